"""The denoising MLP on the GPU: one reverse step, the 100-step loop and training, in one run.

Heads of D-JEPA-B/L/H (MAR SimpleMLPAdaLN, depth/width 6/1024, 8/1280, 12/1536; 16 token
channels in, 32 out (learned sigma), z = the encoder width 768/1024/1280), random weights (not
the zero init, which would time zeros). Cases:

  step      one reverse step of M rows (MLP forward + posterior update + noise)
  loop      djepa.diffusion.sample's 100 steps of M rows (cond_embed once)
  train     MLP forward + backward of M = 32768 rows (MSE against a random target)

Paths, timed in this order so each later path records its ratio to the earlier ones:
  eager-fp32      the MLP in float32, plain PyTorch ops
  eager-bf16      the same under torch.autocast(bfloat16)
  compile         torch.compile(mode="max-autotune") of the eager bf16 step / forward (CUDA graphs)
  djepa-triton    backend="triton", bf16 weights (loop: djepa.diffusion.sample, fused steps)
  djepa-cuda      backend="cuda", bf16 weights (loop captured as one CUDA graph)

`extra_info`: ms (median of triton.testing.do_bench), TFLOP/s counted from the GEMMs
(`gemm_flops`), the measured bf16 matmul rate and the fraction of it, and speed-ups over
eager-bf16 and compile. The loop runs without classifier-free guidance (M rows, cfg 1).

    pytest benchmarks/test_bench_denoise.py --benchmark-json=benchmarks/results/<date>_<gpu>_denoise.json

Knobs: DJEPA_BENCH_DENOISE_HEADS (default "B,L,H"), DJEPA_BENCH_DENOISE_M (default
"512,2048,8192"), DJEPA_BENCH_DENOISE_CASES (default "step,loop,train"),
DJEPA_BENCH_DENOISE_PATHS (default all).

Targets on an H100 (benchmark, not a test): the 100-step loop of the B head at M = 2048 >= 3x
eager bf16 and >= 1.2x torch.compile, at >= 60% of the measured bf16 matmul rate; training
forward + backward >= 1.3x eager bf16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the denoising benchmark needs a CUDA GPU (none is visible)", allow_module_level=True)

import triton  # noqa: E402

from djepa import backends  # noqa: E402
from djepa.diffusion import create_diffusion, sample  # noqa: E402
from djepa.nn import DenoisingMLP  # noqa: E402
from djepa.ops import denoise_step  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = {"B": (6, 1024, 768), "L": (8, 1280, 1024), "H": (12, 1536, 1280)}  # depth, width, z
IN_CH, OUT_CH, STEPS, TRAIN_M = 16, 32, 100, 32768
PATHS = ["eager-fp32", "eager-bf16", "compile", "djepa-triton", "djepa-cuda"]


def _select(env, universe, default=None):
    raw = os.environ.get(env)
    if not raw:
        return list(default or universe)
    chosen = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [x for x in chosen if x not in universe]
    if bad:
        raise ValueError(f"{env}: unknown {bad}; choose from {list(universe)}")
    return chosen


SELECTED_HEADS = _select("DJEPA_BENCH_DENOISE_HEADS", HEADS)
SIZES = [int(m) for m in os.environ.get("DJEPA_BENCH_DENOISE_M", "512,2048,8192").split(",")]
CASES = _select("DJEPA_BENCH_DENOISE_CASES", ["step", "loop", "train"])
SELECTED_PATHS = _select("DJEPA_BENCH_DENOISE_PATHS", PATHS)
_ms = {}


def gemm_flops(M, depth, width, z, case):
    """GEMM FLOPs of one MLP forward over M rows (x2 per multiply-add): input projection
    (IN_CH -> W), per block adaLN (W -> 3W) and the two W x W layers, final adaLN (W -> 2W) and
    output (W -> OUT_CH); cond_embed (z -> W) once per forward (step, train) or once per loop.
    The loop is STEPS forwards plus one cond_embed; training is 3x the forward (fwd + 2 bwd)."""
    per_forward = 2 * M * (IN_CH * width + depth * (3 * width * width + 2 * width * width)
                           + 2 * width * width + width * OUT_CH)
    cond = 2 * M * z * width
    if case == "step":
        return per_forward + cond
    if case == "loop":
        return STEPS * per_forward + cond
    return 3 * (per_forward + cond)


@pytest.fixture(scope="module")
def matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


_mlps = {}


def _mlp(head, dtype, backend):
    key = (head, dtype)
    if key not in _mlps:
        depth, width, z = HEADS[head]
        torch.manual_seed(0)
        m = DenoisingMLP(IN_CH, width, OUT_CH, z, depth).cuda()
        with torch.no_grad():
            for p in m.parameters():  # random, not MAR's zero init: never time zeros
                p.normal_(0, width ** -0.5 if p.ndim == 2 else 0.02)
        _mlps[key] = m.to(dtype)
    m = _mlps[key]
    m.backend = backend
    return m


def _eager_step(mlp, x, c_emb, temb, noise, coefs):
    """One reverse step in plain ops (the formula djepa.ops.denoise_step fuses)."""
    h = mlp.input_proj(x)
    y = temb + c_emb
    for blk in mlp.res_blocks:
        h = blk(h, y)
    out = mlp.final_layer(h, y).float()
    eps, v = out[:, :IN_CH], out[:, IN_CH:]
    coef_x, coef_eps, min_log, max_log, noise_scale = coefs
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return coef_x * x - coef_eps * eps + torch.exp(0.5 * log_var) * noise * noise_scale


def _path_reason(path):
    if path in ("djepa-triton", "djepa-cuda"):
        backend = path.split("-")[1]
        fn = backends.triton_unavailable_reason if backend == "triton" else backends.cuda_unavailable_reason
        return fn("denoise_step", torch.device("cuda"))
    return None


def _runner(case, path, head, M):
    depth, width, z = HEADS[head]
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = TRAIN_M if case == "train" else M
    x = torch.randn(rows, IN_CH, device="cuda", generator=g)
    zc = torch.randn(rows, z, device="cuda", generator=g)
    diffusion = create_diffusion(str(STEPS))
    fused = path.startswith("djepa")
    backend = path.split("-")[1] if fused else "eager"
    mlp = _mlp(head, torch.bfloat16 if fused else torch.float32, backend)
    autocast = path in ("eager-bf16", "compile")

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    if case == "train":
        target = torch.randn(rows, OUT_CH, device="cuda", generator=g)
        t = torch.randint(0, 1000, (rows,), device="cuda", generator=g)
        mlp.requires_grad_(True)
        fwd = torch.compile(mlp, mode="max-autotune") if path == "compile" else mlp

        def run():
            with amp():
                out = fwd(x.to(mlp.input_proj.weight.dtype), t, zc.to(mlp.input_proj.weight.dtype))
            (out.float() - target).square().mean().backward()
        return run

    mlp.requires_grad_(False)
    zc = zc.to(mlp.input_proj.weight.dtype)
    noise = torch.randn(rows, IN_CH, device="cuda", generator=g)
    if case == "loop" and fused:
        return lambda: sample(mlp, zc, steps=STEPS, generator=g, backend=backend)
    with torch.no_grad(), amp():
        c_emb = mlp.cond_embed(zc)
        ttab = mlp.time_embed(torch.as_tensor(diffusion.timestep_map, device="cuda"))
    coefs = [diffusion.step_coefficients(i) for i in range(STEPS)]
    if case == "step" and fused:
        return lambda: denoise_step(mlp, x, c_emb.to(mlp.input_proj.weight.dtype), diffusion, STEPS // 2,
                                    noise=noise, backend=backend)
    step = torch.compile(_eager_step, mode="max-autotune", dynamic=False) if path == "compile" else _eager_step
    coef_t = [torch.tensor(c, device="cuda") for c in coefs]  # tensors: no recompiles per step

    @torch.no_grad()
    def run():
        with amp():
            if case == "step":
                return step(mlp, x, c_emb, ttab[STEPS // 2], noise, coef_t[STEPS // 2])
            h = x
            for i in reversed(range(STEPS)):
                h = step(mlp, h, c_emb, ttab[i], noise, coef_t[i])
            return h
    return run


def _cases():
    for head in SELECTED_HEADS:
        for case in CASES:
            for M in ([TRAIN_M] if case == "train" else SIZES):
                for path in SELECTED_PATHS:
                    yield pytest.param(head, case, M, path, id=f"{head}-{case}-M{M}-{path}")


@pytest.mark.parametrize("head,case,M,path", list(_cases()))
def test_denoise(benchmark, matmul_tflops, head, case, M, path):
    reason = _path_reason(path)
    if reason:
        pytest.skip(f"{path}: {reason}")
    benchmark.group = f"denoise {head} {case} M={M}"
    run = _runner(case, path, head, M)
    run()  # compile / capture outside the timed region
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    depth, width, z = HEADS[head]
    tflops = gemm_flops(M, depth, width, z, case) / (ms * 1e-3) / 1e12
    info = dict(ms=ms, tflops=tflops, matmul_tflops=matmul_tflops, fraction_of_matmul=tflops / matmul_tflops,
                device=torch.cuda.get_device_name())
    key = (head, case, M)
    for peer in ("eager-bf16", "compile"):
        peer_ms = _ms.get(key + (peer,))
        if peer_ms and path != peer:
            info[f"speedup_vs_{peer}"] = peer_ms / ms
    _ms[key + (path,)] = ms
    benchmark.extra_info.update(info)
