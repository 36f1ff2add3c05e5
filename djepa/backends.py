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
from typing import NamedTuple, Optional

import torch

from djepa import tune_table

BACKENDS = ("auto", "cuda", "triton", "eager")

class OpKernels(NamedTuple):
    """What djepa has for one op, as the dispatch layer sees it (declared here, not by the ops,
    so that `djepa info` knows every op without importing the ops layer)."""
    c_functions: tuple          # the functions it needs from djepa._C
    triton_module: str          # its Triton kernels
    matmul_bound: bool          # its time goes to tensor-core matmuls (else to memory bandwidth)
    sm90_head_dims: Optional[tuple] = None  # head dims djepa._C's sm_90a (wgmma) kernels serve (None: all)
    sm90_dropout: bool = True   # whether those serve dropout


OPS = {
    "ema_update_": OpKernels(("ema_update",), "djepa.kernels.ema", matmul_bound=False),
    "masked_attention": OpKernels(("masked_attention_fwd", "masked_attention_bwd"), "djepa.kernels.attention",
                                  matmul_bound=True, sm90_head_dims=(64, 80, 96, 128), sm90_dropout=False),
    "adaln_block": OpKernels(("adaln_modulate_fwd", "adaln_modulate_bwd", "gemm"), "djepa.kernels.denoise",
                             matmul_bound=True),
    "denoise_step": OpKernels(("adaln_modulate_fwd", "denoise_update", "gemm"), "djepa.kernels.denoise",
                              matmul_bound=True),
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


def version_tuple(version: str) -> tuple:
    """(major, minor) of a version string such as Triton's "3.6.0" or "3.7.0rc1+git4f5e6a7"."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


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
    missing = [f for f in OPS[op].c_functions if not hasattr(ext, f)]
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


def triton_mma(capability) -> str:
    """The tensor-core instruction Triton's tl.dot compiles to (fp16/bf16) on `capability`."""
    return {9: "wgmma", 10: "tcgen05"}.get(capability[0], "mma.sync")


def sm90_kernels_enabled() -> bool:
    """False when DJEPA_SM90_KERNELS=0: djepa._C then runs its mma.sync kernels on sm_90 as well
    (A/B timings, the sanitizer's cases of those kernels on a Hopper GPU)."""
    return os.environ.get("DJEPA_SM90_KERNELS", "1").strip() != "0"


# DJEPA_SM90_GEMM: the design of djepa._C.gemm_sm90 that the denoise ops run (its `kernel`
# argument): "auto" chooses per call by shape (wave-quantised time estimates, csrc/hopper/
# gemm_wide_config.cuh), "128x256" the 128x256 kernel (2-CTA clusters multicasting B, TMA-store
# epilogue; a call whose operands TMA cannot load still runs the 128x128 one), "128x128" the
# first design (register epilogue, no clusters), kept for A/B timings.
SM90_GEMM_DESIGNS = {"auto": 0, "128x128": 1, "128x256": 2}


def sm90_gemm_design() -> str:
    """The sm_90a GEMM design DJEPA_SM90_GEMM asks for ("auto" when unset); ValueError for another
    value."""
    value = os.environ.get("DJEPA_SM90_GEMM", "auto").strip().lower() or "auto"
    if value not in SM90_GEMM_DESIGNS:
        raise ValueError(f"DJEPA_SM90_GEMM={value!r} is not one of {tuple(SM90_GEMM_DESIGNS)}")
    return value


# DJEPA_SM90_ATTENTION: the design of djepa._C.masked_attention_{fwd,bwd}_sm90 that backend="cuda"
# runs on sm_90 (their `design` argument): "pipelined" (the default; FlashAttention-3's schedule,
# csrc/hopper/attn_pipelined_*.cuh) or "baseline" (the first sm_90a kernels, attn_*_kernel.cuh),
# kept so one GPU run measures both.
SM90_ATTENTION_DESIGNS = {"pipelined": 0, "baseline": 1}


def sm90_attention_design() -> str:
    """The sm_90a attention design DJEPA_SM90_ATTENTION asks for ("pipelined" when unset);
    ValueError for another value."""
    value = os.environ.get("DJEPA_SM90_ATTENTION", "pipelined").strip().lower() or "pipelined"
    if value not in SM90_ATTENTION_DESIGNS:
        raise ValueError(f"masked_attention: DJEPA_SM90_ATTENTION={value!r} is not one of "
                         f"{tuple(SM90_ATTENTION_DESIGNS)}")
    return value


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


def wgmma_reason(op: str, case=None):
    """Why djepa._C serves a call of `op` with its mma.sync kernels even where it has sm_90a
    (wgmma) kernels for the op, or None when those serve it. case: the call's features by name
    (see auto_order; this asks D, the head dim, and dropout)."""
    kernels, case = OPS[op], case or {}
    if case.get("dropout") and not kernels.sm90_dropout:
        return "the sm_90a kernels have no dropout (dropout_p > 0 runs on the mma.sync kernels)"
    D = case.get("D")
    if kernels.sm90_head_dims is not None and D is not None and D not in kernels.sm90_head_dims:
        return f"the sm_90a kernels serve head dims {kernels.sm90_head_dims}, not {D}"
    return None


def _wgmma_limited(op: str) -> bool:
    """Whether some calls of `op` are not served by djepa._C's sm_90a kernels (wgmma_reason)."""
    return OPS[op].sm90_head_dims is not None or not OPS[op].sm90_dropout


def static_rule(op: str, device: torch.device, case=None):
    """(backend order, why) of the static rule for one call of `op` on `device` (no measurement);
    case: the call's features (see auto_order), None for the op's calls in general."""
    if device.type != "cuda":
        return ("eager",), f"the tensors are on {device.type}: eager (the kernels run on a GPU)"
    return _static_order(op, device, wgmma_reason(op, case))


def _static_order(op, device, mma_sync_why):
    """static_rule, with mma_sync_why = wgmma_reason(op, case)."""
    cap = tuple(device_info(device)["capability"])
    sm = f"sm_{cap[0]}{cap[1]}"
    if not OPS[op].matmul_bound:
        return ("cuda", "triton", "eager"), f"static rule, {sm}: memory-bound op, djepa._C first, then Triton"
    tri, cu = triton_mma(cap), cuda_mma(op, cap)
    if cu == "wgmma" and mma_sync_why:
        cu = "mma.sync"
        if tri != "mma.sync":
            return ("triton", "cuda", "eager"), (
                f"static rule, {sm}: matmul-bound op; Triton's tl.dot emits {tri}, djepa._C has no wgmma "
                f"kernel for this call ({mma_sync_why}): Triton first")
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
    if uses_wgmma("masked_attention", device):  # the attention design its "cuda" times are of
        env["sm90_attention"] = _sm90_attention_or_raw()
    return env


def _sm90_attention_or_raw() -> str:
    try:
        return sm90_attention_design()
    except ValueError:
        return os.environ.get("DJEPA_SM90_ATTENTION", "")


def _table_key():
    """What the table auto follows depends on besides the device and $DJEPA_TUNE_TABLE."""
    return sm90_kernels_enabled(), os.environ.get("DJEPA_SM90_ATTENTION")


def active_table(device: torch.device):
    """The tuning table auto follows on `device` (None: the static rule)."""
    return tune_table.select_table(device, table_environment, _table_key())[0]


def describe_tables(device: torch.device) -> str:
    """Which tuning table auto follows on `device`, and the ones it ignored and why."""
    return tune_table.describe_tables(device, table_environment, _table_key())


def auto_order(op: str, device: torch.device, dtype=None, case=None):
    """(backend order, why) that backend="auto" tries for one call of `op` on `device`.

    dtype: the call's dtype (torch.dtype or its name). case: the call's features by name, the
    sizes djepa.tune_table.bucket takes (masked_attention: D, Nk, train; adaln_block: W, M,
    train; denoise_step: W, M; ema_update_: numel) and flags (dropout), or a function returning
    them, called only when they are needed. A tuning table active for this GPU decides when it
    measured the dtype at a bucket near the case's; else the static rule, which asks the case
    whether djepa._C's sm_90a kernels serve it (wgmma_reason).
    """
    if device.type != "cuda":
        return static_rule(op, device)
    table = active_table(device)
    lookup = table is not None and dtype is not None and case is not None
    if callable(case):
        case = case() if lookup or _wgmma_limited(op) else None
    bucket = tune_table.bucket(op, **case) if lookup else None
    mma_sync_why = wgmma_reason(op, case)
    key = (op, device, mma_sync_why) if bucket is None else \
        (op, device, mma_sync_why, tune_table.dtype_name(dtype), bucket, id(table))
    hit = _AUTO_CACHE.get(key)
    if hit is None:
        order, why = _static_order(op, device, mma_sync_why)
        if bucket is not None:
            entry, dist = table.lookup(op, key[3], bucket)
            if entry is not None:
                order, why = tune_table.order_from_entry(entry, order), tune_table.explain(table, entry, dist)
        hit = _AUTO_CACHE[key] = (order, why)
    return hit


def auto_backend(op: str, device: torch.device, case=None) -> str:
    """What backend='auto' picks for `op` on `device`, before any limit of the call but those of
    `case` (see auto_order)."""
    order, _ = auto_order(op, device, case=case)
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
    lines.append(f"sm90 gemm    {_describe_sm90_gemm()} (DJEPA_SM90_GEMM: {' | '.join(SM90_GEMM_DESIGNS)})")
    lines.append(f"sm90 attn    {_describe_sm90_attention()} (DJEPA_SM90_ATTENTION: "
                 f"{' | '.join(SM90_ATTENTION_DESIGNS)})")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu_available() else torch.device("cpu")
    lines.extend(_describe_ops(device))
    return "\n".join(lines)


def _describe_sm90_gemm():
    try:
        design = sm90_gemm_design()
    except ValueError as exc:
        return f"invalid: {exc}"
    return {"auto": "auto (by shape: 128x256 clusters or 128x128)", "128x256": "128x256 (2-CTA clusters, TMA "
            "multicast, TMA-store epilogue)", "128x128": "128x128 (the first design)"}[design]


def _describe_sm90_attention():
    try:
        design = sm90_attention_design()
    except ValueError as exc:
        return f"invalid: {exc}"
    return {"pipelined": "pipelined (FlashAttention-3's schedule: softmax under the GEMMs, ping-pong consumers)",
            "baseline": "baseline (the first sm_90a kernels)"}[design]


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
        if not OPS[op].sm90_dropout:
            case = {"dropout": True}
            _, case_rule = static_rule(op, device, case)
            lines.append(f"    dropout_p > 0: auto -> {auto_backend(op, device, case)}  [{case_rule}]; eager, triton "
                         f"and djepa._C serve it, djepa._C with its mma.sync kernels "
                         f"({wgmma_reason(op, case).split(' (')[0]})")
    return lines


def _djepa_version():
    import djepa

    return djepa.__version__
