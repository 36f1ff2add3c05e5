"""Tuning tables: which backend is fastest for each op, shape bucket and dtype on one GPU.

`djepa tune` (`run` below) times every backend that serves each case of `cases()` (the preset
and benchmark shapes of every op) on this GPU, with `triton.testing.do_bench` (median, after a
warm-up call that also compiles and autotunes), and writes a table:

    {"format": 1, "gpu": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0+cu130",
     "triton": "3.6.0", "cuda_driver": 13000, "djepa": "0.1.0+cu130", "c_build": "13.0/90a",
     "complete": true, "created": "2026-12-01T12:00:00",
     "entries": [{"op": "masked_attention", "dtype": "bfloat16", "bucket": {"D": 64, "Nk": 512,
                  "mode": "train"}, "key": "D64-Nk512-train", "shape": "B64 H12 N320 D64 mask 0.5",
                  "backend": "triton", "ms": {"cuda": 0.91, "triton": 0.62, "eager": 4.1},
                  "unserved": {}}, ...]}

`backend="auto"` (djepa.backends.auto_order) follows the first table that matches this GPU and
these versions, searched in: $DJEPA_TUNE_TABLE (a file; "off" disables tables), then the user
cache (~/.cache/djepa, or $XDG_CACHE_HOME/djepa: tune-*.json, where `djepa tune` writes by
default), then the tables shipped in djepa/tune_tables/. A table for another GPU, torch, triton,
driver, djepa or djepa._C build is ignored, and `djepa info` says why. A call whose bucket was
not measured follows the nearest measured bucket of its op and dtype (distance: the sum of
|log2| of the size ratios) when it is within MAX_DISTANCE, else the static rule.
"""
import datetime
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMAT = 1
ENV_VAR = "DJEPA_TUNE_TABLE"
SHIPPED_DIR = Path(__file__).with_name("tune_tables")
# What must match between the table and this machine for the table to be followed.
MATCH_FIELDS = ("gpu", "torch", "triton", "cuda_driver", "djepa", "c_build")
MAX_DISTANCE = 2.0  # e.g. a 4x larger M, or 2x in two sizes
BACKEND_NAMES = ("cuda", "triton", "eager")


class TableError(ValueError):
    """A tuning table that cannot be read."""


# ----------------------------------------------------------------------------- shape buckets
def _p2(n: int) -> int:
    """The power of two >= n (0 for n <= 0)."""
    n = int(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def bucket(op: str, **dims) -> tuple:
    """The shape bucket of one call of `op`, as ((name, value), ...) (hashable, JSON-able).

    masked_attention: D (head dim), Nk (keys, rounded up to a power of two), train (grad needed)
    adaln_block:      W (width), M (rows, power of two), train
    denoise_step:     W, M (rows of the MLP: 2B with CFG, power of two)
    ema_update_:      numel (all tensors' elements, power of two)
    """
    if op == "masked_attention":
        return (("D", int(dims["D"])), ("Nk", _p2(dims["Nk"])), ("mode", "train" if dims["train"] else "infer"))
    if op == "adaln_block":
        return (("W", int(dims["W"])), ("M", _p2(dims["M"])), ("mode", "train" if dims["train"] else "infer"))
    if op == "denoise_step":
        return (("W", int(dims["W"])), ("M", _p2(dims["M"])))
    if op == "ema_update_":
        return (("numel", _p2(dims["numel"])),)
    raise ValueError(f"no shape bucket is defined for op {op!r}")


def bucket_key(b) -> str:
    """'D64-Nk512-train' for (('D', 64), ('Nk', 512), ('mode', 'train'))."""
    items = b.items() if isinstance(b, dict) else b
    return "-".join(str(v) if isinstance(v, str) else f"{k}{v}" for k, v in items)


def distance(a, b) -> float:
    """sum |log2(x / y)| over the numeric sizes of two buckets; inf when a label or a size is
    missing, differs, or is zero on one side only."""
    a, b = dict(a), dict(b)
    if a.keys() != b.keys():
        return math.inf
    d = 0.0
    for k, x in a.items():
        y = b[k]
        if isinstance(x, str) or isinstance(y, str):
            if x != y:
                return math.inf
        elif x != y:
            if x <= 0 or y <= 0:
                return math.inf
            d += abs(math.log2(x / y))
    return d


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- environment
def versions() -> dict:
    """The versions a table is measured with (everything but the GPU)."""
    import djepa
    from djepa import backends

    tri = backends.triton_module()
    ext = backends.cuda_extension()
    driver = None
    try:
        driver = int(torch._C._cuda_getDriverVersion()) if torch.cuda.is_available() else None
    except Exception:  # older torch, no driver
        driver = None
    return {"torch": torch.__version__, "triton": tri.__version__ if tri else None, "cuda_driver": driver,
            "djepa": djepa.__version__,
            "c_build": f"{ext.cuda_version}/{ext.cuda_archs}" if ext is not None else "none"}


def environment(device: torch.device) -> dict:
    """What a table measured on `device` records about it (GPU and versions)."""
    from djepa import backends

    info = backends.device_info(device)
    env = {"gpu": info["name"], "capability": list(info["capability"]), "sms": info["sms"]}
    env.update(versions())
    return env


# ----------------------------------------------------------------------------- tables
class Table:
    """One tuning table read from `path` (see the module docstring for the format)."""

    def __init__(self, meta: dict, entries: list, path=None):
        self.meta, self.entries, self.path = meta, entries, path
        self._index = {}
        for e in entries:
            self._index.setdefault((e["op"], e["dtype"]), []).append(e)

    @classmethod
    def load(cls, path):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TableError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TableError(f"{path}: not a readable JSON tuning table ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TableError(f"{path}: not a djepa tuning table of format {FORMAT}")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise TableError(f"{path}: no entries list")
        clean = []
        for i, e in enumerate(entries):
            try:
                b = tuple((str(k), v) for k, v in e["bucket"].items())
                ms = {str(k): float(v) for k, v in e["ms"].items()}
                if e["backend"] not in BACKEND_NAMES or e["backend"] not in ms:
                    raise ValueError(f"backend {e['backend']!r} was not timed")
                clean.append(dict(e, bucket=b, ms=ms, key=bucket_key(b)))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise TableError(f"{path}: entry {i} is malformed ({exc})") from None
        meta = {k: v for k, v in data.items() if k != "entries"}
        return cls(meta, clean, path)

    def mismatch(self, env: dict):
        """Why this table does not describe the machine `env` (None when it does)."""
        for field in MATCH_FIELDS:
            if self.meta.get(field) != env.get(field):
                return f"measured with {field} {self.meta.get(field)!r}, this machine has {env.get(field)!r}"
        return None

    def lookup(self, op: str, dtype: str, b):
        """(entry, distance) of the measured bucket nearest to `b` for op and dtype, or
        (None, None) when none is within MAX_DISTANCE."""
        best, best_d = None, math.inf
        for e in self._index.get((op, dtype), ()):
            d = distance(e["bucket"], b)
            if d < best_d:
                best, best_d = e, d
        if best is None or best_d > MAX_DISTANCE:
            return None, None
        return best, best_d

    def rows(self, op: str) -> list:
        """One line per measured bucket of `op`: dtype, bucket -> backend (timings)."""
        out = []
        for e in self.entries:
            if e["op"] == op:
                ms = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(e["ms"].items(), key=lambda kv: kv[1]))
                out.append(f"{e['dtype']:9s} {e['key']:18s} -> {e['backend']:6s} ({ms})")
        return out

    def describe(self) -> str:
        m = self.meta
        return (f"{self.path} ({m.get('gpu')}, torch {m.get('torch')}, triton {m.get('triton')}, "
                f"{len(self.entries)} entries{'' if m.get('complete', True) else ', partial'})")


def order_from_entry(entry: dict, static_order) -> tuple:
    """The backends of a measured entry, fastest first, then any unmeasured ones in the static
    order (so a backend that cannot serve a call hands it to the next fastest)."""
    timed = sorted(entry["ms"], key=lambda b: entry["ms"][b])
    return tuple(timed) + tuple(b for b in static_order if b not in timed)


def explain(table: Table, entry: dict, dist: float) -> str:
    where = "measured bucket" if dist == 0 else f"nearest measured bucket (distance {dist:.2g})"
    ms = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(entry["ms"].items(), key=lambda kv: kv[1]))
    return f"tuning table {table.path}: {where} {entry['dtype']} {entry['key']}: {ms}"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "djepa"


def default_path(gpu_name: str) -> Path:
    slug = "".join(ch if ch.isalnum() else "-" for ch in gpu_name.replace("NVIDIA", "")).strip("-").lower()
    return user_cache_dir() / f"tune-{slug or 'gpu'}.json"


def candidate_paths():
    """([table paths in search order], note about $DJEPA_TUNE_TABLE or None)."""
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip().lower() in ("off", "none", "0", "false"):
        return [], f"${ENV_VAR}={env}: tuning tables are off"
    if env:
        return [Path(env)], None
    found = sorted(user_cache_dir().glob("tune-*.json"))
    if SHIPPED_DIR.is_dir():
        found += sorted(SHIPPED_DIR.glob("*.json"))
    return found, None


_ACTIVE = {}  # (device index, $DJEPA_TUNE_TABLE) -> (Table or None, notes)


def reset():
    _ACTIVE.clear()


def _device_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def select_table(device: torch.device):
    """(the Table auto follows on `device` or None, [notes on the tables ignored and why])."""
    ckey = (_device_index(device), os.environ.get(ENV_VAR))
    hit = _ACTIVE.get(ckey)
    if hit is not None:
        return hit
    paths, note = candidate_paths()
    notes = [note] if note else []
    chosen = None
    env = environment(device) if paths else None
    for path in paths:
        try:
            table = Table.load(path)
        except TableError as exc:
            notes.append(f"ignored: {exc}")
            continue
        why = table.mismatch(env)
        if why is not None:
            notes.append(f"ignored {path}: {why}")
            continue
        chosen = table
        break
    if not paths and not notes:
        notes.append(f"no table found (${ENV_VAR}, {user_cache_dir()}/tune-*.json, {SHIPPED_DIR}/*.json)")
    _ACTIVE[ckey] = (chosen, notes)
    return chosen, notes


def active_table(device: torch.device):
    return select_table(device)[0]


def describe_tables(device: torch.device) -> str:
    table, notes = select_table(device)
    head = f"following {table.describe()}" if table else "no tuning table for this GPU: the static rule applies"
    return "; ".join([head] + notes)


def write_table(path, env: dict, entries: list, complete: bool = True) -> Path:
    """Writes the table atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(format=FORMAT, **env, complete=bool(complete),
                created=datetime.datetime.now().isoformat(timespec="seconds"),
                host=platform.node(), entries=[dict(e, bucket=dict(e["bucket"])) for e in entries])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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


def run(case_list, device, timer=gpu_timer, backends=BACKEND_NAMES, budget_s=None, log=None):
    """Times each backend of each case; returns (entries, complete). `timer(fn, backend, case)`
    returns the milliseconds of fn() (one call of the case's op with that backend) or raises
    Unserved. Stops starting new cases once `budget_s` seconds have passed (complete is then
    False)."""
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
        if log:
            times = "  ".join(f"{b} {ms[b]:8.3f}" for b in sorted(ms, key=ms.get))
            log(f"{case.op:17s} {dtype_name(case.dtype):9s} {case.key:18s} -> {best:6s}  {times}  ms")
    return entries, True


# ----------------------------------------------------------------------------- command line
def main(args) -> int:
    """`djepa tune` (its options: djepa/cli.py). Exit 0 after writing the table (or listing the
    cases with --dry-run), 1 without a GPU (one line on stderr, nothing written), 2 on bad options."""
    from djepa import backends

    if args.budget is not None and not args.budget > 0:
        print("djepa tune: error: --budget must be a positive number of seconds", file=sys.stderr)
        return 2
    selected = cases(quick=args.quick, ops=args.op, dtypes=args.dtype)
    if args.dry_run:
        for c in selected:
            print(f"{c.op:17s} {dtype_name(c.dtype):9s} {c.key:18s} {c.shape}")
        print(f"{len(selected)} case(s); table -> {args.out or user_cache_dir() / 'tune-<gpu>.json'}")
        return 0
    if not backends.gpu_available():
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
    print(f"tuning on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, djepa._C {env['c_build']}): "
          f"{len(selected)} case(s)", flush=True)
    with torch.cuda.device(device):
        entries, complete = run(selected, device, budget_s=args.budget, log=lambda m: print(m, flush=True))
    write_table(out, env, entries, complete)
    backends.reset_caches()
    print(f"wrote {out} ({len(entries)} entries{'' if complete else ', partial: budget spent'})")
    return 0
