"""`djepa tune`: which backend is fastest for each op, shape bucket and dtype on this GPU.

`run` times every backend that serves each case of `cases()` (the preset and benchmark shapes of
every op, built from the model presets) with `triton.testing.do_bench` (median, after a warm-up
call that also compiles and autotunes), and `main` writes what it measured as a tuning table
(the format, matching and lookup: djepa/tune_table.py, which the dispatch layer reads without
importing this module or the models). The table is rewritten after every case, so a run cut
short (--budget spent, SIGINT, SIGTERM, even SIGKILL) leaves what it measured, marked partial.
"""
import functools
import math
import signal
import sys
import time
from pathlib import Path

import torch

from djepa import backends as _backends
from djepa.tune_table import (BACKEND_NAMES, ENV_VAR, FORMAT, MATCH_FIELDS, MAX_DISTANCE,  # noqa: F401
                              SHIPPED_DIR, Table, TableError, bucket, bucket_key, build_mismatch,
                              candidate_paths, default_path, distance, dtype_name, explain, is_table,
                              order_from_entry, served_arch, user_cache_dir, write_table)


def environment(device: torch.device) -> dict:
    """What a table measured on `device` records about it (djepa.backends.table_environment)."""
    return _backends.table_environment(device)


# ----------------------------------------------------------------------------- cases
class Case:
    """One op at one shape and dtype. `build(device)` allocates the inputs and returns a function
    `run(backend)` that makes one call of the op with that explicit backend."""

    def __init__(self, op, dtype, dims, shape, build):
        self.op, self.dtype, self.dims, self.shape, self.build = op, dtype, dims, shape, build
        self.bucket = bucket(op, **dims)
        self.key = bucket_key(self.bucket)

    def __repr__(self):
        return f"Case({self.op} {dtype_name(self.dtype)} {self.key}: {self.shape})"


def _attention_case(B, N, H, D, dtype, train, density=0.5):
    def build(device):
        from djepa.ops import masked_attention

        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g, requires_grad=train)
                   for _ in range(3))
        mask = torch.rand(B, N, device=device, generator=g) < density
        do = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)

        def run(backend):
            if not train:
                with torch.no_grad():
                    return masked_attention(q, k, v, mask, backend=backend)
            o = masked_attention(q, k, v, mask, backend=backend)
            return torch.autograd.grad(o, (q, k, v), do)
        return run

    mode = "fwd+bwd" if train else "fwd"
    return Case("masked_attention", dtype, dict(D=D, Nk=N, train=train),
                f"B{B} H{H} N{N} D{D} mask {density} {mode}", build)


def _block_case(M, W, dtype, train):
    def build(device):
        from djepa.ops import adaln_block

        g = torch.Generator(device=device).manual_seed(0)

        def r(*shape, s=1.0):
            return (s * torch.randn(*shape, device=device, generator=g)).to(dtype).requires_grad_(train)
        x, mod = r(M, W), r(M, 3 * W, s=0.5)
        args = (x, mod, r(W, s=0.1), r(W, s=0.1), r(W, W, s=W ** -0.5), r(W, s=0.1), r(W, W, s=W ** -0.5),
                r(W, s=0.1))
        dout = torch.randn(M, W, device=device, generator=g).to(dtype)

        def run(backend):
            if not train:
                with torch.no_grad():
                    return adaln_block(*args, backend=backend)
            out = adaln_block(*args, backend=backend)
            return torch.autograd.grad(out, args, dout)
        return run

    return Case("adaln_block", dtype, dict(W=W, M=M, train=train),
                f"M{M} W{W} {'fwd+bwd' if train else 'fwd'}", build)


def _step_case(B, preset, dtype, cfg=True):
    from djepa.models.presets import get_config

    c = get_config(preset)
    W, depth, z, C = c.diffloss_width, c.diffloss_depth, c.pred_embed_dim, c.token_channels
    rows = 2 * B if cfg else B

    def build(device):
        from djepa.diffusion import create_diffusion
        from djepa.nn import DenoisingMLP
        from djepa.ops import denoise_step

        torch.manual_seed(0)
        mlp = DenoisingMLP(C, W, 2 * C, z, depth).to(device=device, dtype=dtype).eval()
        for p in mlp.parameters():  # MAR zero-initialises the adaLN and output layers
            torch.nn.init.normal_(p, std=0.02)
        diffusion = create_diffusion(timestep_respacing="100", noise_schedule="cosine", learn_sigma=True)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, C, device=device, generator=g)
        with torch.no_grad():
            c_emb = mlp.cond_embed(torch.randn(rows, z, device=device, generator=g).to(dtype))
        noise = torch.randn(B, C, device=device, generator=g)

        def run(backend):
            return denoise_step(mlp, x, c_emb, diffusion, 50, noise=noise, cfg_scale=3.0 if cfg else 1.0,
                                backend=backend)
        return run

    return Case("denoise_step", dtype, dict(W=W, M=rows), f"preset {preset} head (depth {depth}) B{B}"
                f"{' cfg' if cfg else ''}", build)


@functools.lru_cache(maxsize=None)
def _param_shapes(preset):
    from djepa.models import build

    with torch.device("meta"):
        model = build(preset)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def _ema_case(preset, dtype):
    shapes = _param_shapes(preset)
    numel = sum(math.prod(s) for s in shapes)

    def build(device):
        from djepa.ops import ema_update_

        xs = [torch.randn(s, device=device).to(dtype) for s in shapes]
        emas = [x.float() for x in xs]

        def run(backend):
            return ema_update_(emas, xs, 0.9999, backend=backend)
        return run

    return Case("ema_update_", dtype, dict(numel=numel), f"preset {preset}: {len(shapes)} tensors, "
                f"{numel / 1e6:.1f}M elements, float32 EMA", build)


# The benchmark suites' shapes (benchmarks/test_bench_*.py) and the presets', most used first.
ATTENTION_SHAPES = {"djepa-B": (64, 320, 12, 64), "djepa-H": (64, 320, 16, 80),
                    "N1024-D64": (16, 1024, 16, 64), "N1024-D128": (16, 1024, 8, 128),
                    "N4096-D64": (4, 4096, 16, 64), "N4096-D128": (4, 4096, 8, 128)}
BLOCK_WIDTHS = (1024, 1280, 1536)  # diffusion heads of B / L / H
QUICK_OPS = ("masked_attention", "adaln_block", "denoise_step", "ema_update_")


def cases(quick: bool = False, ops=None, dtypes=None):
    """The tuning cases, in the order `run` times them (the presets' own shapes first).

    quick: the presets' shapes only (what `tools/gpu_run.sh` has time for); ops / dtypes
    restrict them (names: "masked_attention", ...; torch dtypes or their names)."""
    want_dtypes = None if dtypes is None else {dtype_name(d) for d in dtypes}
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    low = (bf16,) if quick else (bf16, fp16)
    out = []
    att = ["djepa-B", "djepa-H"] + ([] if quick else ["N1024-D64", "N1024-D128", "N4096-D64", "N4096-D128"])
    for name in att:
        B, N, H, D = ATTENTION_SHAPES[name]
        for dt in low:
            out.append(_attention_case(B, N, H, D, dt, train=True))
            out.append(_attention_case(B, N, H, D, dt, train=False))
    widths = BLOCK_WIDTHS[:1] if quick else BLOCK_WIDTHS
    for W in widths:
        for M in ((8192,) if quick else (2048, 8192, 32768)):
            for dt in low:
                out.append(_block_case(M, W, dt, train=True))
    for preset in (("B",) if quick else ("B", "L", "H")):
        for B in ((1024,) if quick else (256, 1024, 4096)):
            for dt in low:
                out.append(_step_case(B, preset, dt))
    for preset in (("B",) if quick else ("B", "L")):
        for dt in ((bf16,) if quick else (bf16, fp32)):
            out.append(_ema_case(preset, dt))
    if not quick:  # float32: Triton against eager (the CUDA kernels take fp16/bf16)
        B, N, H, D = ATTENTION_SHAPES["djepa-B"]
        out.append(_attention_case(B, N, H, D, fp32, train=True))
        out.append(_block_case(8192, 1024, fp32, train=True))
    return [c for c in out if (ops is None or c.op in ops)
            and (want_dtypes is None or dtype_name(c.dtype) in want_dtypes)]


# ----------------------------------------------------------------------------- timing
class Unserved(Exception):
    """The backend cannot serve this case (the op's own ValueError says why)."""


def gpu_timer(fn, backend=None, case=None) -> float:
    """Median milliseconds of fn() on the GPU after a warm-up call (which compiles and autotunes):
    triton.testing.do_bench (which also clears L2 between calls), else CUDA events."""
    try:
        fn()
        torch.cuda.synchronize()
    except ValueError as exc:  # the op's own refusal: this backend does not serve the case
        raise Unserved(str(exc)) from None
    except RuntimeError as exc:  # a failing launch: recorded, and the other backends still timed
        raise Unserved(f"failed: {exc}") from None
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except (ImportError, TypeError):
        pass
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# The denoise ops whose djepa._C GEMMs have two sm_90a designs (DJEPA_SM90_GEMM): where they run,
# the "cuda" time is that of the default ("auto", by shape) and each design's is recorded beside
# it in the entry's "sm90_gemm" ({design: ms}), for choosing the shape rule from measurements.
SM90_GEMM_OPS = ("adaln_block", "denoise_step")


def sm90_gemm_designs(case, device) -> tuple:
    """The sm_90a GEMM designs `run` times for `case` on `device` (none where they do not run)."""
    if case.op not in SM90_GEMM_OPS or device.type != "cuda" or not _backends.uses_wgmma(case.op, device):
        return ()
    return tuple(d for d in _backends.SM90_GEMM_DESIGNS if d != "auto")


def sm90_attention_designs(case, device) -> tuple:
    """The sm_90a attention designs (DJEPA_SM90_ATTENTION) `run` times masked_attention's "cuda" under,
    beside the "cuda" time of the design in force (none where those kernels do not run)."""
    if case.op != "masked_attention" or device.type != "cuda" or not _backends.uses_wgmma(case.op, device):
        return ()
    return tuple(_backends.SM90_ATTENTION_DESIGNS)


# The design knobs `run` times "cuda" under: (the entry's field, the environment variable, the
# designs of a case on a device).
_DESIGN_KNOBS = (("sm90_gemm", "DJEPA_SM90_GEMM", sm90_gemm_designs),
                 ("sm90_attention", "DJEPA_SM90_ATTENTION", sm90_attention_designs))


def _with_env(fn, name, value):
    """fn with the environment variable `name` = value while it runs (the ops read the design
    knobs at each call)."""
    import os

    def call():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return call


def run(case_list, device, timer=gpu_timer, backends=BACKEND_NAMES, budget_s=None, log=None, on_entry=None):
    """Times each backend of each case; returns (entries, complete). `timer(fn, backend, case)`
    returns the milliseconds of fn() (one call of the case's op with that backend) or raises
    Unserved. Stops starting new cases once `budget_s` seconds have passed (complete is then
    False). `on_entry(entries)` is called after every timed case with the entries so far.
    Where djepa._C runs its sm_90a kernels, "cuda" is also timed under each design of a knob
    (_DESIGN_KNOBS): masked_attention's entries get "sm90_attention" = {design: ms}, adaln_block's
    and denoise_step's "sm90_gemm"."""
    t0 = time.monotonic()
    entries = []
    for i, case in enumerate(case_list):
        if budget_s is not None and time.monotonic() - t0 > budget_s:
            if log:
                log(f"time budget of {budget_s:g} s spent: {len(case_list) - i} case(s) not timed")
            return entries, False
        call = case.build(device)
        ms, unserved = {}, {}
        for b in backends:
            try:
                ms[b] = float(timer(lambda: call(b), b, case))
            except Unserved as exc:
                unserved[b] = str(exc)
        designs = {}  # field -> {design: ms}
        if "cuda" in ms:
            for field, env, designs_of in _DESIGN_KNOBS:
                for d in designs_of(case, device):
                    try:
                        designs.setdefault(field, {})[d] = float(timer(_with_env(lambda: call("cuda"), env, d),
                                                                       "cuda", case))
                    except Unserved as exc:
                        unserved[f"cuda[{d}]"] = str(exc)
        del call
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not ms:
            if log:
                log(f"{case}: no backend serves it ({unserved})")
            continue
        best = min(ms, key=ms.get)
        entries.append({"op": case.op, "dtype": dtype_name(case.dtype), "bucket": case.bucket, "key": case.key,
                        "shape": case.shape, "backend": best, "ms": ms, "unserved": unserved})
        entries[-1].update(designs)
        if log:
            times = "  ".join(f"{b} {ms[b]:8.3f}" for b in sorted(ms, key=ms.get))
            times += "".join(f"  cuda[{d}] {t:8.3f}" for field in designs for d, t in designs[field].items())
            log(f"{case.op:17s} {dtype_name(case.dtype):9s} {case.key:18s} -> {best:6s}  {times}  ms")
        if on_entry is not None:
            on_entry(entries)
    return entries, True


# ----------------------------------------------------------------------------- command line
def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args) -> int:
    """`djepa tune` (its options: djepa/cli.py). Exit 0 after writing the table (or listing the
    cases with --dry-run; a --budget spent still writes the table, marked partial), 1 without a
    GPU (one line on stderr, nothing written), 2 on bad options, 130 when interrupted (SIGINT or
    SIGTERM: the partial table is written first)."""
    if args.budget is not None and not args.budget > 0:
        print("djepa tune: error: --budget must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        _backends.sm90_attention_design()
        _backends.sm90_gemm_design()
    except ValueError as exc:
        print(f"djepa tune: error: {exc}", file=sys.stderr)
        return 2
    selected = cases(quick=args.quick, ops=args.op, dtypes=args.dtype)
    if args.dry_run:
        for c in selected:
            print(f"{c.op:17s} {dtype_name(c.dtype):9s} {c.key:18s} {c.shape}")
        budget = "" if args.budget is None else f", no new case after {args.budget:g} s"
        print(f"{len(selected)} case(s){budget}; table -> {args.out or user_cache_dir() / 'tune-<gpu>.json'}")
        return 0
    if not _backends.gpu_available():
        print("djepa tune: no CUDA GPU is visible: tuning times the kernels on a GPU (nothing written)",
              file=sys.stderr)
        return 1
    try:
        device = torch.device(args.device) if args.device else torch.device("cuda", torch.cuda.current_device())
        if device.type != "cuda" or (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{args.device!r} is not a visible CUDA device")
    except (RuntimeError, ValueError) as exc:
        print(f"djepa tune: error: --device: {exc}", file=sys.stderr)
        return 2
    env = environment(device)
    out = Path(args.out) if args.out else default_path(env["gpu"])
    design = f", attention design {env['sm90_attention']}" if "sm90_attention" in env else ""
    print(f"tuning on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, djepa._C {env['c_build']}, "
          f"sm_90a kernels {'on' if env['sm90_kernels'] else 'off'}{design}): {len(selected)} case(s)"
          f"{'' if args.budget is None else f', no new case after {args.budget:g} s'}", flush=True)
    done = []

    def save(entries, complete=False, why=None):
        done[:] = entries
        extra = {} if complete else {"partial": why or f"{len(entries)} of {len(selected)} case(s) timed so far"}
        write_table(out, env, entries, complete, **extra)

    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        with torch.cuda.device(device):
            entries, complete = run(selected, device, budget_s=args.budget, log=lambda m: print(m, flush=True),
                                    on_entry=save)
    except KeyboardInterrupt:
        save(done, why=f"interrupted after {len(done)} of {len(selected)} case(s)")
        print(f"interrupted: wrote {out} ({len(done)} entries, partial)", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    save(entries, complete, why=None if complete else
         f"--budget {args.budget:g} s spent after {len(entries)} of {len(selected)} case(s)")
    _backends.reset_caches()
    print(f"wrote {out} ({len(entries)} entries{'' if complete else ', partial: budget spent'})")
    return 0
