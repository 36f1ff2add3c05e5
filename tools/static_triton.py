"""The static gate's Triton half: every kernel variant the ops can launch, captured from the
ops' own launch code and compiled for a GPU that is not there.

The launch code (djepa.ops.* and djepa.kernels.*) runs on meta tensors with `kernel[grid](...)`
replaced by a recorder (`recording`), over the preset shapes (tiny/B/L/H), the benchmark shapes,
and (full) a coverage sweep of dtypes, head dims and widths (`scenarios`); every autotune config
of an autotuned kernel is a variant of its own. Each variant goes through Triton's own binder (so
its specialisation is exactly what a launch would compile) and `triton.compile` for
GPUTarget("cuda", ARCH, 32) behind a stand-in driver (`compile_triton`).

Triton is imported lazily: tools/static_check.py sets its environment up before.
"""
import contextlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sass import dump_sass, parse_ptxas, parse_sass, parse_wgmma_serialized
from static_rules import HOT_DTYPES, record
from static_shapes import bench_attention_dropout, bench_attention_shapes, bench_denoise_sizes, bench_ema_presets


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
    op: str = ""                # the kernel module it launches (djepa.kernels.<op>): attention, denoise, ema


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


def _attention_call(B, N, H, D, dtype, masked, Nk=None, dropout_p=0.0, write_keep=False):
    """Forward + backward of masked_attention's Triton launch code on q/k/v views of a fused
    qkv projection [B, N, 3, H, D] (the layout of djepa.nn.MaskedAttention). dropout_p > 0: the
    dropout kernels, with the generator state the op draws (philox_state) and the threshold
    it derives from p (an int argument: Triton specialises it by divisibility as any other);
    write_keep: the forward's debug variant storing its keep bits (return_dropout_mask), forward only."""
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
        rng = op.philox_state(None, torch.device("meta")) if dropout_p > 0 else None
        keep = None
        if write_keep:
            keep = torch.zeros(B, H, N, k.shape[2], dtype=torch.uint8, device="meta")
        o, lse = op._fwd_impl(q, k, v, idx, cnt, D ** -0.5, "triton", rng, dropout_p, keep)
        if not write_keep:
            op._bwd_impl(torch.empty_like(o), q, k, v, o, lse, idx, cnt, D ** -0.5, "triton", rng, dropout_p)
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


COVERAGE_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256)


def scenarios(full):
    """Every launch scenario (full) or the test suite's subset of them."""
    import torch
    from djepa.models.presets import PRESETS

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    out = []
    # --- presets: the encoder (masked, T + visible tokens) and the predictor (dense, T + L), in
    # training with the preset's attention dropout too (both run their Blocks with attn_drop)
    for name, c in PRESETS.items():
        T, L = c.class_tokens, c.seq_len
        for dims, heads in ((c.embed_dim, c.num_heads), (c.pred_embed_dim, c.pred_num_heads)):
            D = dims // heads
            for p in ((0.0, c.attn_dropout) if c.attn_dropout > 0 else (0.0,)):
                drop = f" dropout={p:g}" if p else ""
                for dt in (bf16, f16, f32):
                    out.append(Scenario(f"preset {name} attention dense{drop} {dt}".replace("torch.", ""), dt, True,
                                        _attention_call(2, T + L, heads, D, dt, False, dropout_p=p),
                                        name == "H" and dt == bf16 and not p, "attention"))
                    out.append(Scenario(f"preset {name} attention masked{drop} {dt}".replace("torch.", ""), dt, True,
                                        _attention_call(2, T + max(1, int(L * (1 - c.mask_ratio_min)) | 1),
                                                        heads, D, dt, True, dropout_p=p),
                                        name == "B" and dt == bf16 and p > 0, "attention"))
        W, depth, Cin, z = c.diffloss_width, c.diffloss_depth, c.token_channels, c.pred_embed_dim
        M = 2 * L * c.diffusion_batch_mul
        for dt in (bf16, f16, f32):
            out.append(Scenario(f"preset {name} adaln_block train {dt}".replace("torch.", ""), dt, True,
                                _adaln_train_call(M, W, dt),
                                _subset_adaln if (name == "B" and dt == bf16) else
                                _subset_ln_bwd if (name in ("L", "H") and dt == bf16) else False, "denoise"))
            if c.loss == "diffusion":  # the fused step serves the learned-sigma diffusion
                for cfg in (False, True):
                    out.append(Scenario(f"preset {name} denoise_step cfg={int(cfg)} {dt}".replace("torch.", ""),
                                        dt, True, _fused_step_call(37, depth, W, z, Cin, dt, cfg),
                                        _subset_update if (name == "B" and cfg and dt == bf16) else False, "denoise"))
        for x_dt, e_dt in ((f32, f32), (bf16, f32), (f16, f32), (bf16, bf16), (f16, f16)):
            for dtensor in (False, True):
                out.append(Scenario(f"preset {name} ema {e_dt} <- {x_dt}{' decay-tensor' if dtensor else ''}"
                                    .replace("torch.", ""), x_dt, True, _ema_call(name, x_dt, e_dt, dtensor),
                                    name == "B" and x_dt == bf16 and e_dt == f32 and not dtensor, "ema"))
    # --- benchmark shapes (the dropout mode at its own shapes and p)
    drop_shapes, bench_p = bench_attention_dropout()
    for sid, (B, N, H, D) in bench_attention_shapes().items():
        for p in ((0.0, bench_p) if sid in drop_shapes else (0.0,)):
            drop = f" dropout={p:g}" if p else ""
            for dt in (bf16, f16):
                for masked in (False, True):
                    out.append(Scenario(f"bench attention {sid} {'masked' if masked else 'dense'}{drop} {dt}"
                                        .replace("torch.", ""), dt, True,
                                        _attention_call(B, N, H, D, dt, masked, dropout_p=p), op="attention"))
    sizes, train_m = bench_denoise_sizes()
    for name in ("B", "L", "H"):
        c = PRESETS[name]
        for M in sizes:
            out.append(Scenario(f"bench denoise {name} step M={M} bf16", bf16, True,
                                _fused_step_call(M, c.diffloss_depth, c.diffloss_width, c.pred_embed_dim,
                                                 c.token_channels, bf16, False), op="denoise"))
        out.append(Scenario(f"bench denoise {name} train M={train_m} bf16", bf16, True,
                            _adaln_train_call(train_m, c.diffloss_width, bf16), op="denoise"))
    for name in bench_ema_presets():
        for x_dt in (f32, bf16):
            out.append(Scenario(f"bench ema {name} float32 <- {x_dt}".replace("torch.", ""), x_dt, True,
                                _ema_call(name, x_dt, f32, False), op="ema"))
    # --- coverage: every dtype, head dim class and width the ops accept (not hot). Dropout at
    # p = 0.5, whose threshold (32768) is divisible by 16, where the presets' 0.1 (6554) is not:
    # both specialisations of the threshold argument are compiled. The debug forward that stores
    # its keep bits (return_dropout_mask) is covered at every head dim, forward only.
    for D in COVERAGE_HEAD_DIMS:
        for dt in (bf16, f16, f32):
            for masked in (False, True):
                sub = ((not masked and D in (64, 80, 128) and dt == f32)
                       or (masked and D == 128 and dt == f32 and _subset_fwd)
                       or (not masked and D in (192, 256) and dt == f16 and _subset_fwd))
                kind = "masked" if masked else "dense"
                out.append(Scenario(f"coverage attention D={D} {kind} {dt}".replace("torch.", ""), dt, False,
                                    _attention_call(1, 100, 2, D, dt, masked, Nk=77), sub, "attention"))
                out.append(Scenario(f"coverage attention D={D} {kind} dropout=0.5 {dt}".replace("torch.", ""), dt,
                                    False, _attention_call(1, 100, 2, D, dt, masked, Nk=77, dropout_p=0.5),
                                    op="attention"))
                out.append(Scenario(f"coverage attention D={D} {kind} dropout=0.1 keep-bits {dt}"
                                    .replace("torch.", ""), dt, False,
                                    _attention_call(1, 100, 2, D, dt, masked, Nk=77, dropout_p=0.1,
                                                    write_keep=True), op="attention"))
    for W in (64, 1000, 2048, 4096, 8192):
        for dt in (bf16, f32):
            out.append(Scenario(f"coverage adaln_block W={W} {dt}".replace("torch.", ""), dt, False,
                                _adaln_train_call(4 * 37, W, dt), op="denoise"))
    missing = [s.source for s in out if not s.op]
    if missing:
        raise RuntimeError(f"static_triton: scenarios without their op: {missing[:3]}")
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
    op: str = ""
    sources: list = field(default_factory=list)
    hot: bool = False


def kernel_op(jit_fn):
    """The op of a Triton kernel: its module djepa.kernels.<op>."""
    module = getattr(jit_fn, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("djepa.kernels.") else module


def triton_kernel_ops():
    """{kernel name: op} of every Triton kernel in djepa.kernels.* (for records that carry no op)."""
    import importlib
    import pkgutil

    import djepa.kernels
    from triton.runtime import Autotuner, JITFunction

    out = {}
    for mod in pkgutil.iter_modules(djepa.kernels.__path__):
        m = importlib.import_module(f"djepa.kernels.{mod.name}")
        for name, obj in vars(m).items():
            if isinstance(obj, (JITFunction, Autotuner)):
                out[getattr(obj, "fn", obj).__name__] = mod.name
    return out


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


def triton_variants(full, arch, op=None, scenario_filter=None):
    """The deduplicated Triton variants of every scenario (capture runs on meta tensors); op:
    only the kernels of djepa.kernels.<op>; scenario_filter: a regex on the scenario names."""
    import re

    from triton.runtime import driver

    driver.set_active(_OfflineDriver(arch))
    launches = []
    for sc in scenarios(full):
        if (op and sc.op != op) or (scenario_filter and not re.search(scenario_filter, sc.source)):
            continue
        with recording(launches, sc):
            sc.run()
    variants = {}
    for ln in launches:
        for jit_fn, kwargs in _expand(ln):
            if op and kernel_op(jit_fn) != op:
                continue
            binder = jit_fn.device_caches[0][4]
            _, spec, opts = binder(*ln.args, **kwargs)
            label, consts = _label(jit_fn, spec, kwargs)
            if not full and callable(ln.subset) and not ln.subset(jit_fn.__name__, consts):
                continue
            key = (jit_fn.__name__, str(spec), str(sorted(opts.items())))
            v = variants.get(key)
            if v is None:
                v = variants[key] = TritonVariant(jit_fn, ln.grid, ln.args, kwargs, jit_fn.__name__, label,
                                                  _first_float_dtype(spec), consts, kernel_op(jit_fn))
            if ln.source not in v.sources:
                v.sources.append(ln.source)
            v.hot = v.hot or ln.hot
    return list(variants.values())


def compile_triton(v, arch):
    """One Record of a Triton variant."""
    from triton import knobs

    consts = {k: int(x) if isinstance(x, bool) else x if isinstance(x, (int, float, str)) else str(x)
              for k, x in v.constexprs.items()}
    base = dict(op=v.op, dtype=v.dtype, constexprs=consts,
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
    serialized = [m for msgs in parse_wgmma_serialized(log.getvalue()).values() for m in msgs]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kern.asm["cubin"])
        sass = next(iter(parse_sass(dump_sass(cubin)).values()), dict(wgmma=0, mma_sync=0, ld128=0, st128=0))
    smem = max(int(kern.metadata.shared), rep["static_smem"])
    return record("triton", v.kernel, v.label, arch, regs=rep["regs"], spill_bytes=rep["spill_bytes"],
                  stack_bytes=rep["stack_bytes"], smem_bytes=smem, wgmma=sass["wgmma"],
                  mma_sync=sass["mma_sync"], hot=v.hot, vector_ldst=dict(ld128=sass["ld128"], st128=sass["st128"]),
                  num_warps=int(kern.metadata.num_warps), compile_s=round(time.time() - t0, 2),
                  wgmma_serialized=serialized, **base)

