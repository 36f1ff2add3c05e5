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

    def g(q, k, v, mask):  # dropout: its generator draw traces too, and replays the same stream
        return masked_attention(q, k, v, mask, dropout_p=0.25, backend="triton").sum()

    compiled = torch.compile(g, backend="aot_eager", fullgraph=True)
    qs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out = compiled(*qs, mask)
    out.backward()
    qe = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    ref = g(*qe, mask)
    ref.backward()
    assert torch.equal(out, ref)
    for a, b in zip(qs, qe):
        assert torch.equal(a.grad, b.grad)


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
    from djepa.ops.attention import cuda_reason

    assert "head dims" in cuda_reason(torch.empty(1, 1, 1, 48, dtype=torch.float16))
    assert "float32" in cuda_reason(torch.empty(1, 1, 1, 64, dtype=torch.float32))
    assert cuda_reason(torch.empty(1, 1, 1, 80, dtype=torch.bfloat16)) is None


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
# Dropout (the keep rule: djepa.ops.attention's docstring)
# --------------------------------------------------------------------------------------------
def check_dropout_against_reference(q, k, v, mask, backend, p, scale=None, generator=None):
    """Output and dq/dk/dv of `backend` with dropout vs the eager reference applying the mask the
    kernel returned (return_dropout_mask), under the tolerance rule. Returns (fast, keep)."""
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o, keep = masked_attention(*leaves, mask, dropout_p=p, generator=generator, scale=scale, backend=backend,
                               return_dropout_mask=True)
    assert keep.dtype == torch.bool and keep.shape == (*q.shape[:3], k.shape[2])
    fast = (o, *torch.autograd.grad(o, leaves, do))
    kw = dict(scale=scale, dropout_p=p)
    ref = _grads(lambda a, b, c: masked_attention_reference(a, b, c, None if mask is None else mask.cpu(),
                                                            dropout_mask=keep.cpu(), **kw),
                 q.double().cpu(), k.double().cpu(), v.double().cpu(), do.double().cpu())
    upcast = q.dtype == torch.float32
    lowp = _grads(lambda a, b, c: masked_attention_reference(a, b, c, mask, upcast=upcast, dropout_mask=keep, **kw),
                  q, k, v, do)
    for name, f, lo, r in zip(("output", "dq", "dk", "dv"), fast, lowp, ref):
        assert f.dtype == q.dtype and f.shape == r.shape
        assert_close_to_reference(f, lo, r, atol=ATOL[q.dtype], what=f"{backend} dropout {name}")
    return fast, keep


def _generator(device, seed):
    return torch.Generator(device=torch.device(device).type).manual_seed(seed)


def test_the_keep_rule_is_philox_4x32_10_with_a_16_bit_threshold():
    from djepa.ops.attention import _philox, dropout_keep_reference, dropout_threshold

    zero, ones = torch.tensor(0), torch.tensor(0xFFFFFFFF)
    assert [int(x) for x in _philox(zero, zero, zero, zero, zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(x) for x in _philox(ones, ones, ones, ones, torch.tensor(-1))] == [0x408F276D, 0x41C83B0E,
                                                                                  0xA20BC7C6, 0x6D5451FD]
    assert (dropout_threshold(0.0), dropout_threshold(0.1), dropout_threshold(0.5)) == (0, 6554, 32768)
    assert dropout_threshold(1 - 1e-9) == 65535
    rng = torch.tensor([123456789012345, 77])
    keep = dropout_keep_reference(rng, 0.5, 1, 2, 16, 16)
    # one Philox call covers queries {i, i + 8} x keys {j, j + 1, j + 8, j + 9}; another offset,
    # head or seed gives other bits
    assert 0.35 < keep.float().mean() < 0.65
    for other in (torch.tensor([123456789012345, 78]), torch.tensor([123456789012346, 77])):
        assert not torch.equal(dropout_keep_reference(other, 0.5, 1, 2, 16, 16), keep)
    assert not torch.equal(keep[0, 0], keep[0, 1])


@pytest.mark.parametrize("dtype,D,masked", [(torch.float32, 32, True), (torch.float16, 64, False),
                                            (torch.float32, 80, True)])
def test_triton_dropout_matches_eager_with_the_same_mask(triton_device, dtype, D, masked):
    """Forward and gradients against the reference with the kernel's own mask, which is the keep
    rule's (dropout_keep_reference over the compacted keys); tails in queries and keys."""
    from djepa.ops.attention import _uncompact, dropout_keep_reference, philox_state

    q, k, v, mask = _inputs(2, 1, 21, 35, D, dtype, triton_device, 0.6)
    mask[0, 0] = mask[1, 34] = True
    mask = mask if masked else None
    _, keep = check_dropout_against_reference(q, k, v, mask, "triton", 0.3, generator=_generator(triton_device, 5))
    rng = philox_state(_generator(triton_device, 5), q.device)
    rule = dropout_keep_reference(rng, 0.3, 2, 1, 21, 35).to(keep.device)
    assert torch.equal(keep, rule if mask is None else _uncompact(rule, *_compact(mask)))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_dropout_follows_the_generator(triton_device, backend):
    """The same generator state gives the same result on a backend; each call advances it; no
    generator means the device's default one."""
    device = "cpu" if backend == "eager" else triton_device
    q, k, v, mask = _inputs(1, 2, 16, 20, 16, torch.float32, device)
    mask[0, 0] = True
    g = _generator(device, 3)
    first = masked_attention(q, k, v, mask, dropout_p=0.5, generator=g, backend=backend)
    second = masked_attention(q, k, v, mask, dropout_p=0.5, generator=g, backend=backend)
    assert not torch.equal(first, second)
    g.manual_seed(3)
    assert torch.equal(masked_attention(q, k, v, mask, dropout_p=0.5, generator=g, backend=backend), first)
    torch.manual_seed(7)
    a = masked_attention(q, k, v, mask, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    assert torch.equal(masked_attention(q, k, v, mask, dropout_p=0.5, backend=backend), a)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_dropout_statistics(triton_device, backend):
    """Over many calls: the kept fraction of the visible probabilities is 1 - p within 4
    standard errors; the mean output approaches the output without dropout (its error shrinks as
    1 / sqrt(calls)); masked keys are never kept; a sample without visible keys stays zero."""
    device = "cpu" if backend == "eager" else triton_device
    p, calls = 0.3, 10
    q, k, v, mask = _inputs(2, 1, 32, 32, 16, torch.float32, device, 0.5)
    mask[1] = False
    no_dropout = masked_attention_reference(q, k, v, mask)
    g = _generator(device, 11)
    kept = seen = 0
    total = torch.zeros_like(no_dropout)
    visible = mask[:, None, None, :].expand(2, 1, 32, 32)
    for _ in range(calls):
        o, keep = masked_attention(q, k, v, mask, dropout_p=p, generator=g, backend=backend, return_dropout_mask=True)
        assert not keep[~visible].any()
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        kept += int(keep[visible].sum())
        seen += int(visible.sum())
        total += o
    se = math.sqrt(p * (1 - p) / seen)
    assert abs(kept / seen - (1 - p)) < 4 * se, (kept / seen, se)
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    single, mean = rms(o[0] - no_dropout[0]), rms(total[0] / calls - no_dropout[0])
    assert mean < 0.5 * single, (mean, single)  # 1 / sqrt(10) = 0.32 expected


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_poisoned_masked_keys_and_values_never_touch_the_result(triton_device, backend, dropout_p):
    """NaN / Inf in the masked keys and values (padding) change no output and no gradient bit,
    and a sample without any visible key (all poisoned) stays zero."""
    device = "cpu" if backend == "eager" else triton_device
    q, k, v, mask = _inputs(2, 2, 9, 13, 16, torch.float32, device, 0.5)
    mask[0] = False
    mask[1, 0] = True
    hidden = ~mask[:, None, :, None].expand_as(k)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[hidden] = torch.tensor([float("inf"), -float("inf"), float("nan")], device=device).repeat(
        int(hidden.sum()) // 3 + 1)[: int(hidden.sum())]
    v_bad[hidden] = float("nan")
    do = torch.randn_like(q)
    runs = []
    for kk, vv in ((k, v), (k_bad, v_bad)):
        torch.manual_seed(2)
        runs.append(_grads(lambda a, b, c: masked_attention(a, b, c, mask, dropout_p=dropout_p, backend=backend),
                           q, kk, vv, do))
    for name, clean, poisoned in zip(("output", "dq", "dk", "dv"), *runs):
        assert torch.isfinite(poisoned).all(), name
        assert torch.equal(clean, poisoned), name
    assert torch.equal(runs[1][0][0], torch.zeros_like(runs[1][0][0]))


def test_dropout_bad_arguments():
    q, k, v, mask = _inputs(1, 1, 3, 4, 8, torch.float32, "cpu")
    for p, error in ((-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError),
                     (True, TypeError), (torch.tensor(0.1), TypeError)):
        with pytest.raises(error, match="dropout_p"):
            masked_attention(q, k, v, mask, dropout_p=p)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        masked_attention(q, k, v, mask, dropout_p=0.1, generator=3)
    with pytest.raises(ValueError, match="return_dropout_mask needs dropout_p > 0"):
        masked_attention(q, k, v, mask, return_dropout_mask=True)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="both dropout_p > 0 and dropout_mask"):
        masked_attention_reference(q, k, v, mask, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"\[B, H, Nq, Nk\]"):
        masked_attention_reference(q, k, v, mask, dropout_p=0.1, dropout_mask=keep[..., :3])
    with pytest.raises(TypeError, match="bool"):
        masked_attention_reference(q, k, v, mask, dropout_p=0.1, dropout_mask=keep.float())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on"):
            masked_attention(q, k, v, mask, dropout_p=0.1, generator=torch.Generator(device="cuda"))


def test_torch_library_op_with_dropout_passes_opcheck(triton_device):
    from djepa.ops.attention import philox_state

    q, k, v, mask = _inputs(1, 2, 9, 11, 32, torch.float32, triton_device, 0.5)
    mask[0, 0] = True
    kv_index, kv_count = _compact(mask)
    rng = philox_state(_generator(triton_device, 1), q.device)
    args = tuple(t.requires_grad_() for t in (q, k, v)) + (kv_index, kv_count, 0.2, "triton", rng, 0.25, True)
    torch.library.opcheck(torch.ops.djepa.masked_attention.default, args)


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


class _NameSpy:
    """djepa._C as the ops see it, recording the entry points they fetch."""

    def __init__(self, ext):
        self.ext, self.names = ext, []

    def __getattr__(self, name):
        value = getattr(self.ext, name)
        if callable(value):
            self.names.append(name)
        return value


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("masked", [True, False])
def test_cuda_dropout_matches_eager_with_the_same_mask(monkeypatch, dtype, D, masked):
    """The mma.sync dropout kernels (also on sm_90, where the sm_90a kernels have no dropout)
    against the reference with their own mask, which is the keep rule's; an empty sample stays 0."""
    from djepa.ops import _dispatch
    from djepa.ops.attention import _uncompact, dropout_keep_reference, philox_state

    _need_cuda_kernels()
    spy = _NameSpy(backends.cuda_extension())
    monkeypatch.setattr(_dispatch, "extension", lambda: spy)
    q, k, v, mask = _inputs(2, 3, 197, 203, D, dtype, "cuda", 0.5)
    mask[0] = False
    mask[1, 5] = True
    mask = mask if masked else None
    fast, keep = check_dropout_against_reference(q, k, v, mask, "cuda", 0.1, generator=_generator("cuda", 4))
    assert [n for n in spy.names if n.startswith("masked_attention")] == ["masked_attention_fwd",
                                                                         "masked_attention_bwd"]
    rule = dropout_keep_reference(philox_state(_generator("cuda", 4), q.device), 0.1, 2, 3, 197, 203).cuda()
    assert torch.equal(keep, rule if mask is None else _uncompact(rule, *_compact(mask)))
    if masked:
        for t in fast:
            assert torch.equal(t[0], torch.zeros_like(t[0]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_dropout_statistics_on_gpu(backend):
    if backend == "cuda":
        _need_cuda_kernels()
    p, calls = 0.1, 8
    q, k, v, mask = _inputs(4, 4, 320, 320, 64, torch.bfloat16, "cuda", 0.3)
    no_dropout = masked_attention_reference(q, k, v, mask).float()
    g = _generator("cuda", 9)
    kept, seen, total = 0, 0, torch.zeros_like(no_dropout)
    visible = mask[:, None, None, :].expand(4, 4, 320, 320)
    for _ in range(calls):
        o, keep = masked_attention(q, k, v, mask, dropout_p=p, generator=g, backend=backend, return_dropout_mask=True)
        assert not keep[~visible].any()
        kept += int(keep[visible].sum())
        seen += int(visible.sum())
        total += o.float()
    se = math.sqrt(p * (1 - p) / seen)
    assert abs(kept / seen - (1 - p)) < 4 * se, (kept / seen, se)
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(total / calls - no_dropout) < 0.5 * rms(o.float() - no_dropout)  # 1 / sqrt(8) = 0.35 expected


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_dropout_in_a_cuda_graph_draws_new_bits_per_replay(backend):
    """The generator state is a device tensor drawn inside the graph: every replay of a captured
    forward + backward uses new bits, and each replay matches the reference with its own mask."""
    if backend == "cuda":
        _need_cuda_kernels()
    q, k, v, mask = _inputs(2, 2, 70, 90, 64, torch.bfloat16, "cuda", 0.5)
    mask[:, 0] = True
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)

    def step():
        o, keep = masked_attention(*leaves, mask, dropout_p=0.3, backend=backend, return_dropout_mask=True)
        return (o, *torch.autograd.grad(o, leaves, do)), keep

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, keep = step()
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(keep.clone())
        ref = _grads(lambda a, b, c: masked_attention_reference(a, b, c, mask.cpu(), dropout_p=0.3,
                                                                dropout_mask=keep.cpu()),
                     q.double().cpu(), k.double().cpu(), v.double().cpu(), do.double().cpu())
        low = _grads(lambda a, b, c: masked_attention_reference(a, b, c, mask, upcast=False, dropout_p=0.3,
                                                                dropout_mask=keep), q, k, v, do)
        for name, f, lo, r in zip(("output", "dq", "dk", "dv"), outs, low, ref):
            assert_close_to_reference(f, lo, r, atol=ATOL[q.dtype], what=f"{backend} graph replay {name}")
    assert not torch.equal(masks[0], masks[1])


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
    from djepa.ops.attention import cuda_reason, triton_reason

    q = torch.empty(1, 1, 4, 64, dtype=torch.bfloat16, device="cuda")
    chosen = _dispatch.select_backend("masked_attention", "auto", q.device,
                                      cuda_reason=cuda_reason(q), triton_reason=triton_reason(q))
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


def test_module_attention_dropout_runs_in_training_only(triton_device):
    """attn_drop is masked_attention's dropout_p in training (the kernel backend named, no eager
    fallback) and 0 in evaluation."""
    attn = MaskedAttention(32, num_heads=2, attn_drop=0.5, backend="triton").to(triton_device)
    x = torch.randn(2, 9, 32, device=triton_device)
    mask = torch.rand(2, 9, device=triton_device) < 0.5
    mask[:, 0] = True
    attn.eval()
    ev = attn(x, mask)
    torch.testing.assert_close(ev, attn(x, mask))
    attn.train()
    torch.manual_seed(1)
    tr = attn(x, mask)
    assert tr.shape == ev.shape and torch.isfinite(tr).all()
    assert not torch.allclose(tr, ev)
    # the same as the op with dropout_p=0.5 on Triton from the same generator state
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(1)
    o = masked_attention(q, k, v, mask, dropout_p=0.5, scale=attn.scale, backend="triton")
    torch.testing.assert_close(tr, attn.proj(o.transpose(1, 2).reshape(2, 9, 32)))
    assert attn.training_backend() == "triton"
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

    def _record(self, name, stream, Nk, *dropout):
        if Nk < 1:
            raise ValueError(f"djepa._C.{name}: sizes must be >= 1, got Nk={Nk}")
        self.calls.append((name, self.guard.current, _STREAMS[stream], dropout))

    def masked_attention_fwd(self, q, k, v, o, lse, kv_index, kv_count, B, H, Nq, Nk, D, qs, ks, vs, scale,
                             dtype, stream, philox=0, dropout_p=0.0, keep_out=0):
        self._record("masked_attention_fwd", stream, Nk, philox, dropout_p, keep_out)

    def masked_attention_bwd(self, q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, B, H, Nq, Nk, D,
                             qs, ks, vs, scale, dtype, stream, philox=0, dropout_p=0.0):
        self._record("masked_attention_bwd", stream, Nk, philox, dropout_p)


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
    for name, current, stream_device, _ in ext.calls:
        assert current == q.device, f"{name} ran outside the tensors' device guard"
        assert stream_device == q.device, f"{name} got another device's stream"
    assert guard.current is None  # restored


@pytest.mark.parametrize("wgmma", [False, True])
def test_cuda_dropout_hands_the_mma_sync_kernels_one_philox_state(monkeypatch, wgmma):
    """With dropout the forward and the backward get the same Philox state tensor and dropout_p
    (and the forward its keep buffer only when asked), from the mma.sync entry points even where
    the sm_90a kernels would serve the call without dropout; a call without dropout passes none."""
    ext, _ = _fake_cuda(monkeypatch, _FakeAttentionC)
    monkeypatch.setattr(backends, "uses_wgmma", lambda op, device: wgmma)
    monkeypatch.setattr(_FakeAttentionC, "masked_attention_fwd_sm90", lambda self, *a, **kw: self.calls.append(
        ("masked_attention_fwd_sm90", None, None, (0, 0.0))), raising=False)
    monkeypatch.setattr(_FakeAttentionC, "masked_attention_bwd_sm90", lambda self, *a, **kw: self.calls.append(
        ("masked_attention_bwd_sm90", None, None, (0, 0.0))), raising=False)
    q, k, v, mask = _inputs(1, 2, 5, 7, 64, torch.float16, "cpu")
    q.requires_grad_()
    masked_attention(q, k, v, mask, dropout_p=0.2, backend="cuda").sum().backward()
    (fwd, _, _, (philox, p, keep)), (bwd, _, _, (philox_b, p_b)) = ext.calls
    assert (fwd, bwd) == ("masked_attention_fwd", "masked_attention_bwd")
    assert philox != 0 and philox == philox_b and p == p_b == 0.2 and keep == 0
    ext.calls.clear()
    out, mask_used = masked_attention(q, k, v, mask, dropout_p=0.2, backend="cuda", return_dropout_mask=True)
    assert ext.calls[0][3][2] != 0 and mask_used.shape == (1, 2, 5, 7)
    ext.calls.clear()
    masked_attention(q, k, v, mask, backend="cuda").sum().backward()
    assert all(c[3][:2] == (0, 0.0) for c in ext.calls)
    sm90 = ["masked_attention_fwd_sm90", "masked_attention_bwd_sm90"]
    assert [c[0] for c in ext.calls] == (sm90 if wgmma else ["masked_attention_fwd", "masked_attention_bwd"])


def test_auto_sends_dropout_where_it_is_served_on_sm90(monkeypatch):
    """On an sm_90 GPU with the sm_90a kernels, auto's static rule keeps djepa._C for calls they
    serve and puts Triton's wgmma first for dropout (the sm_90a kernels have none); djepa info
    says so; an explicit backend="cuda" still serves dropout (mma.sync)."""
    from djepa.ops.attention import _choose_backend, choose_backend

    class Ext:
        cuda_version, cuda_archs, registered = "13.0", "80,90a", ()
        wgmma_ops = ("masked_attention",)
        masked_attention_fwd = masked_attention_bwd = staticmethod(lambda *a: None)

    gpu = torch.device("cuda", 0)
    monkeypatch.setenv("DJEPA_TUNE_TABLE", "off")
    monkeypatch.delenv("DJEPA_SM90_KERNELS", raising=False)
    monkeypatch.setattr(backends, "cuda_extension", lambda: Ext())
    monkeypatch.setattr(backends, "gpu_available", lambda: True)
    monkeypatch.setattr(backends, "device_info", lambda d: {"name": "NVIDIA H200", "capability": (9, 0), "sms": 132})
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda op, device: None)
    backends.reset_caches()
    try:
        assert _choose_backend("auto", gpu, torch.bfloat16, 64, 256, True, False) == "cuda"
        assert _choose_backend("auto", gpu, torch.bfloat16, 64, 256, True, True) == "triton"
        assert choose_backend("cuda", gpu, torch.bfloat16, 64, train=True, dropout_p=0.1) == "cuda"
        order, why = backends.static_rule("masked_attention", gpu, {"D": 64, "dropout": True})
        assert order[0] == "triton" and "no dropout" in why
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
        line = next(ln for ln in backends.describe().splitlines() if "dropout_p > 0" in ln)
        assert "auto -> triton" in line and "mma.sync kernels" in line and "no dropout" in line, line
    finally:
        backends.reset_caches()


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
