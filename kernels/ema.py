"""Triton multi-tensor EMA: one launch updates a whole list of tensors of one dtype pair.

The tensor list travels as a small int64 table on the device (EMA pointers, tensor pointers,
element counts, cumulative block starts); each program finds its tensor by binary search over
the block starts and updates BLOCK elements with 64-bit offsets: with 16-byte vector accesses
where both pointers are 16-byte aligned and the element count a multiple of the vector, else
element by element (the views of djepa.nn.EMA's flat buffer may start anywhere).
"""
import functools

import torch
import triton
import triton.language as tl

# Elements per program, and warps: 16 elements per thread, so each thread keeps several 16-byte
# loads in flight (the update is bound by memory bandwidth; a program is one tensor's slice).
BLOCK = 4096
WARPS = 8
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _lerp_block(ema, x, start, numel, d, w, EMA_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """ema[i] = d * ema[i] + w * x[i] (w = 1 - d) for i in [start, start + BLOCK) below numel,
    in fp32, stored in EMA_DTYPE: the EMA update of BYOL / I-JEPA, `ema.mul_(d).add_(x, 1 - d)`."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    e = tl.load(ema + offs, mask=mask).to(tl.float32)
    v = tl.load(x + offs, mask=mask).to(tl.float32)
    tl.store(ema + offs, (d * e + w * v).to(EMA_DTYPE), mask=mask)


@triton.jit
def _ema_kernel(
    table_ptr,
    num_tensors,
    decay_ptr,
    decay,
    one_minus_decay,
    EMA_DTYPE: tl.constexpr,
    X_DTYPE: tl.constexpr,
    DECAY_FROM_PTR: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    """The EMA update of every tensor of a list, one launch: program p finds its tensor t by a
    binary search of the block starts (SEARCH_STEPS = ceil(log2 T) + 1 steps), then updates
    BLOCK elements of it with _lerp_block, d = decay (or *decay_ptr, a device scalar), as
    `torch._foreach_lerp_` and apex's multi_tensor_apply do over a tensor list."""
    pid = tl.program_id(0).to(tl.int64)
    # table rows: [0] EMA pointers, [1] tensor pointers, [2] numels, [3] block starts (T + 1)
    starts = table_ptr + 3 * num_tensors
    lo = pid * 0
    hi = lo + num_tensors
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(starts + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    ema_addr = tl.load(table_ptr + t)
    x_addr = tl.load(table_ptr + num_tensors + t)
    numel = tl.load(table_ptr + 2 * num_tensors + t)
    start = (pid - tl.load(starts + t)) * BLOCK
    if DECAY_FROM_PTR:
        d = tl.load(decay_ptr).to(tl.float32)
        w = 1.0 - d
    else:
        d = decay
        w = one_minus_decay
    # The pointers come from a table, so the compiler cannot know their alignment: check it
    # here, per tensor, and promise it where it holds (16-byte vectors, VEC elements of the
    # narrower dtype), masks included (numel a multiple of VEC); the rest takes element accesses.
    if ((ema_addr % 16) == 0) & ((x_addr % 16) == 0) & ((numel % VEC) == 0):
        ema = tl.multiple_of(ema_addr.to(tl.pointer_type(EMA_DTYPE)), 16)
        x = tl.multiple_of(x_addr.to(tl.pointer_type(X_DTYPE)), 16)
        _lerp_block(ema, x, start, tl.multiple_of(numel, VEC), d, w, EMA_DTYPE, BLOCK)
    else:
        ema = ema_addr.to(tl.pointer_type(EMA_DTYPE))
        x = x_addr.to(tl.pointer_type(X_DTYPE))
        _lerp_block(ema, x, start, numel, d, w, EMA_DTYPE, BLOCK)


def _table(ema_tensors, tensors):
    n = len(ema_tensors)
    blocks = [triton.cdiv(e.numel(), BLOCK) for e in ema_tensors]
    starts = [0]
    for b in blocks:
        starts.append(starts[-1] + b)
    rows = (
        [e.data_ptr() for e in ema_tensors]
        + [x.data_ptr() for x in tensors]
        + [e.numel() for e in ema_tensors]
        + starts
    )
    return _device_table(ema_tensors[0].device, tuple(rows)), starts[-1], n


@functools.lru_cache(maxsize=32)
def _device_table(device, rows):
    # Cached: a training loop updates the same parameter list every step, so its table is built
    # and copied to the device once. The key is the table's content, so reuse is always correct.
    return torch.tensor(rows, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=None)
def _search_steps(n):
    return max(1, (n - 1).bit_length() + 1)


def ema_update(ema_tensors, tensors, decay_tensor, decay, one_minus_decay):
    """Update `ema_tensors` in place. All tensors contiguous, non-empty, one device, and of one
    (EMA dtype, tensor dtype) pair; validation is djepa.ops.ema's job."""
    if not ema_tensors:
        return
    table, total_blocks, n = _table(ema_tensors, tensors)
    decay_arg = decay_tensor if decay_tensor is not None else table
    _ema_kernel[(total_blocks,)](
        table,
        n,
        decay_arg,
        float(decay),
        float(one_minus_decay),
        EMA_DTYPE=_TL_DTYPES[ema_tensors[0].dtype],
        X_DTYPE=_TL_DTYPES[tensors[0].dtype],
        DECAY_FROM_PTR=decay_tensor is not None,
        SEARCH_STEPS=_search_steps(n),
        BLOCK=BLOCK,
        VEC=16 // min(ema_tensors[0].element_size(), tensors[0].element_size()),
        num_warps=WARPS,
    )
