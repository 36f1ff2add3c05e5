"""Backend choice and argument plumbing shared by every op in djepa.ops."""
import contextlib
import functools
import inspect

import torch

from djepa import backends

# Must match csrc/common.h DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def select_backend(op, backend, device, *, cuda_reason=None, triton_reason=None, dtype=None, case=None):
    """Pick the backend that serves one call of `op` on tensors on `device`.

    `backend` is "auto" | "cuda" | "triton" | "eager" or None (DJEPA_BACKEND, default auto).
    `cuda_reason` / `triton_reason` say why this particular call (dtype, head dim, ...) cannot
    go to that backend, or are None. An explicit backend that cannot serve the call raises a
    ValueError with the reason; it never falls back silently.

    "auto" tries the backends in the order of djepa.backends.auto_order for the call's `dtype`
    and `case` (its sizes and flags by name, or a function returning them): the tuning table's
    measurement when one is active for the GPU, else the static rule; the first that serves the
    call wins.
    """
    requested = backends.default_backend() if backend is None else str(backend).lower()
    if requested not in backends.BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {backends.BACKENDS}")
    if requested == "eager":
        return "eager"
    cuda_why = backends.cuda_unavailable_reason(op, device) or cuda_reason
    triton_why = backends.triton_unavailable_reason(op, device) or triton_reason
    if requested == "cuda":
        if cuda_why:
            raise ValueError(f"{op}: backend='cuda' cannot serve this call: {cuda_why}")
        return "cuda"
    if requested == "triton":
        if triton_why:
            raise ValueError(f"{op}: backend='triton' cannot serve this call: {triton_why}")
        return "triton"
    if device.type != "cuda":
        return "eager"
    why = {"cuda": cuda_why, "triton": triton_why, "eager": None}
    order, _ = backends.auto_order(op, device, dtype=dtype, case=case)
    return next((b for b in order if why[b] is None), "eager")


def dtype_code(dtype):
    return DTYPE_CODES[dtype]


def on_device(device):
    """Context in which a kernel for tensors on `device` is launched: that device current (so
    djepa._C and Triton launch on it, on its current stream, and cudaFuncSetAttribute applies to
    it), the previous device restored after. A no-op for CPU tensors."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launches_on_device_of(name):
    """Decorator: the function runs under on_device(<its tensor argument `name`>.device)."""
    def wrap(fn):
        index = list(inspect.signature(fn).parameters).index(name)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            t = kwargs[name] if name in kwargs else args[index]
            with on_device(t.device):
                return fn(*args, **kwargs)
        return run
    return wrap


def stream_handle(device):
    """The current CUDA stream of `device` as an integer, for djepa._C."""
    return torch.cuda.current_stream(device).cuda_stream


def extension():
    ext = backends.cuda_extension()
    if ext is None:
        raise RuntimeError(backends.cuda_extension_error())
    return ext
