"""Triton masked attention: flash-attention style kernels over the compacted visible keys.

The caller (djepa.ops.attention) compacts the key mask once per call: ``kv_index[b]`` lists the
visible key indices of sample b first (ascending), then the invisible ones; ``kv_count[b]`` is the
number of visible keys. With no mask both are None and all Nk keys are visible.

  forward   grid (query blocks, B*H): online softmax over kv_count[b] gathered K/V rows;
            writes O and the natural-log LSE of the scaled scores (0 where no key is visible).
  backward  two kernels, no atomics, so the result is bitwise deterministic:
            dq    grid (query blocks, B*H): delta = rowsum(dO*O), then dQ over the visible keys;
            dkdv  grid (compacted key blocks, B*H): dK, dV of the visible keys over all queries,
                  zeros for the invisible ones (every row of dK/dV is written exactly once).

q/k/v take arbitrary (batch, head, token) strides with a contiguous last dim; O, dO, dQ, dK, dV
are contiguous [B, H, N, D]; LSE and delta are contiguous float32 [B, H, Nq]. The head dim is
split into one or two power-of-two column blocks (BLOCK_D, BLOCK_D2: 64 -> 64 + 0,
80 -> 64 + 16, 96 -> 64 + 32, 100 -> 128 + 0), each its own dot, so a head dim like 80 costs the
MMA and shared-memory work of 80 columns, not of 128; loads and stores are masked to D.

Dropout (DROPOUT, from djepa.ops.attention, which documents the keep rule): with P the softmax,
Z the keep mask scaled by 1 / (1 - p) and dP = dO V^T,
  forward   O = (P * Z) V (the row sum l and LSE stay those of the undropped P)
  backward  dV = (P * Z)^T dO,  dS = P * (Z * dP - delta),  delta = rowsum(dO * O) as before.
Z is regenerated from the Philox seed/offset in each kernel (_keep_tile), never stored. One Philox
call yields the keep bits of queries {i, i + 8} x keys {j, j + 1, j + 8, j + 9}; a key tile is
loaded in the order (_key_positions) in which those bits come out of the call, so the tile of
bits is a reshape, not a permutation. WRITE_KEEP (debug): the forward stores its bits.

Launch configuration: a `Tile` per kernel, input precision and head-dim class (`_TILES`, with
the reason for each row), chosen by `_config`.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from djepa import backends

# Softmax runs in base 2 (exp2 / log2 are single MUFU instructions): exp(x) = exp2(x * LOG2E),
# log(x) = log2(x) * LN2. Constexprs, so the kernels and the launchers use the same values.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, fp32 accumulation (IEEE fp32 products for fp32 inputs, else tensor cores)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _key_positions(n0, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    """Compacted key positions of a tile's columns: n0 + c, or with dropout, within each 16 keys,
    column 4 m + 2 o + t holds key 8 t + 2 m + o (the order of _keep_tile's bits)."""
    c = tl.arange(0, BLOCK_N)
    if DROPOUT:
        return n0 + (c // 16) * 16 + (c % 2) * 8 + ((c // 4) % 4) * 2 + (c // 2) % 2
    return n0 + c


@triton.jit
def _keep_tile(RNG, bh, offs_m, n0, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep bits [BLOCK_M, BLOCK_N] of queries offs_m and the keys _key_positions(n0) puts in
    the columns, by the keep rule of djepa/ops/attention.py:

        keep(i, j) = half (j >> 3) & 1 of word ((i >> 3) & 1) + 2 (j & 1) of
                     philox4x32_10(key = RNG[0], counter = (i & ~8, j & ~9, bh, RNG[1])) >= threshold

    (Philox: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). Each row
    computes the calls of its own (query, 4-key) groups (rows i and i + 8 share them)."""
    seed = tl.load(RNG)
    offset = tl.load(RNG + 1).to(tl.uint32)
    g = tl.arange(0, BLOCK_N // 4)
    j0 = n0 + (g // 4) * 16 + (g % 4) * 2  # first key of each group
    shape: tl.constexpr = [BLOCK_M, BLOCK_N // 4]
    c0 = tl.broadcast_to((offs_m & ~8).to(tl.uint32)[:, None], shape)
    c1 = tl.broadcast_to(j0.to(tl.uint32)[None, :], shape)
    c2 = tl.full(shape, 0, tl.uint32) + bh.to(tl.uint32)
    c3 = tl.full(shape, 0, tl.uint32) + offset
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    upper = ((offs_m >> 3) & 1)[:, None] == 1  # row i + 8 of its call
    even = tl.where(upper, w1, w0)  # keys j, j + 8 (low, high half)
    odd = tl.where(upper, w3, w2)  # keys j + 1, j + 9
    bits = tl.join(tl.join(even & 0xFFFF, odd & 0xFFFF), tl.join(even >> 16, odd >> 16))
    return tl.reshape(bits, [BLOCK_M, BLOCK_N]) >= threshold.to(tl.uint32)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_INDEX, KV_COUNT, RNG, KEEP,
    q_batch_stride, q_head_stride, q_token_stride, k_batch_stride, k_head_stride, k_token_stride,
    v_batch_stride, v_head_stride, v_token_stride,
    H, Nq, Nk, D, qk_scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """Forward of one query block of one (b, h), over the visible keys j:

        s_j = qk_scale * q . k_j          (qk_scale = scale * LOG2E: base 2)
        m   = max_j s_j,   p_j = exp2(s_j - m),   l = sum_j p_j
        O   = sum_j (p_j * Z_j) v_j / l   (Z: the dropout factor, 1 without dropout)
        LSE = (m + log2 l) * LN2          (natural log; 0 for a row without a visible key)

    with m, l and O updated key block by key block (online softmax, rescaled by
    alpha = exp2(m_old - m_new)): FlashAttention-2's forward (Dao 2023, arXiv 2307.08691,
    Algorithm 1), its keys gathered through kv_index."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_rows = Q + b * q_batch_stride + h * q_head_stride + offs_m.to(tl.int64)[:, None] * q_token_stride
    q = tl.load(q_rows + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # head dims columns BLOCK_D.. (e.g. 80 = 64 + 16): no padding to 128
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_mask = offs_d2 < D
        q2 = tl.load(q_rows + offs_d2[None, :], mask=m_mask[:, None] & d2_mask[None, :], other=0.0)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
    else:
        count = Nk
    k_base = K + b * k_batch_stride + h * k_head_stride
    v_base = V + b * v_batch_stride + h * v_head_stride

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = _key_positions(start, BLOCK_N, DROPOUT)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        k_rows = k_base + idx[:, None] * k_token_stride
        v_rows = v_base + idx[:, None] * v_token_stride
        k = tl.load(k_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if BLOCK_D2 > 0:
            k2 = tl.load(k_rows + offs_d2[None, :], mask=n_mask[:, None] & d2_mask[None, :], other=0.0)
            s = _dot(q2, tl.trans(k2), s, IEEE)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        # Every block holds at least one visible key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep_tile(RNG, bh, offs_m, start, threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
            if WRITE_KEEP:
                keep_rows = KEEP + (bh.to(tl.int64) * Nq + offs_m)[:, None] * Nk
                tl.store(keep_rows + offs_n[None, :], keep.to(tl.uint8), mask=m_mask[:, None] & n_mask[None, :])
        v = tl.load(v_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        p = p.to(v.dtype)
        acc = _dot(p, v, acc * alpha[:, None], IEEE)
        if BLOCK_D2 > 0:
            v2 = tl.load(v_rows + offs_d2[None, :], mask=n_mask[:, None] & d2_mask[None, :], other=0.0)
            acc2 = _dot(p, v2, acc2 * alpha[:, None], IEEE)
        m_i = m_new

    has_key = l_i > 0.0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        inv_l *= keep_scale
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, 0.0)
    row = bh.to(tl.int64) * Nq + offs_m
    o_rows = O + row[:, None] * D
    tl.store(o_rows + offs_d[None, :], (acc * inv_l[:, None]).to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_rows + offs_d2[None, :], (acc2 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=m_mask[:, None] & d2_mask[None, :])
    tl.store(LSE + row, lse, mask=m_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, KV_INDEX, KV_COUNT, RNG,
    q_batch_stride, q_head_stride, q_token_stride, k_batch_stride, k_head_stride, k_token_stride,
    v_batch_stride, v_head_stride, v_token_stride,
    H, Nq, Nk, D, qk_scale, scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """dQ of one query block of one (b, h), over the visible keys j:

        delta = rowsum(dO * O)                          (stored for the dK/dV kernel)
        P_j   = exp2(qk_scale * q . k_j - LSE * LOG2E)  (the forward's softmax, from its LSE)
        dP_j  = dO . v_j
        dS_j  = P_j * (Z_j * dP_j - delta)
        dQ    = scale * sum_j dS_j k_j

    FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Algorithm 2), its dQ half in a
    kernel of its own, so that no output is accumulated atomically."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    row = bh.to(tl.int64) * Nq + offs_m
    q_rows = Q + b * q_batch_stride + h * q_head_stride + offs_m.to(tl.int64)[:, None] * q_token_stride
    do_rows = DO + row[:, None] * D
    o_rows = O + row[:, None] * D
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(do_rows + offs_d[None, :], mask=md_mask, other=0.0)
    o = tl.load(o_rows + offs_d[None, :], mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_mask = offs_d2 < D
        md2_mask = m_mask[:, None] & d2_mask[None, :]
        q2 = tl.load(q_rows + offs_d2[None, :], mask=md2_mask, other=0.0)
        do2 = tl.load(do_rows + offs_d2[None, :], mask=md2_mask, other=0.0)
        o2 = tl.load(o_rows + offs_d2[None, :], mask=md2_mask, other=0.0)
        delta += tl.sum(do2.to(tl.float32) * o2.to(tl.float32), 1)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    tl.store(DELTA + row, delta, mask=m_mask)
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * LOG2E

    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
    else:
        count = Nk
    k_base = K + b * k_batch_stride + h * k_head_stride
    v_base = V + b * v_batch_stride + h * v_head_stride
    # With dropout, LLVM hoists the Philox constants into the loop's preheader and gives the
    # zero-trip path its own copy of dQ's zero fill, which ptxas takes for a non-wgmma write
    # to an accumulator in flight and serializes every wgmma (C7515): one pass always runs
    # (an empty sample's pass sees no key: P = 0, dQ += 0).
    n_end = tl.maximum(count, 1) if DROPOUT else count
    for start in range(0, n_end, BLOCK_N):
        offs_n = _key_positions(start, BLOCK_N, DROPOUT)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        k_rows = k_base + idx[:, None] * k_token_stride
        v_rows = v_base + idx[:, None] * v_token_stride
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q, tl.trans(k), zero, IEEE)
        dp = _dot(do, tl.trans(v), zero, IEEE)
        if BLOCK_D2 > 0:
            kv2_mask = n_mask[:, None] & d2_mask[None, :]
            k2 = tl.load(k_rows + offs_d2[None, :], mask=kv2_mask, other=0.0)
            v2 = tl.load(v_rows + offs_d2[None, :], mask=kv2_mask, other=0.0)
            s = _dot(q2, tl.trans(k2), s, IEEE)
            dp = _dot(do2, tl.trans(v2), dp, IEEE)
        p = tl.where(n_mask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        if DROPOUT:
            keep = _keep_tile(RNG, bh, offs_m, start, threshold, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = _dot(ds, k, dq, IEEE)
        if BLOCK_D2 > 0:
            dq2 = _dot(ds, k2, dq2, IEEE)
    dq_rows = DQ + row[:, None] * D
    tl.store(dq_rows + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)
    if BLOCK_D2 > 0:
        tl.store(dq_rows + offs_d2[None, :], (dq2 * scale).to(DQ.dtype.element_ty), mask=md2_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_INDEX, KV_COUNT, RNG,
    q_batch_stride, q_head_stride, q_token_stride, k_batch_stride, k_head_stride, k_token_stride,
    v_batch_stride, v_head_stride, v_token_stride,
    H, Nq, Nk, D, qk_scale, scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """dK and dV of one block of compacted keys of one (b, h), over all queries i:

        P^T_i  = exp2(qk_scale * K q_i - LSE_i * LOG2E)   (transposed: keys are rows)
        dV     = sum_i (P^T_i * Z^T_i) dO_i
        dS^T_i = P^T_i * (Z^T_i * (V dO_i) - delta_i)
        dK     = scale * sum_i dS^T_i q_i

    zeros for the invisible keys (every row of dK / dV is written once). FlashAttention-2's
    backward (Dao 2023, arXiv 2307.08691, Algorithm 2), its dK/dV half: one program owns its keys'
    rows, so no output is accumulated atomically."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = _key_positions(pid_n * BLOCK_N, BLOCK_N, DROPOUT)  # positions in the compacted key order
    pos_mask = offs_n < Nk
    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
        idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=pos_mask, other=0).to(tl.int64)
    else:
        count = Nk
        idx = offs_n.to(tl.int64)
    vis = offs_n < count
    k_rows = K + b * k_batch_stride + h * k_head_stride + idx[:, None] * k_token_stride
    v_rows = V + b * v_batch_stride + h * v_head_stride + idx[:, None] * v_token_stride
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_mask = vis[:, None] & d_mask[None, :]
    k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_rows + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d2_mask = offs_d2 < D
        kv2_mask = vis[:, None] & d2_mask[None, :]
        k2 = tl.load(k_rows + offs_d2[None, :], mask=kv2_mask, other=0.0)
        v2 = tl.load(v_rows + offs_d2[None, :], mask=kv2_mask, other=0.0)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)

    # Blocks made only of invisible keys skip the loop and write zeros.
    # (with dropout they make one pass over the first queries, with P = 0: see _bwd_dq_kernel)
    if DROPOUT:
        q_end = tl.where(pid_n * BLOCK_N < count, tl.maximum(Nq, 1), 1)
    else:
        q_end = tl.where(pid_n * BLOCK_N < count, Nq, 0)
    q_base = Q + b * q_batch_stride + h * q_head_stride
    row0 = bh.to(tl.int64) * Nq
    for start in range(0, q_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        row = row0 + offs_m
        q_rows = q_base + offs_m.to(tl.int64)[:, None] * q_token_stride
        do_rows = DO + row[:, None] * D
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_rows + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_rows + offs_d[None, :], mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * LOG2E
        delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        s_t = _dot(k, tl.trans(q), zero, IEEE)
        dp_t = _dot(v, tl.trans(do), zero, IEEE)
        if BLOCK_D2 > 0:
            md2_mask = m_mask[:, None] & d2_mask[None, :]
            q2 = tl.load(q_rows + offs_d2[None, :], mask=md2_mask, other=0.0)
            do2 = tl.load(do_rows + offs_d2[None, :], mask=md2_mask, other=0.0)
            s_t = _dot(k2, tl.trans(q2), s_t, IEEE)
            dp_t = _dot(v2, tl.trans(do2), dp_t, IEEE)
        p_t = tl.where(vis[:, None] & m_mask[None, :], tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
        if DROPOUT:
            keep_t = tl.trans(_keep_tile(RNG, bh, offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N))
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            p_t = tl.where(keep_t, p_t, 0.0).to(do.dtype)  # dV's keep_scale is applied once, at the end
        else:
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            p_t = p_t.to(do.dtype)
        dv = _dot(p_t, do, dv, IEEE)
        dk = _dot(ds_t, q, dk, IEEE)
        if BLOCK_D2 > 0:
            dv2 = _dot(p_t, do2, dv2, IEEE)
            dk2 = _dot(ds_t, q2, dk2, IEEE)
    out = DK + ((bh.to(tl.int64) * Nk + idx)[:, None] * D)
    out_v = DV + ((bh.to(tl.int64) * Nk + idx)[:, None] * D)
    store_mask = pos_mask[:, None] & d_mask[None, :]
    if DROPOUT:
        dv *= keep_scale
    tl.store(out + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(out_v + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=store_mask)
    if BLOCK_D2 > 0:
        if DROPOUT:
            dv2 *= keep_scale
        store2_mask = pos_mask[:, None] & d2_mask[None, :]
        tl.store(out + offs_d2[None, :], (dk2 * scale).to(DK.dtype.element_ty), mask=store2_mask)
        tl.store(out_v + offs_d2[None, :], dv2.to(DV.dtype.element_ty), mask=store2_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _head_split(D):
    """(BLOCK_D, BLOCK_D2): the head dim as one power of two, or as two (80 = 64 + 16,
    96 = 64 + 32, 160 = 128 + 32, ...) when that is less padding than the next power of two."""
    full = max(16, triton.next_power_of_2(D))
    lo = full // 2
    if lo >= 16 and D > lo:
        hi = max(16, triton.next_power_of_2(D - lo))
        if lo + hi < full:
            return lo, hi
    return full, 0


class Tile(NamedTuple):
    """The launch configuration of one attention kernel. Fields, in this order in every row:

    block_m   queries per tile: per program (forward, dq), per step of the query loop (dkdv)
    block_n   keys per tile: per step of the key loop (forward, dq), per program (dkdv)
    warps     num_warps
    stages    num_stages (the depth of Triton's software pipeline over the loop's loads)
    """
    block_m: int
    block_n: int
    warps: int
    stages: int


# Head-dim classes: the padded width BLOCK_D + BLOCK_D2 (_head_split) rounded up to one of these.
HEAD_CLASSES = (64, 96, 128, 256)
# The interpreter runs one program at a time: small tiles keep it fast and still exercise tails.
INTERPRETER_TILE = Tile(16, 16, 1, 1)

# (kernel, precision, head-dim class) -> Tile. The reasons: registers per thread and shared
# memory per block that the static gate measured for the class's head dims (sm_90, ptxas of
# Triton 3.9, masked and dense variants; benchmarks/results/static/sm_90.md), or the spill that
# ruled out the bigger tile. Every hot variant (16-bit, a preset's or a benchmark's head dim)
# has no spill and no stack. fp32 multiplies in IEEE fp32 on the FMA units, whose dot operands
# live in registers: its tiles are small and its warps many. D 129-256 serves no preset. The GPU
# machine's image compiles with Triton 3.6, whose ptxas spilled fp32's D = 80-96 backward on the
# 32 x 32 tiles 3.9 kept: those take the smaller tiles that spill on neither.
_TILES = {
    # forward: a 128-query block keeps the K/V traffic per FLOP of FlashAttention-2
    ("fwd", "16-bit", 64): Tile(128, 64, 4, 3),   # one warpgroup: 142-225 regs, <= 64 KiB smem
    ("fwd", "16-bit", 96): Tile(128, 64, 8, 3),   # D = 80, 96: two warpgroups share the 128 x D
                                                  # accumulator, 142-156 regs, 60-96 KiB
    ("fwd", "16-bit", 128): Tile(128, 64, 8, 3),  # 171-181 regs, 96-128 KiB
    ("fwd", "16-bit", 256): Tile(128, 32, 8, 2),  # 32-key tiles, 2 stages: 80-128 KiB of 227
    ("fwd", "fp32", 64): Tile(32, 32, 8, 2),      # 64 x 32 spilled 16 B masked at D = 64
    ("fwd", "fp32", 96): Tile(64, 32, 8, 2),      # 116-148 regs, no spill
    ("fwd", "fp32", 128): Tile(32, 32, 8, 2),     # 64 x 32 spilled 2036 B masked at D = 128
    ("fwd", "fp32", 256): Tile(16, 16, 8, 1),     # 80-134 regs, <= 34 KiB
    # dq: Q, dO and O of the block stay in registers beside the dQ accumulator
    ("dq", "16-bit", 64): Tile(128, 64, 8, 2),    # 100-128 regs, <= 64 KiB
    ("dq", "16-bit", 96): Tile(64, 64, 4, 2),     # one warpgroup, 64 queries: 173-182 regs, 60-72 KiB
    ("dq", "16-bit", 128): Tile(64, 64, 4, 2),    # 166-186 regs, 96 KiB
    ("dq", "16-bit", 256): Tile(64, 32, 4, 2),    # not hot: spills up to 88 B at D 160-256
    ("dq", "fp32", 64): Tile(32, 32, 8, 1),       # 56-172 regs, no spill
    ("dq", "fp32", 96): Tile(16, 16, 8, 1),       # 32 x 32 spilled 48-76 B with dropout on Triton 3.6
    ("dq", "fp32", 128): Tile(16, 16, 8, 1),      # 170-171 regs; 16 warps spilled 2 KB on Triton 3.6
    ("dq", "fp32", 256): Tile(16, 16, 8, 1),      # not hot: spills up to 640 B
    # dkdv: the dK and dV accumulators of the block's keys stay in registers over the query loop
    ("dkdv", "16-bit", 64): Tile(64, 64, 8, 2),   # 124-175 regs, <= 49 KiB
    ("dkdv", "16-bit", 96): Tile(64, 64, 8, 2),   # 194-212 regs, 61-74 KiB
    ("dkdv", "16-bit", 128): Tile(64, 64, 8, 2),  # 223-227 regs, 97 KiB
    ("dkdv", "16-bit", 256): Tile(16, 64, 8, 2),  # 16-query steps; not hot: spills up to 208 B
    ("dkdv", "fp32", 64): Tile(32, 32, 8, 1),     # 54-94 regs
    ("dkdv", "fp32", 96): Tile(16, 32, 8, 1),     # 32-query steps spilled 8-60 B on Triton 3.6 (D = 80)
    ("dkdv", "fp32", 128): Tile(32, 32, 8, 1),    # 96-108 regs, 72 KiB
    ("dkdv", "fp32", 256): Tile(16, 16, 8, 1),    # not hot: spills up to 40 B
}

# With dropout the Philox rounds of _keep_tile need registers of their own. Where the tiles above
# spilled on sm_90 with them, 16-bit inputs take these (kernel, head-dim class) instead; the rest
# keep their tile.
_DROPOUT_TILES = {
    ("fwd", 64): Tile(128, 64, 8, 3),    # 4 warps spilled 200-224 B with the Philox rounds
    ("dkdv", 128): Tile(32, 64, 8, 2),   # 64-query steps spilled 64 B with the Philox rounds
}


def _config(kind, D, dtype, dropout=False) -> Tile:
    """The Tile of kernel `kind` ("fwd", "dq", "dkdv") at head dim D for inputs of `dtype`."""
    if backends.interpreter_enabled():
        return INTERPRETER_TILE
    width = sum(_head_split(D))
    cls = next(c for c in HEAD_CLASSES if width <= c)
    if dropout and dtype != torch.float32 and (kind, cls) in _DROPOUT_TILES:
        return _DROPOUT_TILES[(kind, cls)]
    return _TILES[(kind, "fp32" if dtype == torch.float32 else "16-bit", cls)]


def _strides(q, k, v):
    """The (batch, head, token) strides of q, k and v, in the kernels' argument order."""
    return (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
    )


def _mask_args(kv_index, kv_count, q):
    if kv_index is None:
        dummy = torch.empty(1, dtype=torch.int32, device=q.device)
        return dummy, dummy, False
    return kv_index, kv_count, True


def _dropout_args(rng, q):
    """(RNG pointer, DROPOUT) for the kernels."""
    if rng is None:
        return torch.empty(2, dtype=torch.int64, device=q.device), False
    return rng, True


def attention_fwd(q, k, v, o, lse, kv_index, kv_count, scale, rng=None, threshold=0, keep_scale=1.0,
                  keep_out=None):
    """Fill o [B,H,Nq,D] (contiguous) and lse [B,H,Nq] (float32). Validation is the caller's.
    Dropout (rng not None): rng = djepa.ops.attention.philox_state(...), threshold = its
    dropout_threshold(p), keep_scale = 1 / (1 - p); keep_out (debug, uint8 [B,H,Nq,Nk]
    contiguous) receives the keep bits over compacted key positions."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    bd, bd2 = _head_split(D)
    idx, cnt, has_mask = _mask_args(kv_index, kv_count, q)
    rng, dropout = _dropout_args(rng, q)
    tile = _config("fwd", D, q.dtype, dropout)
    write_keep = dropout and keep_out is not None
    grid = (triton.cdiv(Nq, tile.block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, idx, cnt, rng, keep_out if write_keep else rng, *_strides(q, k, v),
        H, Nq, Nk, D, float(scale) * LOG2E.value, threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=q.dtype == torch.float32, DROPOUT=dropout, WRITE_KEEP=write_keep,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=tile.warps, num_stages=tile.stages,
    )


def attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale, rng=None, threshold=0,
                  keep_scale=1.0):
    """Fill dq, dk, dv (contiguous, input dtype) and the float32 workspace delta [B,H,Nq]; with
    dropout, from the forward's rng, threshold and keep_scale (the keep bits are regenerated)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    idx, cnt, has_mask = _mask_args(kv_index, kv_count, q)
    strides = _strides(q, k, v)
    ieee = q.dtype == torch.float32
    bd, bd2 = _head_split(D)
    rng, dropout = _dropout_args(rng, q)
    tile = _config("dq", D, q.dtype, dropout)
    _bwd_dq_kernel[(triton.cdiv(Nq, tile.block_m), B * H)](
        q, k, v, o, do, lse, delta, dq, idx, cnt, rng, *strides,
        H, Nq, Nk, D, float(scale) * LOG2E.value, float(scale), threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=ieee, DROPOUT=dropout,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=tile.warps, num_stages=tile.stages,
    )
    tile = _config("dkdv", D, q.dtype, dropout)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, tile.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, idx, cnt, rng, *strides,
        H, Nq, Nk, D, float(scale) * LOG2E.value, float(scale), threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=ieee, DROPOUT=dropout,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=tile.warps, num_stages=tile.stages,
    )
