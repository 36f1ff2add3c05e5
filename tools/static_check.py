#!/usr/bin/env python
"""Static speed gate: compile every kernel for sm_90 (or sm_80) without a GPU and check it.

    python tools/static_check.py [--arch 90|80] [--full] [--json OUT] [--jobs N] [--only triton|cuda]

Triton: every kernel variant the ops can launch is captured from the ops' own launch code
(djepa.ops.* and djepa.kernels.*, run on meta tensors with `kernel[grid](...)` replaced by a
recorder) over the preset shapes (tiny/B/L/H), the benchmark shapes, and (with --full) a
coverage sweep of dtypes, head dims and widths; every autotune config of an autotuned kernel
is a variant of its own. Each variant goes through Triton's own binder (so its specialisation
is exactly what a launch would compile) and `triton.compile` for GPUTarget("cuda", ARCH, 32),
behind a stand-in driver: no GPU is needed.
CUDA: every csrc/*.cu is compiled with nvcc for sm_90a (sm_80) with `-Xptxas -v`; the SASS of
the cubin (cuobjdump --dump-sass) gives the tensor-core instruction counts per kernel.

One JSON record per variant (a list), and a Markdown table beside it (OUT with .md):
    {"backend", "kernel", "variant", "arch", "regs", "spill_bytes", "stack_bytes", "smem_bytes",
     "smem_limit", "tensor_core": {"wgmma", "mma_sync"}, "hot", ...}
`hot` = launched by a preset or benchmark shape in fp16/bf16. The gate fails (exit 1) when
  - a hot variant spills or has a stack frame,
  - a variant needs more shared memory than one block may have (232448 B sm_90, 166912 B sm_80),
  - a matmul-bound Triton kernel (fp16/bf16) on sm_90 compiles to no wgmma,
  - a sm_90a CUDA matmul kernel (csrc/*_sm90.cu: CUDA_WGMMA_KERNELS) compiles to no wgmma,
  - a hot memory-bound vector kernel (the EMA) issues no 16-byte global load or store,
  - a variant does not compile.
Without --full a small subset runs (the one the test suite runs); --full writes
benchmarks/results/static/sm_<arch>.json/.md unless --json says otherwise.
"""
import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = {
    90: dict(name="sm_90", smem_limit=232448, gencode="-gencode=arch=compute_90a,code=sm_90a"),
    80: dict(name="sm_80", smem_limit=166912, gencode="-gencode=arch=compute_80,code=sm_80"),
}
HOT_DTYPES = ("float16", "bfloat16")
# Triton kernels whose time is their tl.dots: on sm_90 their fp16/bf16 variants must use wgmma.
MATMUL_KERNELS = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "gemm_kernel"}
# Memory-bound kernels that must move 16 bytes per access on their hot path.
VECTOR_KERNELS = {"_ema_kernel"}


# ------------------------------------------------------------------------------------------
# Records and the gate's rules
# ------------------------------------------------------------------------------------------
def record(backend, kernel, variant, arch, *, regs=0, spill_bytes=0, stack_bytes=0, smem_bytes=0,
           wgmma=0, mma_sync=0, hot=False, **extra):
    rec = {
        "backend": backend, "kernel": kernel, "variant": variant, "arch": ARCHS[arch]["name"],
        "regs": int(regs), "spill_bytes": int(spill_bytes), "stack_bytes": int(stack_bytes),
        "smem_bytes": int(smem_bytes), "smem_limit": ARCHS[arch]["smem_limit"],
        "tensor_core": {"wgmma": int(wgmma), "mma_sync": int(mma_sync)}, "hot": bool(hot),
    }
    rec.update(extra)
    return rec


def violations(rec):
    """The gate's complaints about one record (empty when it passes)."""
    out = []
    if rec.get("error"):
        return [f"does not compile: {rec['error']}"]
    if rec["hot"] and rec["spill_bytes"] > 0:
        out.append(f"hot variant spills {rec['spill_bytes']} B/thread")
    if rec["hot"] and rec["stack_bytes"] > 0:
        out.append(f"hot variant has a {rec['stack_bytes']} B stack frame")
    if rec["smem_bytes"] > rec["smem_limit"]:
        out.append(f"shared memory {rec['smem_bytes']} B > the {rec['arch']} limit {rec['smem_limit']} B")
    if (rec["backend"] == "triton" and rec["arch"] == "sm_90" and rec["kernel"] in MATMUL_KERNELS
            and rec.get("dtype") in HOT_DTYPES and rec["tensor_core"]["wgmma"] == 0):
        out.append("matmul-bound kernel without wgmma on sm_90")
    if (rec["backend"] == "cuda" and rec["arch"] == "sm_90" and rec["kernel"] in CUDA_WGMMA_KERNELS
            and rec["tensor_core"]["wgmma"] == 0):
        out.append("sm_90a CUDA matmul kernel without wgmma (HGMMA)")
    if rec["backend"] == "triton" and rec["hot"] and rec["kernel"] in VECTOR_KERNELS:
        vec = rec.get("vector_ldst", {})
        if not vec.get("ld128") or not vec.get("st128"):
            out.append("memory-bound kernel without 16-byte global loads/stores")
    return out


def check(records):
    """[(record, complaint)] over all records."""
    return [(r, v) for r in records for v in violations(r)]


# ------------------------------------------------------------------------------------------
# Reports of ptxas and cuobjdump
# ------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log):
    """{mangled kernel name: {regs, spill_bytes, stack_bytes, static_smem}} from `ptxas -v`."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, spill_bytes=0, stack_bytes=0, static_smem=0))
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return out


_FUNC = re.compile(r"^\s*Function : (\S+)")


def parse_sass(text):
    """{mangled kernel name: instruction counts} from `cuobjdump --dump-sass`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1), dict(wgmma=0, mma_sync=0, ld128=0, st128=0))
            continue
        if cur is None or "/*" not in line:
            continue
        code = line.split("*/", 1)[-1]
        if re.search(r"\bHGMMA\.", code):
            cur["wgmma"] += 1
        elif re.search(r"\bHMMA\.", code):
            cur["mma_sync"] += 1
        elif re.search(r"\bLDG\.[\w.]*\b128\b", code):
            cur["ld128"] += 1
        elif re.search(r"\bSTG\.[\w.]*\b128\b", code):
            cur["st128"] += 1
    return out


def _tool(name):
    """A CUDA binary: the toolkit's, else the copy in Triton's wheel."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / name).is_file():
            return str(Path(base) / "bin" / name)
    found = shutil.which(name)
    if found:
        return found
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else None


def sass_counts(cubin_path):
    res = subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin_path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {cubin_path}: {res.stderr.strip()[-500:]}")
    return parse_sass(res.stdout)


# ------------------------------------------------------------------------------------------
# Triton: capture the launches of the ops' launch code
# ------------------------------------------------------------------------------------------
@dataclass
class Launch:
    fn: object      # the JITFunction / Autotuner the launch code indexed
    grid: object
    args: tuple
    kwargs: dict
    source: str     # which scenario launched it
    hot: bool
    subset: bool


@dataclass
class Scenario:
    source: str                 # e.g. "preset B train bf16"
    dtype: object               # the compute dtype (hot when fp16/bf16 and launched by a preset/bench)
    launched: bool              # a preset or benchmark shape (not the coverage sweep)
    run: object                 # a no-argument callable running the launch code on meta tensors
    subset: object = False      # True, or a predicate on (kernel name, constexprs) for the subset


class _OfflineDriver:
    """Enough of a Triton driver to bind and compile for a GPU that is not there."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


@contextlib.contextmanager
def recording(sink, scenario):
    """Within: `kernel[grid](*args, **kwargs)` records a Launch instead of launching."""
    from triton.runtime.jit import KernelInterface

    def getitem(self, grid):
        def launch(*args, **kwargs):
            sink.append(Launch(self, grid, args, kwargs, scenario.source,
                               scenario.launched and str(scenario.dtype).split(".")[-1] in HOT_DTYPES,
                               scenario.subset))
        return launch

    saved = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = saved


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


def _attention_call(B, N, H, D, dtype, masked, Nk=None):
    """Forward + backward of masked_attention's Triton launch code on q/k/v views of a fused
    qkv projection [B, N, 3, H, D] (the layout of djepa.nn.MaskedAttention)."""
    import torch
    from djepa.ops import attention as op

    def run():
        qkv = _meta(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if Nk is not None:
            kv = _meta(B, Nk, 2, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)
        idx = cnt = None
        if masked:
            idx, cnt = op._compact(torch.ones(B, k.shape[2], dtype=torch.bool, device="meta"))
        o, lse = op._fwd_impl(q, k, v, idx, cnt, D ** -0.5, "triton")
        op._bwd_impl(torch.empty_like(o), q, k, v, o, lse, idx, cnt, D ** -0.5, "triton")
    return run


def _adaln_train_call(M, W, dtype, affine=True):
    """adaln_block forward + backward launch code (the diffusion head's training step)."""
    from djepa.ops import denoise as op

    def run():
        x, mod = _meta(M, W, dtype=dtype), _meta(M, 3 * W, dtype=dtype)
        w, b = _meta(W, W, dtype=dtype), _meta(W, dtype=dtype)
        ln_w, ln_b = _meta(W, dtype=dtype), _meta(W, dtype=dtype)
        out, h, p, a, y2, stats = op._block_fwd_impl("triton", x, mod, ln_w, ln_b, w, b, w, b, 1e-6, True)
        op._block_bwd_impl("triton", out, x, mod, ln_w, ln_b, w, w, h, p, a, y2, stats)
        op._block_fwd_impl("triton", x, mod, ln_w, ln_b, w, b, w, b, 1e-6, False)  # inference
    return run


def _fused_step_call(B, depth, W, z, C, dtype, cfg):
    """denoise_step's / the sampler's fused step launch code (with and without noise, with and
    without the next step's MLP input)."""
    import torch
    from djepa.nn import DenoisingMLP
    from djepa.ops import denoise as op

    def run():
        with torch.device("meta"):
            mlp = DenoisingMLP(C, W, 2 * C, z, depth).to(dtype)
        pk = op.packed(mlp)
        rows = 2 * B if cfg else B
        x, out = _meta(B, C, dtype=torch.float32), _meta(B, C, dtype=torch.float32)
        xin, nxt = _meta(rows, C, dtype=dtype), _meta(rows, C, dtype=dtype)
        c_emb, temb = _meta(rows, W, dtype=dtype), _meta(W, dtype=dtype)
        coefs = (1.01, 0.02, -7.0, -6.0, 1.0)
        scale = _meta((), dtype=torch.float32)  # the CFG scale is read on the device
        for noise, xn, co in ((x, nxt, coefs), (None, None, coefs[:4] + (0.0,))):
            op._fused_step(op._Triton(), pk, x, xin, c_emb, temb, noise, co, cfg, scale, out, xn)
    return run


def _ema_call(preset, x_dtype, ema_dtype, decay_tensor):
    """ema_update_'s Triton launch code over a preset's parameter list, the EMA targets being
    views of one flat buffer (as djepa.nn.EMA holds them)."""
    import torch
    from djepa.models import build
    from djepa.ops import ema as op

    def run():
        with torch.device("meta"):
            shapes = [p.shape for p in build(preset).parameters() if p.requires_grad]
        flat = _meta(sum(s.numel() for s in shapes), dtype=ema_dtype)
        emas, off = [], 0
        for s in shapes:
            emas.append(flat[off:off + s.numel()].view(s))
            off += s.numel()
        xs = [_meta(s, dtype=x_dtype) for s in shapes]
        decay = _meta((), dtype=torch.float32) if decay_tensor else 0.9999
        op._triton(emas, xs, decay, torch.device("meta"))
    return run


def _bench_attention_shapes():
    """SHAPES of benchmarks/test_bench_attention.py (read, not imported: it needs a GPU)."""
    tree = ast.parse((ROOT / "benchmarks" / "test_bench_attention.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHAPES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("benchmarks/test_bench_attention.py has no SHAPES dict")


def _bench_denoise_sizes():
    """The default token counts of benchmarks/test_bench_denoise.py (DJEPA_BENCH_DENOISE_M)."""
    text = (ROOT / "benchmarks" / "test_bench_denoise.py").read_text()
    m = re.search(r'"DJEPA_BENCH_DENOISE_M",\s*"([\d,]+)"', text)
    t = re.search(r'"DJEPA_BENCH_DENOISE_TRAIN_M",\s*"(\d+)"', text)
    if not m or not t:
        raise RuntimeError("benchmarks/test_bench_denoise.py: default sizes not found")
    return [int(s) for s in m.group(1).split(",")], int(t.group(1))


def _bench_ema_presets():
    text = (ROOT / "benchmarks" / "test_bench_ema.py").read_text()
    m = re.search(r'"DJEPA_BENCH_EMA_PRESETS",\s*"([\w,]+)"', text)
    if not m:
        raise RuntimeError("benchmarks/test_bench_ema.py: default presets not found")
    return m.group(1).split(",")


def _subset_adaln(kernel, constexprs):
    """The test suite's share of the adaLN training step: its LayerNorm backward and the GEMMs
    with the heaviest epilogues (gate + residual with the pre-activation out, dSiLU)."""
    if kernel == "gemm_kernel":
        return (constexprs["EPILOGUE"], constexprs["HAS_AUX_OUT"]) in ((2, True), (3, False))
    return kernel == "ln_mod_bwd_kernel"


def _subset_fwd(kernel, constexprs):
    return kernel == "_fwd_kernel"


def _subset_ln_bwd(kernel, constexprs):
    return kernel == "ln_mod_bwd_kernel"


def _subset_update(kernel, constexprs):
    return kernel == "denoise_update_kernel"


def scenarios(full):
    """Every launch scenario (full) or the test suite's subset of them."""
    import torch
    from djepa.models.presets import PRESETS

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    out = []
    # --- presets: the encoder (masked, T + visible tokens) and the predictor (dense, T + L)
    for name, c in PRESETS.items():
        T, L = c.class_tokens, c.seq_len
        for dims, heads in ((c.embed_dim, c.num_heads), (c.pred_embed_dim, c.pred_num_heads)):
            D = dims // heads
            for dt in (bf16, f16, f32):
                out.append(Scenario(f"preset {name} attention dense {dt}".replace("torch.", ""), dt, True,
                                    _attention_call(2, T + L, heads, D, dt, False), name == "H" and dt == bf16))
                out.append(Scenario(f"preset {name} attention masked {dt}".replace("torch.", ""), dt, True,
                                    _attention_call(2, T + max(1, int(L * (1 - c.mask_ratio_min)) | 1),
                                                    heads, D, dt, True)))
        W, depth, Cin, z = c.diffloss_width, c.diffloss_depth, c.token_channels, c.pred_embed_dim
        M = 2 * L * c.diffusion_batch_mul
        for dt in (bf16, f16, f32):
            out.append(Scenario(f"preset {name} adaln_block train {dt}".replace("torch.", ""), dt, True,
                                _adaln_train_call(M, W, dt),
                                _subset_adaln if (name == "B" and dt == bf16) else
                                _subset_ln_bwd if (name in ("L", "H") and dt == bf16) else False))
            if c.loss == "diffusion":  # the fused step serves the learned-sigma diffusion
                for cfg in (False, True):
                    out.append(Scenario(f"preset {name} denoise_step cfg={int(cfg)} {dt}".replace("torch.", ""),
                                        dt, True, _fused_step_call(37, depth, W, z, Cin, dt, cfg),
                                        _subset_update if (name == "B" and cfg and dt == bf16) else False))
        for x_dt, e_dt in ((f32, f32), (bf16, f32), (f16, f32), (bf16, bf16), (f16, f16)):
            for dtensor in (False, True):
                out.append(Scenario(f"preset {name} ema {e_dt} <- {x_dt}{' decay-tensor' if dtensor else ''}"
                                    .replace("torch.", ""), x_dt, True, _ema_call(name, x_dt, e_dt, dtensor),
                                    name == "B" and x_dt == bf16 and e_dt == f32 and not dtensor))
    # --- benchmark shapes
    for sid, (B, N, H, D) in _bench_attention_shapes().items():
        for dt in (bf16, f16):
            for masked in (False, True):
                out.append(Scenario(f"bench attention {sid} {'masked' if masked else 'dense'} {dt}"
                                    .replace("torch.", ""), dt, True, _attention_call(B, N, H, D, dt, masked)))
    sizes, train_m = _bench_denoise_sizes()
    for name in ("B", "L", "H"):
        c = PRESETS[name]
        for M in sizes:
            out.append(Scenario(f"bench denoise {name} step M={M} bf16", bf16, True,
                                _fused_step_call(M, c.diffloss_depth, c.diffloss_width, c.pred_embed_dim,
                                                 c.token_channels, bf16, False)))
        out.append(Scenario(f"bench denoise {name} train M={train_m} bf16", bf16, True,
                            _adaln_train_call(train_m, c.diffloss_width, bf16)))
    for name in _bench_ema_presets():
        for x_dt in (f32, bf16):
            out.append(Scenario(f"bench ema {name} float32 <- {x_dt}".replace("torch.", ""), x_dt, True,
                                _ema_call(name, x_dt, f32, False)))
    # --- coverage: every dtype, head dim class and width the ops accept (not hot)
    for D in (16, 32, 48, 64, 80, 96, 128, 160, 192, 256):
        for dt in (bf16, f16, f32):
            for masked in (False, True):
                sub = ((not masked and D in (64, 80, 128) and dt == f32)
                       or (masked and D == 128 and dt == f32 and _subset_fwd)
                       or (not masked and D in (192, 256) and dt == f16 and _subset_fwd))
                out.append(Scenario(f"coverage attention D={D} {'masked' if masked else 'dense'} {dt}"
                                    .replace("torch.", ""), dt, False,
                                    _attention_call(1, 100, 2, D, dt, masked, Nk=77), sub))
    for W in (64, 1000, 2048, 4096, 8192):
        for dt in (bf16, f32):
            out.append(Scenario(f"coverage adaln_block W={W} {dt}".replace("torch.", ""), dt, False,
                                _adaln_train_call(4 * 37, W, dt)))
    if full:
        return out
    return [s for s in out if s.subset]


def _expand(launch):
    """(JITFunction, kwargs) per compiled variant: one per autotune config that survives the
    autotuner's own pruning (as Autotuner.warmup does)."""
    fn = launch.fn
    if getattr(fn, "configs", None) is None:
        return [(fn, dict(launch.kwargs))]
    fn.nargs = dict(zip(fn.arg_names, launch.args))
    try:
        configs = fn.prune_configs(dict(launch.kwargs))
    finally:
        fn.nargs = None
    return [(fn.fn, {**launch.kwargs, **cfg.all_kwargs()}) for cfg in configs]


@dataclass
class TritonVariant:
    fn: object
    grid: object
    args: tuple
    kwargs: dict
    kernel: str
    label: str
    dtype: str
    constexprs: dict
    sources: list = field(default_factory=list)
    hot: bool = False


def _label(fn, specialization, kwargs):
    """A readable name of one specialisation: dtypes, constexpr arguments, warps/stages, and the
    integer arguments Triton specialised differently from 'divisible by 16'."""
    dtypes, consts, odd, ones = [], {}, [], []
    for p, (ty, attr) in zip(fn.params, specialization):
        if p.is_constexpr:
            consts[p.name] = attr
        elif ty.startswith("*"):
            if ty[1:] not in dtypes:
                dtypes.append(ty[1:])
            if attr != "D":
                odd.append(p.name)
        elif ty == "constexpr":
            ones.append(f"{p.name}={attr}")
        elif ty.startswith("i") and attr != "D":
            odd.append(p.name)
    parts = ["/".join(dtypes)] + [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in consts.items()]
    parts.append(f"w{kwargs.get('num_warps', 4)}s{kwargs.get('num_stages', 3)}")
    if ones:
        parts.append(",".join(ones))
    if odd:
        parts.append("~16:" + ",".join(odd))
    return " ".join(parts), consts


def _first_float_dtype(specialization):
    for ty, _ in specialization:
        if ty in ("*fp16", "*bf16", "*fp32"):
            return {"*fp16": "float16", "*bf16": "bfloat16", "*fp32": "float32"}[ty]
    return None


def triton_variants(full, arch):
    """The deduplicated Triton variants of every scenario (capture runs on meta tensors)."""
    from triton.runtime import driver

    driver.set_active(_OfflineDriver(arch))
    launches = []
    for sc in scenarios(full):
        with recording(launches, sc):
            sc.run()
    variants = {}
    for ln in launches:
        for jit_fn, kwargs in _expand(ln):
            binder = jit_fn.device_caches[0][4]
            _, spec, opts = binder(*ln.args, **kwargs)
            label, consts = _label(jit_fn, spec, kwargs)
            if not full and callable(ln.subset) and not ln.subset(jit_fn.__name__, consts):
                continue
            key = (jit_fn.__name__, str(spec), str(sorted(opts.items())))
            v = variants.get(key)
            if v is None:
                v = variants[key] = TritonVariant(jit_fn, ln.grid, ln.args, kwargs, jit_fn.__name__, label,
                                                  _first_float_dtype(spec), consts)
            if ln.source not in v.sources:
                v.sources.append(ln.source)
            v.hot = v.hot or ln.hot
    return list(variants.values())


def compile_triton(v, arch):
    """One Record of a Triton variant."""
    from triton import knobs

    consts = {k: int(x) if isinstance(x, bool) else x if isinstance(x, (int, float, str)) else str(x)
              for k, x in v.constexprs.items()}
    base = dict(dtype=v.dtype, constexprs=consts,
                sources=v.sources[:6] + ([f"... {len(v.sources) - 6} more"] if len(v.sources) > 6 else []))
    knobs.nvidia.dump_ptxas_log = True
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kern = v.fn.warmup(*v.args, grid=v.grid, **v.kwargs)
    except Exception as exc:  # a compile error is a gate failure, reported with the variant
        msg = str(exc).strip().splitlines()
        return record("triton", v.kernel, v.label, arch, hot=v.hot, error=(msg[0] if msg else repr(exc))[:300],
                      detail="\n".join(msg)[-2000:], **base)
    reports = parse_ptxas(log.getvalue())
    rep = next(iter(reports.values()), dict(regs=0, spill_bytes=0, stack_bytes=0, static_smem=0))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kern.asm["cubin"])
        sass = next(iter(sass_counts(cubin).values()), dict(wgmma=0, mma_sync=0, ld128=0, st128=0))
    smem = max(int(kern.metadata.shared), rep["static_smem"])
    return record("triton", v.kernel, v.label, arch, regs=rep["regs"], spill_bytes=rep["spill_bytes"],
                  stack_bytes=rep["stack_bytes"], smem_bytes=smem, wgmma=sass["wgmma"],
                  mma_sync=sass["mma_sync"], hot=v.hot, vector_ldst=dict(ld128=sass["ld128"], st128=sass["st128"]),
                  num_warps=int(kern.metadata.num_warps), compile_s=round(time.time() - t0, 2), **base)


# ------------------------------------------------------------------------------------------
# CUDA: csrc/*.cu through nvcc
# ------------------------------------------------------------------------------------------
# Dynamic shared memory is a launch argument, not in the cubin: per kernel, the C++ expression
# the host code launches with ({0}, {1}, ... = the instantiation's template arguments), read by
# compiling a small probe against the kernels' headers (a renamed constant fails it loudly).
CUDA_DYNAMIC_SMEM = {
    "djepa::attention::fwd_kernel": ("attention_kernels.cuh", "djepa::attention::FwdCfg<{1}>::kSmem"),
    "djepa::attention::dkdv_kernel": ("attention_kernels.cuh", "djepa::attention::DkdvCfg<{1}>::kSmem"),
    "djepa::attention::dq_kernel": ("attention_kernels.cuh", "djepa::attention::DqCfg<{1}>::kSmem"),
    "djepa::denoise::gemm_kernel": ("denoise_kernels.cuh", "djepa::denoise::kGemmSmem"),
    # launch_ln: 2 * W floats with W <= NC * 32 * VEC (NC = 0: none)
    "djepa::denoise::adaln_bwd_kernel": ("denoise_kernels.cuh", "2 * {2} * 32 * {1} * sizeof(float)"),
    # csrc/*_sm90.cu (sm_90a): the shared-memory plans of csrc/hopper/*_config.cuh
    "djepa::hopper::attn::attn_fwd_sm90_kernel": ("hopper/attn_config.cuh",
                                                  "djepa::hopper::attn::Chunks<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dkdv_sm90_kernel": ("hopper/attn_config.cuh",
                                                   "djepa::hopper::attn::BwdShape<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dq_sm90_kernel": ("hopper/attn_config.cuh",
                                                 "djepa::hopper::attn::BwdShape<{1}>::kSmemBytes"),
    "djepa::hopper::gemm::gemm_sm90_kernel": ("hopper/gemm_config.cuh", "djepa::hopper::gemm::kSmemBytes"),
}
# The sm_90a matmul kernels: on sm_90 each must compile to wgmma (HGMMA).
CUDA_WGMMA_KERNELS = {"attn_fwd_sm90_kernel", "attn_dkdv_sm90_kernel", "attn_dq_sm90_kernel", "gemm_sm90_kernel"}
CUDA_ATTENTION_KERNELS = {"djepa::attention::fwd_kernel", "djepa::attention::dkdv_kernel",
                          "djepa::attention::dq_kernel", "djepa::hopper::attn::attn_fwd_sm90_kernel",
                          "djepa::hopper::attn::attn_dkdv_sm90_kernel", "djepa::hopper::attn::attn_dq_sm90_kernel"}
CUDA_LN_KERNELS = {"djepa::denoise::adaln_fwd_kernel", "djepa::denoise::adaln_bwd_kernel"}
_SIXTEEN_BIT = {"__half": 2, "__nv_bfloat16": 2}


def _nvcc():
    return _tool("nvcc")


def _include_flags():
    import sysconfig

    flags = ["-I", str(ROOT / "csrc"), "-I", sysconfig.get_paths()["include"]]
    try:
        import pybind11

        flags += ["-I", pybind11.get_include()]
    except ImportError:  # torch ships the pybind11 headers
        import torch

        flags += ["-I", str(Path(torch.__file__).parent / "include")]
    return flags


def _nvcc_flags(arch):
    return ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", ARCHS[arch]["gencode"],
            f'-DDJEPA_CUDA_ARCHS="{arch}"', '-DDJEPA_CUDA_VERSION="static-check"'] + _include_flags()


def compile_cuda_file(path, arch):
    """[(mangled name, ptxas report, sass counts)] of one .cu file, or raises."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (Path(path).stem + ".cubin")
        cmd = [_nvcc(), *_nvcc_flags(arch), "-cubin", "-Xptxas", "-v", str(path), "-o", str(cubin)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {path}:\n{res.stderr.strip()[-2000:]}")
        reports = parse_ptxas(res.stdout + res.stderr)
        sass = sass_counts(cubin)
    return [(name, rep, sass.get(name, {})) for name, rep in reports.items()]


def _demangle(names):
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, res.stdout.splitlines()))


def split_template(demangled):
    """('djepa::attention::fwd_kernel', ['__nv_bfloat16', '128']) from a demangled signature."""
    s = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    s = s[5:] if s.startswith("void ") else s
    if "<" not in s:
        return s, []
    name, rest = s.split("<", 1)
    args, depth, cur = [], 0, ""
    for ch in rest.rsplit(">", 1)[0]:
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += ch == "<"
        depth -= ch == ">"
        cur += ch
    args.append(cur.strip())
    return name, args


def _ln_chunks(W, vec):
    """The NC template argument csrc/denoise.cu's dispatch_ln picks for width W (vector path)."""
    nch = -(-W // (32 * vec))
    for nc in (1, 2, 4, 6, 8):
        if nch <= nc:
            return nc
    return 0


def hot_shapes():
    """Head dims and denoise widths the presets and benchmarks launch."""
    from djepa.models.presets import PRESETS

    dims = {c.embed_dim // c.num_heads for c in PRESETS.values()}
    dims |= {c.pred_embed_dim // c.pred_num_heads for c in PRESETS.values()}
    dims |= {D for (_, _, _, D) in _bench_attention_shapes().values()}
    widths = {c.diffloss_width for c in PRESETS.values()}
    return dims, widths


def cuda_hot(name, args, dims, widths):
    """Whether the CUDA instantiation serves a preset/benchmark shape in fp16/bf16 (mirrors the
    host dispatch of csrc/: attention by head dim, the LayerNorm kernels by chunk count)."""
    if not any(a in _SIXTEEN_BIT for a in args):
        return False
    if name in CUDA_ATTENTION_KERNELS:
        return int(args[1]) in dims
    if name in CUDA_LN_KERNELS:
        vec = int(args[1])
        return vec == 16 // _SIXTEEN_BIT.get(args[0], 4) and int(args[2]) in {_ln_chunks(W, vec) for W in widths}
    return True


def dynamic_smem(instances, arch):
    """{(name, tuple(args)): bytes} for the kernels of CUDA_DYNAMIC_SMEM, by one probe program."""
    wanted = [(n, a) for n, a in instances if n in CUDA_DYNAMIC_SMEM]
    if not wanted:
        return {}
    headers = sorted({CUDA_DYNAMIC_SMEM[n][0] for n, _ in wanted})
    lines = [f'#include "{h}"' for h in headers] + ["#include <cstdio>", "int main() {"]
    for n, a in wanted:
        lines.append(f'  std::printf("%lld\\n", (long long)({CUDA_DYNAMIC_SMEM[n][1].format(*a)}));')
    lines.append("  return 0;\n}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "smem_probe.cu", Path(tmp) / "smem_probe"
        src.write_text("\n".join(lines) + "\n")
        res = subprocess.run([_nvcc(), *_nvcc_flags(arch), str(src), "-o", str(exe)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("the dynamic shared memory probe (CUDA_DYNAMIC_SMEM in tools/static_check.py) "
                               f"does not compile against csrc/:\n{res.stderr.strip()[-1500:]}")
        values = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    return {(n, tuple(a)): int(x) for (n, a), x in zip(wanted, values)}


def cuda_records(results, arch):
    """Records from [(file, [(mangled, report, sass)]) or (file, error)]."""
    dims, widths = hot_shapes()
    out, items = [], []
    for path, res in results:
        if isinstance(res, str):
            out.append(record("cuda", Path(path).name, "(file)", arch, error=res.splitlines()[0][:300],
                              detail=res[-2000:]))
            continue
        dem = _demangle([m for m, _, _ in res])
        for mangled, rep, sass in res:
            name, args = split_template(dem[mangled])
            items.append((path, mangled, name, args, rep, sass))
    try:
        dyn = dynamic_smem([(n, a) for _, _, n, a, _, _ in items], arch)
        probe_error = None
    except RuntimeError as exc:
        dyn, probe_error = {}, str(exc)
    for path, mangled, name, args, rep, sass in sorted(items, key=lambda t: (t[2], t[3])):
        extra = dict(file=f"csrc/{Path(path).name}", mangled=mangled, static_smem=rep["static_smem"],
                     dynamic_smem=dyn.get((name, tuple(args)), 0))
        if probe_error and name in CUDA_DYNAMIC_SMEM:
            extra["error"] = probe_error.splitlines()[0]
            extra["detail"] = probe_error
        out.append(record("cuda", name.split("::")[-1], "<" + ", ".join(args) + ">", arch, regs=rep["regs"],
                          spill_bytes=rep["spill_bytes"], stack_bytes=rep["stack_bytes"],
                          smem_bytes=rep["static_smem"] + extra["dynamic_smem"], wgmma=sass.get("wgmma", 0),
                          mma_sync=sass.get("mma_sync", 0), hot=cuda_hot(name, args, dims, widths), **extra))
    return out


def cuda_sources(full):
    files = sorted((ROOT / "csrc").glob("*.cu"))
    return files if full else [f for f in files if f.name == "ema.cu"]


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
_WORK = {}


def _run_job(job):
    kind, arch, item = job
    if kind == "triton":
        return kind, compile_triton(_WORK["variants"][item], arch)
    path = item
    try:
        return kind, (path, compile_cuda_file(path, arch))
    except Exception as exc:
        return kind, (path, str(exc))


def run_gate(arch=90, full=False, jobs=None, only=None, kernel_filter=None, verbose=True, hot_only=False):
    """All records of one gate run, each stamped with its toolchain and the day it was compiled."""
    t0 = time.time()
    jobs_list = []
    if only in (None, "cuda"):
        if _nvcc() is None:
            raise SystemExit("static_check: nvcc not found (CUDA_HOME, PATH, /usr/local/cuda); use --only triton")
        jobs_list += [("cuda", arch, str(p)) for p in cuda_sources(full)]
    if only in (None, "triton"):
        variants = triton_variants(full, arch)
        if kernel_filter:
            variants = [v for v in variants if re.search(kernel_filter, v.kernel)]
        if hot_only:
            variants = [v for v in variants if v.hot]
        _WORK["variants"] = variants
        jobs_list += [("triton", arch, i) for i in range(len(variants))]
        if verbose:
            print(f"static_check: {len(variants)} Triton variants, {len(jobs_list) - len(variants)} CUDA files, "
                  f"sm_{arch}, {jobs} jobs", file=sys.stderr)
    triton_recs, cuda_results = [], []
    # The CUDA files are the longest jobs: submitted first.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs_list]
        for n, fut in enumerate(as_completed(futures), 1):
            kind, res = fut.result()
            (triton_recs if kind == "triton" else cuda_results).append(res)
            if verbose and n % 50 == 0:
                print(f"static_check: {n}/{len(jobs_list)} compiled ({time.time() - t0:.0f} s)", file=sys.stderr)
    records = cuda_records(cuda_results, arch) if cuda_results else []
    records += sorted(triton_recs, key=lambda r: (r["kernel"], r["variant"]))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for r in records:
        r["toolchain"], r["date"] = _toolchain(r["backend"]), day
    return records, time.time() - t0


def _toolchain(backend):
    if backend == "triton":
        import triton

        return f"triton {triton.__version__}"
    nv = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout if _nvcc() else ""
    m = re.search(r"release ([\d.]+)", nv)
    return f"nvcc {m.group(1) if m else 'absent'}"


def _record_order(r):
    return (r["backend"] != "cuda", r["kernel"], r["variant"])


def merge(old, new, backends, kernel_filter=None):
    """`old` with the records a run of `backends` (Triton: only kernels matching kernel_filter)
    replaced by `new`: refreshes one backend's part of a committed table."""
    def replaced(r):
        if r["backend"] not in backends:
            return False
        return r["backend"] != "triton" or not kernel_filter or re.search(kernel_filter, r["kernel"])
    archs = {r["arch"] for r in old + new}
    if len(archs) > 1:
        raise ValueError(f"cannot merge records of different archs: {sorted(archs)}")
    return sorted([r for r in old if not replaced(r)] + new, key=_record_order)


def _versions(records):
    """'triton 3.9.0 (2026-12-02) for 700 Triton records; ...' from the records' stamps."""
    parts = []
    for backend in ("cuda", "triton"):
        stamps = sorted({(r.get("toolchain", "?"), r.get("date", "?")) for r in records if r["backend"] == backend})
        n = sum(1 for r in records if r["backend"] == backend)
        if n:
            parts.append(f"{backend.upper() if backend == 'cuda' else 'Triton'}: "
                         f"{', '.join(f'{t} on {d}' for t, d in stamps)} ({n} records)")
    return "; ".join(parts) or "no records"


HOT_SCOPE = "hot Triton variants"


def markdown(records, arch, elapsed, full, scope=None):
    bad = check(records)
    hot = [r for r in records if r["hot"]]
    lines = [
        f"# Static gate, {ARCHS[arch]['name']} ({scope or ('full' if full else 'subset')})",
        "",
        f"`python tools/static_check.py --arch {arch}{' --full' if full else ''}"
        f"{' --hot --only triton' if scope == HOT_SCOPE else ''}`. {_versions(records)}; "
        f"last run {elapsed:.0f} s. Shared-memory limit {ARCHS[arch]['smem_limit']} B per block. "
        f"{len(records)} variants, {len(hot)} hot; "
        f"hot with spills: {sum(1 for r in hot if r['spill_bytes'])}, with a stack frame: "
        f"{sum(1 for r in hot if r['stack_bytes'])}; all with spills: "
        f"{sum(1 for r in records if r['spill_bytes'])}; gate violations: {len(bad)}.",
        "",
    ]
    for backend in ("cuda", "triton"):
        mine, hot_mine = [r for r in records if r["backend"] == backend], [r for r in hot if r["backend"] == backend]
        if mine:
            lines += [f"- {backend}: {len(mine)} variants, {len(hot_mine)} hot; hot with spills or a stack frame: "
                      f"{sum(1 for r in hot_mine if r['spill_bytes'] or r['stack_bytes'])}; violations: "
                      f"{sum(1 for r, _ in bad if r['backend'] == backend)}"]
    lines.append("")
    if bad:
        lines += ["## Violations", ""]
        lines += [f"- {r['backend']} `{r['kernel']}` {r['variant']}: {v}" for r, v in bad]
        lines.append("")
    lines += ["| backend | kernel | variant | hot | regs | spill B | stack B | smem B | wgmma | mma.sync | ld/st 128 |",
              "|---|---|---|:-:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in records:
        vec = r.get("vector_ldst")
        ldst = f"{vec['ld128']}/{vec['st128']}" if vec else ""
        mark = " **!**" if violations(r) else ""
        err = f" (error: {r['error']})" if r.get("error") else ""
        lines.append(f"| {r['backend']} | {r['kernel']}{mark} | {r['variant']}{err} | {'yes' if r['hot'] else ''} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['stack_bytes']} | {r['smem_bytes']} | "
                     f"{r['tensor_core']['wgmma']} | {r['tensor_core']['mma_sync']} | {ldst} |")
    return "\n".join(lines) + "\n"


def _prepare_environment():
    """Compile for the GPU, never the interpreter (the test suite sets TRITON_INTERPRET=1), into
    a fresh cache (a cached kernel comes back without its ptxas report). Before triton imports."""
    if "triton" in sys.modules:
        raise RuntimeError("static_check must run in its own process (triton is already imported)")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="djepa-static-triton-")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90)
    ap.add_argument("--full", action="store_true", help="every variant (default: the test suite's subset)")
    ap.add_argument("--json", metavar="OUT", help="write the records here (and a Markdown table at OUT.md); "
                    "default with --full: benchmarks/results/static/sm_<arch>.json")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    ap.add_argument("--only", choices=("triton", "cuda"), help="one backend only")
    ap.add_argument("--kernel", metavar="REGEX", help="only Triton kernels whose name matches")
    ap.add_argument("--hot", action="store_true", help="only the hot Triton variants")
    ap.add_argument("--merge", action="store_true", help="keep the records of OUT that this run does not "
                    "replace (the other backend; with --kernel, the other Triton kernels) and write both")
    ap.add_argument("--list", action="store_true", help="list the Triton variants (no compiling)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    _prepare_environment()
    try:
        return _main(args)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)


def _main(args):
    if args.list:
        for v in triton_variants(args.full, args.arch):
            if not args.kernel or re.search(args.kernel, v.kernel):
                print(f"{'hot ' if v.hot else '    '}{v.kernel} {v.label}  <- {v.sources[0]}"
                      f"{f' (+{len(v.sources) - 1})' if len(v.sources) > 1 else ''}")
        return 0
    default_out = ROOT / "benchmarks" / "results" / "static" / f"sm_{args.arch}.json"
    out = args.json
    if out is None and (args.merge or (args.full and args.only is None and args.kernel is None and not args.hot)):
        out = default_out
    records, elapsed = run_gate(args.arch, args.full, args.jobs, args.only, args.kernel, hot_only=args.hot)
    if args.merge and Path(out).is_file():
        backends = {"triton", "cuda"} if args.only is None else {args.only}
        records = merge(json.loads(Path(out).read_text()), records, backends, args.kernel)
    md = markdown(records, args.arch, elapsed, args.full, HOT_SCOPE if args.hot else None)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"static_check: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    bad = check(records)
    for r, v in bad:
        print(f"static_check: FAIL {r['backend']} {r['kernel']} [{r['variant']}]: {v}", file=sys.stderr)
    print(f"static_check: {len(records)} variants, {len(bad)} violations, {elapsed:.0f} s", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
