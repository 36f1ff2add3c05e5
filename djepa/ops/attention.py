"""Masked attention: each sample attends only to its visible keys, at a cost that follows them.

`masked_attention(q, k, v, key_mask)` computes, per sample b and head h,
``softmax(scale * q @ k[visible].T) @ v[visible]``, where the visible keys of sample b are
``key_mask[b]``. Every query row is computed; only keys are masked.

Backends:
  eager   the reference below (float32 math, float64 for float64 inputs), differentiated by autograd;
  triton  djepa.kernels.attention (forward, and a deterministic two-kernel backward);
  cuda    djepa._C.masked_attention_fwd / masked_attention_bwd (fp16/bf16, head dims 32..128;
          mma.sync), or on an sm_90 GPU, where the build has sm_90a code, their wgmma versions
          masked_attention_fwd_sm90 / _bwd_sm90 (head dims 64, 80, 96, 128; the others stay on
          the mma.sync kernels). Chosen per launch by the device (DJEPA_SM90_KERNELS=0: never).

The kernel backends compact the mask once per call (visible key indices first) and iterate only
over the visible keys, so the work follows the number of visible keys, wherever they are.
"""
import math
from typing import Optional

import torch

from djepa.ops import _dispatch

__all__ = ["masked_attention", "masked_attention_reference"]

_OP = "masked_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
SM90_HEAD_DIMS = (64, 80, 96, 128)  # djepa._C's sm_90a (wgmma) kernels
TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------
def _eager_attention(q, k, v, key_mask, scale, upcast=True, dropout_p=0.0, training=False):
    """Masked softmax attention in plain torch ops (autograd-friendly, NaN-free).

    upcast=True computes in float32 (float64 for float64 inputs) and casts the result back;
    upcast=False keeps the matmuls in the input dtype (softmax in float32, probabilities cast to
    the input dtype), which is what a low-precision kernel does: the "eager_lowp" of the tests.
    """
    out_dtype = q.dtype
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if key_mask is not None:
        visible = key_mask.any(dim=1)  # [B]
        # Samples without a visible key run an unmasked softmax whose result is then zeroed, so
        # neither the output nor the gradients ever see NaN (softmax over all -inf would).
        attend = key_mask | ~visible[:, None]
        s = s.masked_fill(~attend[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1) * visible.to(s.dtype)[:, None, None, None]
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_p > 0.0 and training:
        p = torch.nn.functional.dropout(p, p=dropout_p, training=True)
    o = torch.matmul(p.to(v.dtype), v)
    return o.to(out_dtype)


def masked_attention_reference(q, k, v, key_mask=None, *, scale=None, upcast=True):
    """Eager masked attention (the reference every kernel is checked against).

    Same arguments and result as `masked_attention`; `upcast=False` keeps the matmuls in the
    input dtype (used by the tests as the low-precision baseline of the tolerance rule).
    """
    _validate(q, k, v, key_mask, scale)
    scale = _default_scale(q, scale)
    return _eager_attention(q, k, v, key_mask, scale, upcast=upcast)


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------
def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _validate(q, k, v, key_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype}; expected one of {_FLOAT_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_OP}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{_OP}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"{_OP}: head counts differ: q {H}, k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"{_OP}: head dims differ: q {D}, k {k.shape[3]}, v {v.shape[3]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{_OP}: k has {k.shape[2]} keys but v has {v.shape[2]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[3] > 1 and t.stride(3) != 1:
            raise ValueError(
                f"{_OP}: {name} must have a contiguous last dim (stride 1), got strides "
                f"{tuple(t.stride())}; call .contiguous() on it"
            )
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"{_OP}: key_mask must be a bool tensor or None, got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"{_OP}: key_mask must have dtype torch.bool (True = visible), got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, k.shape[2]):
            raise ValueError(
                f"{_OP}: key_mask must have shape [B, Nk] = {[B, k.shape[2]]}, got {list(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"{_OP}: key_mask is on {key_mask.device} but q is on {q.device}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{_OP}: scale must be a Python float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{_OP}: scale must be finite, got {scale}")


def _cuda_reason(q):
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernels support float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the CUDA kernels support head dims {CUDA_HEAD_DIMS}, not {q.shape[-1]}"
    return None


def _triton_reason(q, device=None):
    from djepa import backends

    device = q.device if device is None else device
    if q.dtype == torch.float64:
        return "the Triton kernels support float16, bfloat16 and float32, not float64"
    if q.dtype == torch.bfloat16 and device.type == "cpu" and backends.interpreter_enabled():
        return "the Triton interpreter does not compute bfloat16 correctly; use float16/float32 or a GPU"
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernels support head dims up to {TRITON_MAX_HEAD_DIM}, not {q.shape[-1]}"
    return None


@torch.compiler.assume_constant_result
def _choose_backend(backend, device, dtype, head_dim, num_keys=None, train=False):
    # A pure function of its (constant) arguments and the environment, so torch.compile can
    # evaluate it once at trace time instead of tracing the extension/Triton probes.
    probe = torch.empty((0, 0, 0, head_dim), dtype=dtype, device="meta")
    bucket = None
    if num_keys is not None:
        from djepa import tune_table

        bucket = tune_table.bucket(_OP, D=head_dim, Nk=num_keys, train=train)
    return _dispatch.select_backend(
        _OP, backend, device,
        cuda_reason=_cuda_reason(probe), triton_reason=_triton_reason(probe, device),
        dtype=dtype, bucket=bucket, wgmma_reason=_wgmma_reason(head_dim),
    )


def _wgmma_reason(head_dim):
    """Why the CUDA backend serves this head dim with the mma.sync kernels on sm_90 (None: the
    sm_90a wgmma kernels serve it)."""
    if head_dim in SM90_HEAD_DIMS:
        return None
    return f"the sm_90a kernels serve head dims {SM90_HEAD_DIMS}, not {head_dim}"


def cuda_kernels(device, head_dim):
    """The names of the djepa._C (forward, backward) functions that backend="cuda" launches for
    tensors on `device` with this head dim: the sm_90a wgmma kernels on an sm_90 GPU where the
    build has them (djepa.backends.uses_wgmma) and they serve the head dim, else mma.sync."""
    from djepa import backends

    if _wgmma_reason(head_dim) is None and backends.uses_wgmma(_OP, device):
        return "masked_attention_fwd_sm90", "masked_attention_bwd_sm90"
    return "masked_attention_fwd", "masked_attention_bwd"


def _compact(key_mask):
    """Visible key indices first (ascending), and the count of visible keys per sample."""
    kv_count = key_mask.sum(dim=1, dtype=torch.int32)
    kv_index = torch.argsort((~key_mask).to(torch.uint8), dim=1, stable=True).to(torch.int32)
    return kv_index.contiguous(), kv_count.contiguous()


# --------------------------------------------------------------------------------------------
# Kernel launchers
# --------------------------------------------------------------------------------------------
def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2))


def _fwd_impl(q, k, v, kv_index, kv_count, scale, backend):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Nk == 0:  # no key at all: every row has no visible key (zeros, lse 0, as the kernels define)
        return o.zero_(), lse.zero_()
    if backend == "cuda":
        fwd = getattr(_dispatch.extension(), cuda_kernels(q.device, D)[0])
        fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
            0 if kv_index is None else kv_index.data_ptr(),
            0 if kv_count is None else kv_count.data_ptr(),
            B, H, Nq, Nk, D, _strides3(q), _strides3(k), _strides3(v),
            float(scale), _dispatch.dtype_code(q.dtype), _dispatch.stream_handle(q.device),
        )
    elif backend == "triton":
        from djepa.kernels import attention as kern

        kern.attention_fwd(q, k, v, o, lse, kv_index, kv_count, scale)
    else:
        raise ValueError(f"{_OP}: unknown kernel backend {backend!r}")
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, kv_index, kv_count, scale, backend):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    do = do.contiguous()
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Nk, D), dtype=v.dtype, device=q.device)
    if Nq == 0 or Nk == 0 or B * H * D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if backend == "cuda":
        bwd = getattr(_dispatch.extension(), cuda_kernels(q.device, D)[1])
        bwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(),
            0 if kv_index is None else kv_index.data_ptr(),
            0 if kv_count is None else kv_count.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(),
            B, H, Nq, Nk, D, _strides3(q), _strides3(k), _strides3(v),
            float(scale), _dispatch.dtype_code(q.dtype), _dispatch.stream_handle(q.device),
        )
    elif backend == "triton":
        from djepa.kernels import attention as kern

        kern.attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale)
    else:
        raise ValueError(f"{_OP}: unknown kernel backend {backend!r}")
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, differentiable through register_autograd)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("djepa::masked_attention", mutates_args=())
def _masked_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_index: Optional[torch.Tensor],
    kv_count: Optional[torch.Tensor],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with _dispatch.on_device(q.device):
        return _fwd_impl(q, k, v, kv_index, kv_count, scale, backend)


@_masked_attention_op.register_fake
def _(q, k, v, kv_index, kv_count, scale, backend):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("djepa::masked_attention_backward", mutates_args=())
def _masked_attention_backward_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_index: Optional[torch.Tensor],
    kv_count: Optional[torch.Tensor],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _dispatch.on_device(q.device):
        return _bwd_impl(do, q, k, v, o, lse, kv_index, kv_count, scale, backend)


@_masked_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, kv_index, kv_count, scale, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, kv_count, scale, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_index, kv_count)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, do, dlse):
    q, k, v, o, lse, kv_index, kv_count = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _masked_attention_backward_op(do, q, k, v, o, lse, kv_index, kv_count, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def masked_attention(q, k, v, key_mask=None, *, scale=None, backend="auto"):
    """Attention in which each sample attends only to its visible keys.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``. Any strides with the last dim contiguous
            (stride 1), so views of a fused qkv projection go in without a copy. fp16, bf16, fp32
            (fp64 on the eager backend). All three share a dtype and a device.
        key_mask: bool ``[B, Nk]``, True = the key may be attended; None = all keys visible.
            Only keys are masked: every query row is computed.
        scale: multiplier of ``q @ k^T``; defaults to ``D ** -0.5``.
        backend: "auto" | "cuda" | "triton" | "eager" | None (None: ``DJEPA_BACKEND``). An
            explicit backend that cannot serve the call raises ValueError with the reason.

    Returns:
        ``[B, H, Nq, D]`` in the input dtype (contiguous for the kernel backends).

    Defined edge case: a sample whose ``key_mask`` row has no True entry (or ``Nk == 0``) gets an
    all-zero output and zero gradients for its q, k and v. A masked softmax written by hand
    (``masked_fill(-inf).softmax``) gives NaN there, and so does ``F.scaled_dot_product_attention``
    with a boolean mask on some backends and torch versions (others return zeros): do not rely on
    SDPA for it. An empty batch (``B == 0`` or ``Nq == 0``) returns an empty tensor.

    The kernel backends compact the mask (visible indices first) and visit only the visible keys,
    so the cost follows their number. Their backward is deterministic: the same inputs give the
    same bits.
    """
    _validate(q, k, v, key_mask, scale)
    scale = _default_scale(q, scale)
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = _choose_backend(backend, q.device, q.dtype, q.shape[-1], k.shape[2], train)
    if chosen == "eager":
        return _eager_attention(q, k, v, key_mask, scale)
    if key_mask is None:
        kv_index = kv_count = None
    else:
        kv_index, kv_count = _compact(key_mask)
    o, _ = _masked_attention_op(q, k, v, kv_index, kv_count, scale, chosen)
    return o
