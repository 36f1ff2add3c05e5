"""What this machine can run: the CUDA extension, a GPU, Triton, the Triton interpreter, and
what `backend="auto"` picks for each op there, and why.

`auto` on a GPU follows, in this order: a tuning table measured on this GPU with these versions
(`djepa tune` writes them, djepa/tune_table.py reads them), then the static rule: for
matmul-bound ops a tensor-core path native to the arch (wgmma on sm_90) before an mma.sync one,
and djepa._C before Triton where both use the same instructions or the op is memory-bound. A
backend that cannot serve a call is skipped; eager comes last. `describe()` (and `djepa info`)
prints it all, with the reason for anything unavailable and the rule that chose each op's backend.
"""
import functools
import importlib
import os
import platform

import torch

from djepa import tune_table

BACKENDS = ("auto", "cuda", "triton", "eager")

# op name -> (functions it needs from djepa._C, its Triton module)
OPS = {
    "ema_update_": (("ema_update",), "djepa.kernels.ema"),
    "masked_attention": (("masked_attention_fwd", "masked_attention_bwd"), "djepa.kernels.attention"),
    "adaln_block": (("adaln_modulate_fwd", "adaln_modulate_bwd", "gemm"), "djepa.kernels.denoise"),
    "denoise_step": (("adaln_modulate_fwd", "denoise_update", "gemm"), "djepa.kernels.denoise"),
}


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("djepa._C"), None
    except ImportError as exc:
        return None, f"djepa._C is not built ({exc}); reinstall with nvcc on PATH or CUDA_HOME set"


def cuda_extension():
    """The djepa._C module, or None when it was not built."""
    return _load_extension()[0]


def cuda_extension_error():
    """Why djepa._C cannot be imported (None when it can)."""
    return _load_extension()[1]


def parse_archs(text: str) -> list:
    """The CUDA architectures djepa._C reports ("80,90a": CMake's list, comma-separated) as a list."""
    import re

    return [a.strip() for a in re.split(r"[;,]", text or "") if a.strip()]


def gpu_available() -> bool:
    return torch.cuda.is_available()


def device_info(device: torch.device) -> dict:
    """name, capability (major, minor) and SM count of the GPU `device` is on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "capability": (props.major, props.minor),
            "sms": props.multi_processor_count}


def _arch_runs(archs, capability) -> bool:
    """Whether a _C built for `archs` ("80", "90a", ...) has code for a GPU of `capability`:
    SASS of the same major (not newer), PTX of an older arch (JIT-compiled; CMake embeds it for
    every arch), or an arch-specific "a" build for exactly this capability."""
    cc = capability[0] * 10 + capability[1]
    for arch in archs:
        digits = arch.rstrip("af")
        if not digits.isdigit():
            continue
        if arch.endswith(("a", "f")):
            if int(digits) == cc:
                return True
        elif int(digits) <= cc:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        return importlib.import_module("triton"), None
    except Exception as exc:  # ImportError, or a broken install raising at import
        return None, f"triton cannot be imported ({exc})"


def triton_module():
    return _load_triton()[0]


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_backend() -> str:
    value = os.environ.get("DJEPA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"DJEPA_BACKEND={value!r} is not one of {BACKENDS}")
    return value


# The import probes run once per process; torch.compile takes their answers as constants
# instead of tracing importlib (which would break the graph around every op).
@torch.compiler.assume_constant_result
def _extension_reason(op: str):
    """Why djepa._C cannot serve `op` on any device (None when it is built with it)."""
    ext = cuda_extension()
    if ext is None:
        return cuda_extension_error()
    missing = [f for f in OPS[op][0] if not hasattr(ext, f)]
    if missing:
        return f"djepa._C was built without {', '.join(missing)}"
    return None


@torch.compiler.assume_constant_result
def _triton_reason():
    """Why triton cannot be imported (None when it can)."""
    return _load_triton()[1]


def cuda_unavailable_reason(op: str, device: torch.device):
    """Why djepa._C cannot run `op` on tensors on `device` (None when it can)."""
    reason = _extension_reason(op)
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the tensors are on {device.type}, the CUDA kernels need them on a GPU"
    if not gpu_available():
        return "no CUDA GPU is visible"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _arch_reason(getattr(cuda_extension(), "cuda_archs", ""), index)


@functools.lru_cache(maxsize=None)
def _arch_reason(cuda_archs, index):
    archs = parse_archs(cuda_archs)
    if not archs:
        return None
    cap = device_info(torch.device("cuda", index))["capability"]
    if _arch_runs(archs, cap):
        return None
    return (f"djepa._C was built for {','.join(archs)}, which has no code for this GPU "
            f"(sm_{cap[0]}{cap[1]}); rebuild with DJEPA_CUDA_ARCHS including {cap[0]}{cap[1]}")


def triton_unavailable_reason(op: str, device: torch.device):
    """Why the Triton kernel of `op` cannot run on tensors on `device` (None when it can)."""
    reason = _triton_reason()
    if reason is not None:
        return reason
    if device.type == "cuda":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set, so Triton runs on the CPU, not on the GPU tensors given"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "the tensors are on the CPU; Triton needs a GPU, or TRITON_INTERPRET=1 for its CPU interpreter"
    return f"Triton does not run on {device.type} tensors"


# Ops whose time goes to tensor-core matmuls (the rest, EMA, are bound by memory bandwidth).
MATMUL_BOUND = frozenset({"masked_attention", "adaln_block", "denoise_step"})
# Calls of an op that djepa._C's sm_90a (wgmma) kernels do not serve whatever their shape: they
# run on its mma.sync kernels (so on sm_90 the static rule puts Triton's wgmma first). op -> [(case, why)]
WGMMA_EXCLUDED = {"masked_attention": [("dropout_p > 0", "the sm_90a kernels have no dropout "
                                                          "(dropout_p > 0 runs on the mma.sync kernels)")]}


def triton_mma(capability) -> str:
    """The tensor-core instruction Triton's tl.dot compiles to (fp16/bf16) on `capability`."""
    return {9: "wgmma", 10: "tcgen05"}.get(capability[0], "mma.sync")


def sm90_kernels_enabled() -> bool:
    """False when DJEPA_SM90_KERNELS=0: djepa._C then runs its mma.sync kernels on sm_90 as well
    (A/B timings, the sanitizer's cases of those kernels on a Hopper GPU)."""
    return os.environ.get("DJEPA_SM90_KERNELS", "1").strip() != "0"


def cuda_mma(op: str, capability) -> str:
    """The tensor-core instruction djepa._C's kernels of `op` use on `capability`: mma.sync,
    unless the extension lists the op in `wgmma_ops` (its Hopper kernels) and runs sm_90a code
    (and DJEPA_SM90_KERNELS=0 does not turn them off)."""
    ext = cuda_extension()
    if (ext is not None and tuple(capability) == (9, 0) and op in getattr(ext, "wgmma_ops", ())
            and "90a" in parse_archs(getattr(ext, "cuda_archs", "")) and sm90_kernels_enabled()):
        return "wgmma"
    return "mma.sync"


def uses_wgmma(op: str, device: torch.device) -> bool:
    """Whether djepa._C launches its sm_90a (wgmma) kernels for `op` on `device` (the ops ask at
    each launch; a call whose case those kernels do not serve, e.g. a head dim, still goes to
    the mma.sync ones)."""
    if device.type != "cuda":
        return False
    return cuda_mma(op, device_info(device)["capability"]) == "wgmma"


def static_rule(op: str, device: torch.device, wgmma_reason=None):
    """(backend order, why) of the static rule for `op` on `device` (no measurement).

    wgmma_reason: why this call's djepa._C kernel is the mma.sync one even where the op has
    wgmma kernels (e.g. a head dim they do not serve), or None."""
    if device.type != "cuda":
        return ("eager",), f"the tensors are on {device.type}: eager (the kernels run on a GPU)"
    cap = tuple(device_info(device)["capability"])
    sm = f"sm_{cap[0]}{cap[1]}"
    if op not in MATMUL_BOUND:
        return ("cuda", "triton", "eager"), f"static rule, {sm}: memory-bound op, djepa._C first, then Triton"
    tri, cu = triton_mma(cap), cuda_mma(op, cap)
    if cu == "wgmma" and wgmma_reason:
        cu = "mma.sync"
        if tri != "mma.sync":
            return ("triton", "cuda", "eager"), (
                f"static rule, {sm}: matmul-bound op; Triton's tl.dot emits {tri}, djepa._C has no wgmma "
                f"kernel for this call ({wgmma_reason}): Triton first")
    if tri != "mma.sync" and cu == "mma.sync":
        return ("triton", "cuda", "eager"), (
            f"static rule, {sm}: matmul-bound op; Triton's tl.dot emits {tri}, djepa._C's kernels are "
            f"mma.sync: Triton first")
    if cu == "wgmma":
        return ("cuda", "triton", "eager"), (
            f"static rule, {sm}: matmul-bound op; djepa._C's sm_90a kernels use wgmma (warp-specialised, "
            f"TMA), Triton {tri}: djepa._C first")
    return ("cuda", "triton", "eager"), (
        f"static rule, {sm}: matmul-bound op; djepa._C uses {cu}, Triton {tri}: djepa._C first")


_AUTO_CACHE = {}


def reset_caches():
    """Forget cached tuning tables and auto decisions (after writing a table, or in tests)."""
    _AUTO_CACHE.clear()
    tune_table.reset()


def build_versions() -> dict:
    """The versions a tuning table is measured with (everything but the GPU)."""
    tri = triton_module()
    ext = cuda_extension()
    try:
        driver = int(torch._C._cuda_getDriverVersion()) if torch.cuda.is_available() else None
    except Exception:  # older torch, no driver
        driver = None
    return {"torch": torch.__version__, "triton": tri.__version__ if tri else None, "cuda_driver": driver,
            "djepa": _djepa_version(),
            "c_build": f"{ext.cuda_version}/{ext.cuda_archs}" if ext is not None else "none"}


def table_environment(device: torch.device) -> dict:
    """What a tuning table measured on `device` records about it, and what a table must match
    to be followed there: the GPU, the versions, and whether the sm_90a kernels are on."""
    info = device_info(device)
    env = {"gpu": info["name"], "capability": list(info["capability"]), "sms": info["sms"]}
    env.update(build_versions())
    env["sm90_kernels"] = sm90_kernels_enabled()
    return env


def active_table(device: torch.device):
    """The tuning table auto follows on `device` (None: the static rule)."""
    return tune_table.select_table(device, table_environment, sm90_kernels_enabled())[0]


def describe_tables(device: torch.device) -> str:
    """Which tuning table auto follows on `device`, and the ones it ignored and why."""
    return tune_table.describe_tables(device, table_environment, sm90_kernels_enabled())


def auto_order(op: str, device: torch.device, dtype=None, bucket=None, wgmma_reason=None):
    """(backend order, why) that backend="auto" tries for one call of `op` on `device`.

    dtype: the call's dtype (torch.dtype or its name); bucket: its shape bucket
    (djepa.tune_table.bucket(op, ...), or a function returning it, called only when a tuning table for
    this GPU is active). Without both, or without a measurement near the bucket, the static rule
    (wgmma_reason: see static_rule).
    """
    if device.type != "cuda":
        return static_rule(op, device)
    table = active_table(device)
    if table is None or dtype is None or bucket is None:
        key = (op, device, None, None, None, wgmma_reason)
    else:
        if callable(bucket):
            bucket = bucket()
        key = (op, device, tune_table.dtype_name(dtype), tuple(bucket), id(table), wgmma_reason)
    hit = _AUTO_CACHE.get(key)
    if hit is None:
        order, why = static_rule(op, device, wgmma_reason)
        if key[2] is not None:
            entry, dist = table.lookup(op, key[2], key[3])
            if entry is not None:
                order, why = tune_table.order_from_entry(entry, order), tune_table.explain(table, entry, dist)
        hit = _AUTO_CACHE[key] = (order, why)
    return hit


def auto_backend(op: str, device: torch.device, wgmma_reason=None) -> str:
    """What backend='auto' picks for `op` on `device`, before any case-specific limit
    (wgmma_reason: see static_rule)."""
    order, _ = auto_order(op, device, wgmma_reason=wgmma_reason)
    why = {"cuda": cuda_unavailable_reason(op, device), "triton": triton_unavailable_reason(op, device),
           "eager": None}
    return next(b for b in order if why[b] is None) if device.type == "cuda" else "eager"


def describe() -> str:
    """A human-readable report of versions, the extension, the GPU and each op's backends."""
    lines = [
        f"djepa        {_djepa_version()}",
        f"python       {platform.python_version()} ({platform.machine()})",
        f"torch        {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})",
    ]
    triton = triton_module()
    lines.append(f"triton       {triton.__version__ if triton else 'unavailable: ' + _load_triton()[1]}")
    lines.append(f"interpreter  {'on (TRITON_INTERPRET=1)' if interpreter_enabled() else 'off'}")
    ext = cuda_extension()
    if ext is None:
        lines.append(f"djepa._C     not available: {cuda_extension_error()}")
    else:
        lines.append(
            f"djepa._C     built with CUDA {ext.cuda_version} for archs {ext.cuda_archs}; "
            f"kernels: {', '.join(ext.registered) or 'none'}; sm_90a wgmma kernels for: "
            f"{', '.join(getattr(ext, 'wgmma_ops', ())) or 'none'}"
        )
    if gpu_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"gpu          {', '.join(names)}")
    else:
        lines.append("gpu          none visible (torch.cuda.is_available() is False)")
    lines.append(f"default      backend={default_backend()} (DJEPA_BACKEND)")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu_available() else torch.device("cpu")
    lines.extend(_describe_ops(device))
    return "\n".join(lines)


def _describe_ops(device):
    head = f"ops on {device}"
    if device.type == "cuda":
        info = device_info(device)
        head += f" ({info['name']}, sm_{info['capability'][0]}{info['capability'][1]})"
    lines = [head + ":"]
    table = None
    if device.type == "cuda":
        table = active_table(device)
        lines.append("  tuning     " + describe_tables(device))
    for op in OPS:
        _, rule = static_rule(op, device)
        lines.append(f"  {op:18s} auto -> {auto_backend(op, device)}  [{rule}]")
        if table is not None:
            rows = table.rows(op)
            if rows:
                lines.append(f"    tuned   {len(rows)} measured bucket(s) follow the table, the rest the "
                             f"nearest measured bucket (or the static rule when none is near):")
                lines.extend(f"      {row}" for row in rows)
            else:
                lines.append("    tuned   the table has no measurement of this op: the static rule applies")
        for name, reason in (
            ("cuda", cuda_unavailable_reason(op, device)),
            ("triton", triton_unavailable_reason(op, device)),
        ):
            state = "available" if reason is None else "unavailable: " + reason
            if name == "cuda" and reason is None and device.type == "cuda":
                state += (" (sm_90a wgmma kernels)" if uses_wgmma(op, device) else " (mma.sync kernels)")
            lines.append(f"    {name:7s} {state}")
        for case, why in WGMMA_EXCLUDED.get(op, ()):
            _, case_rule = static_rule(op, device, why)
            lines.append(f"    {case}: auto -> {auto_backend(op, device, why)}  [{case_rule}]; eager, triton and "
                         f"djepa._C serve it, djepa._C with its mma.sync kernels ({why.split(' (')[0]})")
    return lines


def _djepa_version():
    import djepa

    return djepa.__version__
