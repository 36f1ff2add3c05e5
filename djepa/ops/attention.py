"""Masked attention: each sample attends only to its visible keys, at a cost that follows them.

`masked_attention(q, k, v, key_mask)` computes, per sample b and head h,
``softmax(scale * q @ k[visible].T) @ v[visible]``, where the visible keys of sample b are
``key_mask[b]``. Every query row is computed; only keys are masked. With ``dropout_p > 0`` the
attention probabilities of the visible keys are dropped with probability p and the kept ones
scaled by ``1 / (1 - p)`` (the normaliser is the undropped softmax sum, as in
``F.dropout(softmax(s))``), in the forward and the backward of every backend.

Backends:
  eager   the reference below (float32 math, float64 for float64 inputs), differentiated by autograd;
          its dropout mask is drawn with torch.rand from the generator;
  triton  djepa.kernels.attention (forward, and a deterministic two-kernel backward);
  cuda    djepa._C.masked_attention_fwd / masked_attention_bwd (fp16/bf16, head dims 32..128;
          mma.sync), or on an sm_90 GPU, where the build has sm_90a code, their wgmma versions
          masked_attention_fwd_sm90 / _bwd_sm90 (head dims 64, 80, 96, 128; the others stay on
          the mma.sync kernels). Chosen per launch by the device (DJEPA_SM90_KERNELS=0: never).
          The sm_90a kernels have no dropout: a call with dropout_p > 0 runs on the mma.sync ones.
          Their design, read at each launch: DJEPA_SM90_ATTENTION=pipelined (the default;
          FlashAttention-3's schedule) or baseline (the first sm_90a kernels), see
          djepa.backends.sm90_attention_design.

The kernel backends compact the mask once per call (visible key indices first) and iterate only
over the visible keys, so the work follows the number of visible keys, wherever they are.

Dropout in the kernels (Triton and CUDA alike) keeps no mask: it regenerates it from a
counter-based generator, Philox-4x32-10 keyed by a 64-bit seed, in the forward and again in the
backward. Per call, `philox_state` draws (seed, offset) from the torch generator into a 2-element
int64 tensor on the tensors' device (one torch.randint, so the generator advances per call and
the draw is captured by CUDA graphs and traced by torch.compile like any RNG op); the kernels
read it on the device. For query i and compacted key position j (the j-th visible key) of head
row bh = b * H + h, the kernels keep the probability when the 16-bit value

    philox(key = seed, counter = (i & ~8, j & ~9, bh, offset)) word ((i >> 3) & 1) + 2 * (j & 1),
    half (j >> 3) & 1

is >= round(65536 p): one Philox call serves the 8 (query, key) pairs {i, i+8} x {j, j+1, j+8,
j+9} that one thread of an m16n8k16 fragment holds, in the row layout of the forward and dq
kernels and (with one exchange between two lanes) in the transposed layout of dk/dv. So the
kernels drop with probability round(65536 p) / 65536 (within 7.7e-6 of p) and scale by
1 / (1 - p). `dropout_keep_reference` computes the same bits in torch ops.
"""
import math
from typing import Optional

import torch

from djepa import backends
from djepa.ops import _dispatch

__all__ = ["masked_attention", "masked_attention_reference", "dropout_keep_reference", "philox_state",
           "dropout_threshold", "choose_backend", "cuda_kernels", "cuda_reason", "triton_reason",
           "CUDA_HEAD_DIMS", "SM90_HEAD_DIMS", "TRITON_MAX_HEAD_DIM"]

_OP = "masked_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_HEAD_DIMS = (32, 64, 80, 96, 128)
SM90_HEAD_DIMS = backends.OPS[_OP].sm90_head_dims  # djepa._C's sm_90a (wgmma) kernels
TRITON_MAX_HEAD_DIM = 256
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox-4x32 round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and key increments (Salmon et al. 2011; curand, Triton)
PHILOX_ROUNDS = 10


# --------------------------------------------------------------------------------------------
# Eager reference
# --------------------------------------------------------------------------------------------
def _eager_attention(q, k, v, key_mask, scale, upcast=True, dropout_p=0.0, keep=None, generator=None):
    """Masked softmax attention in plain torch ops (autograd-friendly, NaN-free): (o, keep).

    upcast=True computes in float32 (float64 for float64 inputs) and casts the result back;
    upcast=False keeps the matmuls in the input dtype (softmax in float32, probabilities cast to
    the input dtype), which is what a low-precision kernel does: the "eager_lowp" of the tests.
    Dropout: `keep` (bool [B, H, Nq, Nk]) applies that mask; else with dropout_p > 0 one is drawn
    with torch.rand from `generator` (None: the default one of the tensors' device). keep is None
    without dropout.
    """
    out_dtype = q.dtype
    if key_mask is not None:
        # Masked keys and values never reach the result, whatever they hold (NaN, Inf): a zero
        # probability times NaN would still be NaN, and so would the gradient of dq through K.
        visible_key = key_mask[:, None, :, None]
        k = torch.where(visible_key, k, 0)
        v = torch.where(visible_key, v, 0)
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
    if keep is None and dropout_p > 0.0:
        keep = torch.rand(p.shape, generator=generator, device=p.device) >= dropout_p
    if keep is not None:
        p = p * keep.to(p.dtype) * (1.0 / (1.0 - dropout_p))
    o = torch.matmul(p.to(v.dtype), v)
    return o.to(out_dtype), keep


def masked_attention_reference(q, k, v, key_mask=None, *, scale=None, upcast=True, dropout_p=0.0,
                               dropout_mask=None):
    """Eager masked attention (the reference every kernel is checked against).

    Same arguments and result as `masked_attention`; `upcast=False` keeps the matmuls in the
    input dtype (used by the tests as the low-precision baseline of the tolerance rule). With
    dropout it applies a given mask: `dropout_mask` (bool [B, H, Nq, Nk], True = kept, e.g. the
    one a kernel returned with `return_dropout_mask=True`) and `dropout_p` (the 1 / (1 - p) scale).
    """
    _validate(q, k, v, key_mask, scale)
    _validate_dropout(dropout_p, None, q)
    if (dropout_mask is None) != (dropout_p == 0.0):
        raise ValueError(f"{_OP}_reference: dropout takes both dropout_p > 0 and dropout_mask (the mask to "
                         f"apply), got dropout_p={dropout_p} and dropout_mask="
                         f"{'None' if dropout_mask is None else 'a tensor'}")
    if dropout_mask is not None:
        want = (*q.shape[:3], k.shape[2])
        if not isinstance(dropout_mask, torch.Tensor) or dropout_mask.dtype != torch.bool:
            raise TypeError(f"{_OP}_reference: dropout_mask must be a bool tensor")
        if tuple(dropout_mask.shape) != want:
            raise ValueError(f"{_OP}_reference: dropout_mask must have shape [B, H, Nq, Nk] = {list(want)}, "
                             f"got {list(dropout_mask.shape)}")
        dropout_mask = dropout_mask.to(q.device)
    scale = _default_scale(q, scale)
    return _eager_attention(q, k, v, key_mask, scale, upcast=upcast, dropout_p=dropout_p, keep=dropout_mask)[0]


# --------------------------------------------------------------------------------------------
# Dropout: the generator state of one call, and the bits the kernels keep
# --------------------------------------------------------------------------------------------
def dropout_threshold(dropout_p: float) -> int:
    """The 16-bit threshold of the kernels: a probability is kept when its Philox value >= it."""
    return min(int(round(dropout_p * 65536)), 65535)


def philox_state(generator, device) -> torch.Tensor:
    """(seed, offset) of one kernel call, drawn from `generator` (None: the default generator of
    `device`) into an int64 [2] tensor on `device`, which the kernels read there."""
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64, device=device, generator=generator)


def _mul_hi_lo(a, m):
    """(high, low) 32-bit halves of a * m for uint32 values a (int64 tensor) and the constant m,
    without int64 overflow."""
    x, y = a * (m & 0xFFFF), a * (m >> 16)  # each < 2^48
    low_sum = x + ((y & 0xFFFF) << 16)
    return (y >> 16) + (low_sum >> 32), low_sum & 0xFFFFFFFF


def _philox(c0, c1, c2, c3, seed):
    """Philox-4x32-10 of counters c0..c3 (uint32 values in int64 tensors) under the 64-bit key `seed`."""
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M[0])
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF, (k1 + PHILOX_W[1]) & 0xFFFFFFFF
    return c0, c1, c2, c3


def dropout_keep_reference(rng, dropout_p, B, H, Nq, Nk):
    """The keep bits of the kernels (module docstring), in torch ops: bool [B, H, Nq, Nk] over
    the compacted key positions (position j = the j-th visible key of the sample, ascending)."""
    seed, offset = (int(x) for x in rng.cpu().tolist())
    i = torch.arange(Nq, dtype=torch.int64).view(1, Nq, 1)
    j = torch.arange(Nk, dtype=torch.int64).view(1, 1, Nk)
    bh = torch.arange(B * H, dtype=torch.int64).view(B * H, 1, 1)
    shape = (B * H, Nq, Nk)
    counters = [t.expand(shape) for t in (i & ~8, j & ~9, bh, torch.tensor(offset & 0xFFFFFFFF))]
    words = torch.stack(_philox(*counters, torch.tensor(seed)), 0)
    which = (((i >> 3) & 1) + 2 * (j & 1)).expand(shape)
    value = (words.gather(0, which[None]).squeeze(0) >> (16 * ((j >> 3) & 1))) & 0xFFFF
    return (value >= dropout_threshold(dropout_p)).view(B, H, Nq, Nk)


def _validate_dropout(dropout_p, generator, q):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{_OP}: dropout_p must be a Python float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"{_OP}: dropout_p must lie in [0, 1), got {dropout_p}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{_OP}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != q.device.type:
            raise ValueError(f"{_OP}: generator is on {generator.device} but the tensors are on {q.device}")


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


def cuda_reason(q):
    """Why djepa._C's kernels cannot serve tensors like `q` (dtype, head dim), or None."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernels support float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the CUDA kernels support head dims {CUDA_HEAD_DIMS}, not {q.shape[-1]}"
    return None


def triton_reason(q, device=None):
    """Why the Triton kernels cannot serve tensors like `q` on `device` (default q's), or None."""
    device = q.device if device is None else device
    if q.dtype == torch.float64:
        return "the Triton kernels support float16, bfloat16 and float32, not float64"
    if q.dtype == torch.bfloat16 and device.type == "cpu" and backends.interpreter_enabled():
        return "the Triton interpreter does not compute bfloat16 correctly; use float16/float32 or a GPU"
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernels support head dims up to {TRITON_MAX_HEAD_DIM}, not {q.shape[-1]}"
    return None


@torch.compiler.assume_constant_result
def _choose_backend(backend, device, dtype, head_dim, num_keys=None, train=False, dropout=False):
    # A pure function of its (constant) arguments and the environment, so torch.compile can
    # evaluate it once at trace time instead of tracing the extension/Triton probes.
    probe = torch.empty((0, 0, 0, head_dim), dtype=dtype, device="meta")
    return _dispatch.select_backend(
        _OP, backend, device,
        cuda_reason=cuda_reason(probe), triton_reason=triton_reason(probe, device),
        dtype=dtype, case=dict(D=head_dim, Nk=num_keys, train=train, dropout=dropout),
    )


def choose_backend(backend, device, dtype, head_dim, *, num_keys=None, train=False, dropout_p=0.0) -> str:
    """The backend `masked_attention(..., backend=backend)` runs a call on ("cuda", "triton" or
    "eager") for tensors on `device` in `dtype` with this head dim (num_keys: the key count,
    which a tuning table may use; train: gradients needed). ValueError when an explicit backend
    cannot serve it."""
    return _choose_backend(backend, torch.device(device), dtype, head_dim, num_keys, train, dropout_p > 0.0)


def cuda_kernels(device, head_dim, dropout=False):
    """The names of the djepa._C (forward, backward) functions that backend="cuda" launches for
    tensors on `device` with this head dim: the sm_90a wgmma kernels on an sm_90 GPU where the
    build has them and they serve the call (head dim, no dropout: djepa.backends.wgmma_reason),
    else mma.sync."""
    if backends.wgmma_reason(_OP, dict(D=head_dim, dropout=dropout)) is None and backends.uses_wgmma(_OP, device):
        return "masked_attention_fwd_sm90", "masked_attention_bwd_sm90"
    return "masked_attention_fwd", "masked_attention_bwd"


def _sm90_design(name):
    """The keyword arguments of djepa._C function `name`: the sm_90a ones take the design
    DJEPA_SM90_ATTENTION names."""
    if not name.endswith("_sm90"):
        return {}
    return {"design": backends.SM90_ATTENTION_DESIGNS[backends.sm90_attention_design()]}


def _compact(key_mask):
    """Visible key indices first (ascending), and the count of visible keys per sample."""
    kv_count = key_mask.sum(dim=1, dtype=torch.int32)
    kv_index = torch.argsort((~key_mask).to(torch.uint8), dim=1, stable=True).to(torch.int32)
    return kv_index.contiguous(), kv_count.contiguous()


def _uncompact(keep, kv_index, kv_count):
    """bool [B, H, Nq, Nk] in the keys' own order from the kernels' keep bits over compacted
    positions (invisible keys: False)."""
    keep = keep.bool()
    if kv_index is None:
        return keep
    B, Nk = kv_index.shape
    visible = torch.arange(Nk, device=keep.device)[None, :] < kv_count[:, None].to(keep.device)
    keep = keep & visible[:, None, None, :]
    index = kv_index.long().to(keep.device)[:, None, None, :].expand_as(keep)
    return torch.zeros_like(keep).scatter_(-1, index, keep)


# --------------------------------------------------------------------------------------------
# Kernel launchers
# --------------------------------------------------------------------------------------------
def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2))


def _triton_dropout(rng, dropout_p):
    """The dropout arguments of djepa.kernels.attention (none without dropout)."""
    if dropout_p <= 0.0:
        return {}
    return dict(rng=rng, threshold=dropout_threshold(dropout_p), keep_scale=1.0 / (1.0 - dropout_p))


def _fwd_impl(q, k, v, kv_index, kv_count, scale, backend, rng=None, dropout_p=0.0, keep_out=None):
    """(o, lse); with dropout (rng: philox_state, dropout_p > 0), keep_out (uint8 [B, H, Nq, Nk],
    zeroed) receives the keep bits the forward used, over compacted key positions."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Nk == 0:  # no key at all: every row has no visible key (zeros, lse 0, as the kernels define)
        return o.zero_(), lse.zero_()
    dropout = dropout_p > 0.0
    if backend == "cuda":
        name = cuda_kernels(q.device, D, dropout)[0]
        fwd, design = getattr(_dispatch.extension(), name), _sm90_design(name)
        extra = (rng.data_ptr(), float(dropout_p), 0 if keep_out is None else keep_out.data_ptr()) if dropout else ()
        fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
            0 if kv_index is None else kv_index.data_ptr(),
            0 if kv_count is None else kv_count.data_ptr(),
            B, H, Nq, Nk, D, _strides3(q), _strides3(k), _strides3(v),
            float(scale), _dispatch.dtype_code(q.dtype), _dispatch.stream_handle(q.device), *extra, **design,
        )
    elif backend == "triton":
        from djepa.kernels import attention as kern

        kern.attention_fwd(q, k, v, o, lse, kv_index, kv_count, scale, keep_out=keep_out,
                           **_triton_dropout(rng, dropout_p))
    else:
        raise ValueError(f"{_OP}: unknown kernel backend {backend!r}")
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, kv_index, kv_count, scale, backend, rng=None, dropout_p=0.0):
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    do = do.contiguous()
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Nk, D), dtype=v.dtype, device=q.device)
    if Nq == 0 or Nk == 0 or B * H * D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    dropout = dropout_p > 0.0
    if backend == "cuda":
        name = cuda_kernels(q.device, D, dropout)[1]
        bwd, design = getattr(_dispatch.extension(), name), _sm90_design(name)
        extra = (rng.data_ptr(), float(dropout_p)) if dropout else ()
        bwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), do.data_ptr(), lse.data_ptr(),
            0 if kv_index is None else kv_index.data_ptr(),
            0 if kv_count is None else kv_count.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), delta.data_ptr(),
            B, H, Nq, Nk, D, _strides3(q), _strides3(k), _strides3(v),
            float(scale), _dispatch.dtype_code(q.dtype), _dispatch.stream_handle(q.device), *extra, **design,
        )
    elif backend == "triton":
        from djepa.kernels import attention as kern

        kern.attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale,
                           **_triton_dropout(rng, dropout_p))
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
    rng: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    return_keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, keep): keep is the uint8 [B, H, Nq, Nk] mask of kept probabilities over compacted
    key positions when return_keep (the debug switch), else empty."""
    with _dispatch.on_device(q.device):
        keep = _keep_buffer(q, k, return_keep)
        o, lse = _fwd_impl(q, k, v, kv_index, kv_count, scale, backend, rng, dropout_p,
                           keep if return_keep else None)
        return o, lse, keep


def _keep_buffer(q, k, return_keep):
    B, H, Nq, _ = q.shape
    shape = (B, H, Nq, k.shape[2]) if return_keep else (0,)
    return torch.zeros(shape, dtype=torch.uint8, device=q.device)


@_masked_attention_op.register_fake
def _(q, k, v, kv_index, kv_count, scale, backend, rng=None, dropout_p=0.0, return_keep=False):
    B, H, Nq, D = q.shape
    shape = (B, H, Nq, k.shape[2]) if return_keep else (0,)
    return (q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32),
            q.new_empty(shape, dtype=torch.uint8))


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
    rng: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _dispatch.on_device(q.device):
        return _bwd_impl(do, q, k, v, o, lse, kv_index, kv_count, scale, backend, rng, dropout_p)


@_masked_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, kv_index, kv_count, scale, backend, rng=None, dropout_p=0.0):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, kv_index, kv_count, scale, backend, rng, dropout_p, _ = inputs
    o, lse, _ = output
    ctx.save_for_backward(q, k, v, o, lse, kv_index, kv_count, rng)
    ctx.scale = scale
    ctx.backend = backend
    ctx.dropout_p = dropout_p


def _backward(ctx, do, dlse, dkeep):
    q, k, v, o, lse, kv_index, kv_count, rng = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _masked_attention_backward_op(do, q, k, v, o, lse, kv_index, kv_count, ctx.scale, ctx.backend,
                                               rng, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None, None, None, None


_masked_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
def masked_attention(q, k, v, key_mask=None, *, dropout_p=0.0, generator=None, scale=None, backend="auto",
                     return_dropout_mask=False):
    """Attention in which each sample attends only to its visible keys.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``. Any strides with the last dim contiguous
            (stride 1), so views of a fused qkv projection go in without a copy. fp16, bf16, fp32
            (fp64 on the eager backend). All three share a dtype and a device.
        key_mask: bool ``[B, Nk]``, True = the key may be attended; None = all keys visible.
            Only keys are masked: every query row is computed. Masked keys and their values
            never touch the result, whatever they hold (NaN and Inf included), on every backend.
        dropout_p: dropout on the attention probabilities of the visible keys (SDPA's name),
            in [0, 1): each is dropped with probability p and the kept ones are scaled by
            1 / (1 - p). Applied whenever > 0 (pass 0.0 in evaluation, as with SDPA).
        generator: the torch.Generator dropout draws from (on the tensors' device type); None:
            the default generator of that device. Each call advances it; the same generator
            state gives the same result on the same backend.
        scale: multiplier of ``q @ k^T``; defaults to ``D ** -0.5``.
        backend: "auto" | "cuda" | "triton" | "eager" | None (None: ``DJEPA_BACKEND``). An
            explicit backend that cannot serve the call raises ValueError with the reason.
        return_dropout_mask: debug switch: also return the bool ``[B, H, Nq, Nk]`` mask of the
            probabilities kept (in the keys' own order; invisible keys are False), as the
            forward kernel used it (their backward regenerates the same bits). Requires dropout.

    Returns:
        ``[B, H, Nq, D]`` in the input dtype (contiguous for the kernel backends); with
        return_dropout_mask, ``(output, mask)``.

    Defined edge case: a sample whose ``key_mask`` row has no True entry (or ``Nk == 0``) gets an
    all-zero output and zero gradients for its q, k and v. A masked softmax written by hand
    (``masked_fill(-inf).softmax``) gives NaN there, and so does ``F.scaled_dot_product_attention``
    with a boolean mask on some backends and torch versions (others return zeros): do not rely on
    SDPA for it. An empty batch (``B == 0`` or ``Nq == 0``) returns an empty tensor.

    The kernel backends compact the mask (visible indices first) and visit only the visible keys,
    so the cost follows their number. Their backward is deterministic: the same inputs (and
    generator state) give the same bits. Under torch.compile with ``generator=None`` the call
    traces without a graph break (an explicit Generator object is a graph break in
    torch.compile itself); dropout's generator state is a device tensor, so CUDA graphs capture it.
    """
    _validate(q, k, v, key_mask, scale)
    _validate_dropout(dropout_p, generator, q)
    dropout = dropout_p > 0.0
    if return_dropout_mask and not dropout:
        raise ValueError(f"{_OP}: return_dropout_mask needs dropout_p > 0")
    scale = _default_scale(q, scale)
    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = _choose_backend(backend, q.device, q.dtype, q.shape[-1], k.shape[2], train, dropout)
    if chosen == "eager":
        o, keep = _eager_attention(q, k, v, key_mask, scale, dropout_p=dropout_p, generator=generator)
        if return_dropout_mask:
            return o, keep if key_mask is None else keep & key_mask[:, None, None, :]
        return o
    if key_mask is None:
        kv_index = kv_count = None
    else:
        kv_index, kv_count = _compact(key_mask)
    rng = philox_state(generator, q.device) if dropout else None
    o, _, keep = _masked_attention_op(q, k, v, kv_index, kv_count, scale, chosen, rng, float(dropout_p),
                                      bool(return_dropout_mask))
    if return_dropout_mask:
        return o, _uncompact(keep, kv_index, kv_count)
    return o
