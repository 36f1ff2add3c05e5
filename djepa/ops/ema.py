"""Fused EMA update: `ema = decay * ema + (1 - decay) * x` for every pair of a tensor list.

Backends: `cuda` (djepa._C.ema_update, <= 256 tensors per launch, tensor table in the kernel's
parameters), `triton` (djepa.kernels.ema, one launch per dtype pair, tensor table on the device),
`eager` (torch foreach ops). All update in place and compute in float32.
"""
import math
from typing import List, Optional, Sequence

import torch

from djepa.ops import _dispatch

OP = "ema_update_"
# (EMA dtype, tensor dtype) pairs the kernels take: float32 EMA of float32/bf16/fp16, and
# same-dtype low-precision pairs. float64 pairs are served by the eager backend only.
KERNEL_PAIRS = {
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
}
EAGER_PAIRS = KERNEL_PAIRS | {(torch.float64, torch.float64), (torch.float64, torch.float32)}


def ema_update_reference(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay):
    """Float64 reference: returns new tensors `decay * ema + (1 - decay) * x` (inputs untouched)."""
    d = float(decay) if not isinstance(decay, torch.Tensor) else decay.double().cpu().item()
    return [d * e.detach().double().cpu() + (1.0 - d) * x.detach().double().cpu() for e, x in zip(ema_tensors, tensors)]


def _validate(ema_tensors, tensors, decay):
    for name, seq in (("ema_tensors", ema_tensors), ("tensors", tensors)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{OP}: {name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"{OP}: {len(ema_tensors)} EMA tensors but {len(tensors)} tensors")
    device = None
    for i, (e, x) in enumerate(zip(ema_tensors, tensors)):
        for name, t in (("ema_tensors", e), ("tensors", x)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{OP}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise TypeError(f"{OP}: {name}[{i}] has dtype {t.dtype}; only floating-point tensors can be averaged")
        if (e.dtype, x.dtype) not in EAGER_PAIRS:
            raise TypeError(
                f"{OP}: pair {i} has EMA dtype {e.dtype} and tensor dtype {x.dtype}; supported: a float32 EMA of "
                "float32/bfloat16/float16 tensors, or an EMA of the tensor's own dtype"
            )
        if e.shape != x.shape:
            raise ValueError(f"{OP}: pair {i} has EMA shape {tuple(e.shape)} but tensor shape {tuple(x.shape)}")
        if device is None:
            device = e.device
        if e.device != device or x.device != device:
            raise ValueError(
                f"{OP}: pair {i} is on {e.device} (EMA) and {x.device} (tensor), pair 0 on {device}; "
                "all tensors must be on one device"
            )
    if not torch.compiler.is_compiling():  # a graph's fake tensors have no addresses
        _check_no_overlap(ema_tensors, tensors)
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise TypeError(f"{OP}: a tensor decay must be a 0-dim floating-point tensor, got shape "
                            f"{tuple(decay.shape)} dtype {decay.dtype}")
        if device is not None and decay.device != device and decay.device.type != "cpu":
            raise ValueError(f"{OP}: decay is on {decay.device} but the tensors are on {device}")
        if decay.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_decay_value(decay.item())  # a host read: skipped under torch.compile
    elif isinstance(decay, (int, float)) and not isinstance(decay, bool):
        _check_decay_value(float(decay))
    else:
        raise TypeError(f"{OP}: decay must be a float or a 0-dim tensor, got {type(decay).__name__}")
    return device


def _span(t):
    """[first byte, last byte + 1) of the memory `t` reaches."""
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + t.numel() * t.element_size()
    return lo, lo + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _offsets(t, base):
    """The element offsets of `t` from address `base` (in units of its element size)."""
    off = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return off.reshape(-1) + (t.data_ptr() - base) // t.element_size()


def _share_memory(a, b) -> bool:
    """Whether a and b (whose spans meet) have an element in common."""
    if a.is_contiguous() and b.is_contiguous():
        return True
    base = min(a.data_ptr(), b.data_ptr())
    if a.element_size() != b.element_size() or (a.data_ptr() - b.data_ptr()) % a.element_size():
        return True  # misaligned views of one buffer: treat as shared
    return bool(torch.isin(_offsets(a, base), _offsets(b, base)).any())


def _check_no_overlap(ema_tensors, tensors):
    """ValueError when an EMA tensor shares memory with another EMA tensor or any source
    tensor: the update would read what it has already written. Sources may share memory."""
    spans = []
    for role, seq in (("ema_tensors", ema_tensors), ("tensors", tensors)):
        for i, t in enumerate(seq):
            if t.numel() and t.device.type != "meta":
                spans.append((*_span(t), role, i, t))
    spans.sort(key=lambda s: s[0])
    active = []
    for lo, hi, role, i, t in spans:
        if active:
            active = [a for a in active if a[1] > lo]
        for _, _, role2, j, u in active:
            if "ema_tensors" in (role, role2) and _share_memory(t, u):
                (r1, i1), (r2, i2) = sorted(((role, i), (role2, j)))
                raise ValueError(f"{OP}: {r1}[{i1}] and {r2}[{i2}] share memory; an EMA tensor must not overlap "
                                 "another EMA tensor or a source tensor (the update would read values it "
                                 "already wrote)")
        active.append((lo, hi, role, i, t))


def _check_decay_value(d):
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        raise ValueError(f"{OP}: decay must lie in [0, 1], got {d}")


def _kernel_reason(ema_tensors, tensors, decay, device):
    """Why this call cannot go to a kernel backend (None when it can)."""
    for i, (e, x) in enumerate(zip(ema_tensors, tensors)):
        if (e.dtype, x.dtype) not in KERNEL_PAIRS:
            return f"pair {i} ({e.dtype} EMA of {x.dtype}) is served by the eager backend only"
        if not e.is_contiguous() or not x.is_contiguous():
            which = "EMA tensor" if not e.is_contiguous() else "tensor"
            return f"the {which} of pair {i} is not contiguous"
    if isinstance(decay, torch.Tensor) and decay.device != device and decay.device.type != "cpu":
        return f"decay is on {decay.device}"
    return None


def _groups(ema_tensors, tensors):
    """Pairs with at least one element, grouped by (EMA dtype, tensor dtype), order kept."""
    groups = {}
    for e, x in zip(ema_tensors, tensors):
        if e.numel():
            groups.setdefault((e.dtype, x.dtype), ([], []))
            groups[(e.dtype, x.dtype)][0].append(e)
            groups[(e.dtype, x.dtype)][1].append(x)
    return groups


def _eager(ema_tensors, tensors, decay):
    for (edt, xdt), (es, xs) in _groups(ema_tensors, tensors).items():
        if isinstance(decay, torch.Tensor):
            d = decay.to(device=es[0].device, dtype=torch.float32)
            if edt == torch.float64:
                d = d.double()
            for e, x in zip(es, xs):
                e.copy_(d * e.to(d.dtype) + (1 - d) * x.to(d.dtype))
        elif edt == xdt and edt in (torch.float32, torch.float64):
            torch._foreach_mul_(es, decay)
            torch._foreach_add_(es, xs, alpha=1.0 - decay)
        else:
            for e, x in zip(es, xs):
                e.copy_(e.float().mul_(decay).add_(x.float(), alpha=1.0 - decay))


def _split_decay(decay, device):
    """(decay tensor on the device or None, decay value, 1 - decay) for the kernels."""
    if isinstance(decay, torch.Tensor):
        if decay.device.type == "cpu":
            d = float(decay.item())
            return None, d, 1.0 - d
        return decay, 0.0, 0.0
    return None, float(decay), 1.0 - float(decay)


def _cuda(ema_tensors, tensors, decay, device):
    ext = _dispatch.extension()
    decay_t, d, one_minus = _split_decay(decay, device)
    decay_ptr = 0
    if decay_t is not None:
        decay_t = decay_t.to(torch.float32)
        decay_ptr = decay_t.data_ptr()
    stream = _dispatch.stream_handle(device)
    for (edt, xdt), (es, xs) in _groups(ema_tensors, tensors).items():
        ext.ema_update(
            [e.data_ptr() for e in es],
            [x.data_ptr() for x in xs],
            [e.numel() for e in es],
            _dispatch.dtype_code(edt),
            _dispatch.dtype_code(xdt),
            decay_ptr,
            d,
            one_minus,
            stream,
        )


def _triton(ema_tensors, tensors, decay, device):
    from djepa.kernels import ema as kernel

    decay_t, d, one_minus = _split_decay(decay, device)
    for (_, _), (es, xs) in _groups(ema_tensors, tensors).items():
        kernel.ema_update(es, xs, decay_t, d, one_minus)


def ema_update_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay, *, backend: Optional[str] = None):
    """In place, for every pair: `ema = decay * ema + (1 - decay) * x`.

    ema_tensors, tensors: equal-length lists of floating-point tensors, pairwise equal shape, all
      on one device. Pairs: a float32 EMA of float32/bfloat16/float16 tensors, or an EMA of the
      tensor's own dtype (float64 pairs on the eager backend only). An empty list is a no-op.
    decay: a float in [0, 1], or a 0-dim floating-point tensor (on the tensors' device, so that a
      schedule changes it without recompiles or host syncs; its range is checked only when it is
      a CPU tensor outside torch.compile).
    backend: "auto" | "cuda" | "triton" | "eager" (default: DJEPA_BACKEND, else "auto").

    Everything is validated before any tensor is written: a bad pair raises and leaves every
    tensor untouched. Kernel paths update the whole list in one launch per dtype pair (cuda: per
    256 tensors); indexing is 64-bit.
    """
    device = _validate(ema_tensors, tensors, decay)
    if device is None:
        return
    reason = _kernel_reason(ema_tensors, tensors, decay, device)
    chosen = _dispatch.select_backend(OP, backend, device, cuda_reason=reason, triton_reason=reason,
                                      dtype=tensors[0].dtype, case=lambda: dict(numel=sum(t.numel() for t in tensors)))
    _ema_update_op(list(ema_tensors), list(tensors), *_op_decay(decay), chosen)


def _op_decay(decay):
    if isinstance(decay, torch.Tensor):
        return 0.0, decay
    return float(decay), None


@torch.library.custom_op("djepa::ema_update_", mutates_args=("ema_tensors",))
def _ema_update_op(
    ema_tensors: List[torch.Tensor],
    tensors: List[torch.Tensor],
    decay: float,
    decay_tensor: Optional[torch.Tensor],
    backend: str,
) -> None:
    value = decay_tensor if decay_tensor is not None else decay
    with torch.no_grad(), _dispatch.on_device(ema_tensors[0].device):
        if backend == "cuda":
            _cuda(ema_tensors, tensors, value, ema_tensors[0].device)
        elif backend == "triton":
            _triton(ema_tensors, tensors, value, ema_tensors[0].device)
        else:
            _eager(ema_tensors, tensors, value)


@_ema_update_op.register_fake
def _(ema_tensors, tensors, decay, decay_tensor, backend):
    return None
