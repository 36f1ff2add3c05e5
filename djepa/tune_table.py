"""Tuning tables as backend="auto" reads them: the format, shape buckets, matching a table to
this machine, and looking a call up in it. `djepa tune` (djepa/tune.py, above the models) writes
them; this module imports nothing from djepa, so the dispatch layer can read tables without
depending on the model layer.

A table (JSON):

    {"format": 1, "gpu": "NVIDIA H200", "capability": [9, 0], "torch": "2.11.0+cu130",
     "triton": "3.6.0", "cuda_driver": 13000, "djepa": "0.1.0+cu130", "c_build": "13.0.88/80,90a",
     "sm90_kernels": true, "sm90_attention": "pipelined", "complete": true,
     "created": "2026-12-01T12:00:00",
     "entries": [{"op": "masked_attention", "dtype": "bfloat16", "bucket": {"D": 64, "Nk": 512,
                  "mode": "train"}, "key": "D64-Nk512-train", "shape": "B64 H12 N320 D64 mask 0.5",
                  "backend": "triton", "ms": {"cuda": 0.91, "triton": 0.62, "eager": 4.1},
                  "unserved": {}, "sm90_attention": {"pipelined": 0.91, "baseline": 1.2}}, ...]}

An attention entry measured where djepa._C runs its sm_90a kernels also times "cuda" under each
design of DJEPA_SM90_ATTENTION ("sm90_attention", for A/B); its "ms" and "backend" are those of
the design the table records at the top, which a table must match to be followed.

`backend="auto"` (djepa.backends.auto_order) follows the first table that matches this GPU and
these versions, searched in: $DJEPA_TUNE_TABLE (a file; "off" disables tables), then the user
cache (~/.cache/djepa, or $XDG_CACHE_HOME/djepa: tune-*.json, where `djepa tune` writes by
default), then the tables shipped in djepa/tune_tables/ (newest name first). A table for another
GPU, torch, triton, driver or djepa is ignored, and `djepa info` says why. djepa._C builds match
when they run the same code on this GPU: a table measured with a 90a build serves every build
that holds 90a on an sm_90 GPU (the sm_90a code runs there), whatever else it holds. A call whose
bucket was not measured follows the nearest measured bucket of its op and dtype (distance: the
sum of |log2| of the size ratios) when it is within MAX_DISTANCE, else the static rule.
"""
import datetime
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path

FORMAT = 1
ENV_VAR = "DJEPA_TUNE_TABLE"
SHIPPED_DIR = Path(__file__).with_name("tune_tables")
# What must match between the table and this machine for the table to be followed (c_build by
# the code it runs on this GPU, see build_mismatch; sm90_kernels only where the table has it;
# sm90_attention, the sm_90a attention design (DJEPA_SM90_ATTENTION), where both run those kernels).
MATCH_FIELDS = ("gpu", "torch", "triton", "cuda_driver", "djepa", "c_build", "sm90_kernels", "sm90_attention")
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
    """The shape bucket of one call of `op`, as ((name, value), ...) (hashable, JSON-able), or
    None for a call no table measures.

    masked_attention: D (head dim), Nk (keys, rounded up to a power of two), train (grad needed);
                      None with dropout (tables measure none) or without Nk
    adaln_block:      W (width), M (rows, power of two), train
    denoise_step:     W, M (rows of the MLP: 2B with CFG, power of two)
    ema_update_:      numel (all tensors' elements, power of two)
    """
    if op == "masked_attention":
        if dims.get("dropout") or dims.get("Nk") is None:
            return None
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


# ----------------------------------------------------------------------------- djepa._C builds
def served_arch(archs, capability):
    """The arch whose code a djepa._C built for `archs` ("80", "90a", ...) runs on a GPU of
    `capability` (None when none runs there): the arch-specific build for exactly this GPU, else
    its plain SASS, else the newest older SASS of the same major, else the newest older PTX."""
    cc = int(capability[0]) * 10 + int(capability[1])
    parsed = []
    for arch in archs:
        digits = arch.rstrip("af")
        if digits.isdigit():
            parsed.append((int(digits), arch))
    for want in (f"{cc}a", f"{cc}f", str(cc)):
        if any(arch == want for _, arch in parsed):
            return want
    plain = sorted((n, a) for n, a in parsed if a == str(n) and n <= cc)
    same_major = [a for n, a in plain if n // 10 == cc // 10]
    if same_major:
        return same_major[-1]
    return f"ptx{plain[-1][1]}" if plain else None


def _split_build(c_build):
    """('13.0.88', ['80', '90a']) of a c_build string '13.0.88/80,90a'; (None, []) for 'none'."""
    if not isinstance(c_build, str) or "/" not in c_build:
        return None, []
    version, archs = c_build.split("/", 1)
    return version, [a.strip() for a in re.split(r"[;,]", archs) if a.strip()]


def build_mismatch(table_build, machine_build, capability):
    """Why a table measured with djepa._C `table_build` does not describe `machine_build` on a
    GPU of `capability` (None when it does): both without _C, or the same CUDA version running
    the same arch's code on this GPU."""
    if table_build == machine_build:
        return None
    (tv, ta), (mv, ma) = _split_build(table_build), _split_build(machine_build)
    head = f"measured with c_build {table_build!r}, this machine has {machine_build!r}"
    if tv is None or mv is None:
        return head
    if tv != mv:
        return f"{head} (another CUDA version)"
    ts, ms = served_arch(ta, capability), served_arch(ma, capability)
    if ts is None or ts != ms:
        return (f"{head}: they run {ts or 'no'} and {ms or 'no'} code on sm_{capability[0]}{capability[1]}")
    return None


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
        if not is_table(data):
            raise TableError(f"{path}: not a djepa tuning table of format {FORMAT}")
        clean = []
        for i, e in enumerate(data["entries"]):
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
            mine, theirs = self.meta.get(field), env.get(field)
            if field == "c_build":
                why = build_mismatch(mine, theirs, env.get("capability") or self.meta.get("capability") or (0, 0))
                if why:
                    return why
            elif field == "sm90_kernels":
                if mine is not None and theirs is not None and bool(mine) != bool(theirs):
                    state = "on" if mine else "off (DJEPA_SM90_KERNELS=0)"
                    return f"measured with the sm_90a kernels {state}, here they are {'on' if theirs else 'off'}"
            elif field == "sm90_attention":
                if mine is not None and theirs is not None and mine != theirs:
                    return (f"measured with the sm_90a attention design {mine!r}, here DJEPA_SM90_ATTENTION "
                            f"selects {theirs!r}")
            elif mine != theirs:
                return f"measured with {field} {mine!r}, this machine has {theirs!r}"
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


def is_table(data) -> bool:
    """Whether parsed JSON `data` is a tuning table (and not, e.g., a benchmark JSON)."""
    return isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), list)


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


def gpu_slug(gpu_name: str) -> str:
    """'h200' for 'NVIDIA H200': the GPU's part of file names."""
    return "".join(ch if ch.isalnum() else "-" for ch in gpu_name.replace("NVIDIA", "")).strip("-").lower() or "gpu"


def default_path(gpu_name: str) -> Path:
    return user_cache_dir() / f"tune-{gpu_slug(gpu_name)}.json"


def candidate_paths():
    """([table paths in search order], note about $DJEPA_TUNE_TABLE or None)."""
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip().lower() in ("off", "none", "0", "false"):
        return [], f"${ENV_VAR}={env}: tuning tables are off"
    if env:
        return [Path(env)], None
    found = sorted(user_cache_dir().glob("tune-*.json"))
    if SHIPPED_DIR.is_dir():  # dated names (tools/gpu_run.sh --render): the newest first
        found += sorted(SHIPPED_DIR.glob("*.json"), reverse=True)
    return found, None


_ACTIVE = {}  # (device index, $DJEPA_TUNE_TABLE, caller's key) -> (Table or None, notes)


def reset():
    _ACTIVE.clear()


def _device_index(device):
    if device.index is not None:
        return device.index
    import torch

    return torch.cuda.current_device()


def select_table(device, environment, key=None):
    """(the Table auto follows on `device` or None, [notes on the tables ignored and why]).

    environment(device) -> dict: what this machine is, in a table's fields (djepa.backends
    .table_environment); called only when there is a table to match. `key`: whatever else the
    answer depends on (cached per device, $DJEPA_TUNE_TABLE and key)."""
    ckey = (_device_index(device), os.environ.get(ENV_VAR), key)
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


def describe_tables(device, environment, key=None) -> str:
    table, notes = select_table(device, environment, key)
    head = f"following {table.describe()}" if table else "no tuning table for this GPU: the static rule applies"
    return "; ".join([head] + notes)


def write_table(path, env: dict, entries: list, complete: bool = True, **extra) -> Path:
    """Writes the table atomically (a temporary file renamed over `path`); `extra`: more
    top-level fields (e.g. why it is partial)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(format=FORMAT, **env, complete=bool(complete),
                created=datetime.datetime.now().isoformat(timespec="seconds"),
                host=platform.node(), **extra, entries=[dict(e, bucket=dict(e["bucket"])) for e in entries])
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
