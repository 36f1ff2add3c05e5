"""What this machine can run: the CUDA extension, a GPU, Triton, the Triton interpreter.

`describe()` (and `djepa info`) prints it all, with the reason for anything unavailable.
"""
import functools
import importlib
import os
import platform

import torch

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
    return None


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


def auto_backend(op: str, device: torch.device) -> str:
    """What backend='auto' picks for `op` on `device`, before any case-specific limit."""
    if device.type == "cuda":
        if cuda_unavailable_reason(op, device) is None:
            return "cuda"
        if triton_unavailable_reason(op, device) is None:
            return "triton"
    return "eager"


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
            f"kernels: {', '.join(ext.registered) or 'none'}"
        )
    if gpu_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"gpu          {', '.join(names)}")
    else:
        lines.append("gpu          none visible (torch.cuda.is_available() is False)")
    lines.append(f"default      backend={default_backend()} (DJEPA_BACKEND)")
    device = torch.device("cuda") if gpu_available() else torch.device("cpu")
    lines.append(f"ops on {device.type}:")
    for op in OPS:
        lines.append(f"  {op:18s} auto -> {auto_backend(op, device)}")
        for name, reason in (
            ("cuda", cuda_unavailable_reason(op, device)),
            ("triton", triton_unavailable_reason(op, device)),
        ):
            lines.append(f"    {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _djepa_version():
    import djepa

    return djepa.__version__
