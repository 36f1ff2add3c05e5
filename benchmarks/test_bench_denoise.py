"""The denoising MLP on the GPU: one reverse step, the 100-step loop and training, in one run.

Heads of D-JEPA-B/L/H, read from djepa.models.presets (MAR SimpleMLPAdaLN, depth/width 6/1024,
8/1280, 12/1536; 16 token channels in, 32 out (learned sigma), z = the predictor width
768/1024/1280), random weights (not the zero init, which would time zeros). Cases:

  step      one reverse step of M rows: MLP forward (condition already embedded, as a sampler
            holds it) + posterior update + noise                      M in 512, 2048, 8192
  loop      the 100-step sampling loop of M rows: cond_embed and the time table once, then 100
            steps; x_T and every step's noise drawn beforehand        M in 512, 2048, 8192
  train     MLP forward + backward of M = 32768 rows (MSE against a random target; grads set
            to None each time, as an optimizer step would)
  gemm      the head's GEMMs alone, djepa._C.gemm_sm90 against cuBLAS (torch): fwd = x W^T + b
            [M, W] x [W, W] with bias (M in the step sizes and the training rows), wgrad = dy^T x
            [W, M] x [M, W] into float32 (M = the training rows: split-K), and one square
            8192 x 8192 x 8192 (the shape of the matmul rate below)

Paths, timed in this order for each (head, case, M) so each later path records its ratio to the
earlier ones:
  eager-fp32      MAR's SimpleMLPAdaLN math in plain PyTorch ops, float32
  eager-bf16      the same under torch.autocast(bfloat16)
  compile         torch.compile(mode="max-autotune") (CUDA graphs) of the eager-bf16 step /
                  training forward (the loop calls the compiled step 100 times); a compile or
                  run failure skips it with the reason, for the rest of the session for that
                  case (bench_peers.py)
  djepa-triton    backend="triton": djepa.ops.denoise_step / djepa.diffusion.sample (fused steps,
                  the loop captured as one CUDA graph) / DenoisingMLP with fused adaln_block
  djepa-cuda      backend="cuda", the same through djepa._C
The gemm case times its own paths: cublas (torch.nn.functional.linear with bias, torch.mm for
wgrad: bf16 out, cuBLAS's own choice of kernel), and djepa._C.gemm_sm90 under each design
(sm90-auto: by shape, sm90-128x256, sm90-128x128: DJEPA_SM90_GEMM's values; split-K
workspace allocated once, outside the timed call); `extra_info` adds the ratio to cublas.
A path whose backend is unavailable is skipped with djepa.backends' reason.

Weights: sampling (step, loop) runs every bf16 path on a bfloat16 copy of the weights (the
inference copy; so eager-bf16 pays no per-step weight casts); eager-fp32 keeps float32.
Training runs every bf16 path on float32 master weights under bf16 autocast (the GPU training
default). The eager baselines are deliberately lean (no host-side schedule lookups per step,
unlike MAR's p_sample_loop), so the ratios are conservative.

`extra_info`: ms (median of triton.testing.do_bench), TFLOP/s counted from the GEMMs
(`gemm_flops`), the bf16 matmul rate measured once per session (8192^3 torch.matmul) and the
fraction of it, and the speed-ups over eager-bf16 and compile for the same shape. The loop runs
without classifier-free guidance (M rows, cfg 1). A table of the ratios prints at the end
(run with -s to see it).

    pytest benchmarks/test_bench_denoise.py --benchmark-json=benchmarks/results/<date>_<gpu>_denoise.json

Knobs: DJEPA_BENCH_DENOISE_HEADS (default "B,L,H"), DJEPA_BENCH_DENOISE_M (step/loop rows,
default "512,2048,8192"), DJEPA_BENCH_DENOISE_TRAIN_M (default 32768),
DJEPA_BENCH_DENOISE_CASES (default "step,loop,train,gemm"), DJEPA_BENCH_DENOISE_PATHS (default all),
DJEPA_BENCH_DENOISE_STEPS (loop length, default 100), DJEPA_BENCH_DENOISE_COMPILE_MODE (the
compile peer's torch.compile mode, default max-autotune; reduce-overhead compiles in a fraction
of the time, still with CUDA graphs). A quick look:
DJEPA_BENCH_DENOISE_HEADS=B DJEPA_BENCH_DENOISE_M=2048 DJEPA_BENCH_DENOISE_TRAIN_M=8192.

Targets on an H100 (benchmark, not a test): the 100-step loop of the B head at M = 2048 >= 3x
eager bf16 and >= 1.2x torch.compile, at >= 60% of the measured bf16 matmul rate; training
forward + backward (M = 32768) >= 1.3x eager bf16.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the denoising benchmark needs a CUDA GPU (none is visible)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import bench_peers  # noqa: E402
from djepa import backends  # noqa: E402
from bench_knobs import select  # noqa: E402
from djepa.diffusion import create_diffusion, sample  # noqa: E402
from djepa.models.presets import get_config  # noqa: E402
from djepa.nn import DenoisingMLP  # noqa: E402
from djepa.ops import denoise_step  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
FREQ = 256  # TimestepEmbedder's sinusoid width


def _heads():
    """name -> (depth, width, z_channels, token channels) of each preset's diffusion head."""
    out = {}
    for name in ("B", "L", "H"):
        c = get_config(name)
        out[name] = (c.diffloss_depth, c.diffloss_width, c.pred_embed_dim, c.token_channels)
    return out


HEADS = _heads()
PATHS = ["eager-fp32", "eager-bf16", "compile", "djepa-triton", "djepa-cuda"]


SELECTED_HEADS = select("DJEPA_BENCH_DENOISE_HEADS", HEADS)
SIZES = [int(m) for m in os.environ.get("DJEPA_BENCH_DENOISE_M", "512,2048,8192").split(",") if m.strip()]
TRAIN_M = int(os.environ.get("DJEPA_BENCH_DENOISE_TRAIN_M", "32768"))
STEPS = int(os.environ.get("DJEPA_BENCH_DENOISE_STEPS", "100"))
CASES = select("DJEPA_BENCH_DENOISE_CASES", ["step", "loop", "train", "gemm"])
SELECTED_PATHS = select("DJEPA_BENCH_DENOISE_PATHS", PATHS)
COMPILE_MODE = select("DJEPA_BENCH_DENOISE_COMPILE_MODE",
                      ["max-autotune", "reduce-overhead", "max-autotune-no-cudagraphs", "default"])
if len(COMPILE_MODE) != 1 and os.environ.get("DJEPA_BENCH_DENOISE_COMPILE_MODE"):
    raise ValueError("DJEPA_BENCH_DENOISE_COMPILE_MODE: give one mode")
COMPILE_MODE = COMPILE_MODE[0]

# every (head, M) is a fresh specialisation of the same compiled function: keep them all
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

_ms = {}  # (head, case, M) -> {path: ms}


def gemm_flops(M, depth, width, z, case, steps=STEPS, in_ch=16, freq=FREQ):
    """GEMM FLOPs (2 per multiply-add) of one timed call of `case` over M rows of a head of
    `depth` residual blocks and width W = `width`, learned sigma (out = 2 * in_ch).

    One MLP forward on an embedded condition: input projection (in_ch -> W), per block adaLN
    (W -> 3W) and its two W x W layers, final adaLN (W -> 2W) and the output layer (W -> out):
        fwd(M) = 2 M (in_ch W + depth (3 W^2 + 2 W^2) + 2 W^2 + W out)
    Embeddings: cond(R) = 2 R z W (cond_embed), temb(R) = 2 R (freq W + W^2) (time MLP).
      step   fwd(M) + temb(1)                   (the condition arrives embedded)
      loop   steps fwd(M) + cond(M) + temb(steps) (cond_embed and the time table once per loop)
      train  forward F = fwd(M) + cond(M) + temb(M) (per-row timesteps), backward 2F less the
             input gradients nobody needs (of x, of z, of the sinusoid): 2 M W (in_ch + z + freq)
    Elementwise work (LayerNorm, SiLU, the update) is not counted.
    """
    out_ch = 2 * in_ch
    fwd = 2 * M * (in_ch * width + depth * 5 * width * width + 2 * width * width + width * out_ch)
    cond = 2 * M * z * width

    def temb(rows):
        return 2 * rows * (freq * width + width * width)

    if case == "step":
        return fwd + temb(1)
    if case == "loop":
        return steps * fwd + cond + temb(steps)
    if case == "train":
        forward = fwd + cond + temb(M)
        return 3 * forward - 2 * M * width * (in_ch + z + freq)
    raise ValueError(f"unknown case {case!r}")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _ms:
        return
    lines = ["", "denoising MLP: ms per call, and the speed-up of each path over eager-bf16 / compile"]
    for (head, case, M), row in _ms.items():
        cells = []
        for path, ms in row.items():
            cell = f"{path}={ms:.3f}ms"
            ratios = [f"{row[p] / ms:.2f}x {p}" for p in ("eager-bf16", "compile") if p in row and p != path]
            cells.append(cell + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(f"{head} {case:5s} M={M:<6d} " + "  ".join(cells))
    print("\n".join(lines))


# ------------------------------------------------------------------------------ the models
_mlps = {}


def _mlp(head, dtype):
    """The head with random weights (one float32 master per head; the bf16 copy derived from it)."""
    if (head, dtype) not in _mlps:
        if (head, torch.float32) not in _mlps:
            depth, width, z, in_ch = HEADS[head]
            torch.manual_seed(0)
            m = DenoisingMLP(in_ch, width, 2 * in_ch, z, depth).to(DEVICE)
            with torch.no_grad():
                for p in m.parameters():  # random, not MAR's zero init: never time zeros
                    p.normal_(0, width ** -0.5 if p.ndim == 2 else 0.02)
            _mlps[(head, torch.float32)] = m
        if dtype != torch.float32:
            import copy

            _mlps[(head, dtype)] = copy.deepcopy(_mlps[(head, torch.float32)]).to(dtype)
    return _mlps[(head, dtype)]


def _mar_forward(mlp, x, y):
    """SimpleMLPAdaLN.forward after y = time_embed(t) + cond_embed(c), in MAR's plain ops."""
    h = mlp.input_proj(x)
    for blk in mlp.res_blocks:
        shift, scale, gate = blk.adaLN_modulation(y).chunk(3, dim=-1)
        h = h + gate * blk.mlp(blk.in_ln(h) * (1 + scale) + shift)
    fl = mlp.final_layer
    shift, scale = fl.adaLN_modulation(y).chunk(2, dim=-1)
    return fl.linear(fl.norm_final(h) * (1 + scale) + shift)


def _eager_step(mlp, x, c_emb, temb_row, noise, coefs):
    """One reverse step in plain ops: the formula djepa.ops.denoise_step fuses. coefs is a
    tensor (coef_x, coef_eps, min_log, max_log, noise_scale) of diffusion.step_coefficients."""
    C = x.shape[1]
    out = _mar_forward(mlp, x, temb_row + c_emb).float()
    eps, v = out[:, :C], out[:, C:]
    coef_x, coef_eps, min_log, max_log, noise_scale = coefs.unbind(0)
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return coef_x * x - coef_eps * eps + torch.exp(0.5 * log_var) * noise * noise_scale


def _train_loss(mlp, x, t, c, target):
    """MSE of the eager MLP forward (MAR's math) against `target`."""
    out = _mar_forward(mlp, x, mlp.time_embed(t) + mlp.cond_embed(c))
    return F.mse_loss(out.float(), target)


def _path_reason(path):
    """Why `path` cannot run here (None when it can)."""
    dev = torch.device(DEVICE)
    if path == "djepa-triton":
        return backends.triton_unavailable_reason("denoise_step", dev)
    if path == "djepa-cuda":
        return backends.cuda_unavailable_reason("denoise_step", dev)
    if path == "compile" and backends.triton_module() is None:
        return "torch.compile's inductor needs Triton, which does not import"
    return None


def _runner(case, path, head, M):
    """A no-argument callable doing one timed call of `case` on `path`."""
    depth, width, z, C = HEADS[head]
    g = torch.Generator(device=DEVICE).manual_seed(1)
    fused = path.startswith("djepa")
    backend = path.split("-")[1] if fused else "eager"
    autocast = path in ("eager-bf16", "compile") or (fused and case == "train")

    def amp():
        return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast)

    x = torch.randn(M, C, device=DEVICE, generator=g)
    zc = torch.randn(M, z, device=DEVICE, generator=g)

    if case == "train":
        mlp = _mlp(head, torch.float32)  # master weights; bf16 paths under autocast
        mlp.backend = backend
        mlp.requires_grad_(True)
        target = torch.randn(M, 2 * C, device=DEVICE, generator=g)
        t = torch.randint(0, 1000, (M,), device=DEVICE, generator=g)
        if fused:
            def loss_fn(mlp, x, t, c, target):
                return F.mse_loss(mlp(x, t, c).float(), target)
        elif path == "compile":
            loss_fn = torch.compile(_train_loss, mode=COMPILE_MODE, dynamic=False)
        else:
            loss_fn = _train_loss

        def run():
            mlp.zero_grad(set_to_none=True)
            with amp():
                loss = loss_fn(mlp, x, t, zc, target)
            loss.backward()
        return run

    mlp = _mlp(head, torch.float32 if path == "eager-fp32" else torch.bfloat16)
    mlp.backend = backend
    mlp.requires_grad_(False)
    dt = mlp.input_proj.weight.dtype
    zc = zc.to(dt)
    step_noise = torch.randn(STEPS, M, C, device=DEVICE, generator=g)
    diffusion = create_diffusion(str(STEPS))

    if fused:
        if case == "loop":
            return lambda: sample(mlp, zc, steps=STEPS, backend=backend, noise=x, step_noise=step_noise)
        with torch.no_grad():
            c_emb = mlp.cond_embed(zc)
        i = STEPS // 2
        return lambda: denoise_step(mlp, x, c_emb, diffusion, i, noise=step_noise[0], backend=backend)

    coefs = torch.tensor([diffusion.step_coefficients(i) for i in range(STEPS)], device=DEVICE)
    tmap = torch.as_tensor(diffusion.timestep_map, device=DEVICE)
    compiled = path == "compile"
    step = torch.compile(_eager_step, mode=COMPILE_MODE, dynamic=False) if compiled else _eager_step

    if case == "step":
        with torch.no_grad(), amp():
            c_emb = mlp.cond_embed(zc)

        @torch.no_grad()
        def run_step():  # the time embedding of the step inside, as denoise_step does it
            with amp():
                temb = mlp.time_embed(tmap[STEPS // 2: STEPS // 2 + 1])[0]
                return step(mlp, x, c_emb, temb, step_noise[0], coefs[STEPS // 2])
        return run_step

    @torch.no_grad()
    def run_loop():
        with amp():
            c_emb = mlp.cond_embed(zc)
            ttab = mlp.time_embed(tmap)
            h = x
            for k, i in enumerate(range(STEPS - 1, -1, -1)):
                h = step(mlp, h, c_emb, ttab[i], step_noise[k], coefs[i])
                if compiled:  # a CUDA-graph output is overwritten by the next replay
                    h = h.clone()
            return h
    return run_loop


def _cases():
    for head in SELECTED_HEADS:
        for case in CASES:
            if case == "gemm":
                continue
            for M in ([TRAIN_M] if case == "train" else SIZES):
                for path in SELECTED_PATHS:
                    yield pytest.param(head, case, M, path, id=f"{head}-{case}-M{M}-{path}")


@pytest.mark.parametrize("head,case,M,path", list(_cases()))
def test_denoise(benchmark, matmul_tflops, head, case, M, path):
    import triton

    reason = _path_reason(path)
    if reason:
        pytest.skip(f"{path}: {reason}")
    benchmark.group = f"denoise {head} {case} M={M}"
    if path == "compile":  # the peer; djepa's and the eager paths must fail loudly
        bench_peers.check((path, case))

        def guard(f, *args, **kwargs):
            return bench_peers.run((path, case), f, *args, **kwargs)
    else:
        def guard(f, *args, **kwargs):
            return f(*args, **kwargs)
    try:
        run = _runner(case, path, head, M)

        def synced():
            run()
            torch.cuda.synchronize()

        guard(synced)  # compile / autotune / capture outside the timed region
        ms = guard(triton.testing.do_bench, run, warmup=25, rep=200, return_mode="median")
        guard(benchmark.pedantic, synced, rounds=5, iterations=1, warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{head} {case} M={M} on {path} does not fit in GPU memory")
    depth, width, z, C = HEADS[head]
    tflops = gemm_flops(M, depth, width, z, case, in_ch=C) / (ms * 1e-3) / 1e12
    info = dict(ms=ms, tflops=tflops, matmul_tflops=matmul_tflops, fraction_of_matmul=tflops / matmul_tflops,
                path=path, device=torch.cuda.get_device_name())
    if path == "compile":
        info["compile_mode"] = COMPILE_MODE
    row = _ms.setdefault((head, case, M), {})
    for peer in ("eager-bf16", "compile"):
        if peer in row and path != peer:
            info[f"speedup_vs_{peer}"] = row[peer] / ms
    row[path] = ms
    benchmark.extra_info.update(info)


# ------------------------------------------------------------------------------ the GEMMs alone
GEMM_PATHS = ["cublas", "sm90-auto", "sm90-128x256", "sm90-128x128"]
_gemm_ms = {}  # (name, M, N, K) -> {path: ms}


def _gemm_shapes():
    """(name, M, N, K, a_trans, b_trans, fp32 out) of the gemm case."""
    out = [("square", 8192, 8192, 8192, 0, 1, False)]
    for head in SELECTED_HEADS:
        W = HEADS[head][1]
        for M in sorted(set(SIZES + [TRAIN_M])):
            out.append((f"{head}-fwd", M, W, W, 0, 1, False))
        out.append((f"{head}-wgrad", W, W, TRAIN_M, 1, 0, True))
    return list(dict.fromkeys(out))


def _gemm_cases():
    if "gemm" not in CASES:
        return
    for shape in _gemm_shapes():
        for path in GEMM_PATHS:
            name, M, N, K = shape[:4]
            yield pytest.param(shape, path, id=f"gemm-{name}-{M}x{N}x{K}-{path}")


def _gemm_runner(shape, path):
    """One call of the shape's GEMM on `path` (bf16 operands, bias on fwd/square)."""
    from djepa.ops import _dispatch

    name, M, N, K, a_trans, b_trans, f32 = shape
    g = torch.Generator(device=DEVICE).manual_seed(2)
    a = torch.randn(K if a_trans else M, M if a_trans else K, device=DEVICE, generator=g, dtype=torch.bfloat16)
    b = torch.randn(N if b_trans else K, K if b_trans else N, device=DEVICE, generator=g,
                    dtype=torch.bfloat16) * K ** -0.5
    bias = None if f32 else torch.randn(N, device=DEVICE, generator=g, dtype=torch.bfloat16)
    if path == "cublas":
        if f32:
            return lambda: torch.mm(a.t() if a_trans else a, b.t() if b_trans else b)
        return lambda: F.linear(a, b, bias)
    ext = backends.cuda_extension()
    kernel = backends.SM90_GEMM_DESIGNS[path.split("-", 1)[1]]
    c = torch.empty(M, N, device=DEVICE, dtype=torch.float32 if f32 else torch.bfloat16)
    splits = int(ext.gemm_sm90_splits(M, N, K, kernel=kernel))
    ws = torch.empty(splits * M * N, device=DEVICE) if splits > 1 else None
    args = (a.data_ptr(), b.data_ptr(), c.data_ptr(), 0 if bias is None else bias.data_ptr(), M, N, K, a_trans,
            b_trans, 16 if f32 else 0, 0, 0, 0, _dispatch.dtype_code(torch.bfloat16),
            _dispatch.stream_handle(torch.device(DEVICE)), 0, 0 if ws is None else ws.data_ptr(), splits,
            0 if ws is None else ws.numel())
    return lambda: ext.gemm_sm90(*args, kernel=kernel)


@pytest.fixture(scope="module", autouse=True)
def _gemm_summary():
    yield
    if not _gemm_ms:
        return
    lines = ["", "denoise GEMMs: TFLOP/s per path (ratio to cublas)"]
    for (name, M, N, K), row in _gemm_ms.items():
        base = row.get("cublas")
        cells = [f"{p}={2 * M * N * K / (ms * 1e-3) / 1e12:.0f}" + (f" ({base / ms:.2f}x)" if base and p != "cublas"
                                                                   else "") for p, ms in row.items()]
        lines.append(f"{name:10s} {M}x{N}x{K}  " + "  ".join(cells))
    print("\n".join(lines))


@pytest.mark.parametrize("shape,path", list(_gemm_cases()))
def test_denoise_gemm(benchmark, matmul_tflops, shape, path):
    import triton

    dev = torch.device(DEVICE)
    if path != "cublas" and not backends.uses_wgmma("adaln_block", dev):
        why = backends.cuda_unavailable_reason("adaln_block", dev) or (
            "not an sm_90 GPU with a 90a build, or DJEPA_SM90_KERNELS=0")
        pytest.skip(f"{path}: djepa._C runs no sm_90a GEMM here ({why})")
    name, M, N, K = shape[:4]
    benchmark.group = f"denoise gemm {name} {M}x{N}x{K}"
    run = _gemm_runner(shape, path)

    def synced():
        run()
        torch.cuda.synchronize()

    synced()
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
    benchmark.pedantic(synced, rounds=5, iterations=1, warmup_rounds=1)
    tflops = 2 * M * N * K / (ms * 1e-3) / 1e12
    row = _gemm_ms.setdefault((name, M, N, K), {})
    row[path] = ms
    info = dict(ms=ms, tflops=tflops, matmul_tflops=matmul_tflops, fraction_of_matmul=tflops / matmul_tflops,
                path=path, device=torch.cuda.get_device_name())
    if "cublas" in row and path != "cublas":
        info["speedup_vs_cublas"] = row["cublas"] / ms
    benchmark.extra_info.update(info)
