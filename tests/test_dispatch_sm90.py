"""djepa._C's sm_90a (wgmma) kernels in the ops: which function a launch calls, and its results.

CPU: the extension and the GPU are faked; the tests check that backend="cuda" calls the sm_90a
entry points on an sm_90 device of a 90a build (and only there: sm_80, other builds, the head
dims they do not serve and DJEPA_SM90_KERNELS=0 go to the mma.sync ones) with the same
arguments, that the extension lists the ops it has wgmma kernels for, and that `auto`'s static
rule prefers them on sm_90 and says so.

GPU (pytest.mark.gpu; on an sm_90 device): the sm_90a kernels against the float64 eager reference
under the tolerance rule, over head dims, densities, empty rows, odd and unequal Nq / Nk, strided
and unaligned views, fp16 / bf16, forced split-K, and both GEMM designs (DJEPA_SM90_GEMM / the
`kernel` argument: 128x128, and 128x256 with its clusters, TMA-store and register epilogues);
the sm_80 kernels (DJEPA_SM90_KERNELS=0) over a few of the same cases, since on a Hopper GPU
nothing else reaches them. CPU: the GEMM design knob reaches both _C calls, and the plans.
"""
import contextlib

import pytest
import torch

from djepa import backends
from djepa.ops import _dispatch, adaln_block, masked_attention, masked_attention_reference
from djepa.ops import attention as attn_op
from djepa.ops import denoise as denoise_op
from djepa.testing import assert_close_to_reference, poison_
from fake_c import Buffers, Call, FakeC, watch_denoise

ATTENTION_FNS = ("masked_attention_fwd", "masked_attention_bwd")
SM90_ATTENTION_FNS = ("masked_attention_fwd_sm90", "masked_attention_bwd_sm90")
WGMMA_OPS = ("masked_attention", "adaln_block", "denoise_step")
GPU = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _fresh_caches():
    backends.reset_caches()
    yield
    backends.reset_caches()


@pytest.fixture(autouse=True)
def _seed(request):
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ----------------------------------------------------------------------------- the extension
def test_the_extension_lists_its_wgmma_ops_only_where_it_has_sm90a_code():
    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip(f"djepa._C is not built here: {backends.cuda_extension_error()}")
    ops = tuple(ext.wgmma_ops)
    if "90a" in backends.parse_archs(ext.cuda_archs):
        assert ops == WGMMA_OPS
        for name in (*SM90_ATTENTION_FNS, "gemm_sm90", "gemm_sm90_splits"):
            assert callable(getattr(ext, name, None)), name
    else:
        assert ops == ()
    assert set(ops) <= set(backends.OPS)


def test_gemm_sm90_splits_plans_without_a_gpu_given_the_sm_count():
    ext = backends.cuda_extension()
    if ext is None or not hasattr(ext, "gemm_sm90_splits"):
        pytest.skip("djepa._C without gemm_sm90_splits")
    assert ext.gemm_sm90_splits(8192, 1024, 1024, sms=132) == 1      # 512 tiles fill 132 SMs
    assert ext.gemm_sm90_splits(1024, 1024, 8192, sms=132) > 1       # weight gradient: 64 tiles, K = tokens
    assert ext.gemm_sm90_splits(1024, 1024, 8192, splits=3, sms=132) == 3
    assert ext.gemm_sm90_splits(128, 128, 64 * 10, splits=6, sms=132) == 5   # no empty split: 2 k tiles each
    assert ext.gemm_sm90_splits(0, 16, 16, sms=132) == 1
    with pytest.raises(ValueError, match="gemm_sm90_splits"):
        ext.gemm_sm90_splits(-1, 16, 16, sms=132)


def test_gemm_sm90_splits_plans_each_design_and_forced_splits_alike():
    """kernel 1 (128x128) plans per SM, kernel 2 (128x256) per 2-CTA cluster (sms / 2 of them
    here), kernel 0 by shape; a forced split count is clamped alike, so one workspace size holds
    for whichever design a call then runs."""
    ext = backends.cuda_extension()
    if ext is None or "kernel" not in (ext.gemm_sm90_splits.__doc__ or ""):
        pytest.skip("djepa._C without gemm_sm90_splits(kernel=)")
    plan = lambda M, N, K, **kw: ext.gemm_sm90_splits(M, N, K, sms=132, **kw)  # noqa: E731
    # a weight gradient dW [1024, 1024] over 8192 tokens: 64 tiles of 128x128 on 132 SMs; 16
    # cluster units of 256x256 on 66 clusters: both split K, the wider tile more
    assert plan(1024, 1024, 8192, kernel=1) == 2
    assert plan(1024, 1024, 8192, kernel=2) == 4
    assert plan(1024, 1024, 8192, kernel=0) in (2, 4)
    for kernel in (0, 1, 2):
        assert plan(8192, 1024, 1024, kernel=kernel) == 1                  # enough tiles: no split
        assert plan(1024, 1024, 8192, splits=3, kernel=kernel) == 3
        assert plan(128, 128, 64 * 10, splits=6, kernel=kernel) == 5       # no empty split: 2 k tiles each
    with pytest.raises(ValueError, match=r"gemm_sm90_splits: kernel .*=3 is outside \[0, 2\]"):
        plan(16, 16, 16, kernel=3)


# ----------------------------------------------------------------------------- faked GPU
class _Ext(FakeC):
    """A djepa._C stand-in: the attributes the dispatch reads, the denoise entry points of
    tests/fake_c.FakeC (recording the bytes behind every pointer, checked against the contract),
    and the attention entry points recording (name, args) without running anything."""

    def __init__(self, archs="80,90a", wgmma_ops=WGMMA_OPS, splits=1, buffers=None):
        super().__init__(buffers or Buffers(), archs=archs, wgmma_ops=wgmma_ops,
                         sm90_splits=lambda M, N, K: splits if K >= 64 else 1)

    def __getattr__(self, name):
        if name.startswith("masked_attention_"):
            return lambda *args, **kwargs: self.calls.append(Call(name, args, kwargs=kwargs))
        raise AttributeError(name)


@pytest.fixture
def faked(monkeypatch):
    """An sm_90 GPU and a 90a build that are not there: state["capability"] / state["ext"]."""
    state = {"capability": (9, 0), "ext": _Ext()}
    monkeypatch.setattr(backends, "cuda_extension", lambda: state["ext"])
    monkeypatch.setattr(backends, "gpu_available", lambda: True)
    monkeypatch.setattr(backends, "device_info", lambda device: {
        "name": "NVIDIA H200", "capability": state["capability"], "sms": 132})
    monkeypatch.delenv("DJEPA_SM90_KERNELS", raising=False)
    return state


def test_uses_wgmma_follows_the_device_the_build_and_the_switch(faked, monkeypatch):
    for op in WGMMA_OPS:
        assert backends.uses_wgmma(op, GPU)
    assert not backends.uses_wgmma("ema_update_", GPU)
    assert not backends.uses_wgmma("masked_attention", torch.device("cpu"))
    faked["capability"] = (8, 0)
    assert not backends.uses_wgmma("masked_attention", GPU)
    faked["capability"] = (10, 0)  # sm_90a code runs on sm_90 only
    assert not backends.uses_wgmma("masked_attention", GPU)
    faked["capability"] = (9, 0)
    faked["ext"] = _Ext(archs="80,90")  # no arch-specific code: no wgmma in it
    assert not backends.uses_wgmma("masked_attention", GPU)
    faked["ext"] = _Ext(wgmma_ops=("masked_attention",))
    assert backends.uses_wgmma("masked_attention", GPU) and not backends.uses_wgmma("adaln_block", GPU)
    monkeypatch.setenv("DJEPA_SM90_KERNELS", "0")
    assert not backends.uses_wgmma("masked_attention", GPU)


def _device_free_launches(monkeypatch, wgmma):
    """Launches from CPU tensors: no device guard, a dummy stream, and uses_wgmma answered by
    `wgmma` (what the test above checks for real devices)."""
    asked = []

    def uses(op, device):
        asked.append(op)
        return wgmma

    monkeypatch.setattr(backends, "uses_wgmma", uses)
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(_dispatch, "on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_dispatch, "stream_handle", lambda device: 77)
    return asked


def _attention_calls(faked, monkeypatch, wgmma, D, Nk=19, masked=True):
    faked["ext"] = ext = _Ext()
    asked = _device_free_launches(monkeypatch, wgmma)
    qkv = torch.randn(2, Nk, 3, 3, D, dtype=torch.float16).permute(2, 0, 3, 1, 4)  # strided views
    q = torch.randn(2, 3, 13, D, dtype=torch.float16).requires_grad_()
    k, v = qkv[1].requires_grad_(), qkv[2].requires_grad_()
    mask = torch.rand(2, Nk) < 0.5 if masked else None
    out = masked_attention(q, k, v, mask, backend="cuda")
    out.sum().backward()
    return ext.calls, asked


@pytest.mark.parametrize("D", attn_op.SM90_HEAD_DIMS)
def test_cuda_attention_calls_the_sm90_kernels_with_the_sm80_arguments(faked, monkeypatch, D):
    sm90, asked = _attention_calls(faked, monkeypatch, True, D)
    assert [c[0] for c in sm90] == list(SM90_ATTENTION_FNS) and asked == ["masked_attention"] * 2
    torch.manual_seed(1)
    sm80, _ = _attention_calls(faked, monkeypatch, False, D)
    assert [c[0] for c in sm80] == list(ATTENTION_FNS)
    for (_, a90), (_, a80) in zip(sm90, sm80):  # same contract: only the pointers differ
        assert len(a90) == len(a80)
        fwd = len(a90) == 18
        sizes = slice(7, 18) if fwd else slice(12, 23)
        assert a90[sizes] == a80[sizes]
        B, H, Nq, Nk, head_dim, qs, ks, vs = a90[sizes][:8]
        assert (B, H, Nq, Nk, head_dim) == (2, 3, 13, 19, D)
        assert qs == (3 * 13 * D, 13 * D, D) and ks == vs == (19 * 9 * D, D, 9 * D)  # views of the fused qkv
        assert all(isinstance(x, int) and x != 0 for x in a90[:7 if fwd else 12])  # masked: index, count too


@pytest.mark.parametrize("D", [32])
def test_head_dims_without_sm90_kernels_stay_on_mma_sync(faked, monkeypatch, D):
    calls, _ = _attention_calls(faked, monkeypatch, True, D)
    assert [c[0] for c in calls] == list(ATTENTION_FNS)


def test_no_keys_launches_nothing_on_the_sm90_path(faked, monkeypatch):
    calls, _ = _attention_calls(faked, monkeypatch, True, 64, Nk=0, masked=False)
    assert calls == []


@pytest.mark.parametrize("splits", [1, 3])
def test_denoise_gemms_go_to_gemm_sm90_with_a_workspace_for_split_k(faked, monkeypatch, splits):
    faked["ext"] = ext = _Ext(splits=splits, buffers=watch_denoise(monkeypatch))
    _device_free_launches(monkeypatch, True)
    gen = torch.Generator().manual_seed(3)
    M, W = 70, 64
    ts = [torch.randn(*s, generator=gen).half().requires_grad_() for s in
          ((M, W), (M, 3 * W), (W,), (W,), (W, W), (W,), (W, W), (W,))]
    adaln_block(*ts, backend="cuda").sum().backward()
    names = [c[0] for c in ext.calls]
    assert "gemm" not in names and "gemm_splits" not in names
    gemms = ext.named("gemm_sm90")
    assert len(gemms) == 6 and names.count("gemm_sm90_splits") == 6  # 2 forward, 4 backward
    for c in gemms:
        assert len(c[1]) == 19
        assert c.arg["splits"] == splits and (c.arg["workspace"] != 0) == (splits > 1)
        # every split's M x N float32 partial, and the workspace says how many floats it holds
        need = splits * c.arg["M"] * c.arg["N"] if splits > 1 else 0
        assert c.arg["workspace_numel"] == need and c.sizes.get("workspace", 0) == need * 4
    assert [c.arg["epilogue"] for c in gemms] == [1, 2, 16, 3, 16, 0]  # none, SiLU, gate, dSiLU, fp32 weight gradients
    assert [(c.arg["M"], c.arg["N"], c.arg["K"]) for c in gemms] == [
        (M, W, W), (M, W, W), (W, W, M), (M, W, W), (W, W, M), (M, W, W)]


@pytest.mark.parametrize("design, code", [(None, 0), ("auto", 0), ("128x128", 1), ("128x256", 2), (" 128X256 ", 2)])
def test_denoise_gemms_pass_the_design_djepa_sm90_gemm_names(faked, monkeypatch, design, code):
    if design is None:
        monkeypatch.delenv("DJEPA_SM90_GEMM", raising=False)
    else:
        monkeypatch.setenv("DJEPA_SM90_GEMM", design)
    faked["ext"] = ext = _Ext(splits=2, buffers=watch_denoise(monkeypatch))
    _device_free_launches(monkeypatch, True)
    ts = [torch.randn(*s).half().requires_grad_() for s in ((70, 64), (70, 192), (64,), (64,), (64, 64), (64,),
                                                             (64, 64), (64,))]
    adaln_block(*ts, backend="cuda").sum().backward()
    assert [c.arg["kernel"] for c in ext.named("gemm_sm90")] == [code] * 6
    assert [c.arg["kernel"] for c in ext.named("gemm_sm90_splits")] == [code] * 6


def test_an_unknown_gemm_design_is_refused_by_name(faked, monkeypatch):
    monkeypatch.setenv("DJEPA_SM90_GEMM", "256x256")
    faked["ext"] = _Ext(buffers=watch_denoise(monkeypatch))
    _device_free_launches(monkeypatch, True)
    ts = [torch.randn(*s).half() for s in ((5, 16), (5, 48), (16,), (16,), (16, 16), (16,), (16, 16), (16,))]
    with pytest.raises(ValueError, match=r"DJEPA_SM90_GEMM='256x256' is not one of \('auto', '128x128', '128x256'\)"):
        adaln_block(*ts, backend="cuda")


def test_denoise_gemms_stay_on_gemm_where_there_is_no_wgmma(faked, monkeypatch):
    faked["ext"] = ext = _Ext(buffers=watch_denoise(monkeypatch))
    _device_free_launches(monkeypatch, False)
    ts = [torch.randn(*s).half() for s in ((5, 16), (5, 48), (16,), (16,), (16, 16), (16,), (16, 16), (16,))]
    adaln_block(*ts, backend="cuda")
    names = {c[0] for c in ext.calls}
    assert "gemm" in names and not any(n.startswith("gemm_sm90") for n in names)
    assert all(c.sizes["c"] == 5 * 16 * 2 for c in ext.named("gemm"))


def test_static_rule_prefers_the_wgmma_kernels_on_sm90_and_info_says_so(faked, monkeypatch):
    monkeypatch.setenv("DJEPA_TUNE_TABLE", "off")
    for op in WGMMA_OPS:
        order, why = backends.static_rule(op, GPU)
        assert order[0] == "cuda" and "wgmma" in why and "sm_90a" in why, why
    # a head dim the sm_90a kernels do not serve: Triton's wgmma before djepa._C's mma.sync
    order, why = backends.static_rule("masked_attention", GPU, {"D": 32})
    assert order[0] == "triton" and "not 32" in why
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    assert attn_op._choose_backend("auto", GPU, torch.bfloat16, 64, 256, True) == "cuda"
    assert attn_op._choose_backend("auto", GPU, torch.bfloat16, 32, 256, True) == "triton"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    text = backends.describe()
    for op in WGMMA_OPS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(op))
        assert "auto -> cuda" in line and "wgmma" in line, line
    assert "available (sm_90a wgmma kernels)" in text
    assert "sm_90a wgmma kernels for: masked_attention, adaln_block, denoise_step" in text
    assert ("sm90 gemm    auto (by shape: 128x256 clusters or 128x128) (DJEPA_SM90_GEMM: auto | 128x128 | "
            "128x256)") in text
    monkeypatch.setenv("DJEPA_SM90_GEMM", "128x128")
    assert "sm90 gemm    128x128 (the first design)" in backends.describe()
    monkeypatch.setenv("DJEPA_SM90_GEMM", "x")
    assert "sm90 gemm    invalid: DJEPA_SM90_GEMM='x' is not one of" in backends.describe()
    monkeypatch.delenv("DJEPA_SM90_GEMM")
    # the switch turns them off, and the rule goes back to Triton first
    monkeypatch.setenv("DJEPA_SM90_KERNELS", "0")
    backends.reset_caches()
    assert backends.static_rule("masked_attention", GPU)[0][0] == "triton"
    faked["capability"] = (8, 0)
    monkeypatch.delenv("DJEPA_SM90_KERNELS")
    assert backends.static_rule("adaln_block", GPU)[0][0] == "cuda"
    assert "mma.sync" in backends.static_rule("adaln_block", GPU)[1]


# ----------------------------------------------------------------------------- GPU
class _Spy:
    """djepa._C as the ops see it, recording which entry points they fetch."""

    def __init__(self, ext):
        self.ext, self.names = ext, []

    def __getattr__(self, name):
        value = getattr(self.ext, name)
        if callable(value):
            self.names.append(name)
        return value


def sm90_extension():
    """djepa._C on the sm_90 GPU the GPU tests need: a failure where it cannot run there (the GPU
    machine must), a skip on another arch."""
    ext = backends.cuda_extension()
    reason = backends.cuda_unavailable_reason("masked_attention", GPU)
    if reason:
        pytest.fail(f"djepa._C cannot run on this GPU machine: {reason}")
    cap = torch.cuda.get_device_capability(0)
    if cap != (9, 0):
        pytest.skip(f"the sm_90a kernels run on sm_90 GPUs; this one is sm_{cap[0]}{cap[1]}")
    if "90a" not in backends.parse_archs(ext.cuda_archs):
        pytest.fail(f"djepa._C was built for {ext.cuda_archs}, without 90a: no wgmma kernels on this H100/H200")
    return ext


@pytest.fixture
def kernels(request, monkeypatch):
    """"sm90" or "sm80": the djepa._C kernels the test runs (DJEPA_SM90_KERNELS), checked to be
    the ones the ops call."""
    ext = sm90_extension()
    monkeypatch.setenv("DJEPA_SM90_KERNELS", "1" if request.param == "sm90" else "0")
    spy = _Spy(ext)
    monkeypatch.setattr(_dispatch, "extension", lambda: spy)
    return request.param, spy


def _check_attention(q, k, v, mask, kernels, atol=1e-3):
    kind, spy = kernels
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def grads(fn, *t):
        t = [x.detach().requires_grad_() for x in t]
        o = fn(*t)
        return (o, *torch.autograd.grad(o, t, do.to(o.dtype).to(o.device)))

    spy.names.clear()
    fast = grads(lambda a, b, c: masked_attention(a, b, c, mask, backend="cuda"), q, k, v)
    want = SM90_ATTENTION_FNS if kind == "sm90" and q.shape[-1] in attn_op.SM90_HEAD_DIMS else ATTENTION_FNS
    assert [n for n in spy.names if n.startswith("masked_attention")] == list(want)
    m64 = None if mask is None else mask.cpu()
    ref = grads(lambda a, b, c: masked_attention_reference(a, b, c, m64), q.double().cpu(), k.double().cpu(),
                v.double().cpu())
    low = grads(lambda a, b, c: masked_attention_reference(a, b, c, mask, upcast=False), q, k, v)
    for name, f, lo, r in zip(("output", "dq", "dk", "dv"), fast, low, ref):
        assert f.dtype == q.dtype and f.shape == r.shape
        assert_close_to_reference(f, lo, r, atol=atol, what=f"{kind} {name}")
    return fast


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90", "sm80"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_sm90_attention_matches_reference(kernels, dtype, D, density):
    if kernels[0] == "sm80" and (dtype, density) != (torch.bfloat16, 0.25):
        pytest.skip("the sm_80 kernels on sm_90: one dtype and density per head dim")
    B, H, Nq, Nk = 3, 3, 197, 203
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype, device="cuda") for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device="cuda") < density
    mask[0] = False      # a sample without a visible key: zeros, zero gradients
    mask[1, 202] = True  # the last key of the tail tile
    o, dq, dk, dv = _check_attention(q, k, v, mask, kernels)
    for t in (o, dq, dk, dv):
        assert torch.equal(t[0], torch.zeros_like(t[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 65, 300), (1, 4, 300, 7), (2, 1, 129, 1),
                                   (1, 2, 1000, 1031)])
@pytest.mark.parametrize("D", [64, 80])
def test_sm90_attention_shapes_dense_and_masked(kernels, shape, D):
    B, H, Nq, Nk = shape
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.bfloat16, device="cuda") for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device="cuda") < 0.5
    mask[:, 0] = True
    _check_attention(q, k, v, mask, kernels)
    _check_attention(q, k, v, None, kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("layout", ["fused_qkv", "unaligned"])
def test_sm90_attention_strided_views(kernels, D, layout):
    B, H, N = 2, 3, 150
    if layout == "fused_qkv":  # [B, N, 3, H, D] projection viewed as q, k, v: token stride 3HD (TMA)
        qkv = torch.randn(B, N, 3, H, D, dtype=torch.float16, device="cuda").permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:  # rows of D + 1 elements: strides not a multiple of 16 bytes (ordinary loads, no TMA)
        q, k, v = (torch.randn(B, H, N, D + 1, dtype=torch.float16, device="cuda")[..., 1:] for _ in range(3))
    mask = torch.rand(B, N, device="cuda") < 0.4
    mask[:, 3] = True
    _check_attention(q, k, v, mask, kernels)
    _check_attention(q, k, v, None, kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
def test_sm90_attention_writes_every_output_and_is_deterministic(kernels):
    q, k, v = (torch.randn(2, 2, n, 80, dtype=torch.bfloat16, device="cuda") for n in (130, 257, 257))
    mask = torch.rand(2, 257, device="cuda") < 0.3
    mask[0] = False
    mask[1, 256] = True
    idx, cnt = attn_op._compact(mask)
    runs = []
    for _ in range(2):
        torch.cuda.empty_cache()
        poison_(torch.empty(64 << 20, device="cuda"))  # reused by the allocations below
        o, lse = attn_op._fwd_impl(q, k, v, idx, cnt, 0.1, "cuda")
        runs.append((o, lse, *attn_op._bwd_impl(torch.ones_like(o), q, k, v, o, lse, idx, cnt, 0.1, "cuda")))
    assert kernels[1].names.count("masked_attention_fwd_sm90") == 2
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    hidden = ~mask[:, None, :, None].expand_as(runs[0][3])
    assert (runs[0][3][hidden] == 0).all() and (runs[0][4][hidden] == 0).all()


@pytest.fixture
def design(request, monkeypatch):
    """DJEPA_SM90_GEMM for the test: the sm_90a GEMM design the denoise ops run."""
    monkeypatch.setenv("DJEPA_SM90_GEMM", request.param)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90", "sm80"], indirect=True)
@pytest.mark.parametrize("design", ["128x256", "128x128", "auto"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,W", [(333, 64), (4097, 256), (1000, 1024), (77, 36)])
def test_sm90_adaln_block_matches_reference(kernels, design, dtype, M, W):
    """Every epilogue (SiLU, gate, dSiLU, fp32 weight gradients), split-K (K = M tokens in the
    weight gradients) and, at W = 36 (72-byte rows), the producer's ordinary loads (the 128x256
    design hands those calls to the 128x128 kernel); each GEMM design."""
    if kernels[0] == "sm80" and (dtype == torch.float16 or design != "auto"):
        pytest.skip("the sm_80 kernels on sm_90: bf16 only, one GEMM design")
    gen = torch.Generator().manual_seed(M + W)
    base = [torch.randn(M, W, generator=gen, dtype=torch.float64), torch.randn(M, 3 * W, generator=gen) * 0.5,
            1 + 0.1 * torch.randn(W, generator=gen), 0.1 * torch.randn(W, generator=gen),
            torch.randn(W, W, generator=gen) * W ** -0.5, 0.1 * torch.randn(W, generator=gen),
            torch.randn(W, W, generator=gen) * W ** -0.5, 0.1 * torch.randn(W, generator=gen)]
    mk = lambda dt, dev: [t.to(dev, dt).clone().requires_grad_() for t in base]  # noqa: E731
    ref_in, low_in, fast_in = mk(torch.float64, "cpu"), mk(dtype, "cuda"), mk(dtype, "cuda")
    ref = denoise_op.adaln_block_reference(*ref_in)
    low = denoise_op.adaln_block_reference(*low_in)
    kernels[1].names.clear()
    fast = adaln_block(*fast_in, backend="cuda")
    g = torch.randn(M, W, generator=gen, dtype=torch.float64)
    for out, dev, dt in ((ref, "cpu", torch.float64), (low, "cuda", dtype), (fast, "cuda", dtype)):
        out.backward(g.to(dev, dt))
    gemm = "gemm_sm90" if kernels[0] == "sm90" else "gemm"
    assert kernels[1].names.count(gemm) == 6, kernels[1].names
    assert_close_to_reference(fast, low, ref, atol=1e-2)
    for name, f, lo, r in zip(["x", "mod", "ln_w", "ln_b", "w1", "b1", "w2", "b2"], fast_in, low_in, ref_in):
        assert_close_to_reference(f.grad, lo.grad, r.grad, atol=1e-2, what=f"{kernels[0]} d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
@pytest.mark.parametrize("a_trans,b_trans", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("M,N,K", [(300, 200, 1000), (1, 8, 64), (129, 130, 27), (256, 384, 4096)])
@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("kernel", [1, 2])
def test_gemm_sm90_layouts_and_forced_splits(kernels, a_trans, b_trans, M, N, K, splits, kernel):
    ext = backends.cuda_extension()
    gen = torch.Generator().manual_seed(M * N + K)
    # the reference multiplies the bf16 values the kernel gets, in float64
    a64 = torch.randn(M, K, generator=gen, dtype=torch.float64).bfloat16().double()
    b64 = (torch.randn(K, N, generator=gen, dtype=torch.float64) * K ** -0.5).bfloat16().double()
    a = (a64.t().contiguous() if a_trans else a64).to("cuda", torch.bfloat16)
    b = (b64.t().contiguous() if b_trans else b64).to("cuda", torch.bfloat16)
    ref = a64 @ b64
    low = (a.t() if a_trans else a) @ (b.t() if b_trans else b)
    s = ext.gemm_sm90_splits(M, N, K, splits, kernel=kernel)
    ws = torch.empty(s * M * N, device="cuda") if s > 1 else None
    for out_dtype, epilogue in ((torch.bfloat16, 0), (torch.float32, 16)):
        c = poison_(torch.empty(M, N, device="cuda", dtype=out_dtype))
        ext.gemm_sm90(a.data_ptr(), b.data_ptr(), c.data_ptr(), 0, M, N, K, a_trans, b_trans, epilogue, 0, 0, 0,
                      _dispatch.dtype_code(torch.bfloat16), _dispatch.stream_handle(c.device), 0,
                      0 if ws is None else ws.data_ptr(), s, 0 if ws is None else ws.numel(), kernel=kernel)
        assert_close_to_reference(c, low, ref, atol=1e-2,
                                  what=f"gemm_sm90 kernel={kernel} splits={s} out={out_dtype}")


def _epilogue_reference(y, ep, aux1, aux2):
    """c of epilogue `ep` (& 15) on y = op(a) @ op(b) + bias (djepa/ops/denoise.py's contract)."""
    if ep == 1:
        return y * torch.sigmoid(y)
    if ep == 2:
        return aux1 + aux2 * y
    if ep == 3:
        s = torch.sigmoid(aux1)
        return y * s * (1 + aux1 * (1 - s))
    return y


# bf16 with every epilogue, fp16 with SiLU (16-bit out) and gate (fp32 out)
_EPILOGUES = [(torch.bfloat16, e) for e in (0, 1, 2, 3, 16, 17, 18)] + [(torch.float16, e) for e in (1, 18)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
@pytest.mark.parametrize("kernel", [1, 2])
@pytest.mark.parametrize("dtype,epilogue", _EPILOGUES, ids=[f"{str(d)[6:]}-ep{e}" for d, e in _EPILOGUES])
@pytest.mark.parametrize("M,N,K,splits", [(1000, 1024, 1024, 1),   # TMA stores, clusters of 2
                                          (300, 264, 200, 1),      # a cluster's second CTA below M
                                          (100, 520, 136, 1),      # one tile row: a cluster of 1
                                          (257, 45, 64, 1),        # 90-byte rows: register epilogue
                                          (512, 264, 4096, 0),     # split-K by the plan
                                          (130, 130, 520, 3)])     # forced splits, N % 4 != 0
def test_gemm_sm90_each_epilogue_in_each_design(kernels, kernel, dtype, epilogue, M, N, K, splits):
    """Both designs against the float64 reference under the tolerance rule, for every fused
    epilogue (bias, SiLU with aux_out = y, gate with a strided gate and aux_out, dSiLU, fp32
    outputs) over the 128x256 kernel's paths: TMA-store and register epilogues, clusters of 2
    and 1, split-K partials by TMA and by the register path."""
    ext = backends.cuda_extension()
    gen = torch.Generator().manual_seed(M + 7 * N + K + epilogue)
    ep = epilogue & 15
    out_dtype = torch.float32 if epilogue & 16 else dtype
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    a, b, bias = r(M, K), r(N, K, s=K ** -0.5), r(N, s=0.3)
    aux1 = r(M, N) if ep in (2, 3) else None
    gate = r(M, 3 * N + 8)[:, N:2 * N] if ep == 2 else None          # a strided view, row stride 3N + 8
    saves = ep in (1, 2)

    def reference(on, kind):
        t = {torch.float64: torch.float64, "low": dtype}[kind]
        A, B, bb = (x.to(on, t) for x in (a, b, bias))
        y = A @ B.t() + bb
        c = _epilogue_reference(y, ep, None if aux1 is None else aux1.to(on, t),
                                None if gate is None else gate.to(on, t))
        return c, y
    ref_c, ref_y = reference("cuda", torch.float64)
    low_c, low_y = reference("cuda", "low")
    dev = [x if x is None else x.to("cuda") for x in (a, b, bias, aux1)]
    g_dev = None if gate is None else gate.to("cuda")
    if g_dev is not None:  # keep the row stride of the strided view on the device
        full = torch.empty(M, 3 * N + 8, device="cuda", dtype=dtype)
        full[:, N:2 * N] = g_dev
        g_dev = full[:, N:2 * N]
    c = poison_(torch.empty(M, N, device="cuda", dtype=out_dtype))
    y = poison_(torch.empty(M, N, device="cuda", dtype=out_dtype)) if saves else None
    s = ext.gemm_sm90_splits(M, N, K, splits, kernel=kernel)
    ws = torch.empty(s * M * N, device="cuda") if s > 1 else None
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    ext.gemm_sm90(ptr(dev[0]), ptr(dev[1]), ptr(c), ptr(dev[2]), M, N, K, 0, 1, epilogue, ptr(dev[3]), ptr(g_dev),
                  ptr(y), _dispatch.dtype_code(dtype), _dispatch.stream_handle(c.device),
                  0 if g_dev is None else g_dev.stride(0), ptr(ws), s, 0 if ws is None else ws.numel(), kernel=kernel)
    what = f"gemm_sm90 kernel={kernel} {dtype} epilogue={epilogue} {M}x{N}x{K} splits={s}"
    assert_close_to_reference(c, low_c.to(out_dtype), ref_c, atol=1e-2, what=what)
    if saves:
        assert_close_to_reference(y, low_y.to(out_dtype), ref_y, atol=1e-2, what=what + " aux_out")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["sm90"], indirect=True)
def test_gemm_sm90_designs_agree_and_run_again_from_cached_state(kernels):
    """The same call through both designs, twice each (the second from the cached tensor maps,
    attributes and cluster count), on fresh buffers at the same addresses and at new ones."""
    ext = backends.cuda_extension()
    gen = torch.Generator().manual_seed(5)
    M, N, K = 2048, 1536, 1536
    a = torch.randn(M, K, generator=gen).bfloat16().cuda()
    b = (torch.randn(N, K, generator=gen) * K ** -0.5).bfloat16().cuda()
    outs = []
    for kernel in (1, 2, 2, 1, 0):
        c = poison_(torch.empty(M, N, device="cuda", dtype=torch.bfloat16))
        ext.gemm_sm90(a.data_ptr(), b.data_ptr(), c.data_ptr(), 0, M, N, K, 0, 1, 0, 0, 0, 0,
                      _dispatch.dtype_code(torch.bfloat16), _dispatch.stream_handle(c.device), kernel=kernel)
        outs.append(c)
        a = a.clone()  # a new address for the next call's A map
    ref = a.double() @ b.double().t()
    for c in outs:
        assert torch.isfinite(c).all()
        assert_close_to_reference(c, (a @ b.t()), ref.to("cuda"), atol=1e-2, what="gemm_sm90 designs")
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[0], outs[3])  # deterministic per design
