"""djepa.ops.masked_attention (eager, Triton, CUDA) and djepa.nn.MaskedAttention / Block."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from djepa import backends
from djepa.nn import Block, MaskedAttention, Mlp
from djepa.ops import masked_attention, masked_attention_reference
from djepa.ops.attention import _compact, _eager_attention
from djepa.testing import assert_close_to_reference, poison_

HAS_GPU = torch.cuda.is_available()
# fp16: the kernels round P and dS to fp16 before the gradient GEMMs (as flash-attention does),
# so a gradient summed over many queries may sit a few fp16 ulps of O(1) values past 2x eager.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _inputs(B, H, Nq, Nk, D, dtype, device, density=0.5, gen=None):
    q = torch.randn(B, H, Nq, D, dtype=dtype, device=device)
    k = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    v = torch.randn(B, H, Nk, D, dtype=dtype, device=device)
    mask = torch.rand(B, Nk, device=device) < density
    return q, k, v, mask


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def check_against_reference(q, k, v, mask, backend, scale=None):
    """Output and dq/dk/dv of `backend` vs float64 eager, bound by eager in the input dtype."""
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    fast = _grads(lambda a, b, c: masked_attention(a, b, c, mask, scale=scale, backend=backend), q, k, v, do)
    ref = _grads(
        lambda a, b, c: masked_attention_reference(a, b, c, mask, scale=scale),
        q.double().cpu(), k.double().cpu(), v.double().cpu(), do.double().cpu(),
    )
    upcast = q.dtype == torch.float32
    lowp = _grads(
        lambda a, b, c: masked_attention_reference(a, b, c, mask, scale=scale, upcast=upcast), q, k, v, do
    )
    for name, f, lo, r in zip(("output", "dq", "dk", "dv"), fast, lowp, ref):
        assert f.dtype == q.dtype and f.shape == r.shape
        assert_close_to_reference(f, lo, r, atol=ATOL[q.dtype], what=f"{backend} {name}")
    return fast


# --------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------
def test_reference_matches_sdpa_and_defines_empty_samples():
    q, k, v, mask = _inputs(3, 2, 7, 9, 16, torch.float64, "cpu", density=0.6)
    mask[0, 0] = True
    mask[1] = False
    out = masked_attention_reference(q, k, v, mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out[[0, 2]], sdpa[[0, 2]])
    naive = (q @ k.transpose(-1, -2) / 4).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1) @ v
    assert torch.isnan(naive[1]).all()  # the difference the docstring documents
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    dense = masked_attention_reference(q, k, v, None, scale=0.3)
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_eager_backward_is_finite_and_zero_for_empty_samples():
    q, k, v, mask = _inputs(2, 2, 5, 6, 8, torch.float64, "cpu")
    mask[0] = False
    mask[1, 2] = True
    o, dq, dk, dv = _grads(lambda a, b, c: masked_attention(a, b, c, mask, backend="eager"), q, k, v,
                           torch.randn(2, 2, 5, 8, dtype=torch.float64))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    # invisible keys of sample 1 get no gradient
    assert torch.equal(dk[1][:, ~mask[1]], torch.zeros_like(dk[1][:, ~mask[1]]))
    assert torch.equal(dv[1][:, ~mask[1]], torch.zeros_like(dv[1][:, ~mask[1]]))
    assert dk[1][:, mask[1]].abs().sum() > 0


def test_compact_puts_visible_keys_first_in_order():
    mask = torch.tensor([[False, True, False, True, True], [False] * 5, [True] * 5])
    idx, cnt = _compact(mask)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert cnt.tolist() == [3, 0, 5]
    assert idx[0].tolist() == [1, 3, 4, 0, 2]
    assert sorted(idx[1].tolist()) == list(range(5))
    assert idx[2].tolist() == list(range(5))


# --------------------------------------------------------------------------------------------
# Triton (interpreter on the CPU here, the GPU on the GPU machine)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,density", [(32, 1.0), (64, 0.5), (80, 0.25), (128, 0.25), (128, 1.0)])
def test_triton_matches_reference(triton_device, dtype, D, density):
    q, k, v, mask = _inputs(2, 2, 29, 37, D, dtype, triton_device, density)
    mask[:, 0] = True
    check_against_reference(q, k, v, mask, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "B,H,Nq,Nk",
    [(1, 1, 1, 1), (1, 2, 5, 33), (2, 1, 40, 3), (1, 3, 17, 16), (2, 2, 16, 17)],
    ids=["N1", "Nq<Nk", "Nq>Nk", "odd", "tail"],
)
def test_triton_shapes(triton_device, dtype, B, H, Nq, Nk):
    q, k, v, mask = _inputs(B, H, Nq, Nk, 32, dtype, triton_device, 0.6)
    mask[:, -1] = True
    check_against_reference(q, k, v, mask, "triton", scale=0.37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dense_without_mask(triton_device, dtype):
    q, k, v, _ = _inputs(2, 2, 19, 23, 64, dtype, triton_device)
    check_against_reference(q, k, v, None, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_samples_without_visible_keys(triton_device, dtype):
    q, k, v, mask = _inputs(3, 2, 9, 21, 32, dtype, triton_device, 0.3)
    mask[1] = False
    mask[0, 3] = True
    mask[2, 20] = True
    o, dq, dk, dv = check_against_reference(q, k, v, mask, "triton")
    for t in (o, dq, dk, dv):
        assert torch.equal(t[1], torch.zeros_like(t[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_strided_views_of_fused_qkv(triton_device, dtype):
    B, N, H, D = 2, 13, 2, 32
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=triton_device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask = torch.rand(B, N, device=triton_device) < 0.5
    mask[:, 0] = True
    check_against_reference(q, k, v, mask, "triton")
    # a head-sliced, token-strided view too
    big = torch.randn(B, 2 * H, 2 * N, D, dtype=dtype, device=triton_device)
    check_against_reference(big[:, ::2, ::2], big[:, 1::2, ::2], big[:, 1::2, 1::2], mask, "triton")


@pytest.mark.parametrize("masked", [True, False])
def test_triton_kernels_write_every_output(triton_device, masked):
    """Poisoned (NaN) outputs and workspaces: every element must be written by the kernels."""
    from djepa.kernels import attention as kern

    B, H, Nq, Nk, D, scale = 2, 2, 18, 35, 80, 0.11
    q, k, v, mask = _inputs(B, H, Nq, Nk, D, torch.float32, triton_device, 0.4)
    mask[0] = False
    mask[1, 34] = True
    kv_index, kv_count = _compact(mask) if masked else (None, None)
    o = poison_(torch.empty(B, H, Nq, D, device=triton_device))
    lse = poison_(torch.empty(B, H, Nq, device=triton_device))
    kern.attention_fwd(q, k, v, o, lse, kv_index, kv_count, scale)
    m = mask if masked else None
    ref = _eager_attention(q.double(), k.double(), v.double(), m, scale)[0]
    assert_close_to_reference(o, _eager_attention(q, k, v, m, scale)[0], ref, atol=1e-5)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if masked:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref_lse = torch.logsumexp(s, -1).nan_to_num(neginf=0.0)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    if masked:
        assert torch.equal(lse[0], torch.zeros_like(lse[0]))

    do = torch.randn_like(o)
    dq, dk, dv = (poison_(torch.empty_like(t)) for t in (q, k, v))
    delta = poison_(torch.empty(B, H, Nq, device=triton_device))
    kern.attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale)
    for t in (dq, dk, dv, delta):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(delta, (do * o).sum(-1), rtol=1e-5, atol=1e-5)
    if masked:
        hidden = ~mask[:, None, :, None].expand_as(dk)
        assert torch.equal(dk[hidden], torch.zeros_like(dk[hidden]))
        assert torch.equal(dv[hidden], torch.zeros_like(dv[hidden]))


def test_triton_is_deterministic(triton_device):
    q, k, v, mask = _inputs(2, 2, 33, 29, 32, torch.float16, triton_device, 0.5)
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    run = lambda: _grads(lambda a, b, c: masked_attention(a, b, c, mask, backend="triton"), q, k, v, do)  # noqa: E731
    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@settings(max_examples=8, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 2), Nq=st.integers(1, 20), Nk=st.integers(1, 20),
    D=st.sampled_from([8, 24, 32, 48]), density=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float16]), use_mask=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_property(B, H, Nq, Nk, D, density, dtype, use_mask, seed):
    device = torch.device("cpu") if backends.interpreter_enabled() else torch.device("cuda")
    if backends.triton_unavailable_reason("masked_attention", device):
        pytest.skip(backends.triton_unavailable_reason("masked_attention", device))
    torch.manual_seed(seed)
    q, k, v, mask = _inputs(B, H, Nq, Nk, D, dtype, device, density)
    check_against_reference(q, k, v, mask if use_mask else None, "triton")


def test_torch_library_op_passes_opcheck(triton_device):
    q, k, v, mask = _inputs(1, 2, 9, 11, 32, torch.float32, triton_device, 0.5)
    mask[0, 0] = True
    kv_index, kv_count = _compact(mask)
    args = tuple(t.requires_grad_() for t in (q, k, v)) + (kv_index, kv_count, 0.2, "triton")
    torch.library.opcheck(torch.ops.djepa.masked_attention.default, args)


def test_torch_compile_traces_without_graph_breaks(triton_device):
    q, k, v, mask = _inputs(1, 2, 9, 11, 32, torch.float32, triton_device, 0.5)
    mask[0, 1] = True

    def f(q, k, v, mask):
        return masked_attention(q, k, v, mask, backend="triton").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*qs, mask)
    out.backward()
    qe = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*qe, mask).backward()
    torch.testing.assert_close(out, f(q, k, v, mask))
    for a, b in zip(qs, qe):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Backend selection and bad input
# --------------------------------------------------------------------------------------------
def test_backend_selection_explains_refusals(triton_device):
    q, k, v, mask = _inputs(1, 1, 4, 4, 32, torch.float64, "cpu")
    if backends.cuda_unavailable_reason("masked_attention", q.device):
        with pytest.raises(ValueError, match="backend='cuda' cannot serve"):
            masked_attention(q, k, v, mask, backend="cuda")
    with pytest.raises(ValueError, match="float64"):  # on the device Triton runs on: the dtype refusal
        masked_attention(*(t.to(triton_device) for t in (q, k, v, mask)), backend="triton")
    with pytest.raises(ValueError, match="not one of"):
        masked_attention(q, k, v, mask, backend="fast")
    torch.testing.assert_close(masked_attention(q, k, v, mask), masked_attention(q, k, v, mask, backend="eager"))


def test_triton_refuses_bf16_under_the_interpreter():
    if not backends.interpreter_enabled():
        pytest.skip("the interpreter is off here")
    q, k, v, mask = _inputs(1, 1, 4, 4, 32, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="bfloat16"):
        masked_attention(q, k, v, mask, backend="triton")
    assert masked_attention(q, k, v, mask).dtype == torch.bfloat16  # auto -> eager on the CPU


def test_cuda_reason_names_head_dim_and_dtype():
    from djepa.ops.attention import _cuda_reason

    assert "head dims" in _cuda_reason(torch.empty(1, 1, 1, 48, dtype=torch.float16))
    assert "float32" in _cuda_reason(torch.empty(1, 1, 1, 64, dtype=torch.float32))
    assert _cuda_reason(torch.empty(1, 1, 1, 80, dtype=torch.bfloat16)) is None


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda q, k, v, m: (q[:1], k, v, m), ValueError, "batch"),
        (lambda q, k, v, m: (q[:, :1], k, v, m), ValueError, "head counts"),
        (lambda q, k, v, m: (q[..., :16], k, v, m), ValueError, "head dims"),
        (lambda q, k, v, m: (q, k, v[:, :, :3], m), ValueError, "keys"),
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, "4-D"),
        (lambda q, k, v, m: (q, k, v, m[:, :3]), ValueError, "shape"),
        (lambda q, k, v, m: (q, k, v, m.float()), TypeError, "torch.bool"),
        (lambda q, k, v, m: (q, k, v, m.tolist()), TypeError, "bool tensor"),
        (lambda q, k, v, m: (q.half(), k, v, m), TypeError, "share a dtype"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), TypeError, "dtype"),
        (lambda q, k, v, m: (q.transpose(-1, -2), k, v, m), ValueError, "head dims"),
        (lambda q, k, v, m: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, m), ValueError,
         "contiguous last dim"),
        (lambda q, k, v, m: (q.numpy(), k, v, m), TypeError, "torch.Tensor"),
        (lambda q, k, v, m: (q, k.to("meta"), v, m), ValueError, "one device"),
        (lambda q, k, v, m: (q.to("meta"), k.to("meta"), v.to("meta"), m), ValueError, "key_mask is on"),
    ],
)
def test_bad_input(change, error, match):
    q, k, v, mask = _inputs(2, 2, 5, 6, 32, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        masked_attention(*change(q, k, v, mask))


def test_bad_scale():
    q, k, v, mask = _inputs(1, 1, 3, 3, 8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="scale"):
        masked_attention(q, k, v, mask, scale=torch.tensor(0.5))
    with pytest.raises(ValueError, match="finite"):
        masked_attention(q, k, v, mask, scale=float("nan"))


def test_empty_batch_and_no_keys(triton_device):
    q, k, v, mask = _inputs(0, 2, 5, 6, 32, torch.float32, triton_device)
    assert masked_attention(q, k, v, mask, backend="triton").shape == (0, 2, 5, 32)
    q, k, v, mask = _inputs(2, 1, 5, 0, 32, torch.float32, triton_device)
    q.requires_grad_()
    out = masked_attention(q, k, v, mask, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernels (djepa._C) and Triton in bf16
# --------------------------------------------------------------------------------------------
def _need_cuda_kernels():
    reason = backends.cuda_unavailable_reason("masked_attention", torch.device("cuda"))
    if reason:
        pytest.fail(f"djepa._C cannot run masked attention on this GPU machine: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_cuda_matches_reference(dtype, D, density):
    _need_cuda_kernels()
    q, k, v, mask = _inputs(2, 3, 197, 203, D, dtype, "cuda", density)
    mask[0] = False
    mask[1, 5] = True
    o, dq, dk, dv = check_against_reference(q, k, v, mask, "cuda")
    for t in (o, dq, dk, dv):
        assert torch.equal(t[0], torch.zeros_like(t[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 2, 65, 300), (1, 4, 300, 7)])
def test_cuda_shapes_views_and_dense(shape):
    _need_cuda_kernels()
    B, H, Nq, Nk = shape
    q, k, v, mask = _inputs(B, H, Nq, Nk, 64, torch.bfloat16, "cuda", 0.5)
    mask[:, 0] = True
    check_against_reference(q, k, v, mask, "cuda")
    check_against_reference(q, k, v, None, "cuda")
    qkv = torch.randn(B, Nk, 3, H, 64, dtype=torch.float16, device="cuda").permute(2, 0, 3, 1, 4)
    check_against_reference(qkv[0], qkv[1], qkv[2], mask, "cuda")


@pytest.mark.gpu
def test_cuda_kernels_write_every_output_and_are_deterministic():
    _need_cuda_kernels()
    from djepa.ops.attention import _bwd_impl, _fwd_impl

    q, k, v, mask = _inputs(2, 2, 130, 257, 80, torch.bfloat16, "cuda", 0.3)
    mask[0] = False
    mask[1, 256] = True
    idx, cnt = _compact(mask)
    runs = []
    for _ in range(2):
        torch.cuda.empty_cache()
        poison_(torch.empty(64 << 20, device="cuda"))  # reused by the allocations below
        o, lse = _fwd_impl(q, k, v, idx, cnt, 0.1, "cuda")
        grads = _bwd_impl(torch.ones_like(o), q, k, v, o, lse, idx, cnt, 0.1, "cuda")
        runs.append((o, lse, *grads))
    for a, b in zip(*runs):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    hidden = ~mask[:, None, :, None].expand_as(runs[0][3])
    assert (runs[0][3][hidden] == 0).all() and (runs[0][4][hidden] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
def test_triton_bf16_on_gpu(D):
    q, k, v, mask = _inputs(2, 2, 150, 170, D, torch.bfloat16, "cuda", 0.25)
    mask[:, 0] = True
    check_against_reference(q, k, v, mask, "triton")


@pytest.mark.gpu
def test_auto_picks_a_kernel_on_gpu():
    from djepa.ops import _dispatch
    from djepa.ops.attention import _cuda_reason, _triton_reason

    q = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16, device="cuda")
    chosen = _dispatch.select_backend("masked_attention", "auto", q.device,
                                      cuda_reason=_cuda_reason(q), triton_reason=_triton_reason(q))
    assert chosen in ("cuda", "triton")


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class _TimmAttention(nn.Module):
    """timm's Attention, written out: the naming and math our module must match."""

    def __init__(self, dim, num_heads, qkv_bias, qk_norm, norm_layer):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, qk_norm, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = _TimmAttention(dim, num_heads, qkv_bias, qk_norm, norm_layer)
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_norm_weight else 0.0))
    return module


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_block_matches_timm_math_with_loaded_weights(qk_norm, backend):
    if backend == "triton" and backends.triton_unavailable_reason(
            "masked_attention", torch.device("cpu") if backends.interpreter_enabled() else torch.device("cuda")):
        pytest.skip("Triton cannot run here")
    device = "cpu" if backends.interpreter_enabled() or not HAS_GPU else "cuda"
    norm = partial(nn.LayerNorm, eps=1e-6)
    ref = _randomize(_TimmBlock(64, 2, 2.0, True, qk_norm, norm)).to(device)
    ours = Block(64, 2, mlp_ratio=2.0, qkv_bias=True, qk_norm=qk_norm, norm_layer=norm, backend=backend).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 11, 64, device=device)
    mask = torch.rand(2, 11, device=device) < 0.5
    mask[:, 3] = True
    torch.testing.assert_close(ours(x, mask), ref(x, mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    w = torch.randn(2, 11, 64, device=device)
    (ours(x, mask) * w).sum().backward()
    (ref(x, mask) * w).sum().backward()
    # k's bias has a zero gradient in exact math (softmax is shift-invariant): compare on the
    # scale of the largest gradient, not element-wise relative.
    grad_scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * grad_scale, msg=name)


def test_module_names_and_shapes_match_timm():
    ours = Block(48, 3, qkv_bias=True, qk_norm=True)
    expected = {
        "norm1.weight": (48,), "norm1.bias": (48,), "attn.qkv.weight": (144, 48), "attn.qkv.bias": (144,),
        "attn.q_norm.weight": (16,), "attn.q_norm.bias": (16,), "attn.k_norm.weight": (16,),
        "attn.k_norm.bias": (16,), "attn.proj.weight": (48, 48), "attn.proj.bias": (48,),
        "norm2.weight": (48,), "norm2.bias": (48,), "mlp.fc1.weight": (192, 48), "mlp.fc1.bias": (192,),
        "mlp.fc2.weight": (48, 192), "mlp.fc2.bias": (48,),
    }
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert ours.norm1.eps == 1e-6
    assert isinstance(ours.mlp, Mlp) and isinstance(ours.mlp.act, nn.GELU)
    ls = Block(48, 3, init_values=1e-5)
    assert tuple(ls.state_dict()["ls1.gamma"].shape) == (48,)


def test_attention_dropout_runs_eager_in_training_only():
    attn = MaskedAttention(32, num_heads=2, attn_drop=0.5)
    x = torch.randn(2, 9, 32)
    mask = torch.rand(2, 9) < 0.5
    mask[:, 0] = True
    attn.eval()
    ev = attn(x, mask)
    torch.testing.assert_close(ev, attn(x, mask))
    attn.train()
    torch.manual_seed(1)
    tr = attn(x, mask)
    assert tr.shape == ev.shape and torch.isfinite(tr).all()
    assert not torch.allclose(tr, ev)
    with pytest.raises(TypeError, match="torch.bool"):
        attn(x, mask.float())


def test_module_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        MaskedAttention(30, num_heads=4)
    attn = MaskedAttention(32, num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, N, dim\]"):
        attn(torch.randn(9, 32))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        attn(torch.randn(2, 9, 32), torch.ones(2, 8, dtype=torch.bool))


def test_module_all_masked_sample_gives_projection_bias():
    attn = MaskedAttention(32, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = attn(x, mask)
    torch.testing.assert_close(out[1], attn.proj.bias.expand(5, 32))
    assert math.isfinite(out.sum().item())


# --------------------------------------------------------------------------------------------
# Head dims served as two column blocks (no padding to the next power of two)
# --------------------------------------------------------------------------------------------
def test_head_dims_split_instead_of_padding():
    from djepa.kernels.attention import _head_split

    assert _head_split(80) == (64, 16)  # the H preset: 80 columns of MMA work, not 128
    assert _head_split(96) == (64, 32)
    assert _head_split(48) == (32, 16)
    assert _head_split(160) == (128, 32)
    for D in (16, 32, 64, 128, 256):
        assert _head_split(D) == (D, 0)
    assert _head_split(100) == (128, 0)  # 64 + 64 would be no less padding
    assert _head_split(8) == (16, 0)
    for D in range(1, 257):
        lo, hi = _head_split(D)
        assert lo + hi >= D and lo >= 16 and hi in (0,) + tuple(2 ** i for i in range(4, 8)) and hi <= lo


@pytest.mark.parametrize("D,dtype,masked", [(80, torch.float16, True), (80, torch.float32, False),
                                            (48, torch.float16, False), (96, torch.float32, True),
                                            (160, torch.float16, True), (75, torch.float32, True)])
def test_triton_split_head_dims_match_reference(triton_device, D, dtype, masked):
    """Forward and gradients of the two-block head dim (both blocks masked to D where D is
    not their sum, e.g. 75 = 64 + 16 - 5), with the odd query/key counts of the tails."""
    q, k, v, mask = _inputs(2, 2, 21, 19, D, dtype, triton_device, 0.5)
    mask[:, 3] = True
    check_against_reference(q, k, v, mask if masked else None, "triton")


# The CUDA path's plumbing, checked on the CPU with a stand-in for djepa._C
# --------------------------------------------------------------------------------------------
class _FakeAttentionC:
    """djepa._C's attention entry points as seen from Python (the kernels do not run): checks
    what the real one checked before touching the GPU (it raised for Nk < 1 before it took
    Nk = 0) and records the device current at the call (set by the fake device guard) and the
    device of the stream it was given."""

    def __init__(self, guard):
        self.guard, self.calls = guard, []

    def _record(self, name, stream, Nk):
        if Nk < 1:
            raise ValueError(f"djepa._C.{name}: sizes must be >= 1, got Nk={Nk}")
        self.calls.append((name, self.guard.current, _STREAMS[stream]))

    def masked_attention_fwd(self, q, k, v, o, lse, kv_index, kv_count, B, H, Nq, Nk, D, qs, ks, vs, scale,
                             dtype, stream):
        self._record("masked_attention_fwd", stream, Nk)

    def masked_attention_bwd(self, q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, B, H, Nq, Nk, D,
                             qs, ks, vs, scale, dtype, stream):
        self._record("masked_attention_bwd", stream, Nk)


_STREAMS = {}


class _FakeGuard:
    """Stands in for _dispatch.on_device: `current` is the device a launch would go to."""

    def __init__(self):
        self.current, self.entered = None, []

    def __call__(self, device):
        import contextlib

        @contextlib.contextmanager
        def cm():
            prev, self.current = self.current, device
            self.entered.append(device)
            try:
                yield
            finally:
                self.current = prev
        return cm()


def _fake_cuda(monkeypatch, ext_cls):
    from djepa.ops import _dispatch

    guard = _FakeGuard()
    ext = ext_cls(guard)
    monkeypatch.setattr(backends, "cuda_extension", lambda: ext)
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(_dispatch, "on_device", guard)

    def stream_handle(device):
        _STREAMS[id(device) + 7] = device
        return id(device) + 7
    monkeypatch.setattr(_dispatch, "stream_handle", stream_handle)
    return ext, guard


def test_cuda_path_launches_under_the_tensors_device_on_its_stream(monkeypatch):
    ext, guard = _fake_cuda(monkeypatch, _FakeAttentionC)
    q, k, v, mask = _inputs(1, 2, 5, 7, 64, torch.float16, "cpu")
    q.requires_grad_()
    masked_attention(q, k, v, mask, backend="cuda").sum().backward()
    assert [c[0] for c in ext.calls] == ["masked_attention_fwd", "masked_attention_bwd"]
    for name, current, stream_device in ext.calls:
        assert current == q.device, f"{name} ran outside the tensors' device guard"
        assert stream_device == q.device, f"{name} got another device's stream"
    assert guard.current is None  # restored


def test_on_device_makes_the_tensors_gpu_current_and_restores_it(monkeypatch):
    from djepa.ops import _dispatch

    seen = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            seen.append(("enter", self.device))

        def __exit__(self, *exc):
            seen.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Device)
    with _dispatch.on_device(torch.device("cuda", 1)):
        seen.append("launch")
    assert seen == [("enter", torch.device("cuda", 1)), "launch", ("exit", torch.device("cuda", 1))]
    seen.clear()
    with _dispatch.on_device(torch.device("cpu")):
        pass
    assert seen == []


@pytest.mark.parametrize("masked", [False, True])
def test_no_keys_gives_zeros_and_zero_gradients_on_every_backend(monkeypatch, masked, triton_device):
    """Nk = 0 (the docstring's defined edge case) on eager and Triton, and on the CUDA path as
    the Python side drives it (the stand-in raises, as djepa._C did, if it is asked to run)."""
    for backend, device, dtype in (("eager", "cpu", torch.float32), ("triton", triton_device, torch.float32),
                                   ("cuda", "cpu", torch.float16)):
        if backend == "cuda":
            _fake_cuda(monkeypatch, _FakeAttentionC)
        q, k, v, mask = _inputs(2, 2, 5, 0, 64, dtype, device)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = masked_attention(q, k, v, mask if masked else None, backend=backend)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out)), backend
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape, backend


@pytest.mark.gpu
def test_cuda_runs_on_the_tensors_gpu_when_another_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _need_cuda_kernels()
    torch.cuda.set_device(0)
    q, k, v, mask = _inputs(2, 2, 70, 90, 64, torch.bfloat16, "cuda:1")
    side = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(side):  # side becomes cuda:1's current stream (and cuda:1 current) ...
        torch.cuda.set_device(0)  # ... then cuda:0 is made current again, as in a user's program
        assert torch.cuda.current_device() == 0 and torch.cuda.current_stream(1) == side
        check_against_reference(q, k, v, mask, "cuda")
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
