"""Masked attention on the GPU: djepa (cuda, triton) against its peers, in one run, bf16.

For each shape, visible fraction/pattern and mode (forward, forward+backward) it times:
  djepa-cuda, djepa-triton      djepa.ops.masked_attention with the key mask (None when dense)
  eager                         masked softmax in plain torch ops (bf16 matmuls, fp32 softmax)
  sdpa-efficient, sdpa-cudnn, sdpa-math
                                F.scaled_dot_product_attention with the boolean mask, per backend
                                that accepts it (a backend that refuses is skipped, saying why)
  sdpa-flash-dense              SDPA flash backend on ALL keys, no mask: the dense ceiling
  flex                          torch.compile'd FlexAttention with a BlockMask from the same mask
                                (the BlockMask is built once, outside the timed region)
  flash-attn-varlen             flash_attn_varlen_func on the visible keys, unpad included in the
                                timed region (it syncs with the host); skipped if not installed

A peer that fails (forward or backward, compiling or running) is skipped with the reason, and
skipped at once for the rest of the session at that mode and head dim (a forward failure covers
forward+backward): see bench_peers.py. djepa's paths are never skipped that way.

q, k, v are views of one fused qkv projection ``[B, N, 3, H, D]`` (as in a ViT block). Times are
medians of ``triton.testing.do_bench`` (CUDA events, after warm-up); pytest-benchmark's own stats
time the same call with a device sync. ``extra_info`` holds ms, TFLOP/s counted on visible
(query, key) pairs only (forward 4*Nq*D per pair and head, forward+backward 3.5x that), the
fraction of the measured bf16 matmul rate, and for djepa the speed-up over each peer timed
before it (peers timed after it record djepa's speed-up over themselves). A summary table of the
ratios prints at the end of the module (run with -s to see it).

    pytest benchmarks/test_bench_attention.py --benchmark-json=benchmarks/results/<date>_<gpu>_attention.json

Dropout (test_masked_attention_dropout): forward+backward with dropout_p=0.1 on the attention
probabilities, at the D-JEPA shapes: djepa's kernels (their Philox dropout), eager, and SDPA /
flash-attn with their dropout_p; FlexAttention has no dropout and is skipped saying so.

Knobs: DJEPA_BENCH_ATTN_SHAPES (comma list of ids below, default all),
DJEPA_BENCH_ATTN_FRACTIONS (default "dense,random0.5,prefix0.5,random0.25,prefix0.25"),
DJEPA_BENCH_ATTN_IMPLS (default all), DJEPA_BENCH_ATTN_MODES (default "fwd,fwdbwd,fwdbwd-dropout";
the dropout mode runs at the djepa-* shapes only, DJEPA_BENCH_ATTN_DROPOUT_SHAPES narrows them).

Targets on an H100, bf16 (benchmark, not a test): dense >= 0.9x the best SDPA backend, forward and
forward+backward; 25% random visible >= 2.5x SDPA with the mask and >= 2x FlexAttention,
forward+backward.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the attention benchmark needs a CUDA GPU (none is visible)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import bench_peers  # noqa: E402
from bench_knobs import select  # noqa: E402
from djepa import backends  # noqa: E402
from djepa.ops import masked_attention  # noqa: E402
from djepa.ops.attention import cuda_reason, masked_attention_reference, triton_reason  # noqa: E402

pytestmark = pytest.mark.gpu

# id -> (batch, tokens, heads, head dim); D-JEPA presets use 256 latent tokens + a 64-token buffer.
SHAPES = {
    "djepa-B": (64, 320, 12, 64),
    "djepa-L": (64, 320, 16, 64),
    "djepa-H": (64, 320, 16, 80),
    "N1024-D64": (16, 1024, 16, 64),
    "N1024-D128": (16, 1024, 8, 128),
    "N4096-D64": (4, 4096, 16, 64),
    "N4096-D128": (4, 4096, 8, 128),
}
FRACTIONS = {"dense": (1.0, "random"), "random0.5": (0.5, "random"), "prefix0.5": (0.5, "prefix"),
             "random0.25": (0.25, "random"), "prefix0.25": (0.25, "prefix")}
MODES = ["fwd", "fwdbwd", "fwdbwd-dropout"]
DROPOUT_P = 0.1  # D-JEPA's and MAR's attention dropout
DROPOUT_SHAPES = [s for s in SHAPES if s.startswith("djepa-")]
DTYPE = torch.bfloat16


_times = {}  # (shape, fraction, mode) -> {impl: ms}
_compiled = {}  # torch.compile'd peers, shared across cases


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _times:
        return
    lines = ["", "djepa masked attention: speed-up of djepa-cuda / djepa-triton over each peer (x)"]
    for (shape, frac, mode), row in _times.items():
        for ours in ("djepa-cuda", "djepa-triton"):
            if ours not in row:
                continue
            ratios = "  ".join(f"{p}={row[p] / row[ours]:.2f}" for p in row if not p.startswith("djepa"))
            lines.append(f"{shape:11s} {frac:10s} {mode:6s} {ours:12s} {row[ours]:8.3f} ms  {ratios}")
    print("\n".join(lines))


def _make_mask(B, N, fraction, pattern, gen):
    if fraction >= 1.0:
        return torch.ones(B, N, dtype=torch.bool, device="cuda")
    n_vis = max(1, round(fraction * N))
    if pattern == "prefix":
        mask = torch.zeros(B, N, dtype=torch.bool, device="cuda")
        mask[:, :n_vis] = True
        return mask
    # exactly n_vis visible keys per sample, at random positions
    order = torch.rand(B, N, device="cuda", generator=gen).argsort(dim=1)
    return order < n_vis


# ------------------------------------------------------------------------------------------
# Providers: one set-up per implementation, in the order the cases time them (the peers first,
# so that djepa's cases record their speed-up over each). A set-up takes the case's q, k, v
# (requires_grad for the backward), its key mask (`dense`: every key visible) and dropout_p, and
# returns a callable running one forward, or skips with the reason (pytest.skip).
# ------------------------------------------------------------------------------------------
PROVIDERS = bench_peers.Providers()


@PROVIDERS.register("eager")
def _eager(impl, q, k, v, mask, dense, dropout_p):
    if dropout_p:  # its own bernoulli draw: the eager path of masked_attention
        return lambda: masked_attention(q, k, v, mask, dropout_p=dropout_p, backend="eager")
    return lambda: masked_attention_reference(q, k, v, mask, upcast=False)


@PROVIDERS.register("sdpa-math", "sdpa-efficient", "sdpa-cudnn")
def _sdpa_masked(impl, q, k, v, mask, dense, dropout_p):
    backend = {"sdpa-math": SDPBackend.MATH, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[impl]
    attn_mask = mask[:, None, None, :]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    try:
        run()
    except RuntimeError as exc:
        what = "a boolean mask" + (" with dropout" if dropout_p else "")
        pytest.skip(f"{impl} refuses {what} here: {str(exc).splitlines()[0]}")
    return run


@PROVIDERS.register("sdpa-flash-dense")
def _sdpa_flash_dense(impl, q, k, v, mask, dense, dropout_p):
    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return run


@PROVIDERS.register("flex")
def _flex(impl, q, k, v, mask, dense, dropout_p):
    if dropout_p:
        pytest.skip("flex: FlexAttention has no dropout of the attention probabilities")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        pytest.skip(f"FlexAttention is not available: {exc}")
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention)
    B, _, N, _ = q.shape
    block_mask = create_block_mask(lambda b, h, qi, ki: mask[b, ki], B, None, N, N, device="cuda")
    return lambda: _compiled["flex"](q, k, v, block_mask=block_mask)


@PROVIDERS.register("flash-attn-varlen")
def _flash_attn_varlen(impl, q, k, v, mask, dense, dropout_p):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        pytest.skip(f"flash-attn is not installed: {exc}")
    B, H, N, D = q.shape
    cu_q = torch.arange(0, (B + 1) * N, N, dtype=torch.int32, device="cuda")

    def run():
        qt = q.transpose(1, 2).reshape(B * N, H, D)
        sel = mask.flatten().nonzero().squeeze(1)  # host sync, as unpad_input does
        kt = k.transpose(1, 2).reshape(B * N, H, D).index_select(0, sel)
        vt = v.transpose(1, 2).reshape(B * N, H, D).index_select(0, sel)
        counts = mask.sum(1, dtype=torch.int32)
        cu_k = F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
        out = flash_attn_varlen_func(qt, kt, vt, cu_q, cu_k, N, int(counts.max()), dropout_p=dropout_p)
        return out.view(B, N, H, D).transpose(1, 2)
    return run


@PROVIDERS.register("djepa-triton", "djepa-cuda")
def _djepa(impl, q, k, v, mask, dense, dropout_p):
    backend = impl.split("-")[1]
    if backend == "cuda":
        why = backends.cuda_unavailable_reason("masked_attention", q.device) or cuda_reason(q)
    else:
        why = backends.triton_unavailable_reason("masked_attention", q.device) or triton_reason(q)
    if why:
        pytest.skip(f"{impl}: {why}")
    key_mask = None if dense else mask
    return lambda: masked_attention(q, k, v, key_mask, dropout_p=dropout_p, backend=backend)


IMPLS = list(PROVIDERS)


@pytest.mark.parametrize("impl", select("DJEPA_BENCH_ATTN_IMPLS", IMPLS))
@pytest.mark.parametrize("mode", [m for m in select("DJEPA_BENCH_ATTN_MODES", MODES) if m != "fwdbwd-dropout"])
@pytest.mark.parametrize("fraction", select("DJEPA_BENCH_ATTN_FRACTIONS", FRACTIONS))
@pytest.mark.parametrize("shape", select("DJEPA_BENCH_ATTN_SHAPES", SHAPES))
def test_masked_attention(benchmark, matmul_tflops, shape, fraction, mode, impl):
    _time_case(benchmark, matmul_tflops, shape, fraction, mode, impl)


@pytest.mark.parametrize("impl", select("DJEPA_BENCH_ATTN_IMPLS", IMPLS))
@pytest.mark.parametrize("mode", [m for m in select("DJEPA_BENCH_ATTN_MODES", MODES) if m == "fwdbwd-dropout"])
@pytest.mark.parametrize("fraction", select("DJEPA_BENCH_ATTN_FRACTIONS", FRACTIONS))
@pytest.mark.parametrize("shape", [s for s in select("DJEPA_BENCH_ATTN_SHAPES", SHAPES)
                                   if s in select("DJEPA_BENCH_ATTN_DROPOUT_SHAPES", DROPOUT_SHAPES)])
def test_masked_attention_dropout(benchmark, matmul_tflops, shape, fraction, mode, impl):
    _time_case(benchmark, matmul_tflops, shape, fraction, mode, impl)


def _time_case(benchmark, matmul_tflops, shape, fraction, mode, impl):
    B, N, H, D = SHAPES[shape]
    frac, pattern = FRACTIONS[fraction]
    dense = frac >= 1.0
    benchmark.group = f"attention-{shape}-{fraction}-{mode}"
    if impl.startswith("djepa"):
        def guard(f, *args, **kwargs):
            return f(*args, **kwargs)
    else:
        bench_peers.check((impl, mode, f"D{D}"), (impl, "fwd", f"D{D}"))

        def guard(f, *args, **kwargs):
            return bench_peers.run((impl, mode, f"D{D}"), f, *args, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=DTYPE, generator=gen).permute(2, 0, 3, 1, 4)
    backward = mode.startswith("fwdbwd")
    dropout_p = DROPOUT_P if mode == "fwdbwd-dropout" else 0.0
    q, k, v = (t.requires_grad_(backward) for t in qkv.detach().unbind(0))
    mask = _make_mask(B, N, frac, pattern, gen)
    forward = guard(PROVIDERS[impl], impl, q, k, v, mask, dense, dropout_p)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                forward()
    else:
        do = torch.randn(B, H, N, D, device="cuda", dtype=DTYPE, generator=gen)

        def fn():
            out = forward()
            torch.autograd.grad(out, (q, k, v), do)

    def timed():
        fn()
        torch.cuda.synchronize()

    try:
        guard(fn)  # compile / autotune outside the timed region
        ms = guard(triton.testing.do_bench, fn, warmup=25, rep=100, return_mode="median")
        guard(benchmark.pedantic, timed, rounds=10, iterations=1, warmup_rounds=2)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} does not fit in GPU memory at {shape}")

    visible_pairs = N * (N if (dense or impl == "sdpa-flash-dense") else int(mask.sum()) / B) * B
    flops = 4 * H * D * visible_pairs * (3.5 if backward else 1.0)
    tflops = flops / (ms * 1e-3) / 1e12
    row = _times.setdefault((shape, fraction, mode), {})
    row[impl] = ms
    benchmark.extra_info.update(
        impl=impl, shape=dict(B=B, N=N, H=H, D=D), visible_fraction=frac, pattern=pattern, mode=mode,
        dropout_p=dropout_p,
        ms=ms, tflops=tflops, fraction_of_matmul_peak=tflops / matmul_tflops,
        matmul_tflops=matmul_tflops, device=torch.cuda.get_device_name(),
    )
    if impl.startswith("djepa"):
        for peer, peer_ms in row.items():
            if not peer.startswith("djepa"):
                benchmark.extra_info[f"speedup_vs_{peer}"] = peer_ms / ms
    else:
        for ours in ("djepa-cuda", "djepa-triton"):
            if ours in row:
                benchmark.extra_info[f"{ours}_speedup_over_this"] = ms / row[ours]
