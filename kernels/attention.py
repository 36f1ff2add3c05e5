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
"""
import torch
import triton
import triton.language as tl

from djepa import backends

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, fp32 accumulation (IEEE fp32 products for fp32 inputs)."""
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
    the columns: Philox-4x32-10 keyed by RNG[0], counter (i & ~8, j & ~9, bh, RNG[1]); of word
    ((i >> 3) & 1) + 2 (j & 1), half (j >> 3) & 1, compared with the 16-bit threshold. Each
    row computes the calls of its own (query, 4-key) groups (rows i and i + 8 share them)."""
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
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr, WRITE_KEEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """O = softmax(scale * Q K^T) V over the visible keys: online softmax in base 2 (qk_scale =
    scale * log2 e; s scaled, m its running max), p = exp2(s - m), l = sum p,
    O = (sum (p * Z) V) / l (Z = 1 without dropout), LSE = (m + log2 l) * ln 2 (0 for a row
    without a visible key)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_rows = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn
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
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = _key_positions(start, BLOCK_N, DROPOUT)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        k_rows = k_base + idx[:, None] * skn
        v_rows = v_base + idx[:, None] * svn
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
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, 0.0)
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
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale, scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """delta = rowsum(dO * O) (stored), then dQ = scale * sum_j dS K over the visible keys with
    P = exp2(qk_scale * s - LSE log2 e), dP = dO V^T, dS = P * (Z * dP - delta)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    row = bh.to(tl.int64) * Nq + offs_m
    q_rows = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn
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
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * 1.4426950408889634

    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
    else:
        count = Nk
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for start in range(0, count, BLOCK_N):
        offs_n = _key_positions(start, BLOCK_N, DROPOUT)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        k_rows = k_base + idx[:, None] * skn
        v_rows = v_base + idx[:, None] * svn
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
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale, scale, threshold, keep_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):
    """dV = sum_i (P * Z)^T dO and dK = scale * sum_i dS^T Q over all queries, for one block of
    compacted keys, in the transposed orientation (P^T = exp2(qk_scale * K Q^T - LSE log2 e));
    zeros for the invisible keys."""
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
    k_rows = K + b * skb + h * skh + idx[:, None] * skn
    v_rows = V + b * svb + h * svh + idx[:, None] * svn
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
    q_end = tl.where(pid_n * BLOCK_N < count, Nq, 0)
    q_base = Q + b * sqb + h * sqh
    row0 = bh.to(tl.int64) * Nq
    for start in range(0, q_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        row = row0 + offs_m
        q_rows = q_base + offs_m.to(tl.int64)[:, None] * sqn
        do_rows = DO + row[:, None] * D
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_rows + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_rows + offs_d[None, :], mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * 1.4426950408889634
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, input width and padded head dim
# (BLOCK_D + BLOCK_D2, classes <= 64, 96, 128, 256), checked by tools/static_check.py for sm_90:
# no spills, shared memory within 227 KiB. fp32 runs IEEE products on the FMA units, whose dot
# operands live in registers: its tiles are small and its warps many.
_CONFIGS = {
    # kind: {16-bit: per class}, {fp32: per class}
    "fwd": ({64: (128, 64, 4, 3), 96: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (128, 32, 8, 2)},
            {64: (32, 32, 8, 2), 96: (64, 32, 8, 2), 128: (32, 32, 8, 2), 256: (16, 16, 8, 1)}),
    "dq": ({64: (128, 64, 8, 2), 96: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (64, 32, 4, 2)},
           {64: (32, 32, 8, 1), 96: (32, 32, 8, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)}),
    # dkdv: (BLOCK_N keys per program, BLOCK_M queries per step, warps, stages)
    "dkdv": ({64: (64, 64, 8, 2), 96: (64, 64, 8, 2), 128: (64, 64, 8, 2), 256: (64, 16, 8, 2)},
             {64: (32, 32, 8, 1), 96: (32, 32, 8, 1), 128: (32, 32, 8, 1), 256: (16, 16, 8, 1)}),
}


# With dropout the Philox rounds of _keep_tile need registers of their own; where the tiles above
# spilled on sm_90 (tools/static_check.py), 16-bit inputs use these instead (a class not listed
# keeps its tile): forward D <= 64 with 4 warps spilled 200-224 B/thread, dk/dv at D = 128 64 B.
_DROPOUT_CONFIGS = {"fwd": {64: (128, 64, 8, 3)}, "dq": {}, "dkdv": {128: (64, 32, 8, 2)}}


def _config(kind, D, dtype, dropout=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel."""
    if backends.interpreter_enabled():
        # The interpreter runs one program at a time: small blocks still exercise tails.
        return 16, 16, 1, 1
    width = sum(_head_split(D))
    cls = next(c for c in (64, 96, 128, 256) if width <= c)
    if dropout and dtype != torch.float32 and cls in _DROPOUT_CONFIGS[kind]:
        return _DROPOUT_CONFIGS[kind][cls]
    return _CONFIGS[kind][dtype == torch.float32][cls]


def _common_args(q, k, v):
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
    block_m, block_n, warps, stages = _config("fwd", D, q.dtype, dropout)
    write_keep = dropout and keep_out is not None
    grid = (triton.cdiv(Nq, block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, idx, cnt, rng, keep_out if write_keep else rng, *_common_args(q, k, v),
        H, Nq, Nk, D, float(scale) * LOG2E, threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=q.dtype == torch.float32, DROPOUT=dropout, WRITE_KEEP=write_keep,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=warps, num_stages=stages,
    )


def attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale, rng=None, threshold=0,
                  keep_scale=1.0):
    """Fill dq, dk, dv (contiguous, input dtype) and the float32 workspace delta [B,H,Nq]; with
    dropout, from the forward's rng, threshold and keep_scale (the keep bits are regenerated)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    idx, cnt, has_mask = _mask_args(kv_index, kv_count, q)
    common = _common_args(q, k, v)
    ieee = q.dtype == torch.float32
    bd, bd2 = _head_split(D)
    rng, dropout = _dropout_args(rng, q)
    block_m, block_n, warps, stages = _config("dq", D, q.dtype, dropout)
    _bwd_dq_kernel[(triton.cdiv(Nq, block_m), B * H)](
        q, k, v, o, do, lse, delta, dq, idx, cnt, rng, *common,
        H, Nq, Nk, D, float(scale) * LOG2E, float(scale), threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=ieee, DROPOUT=dropout,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=warps, num_stages=stages,
    )
    block_n, block_m, warps, stages = _config("dkdv", D, q.dtype, dropout)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, idx, cnt, rng, *common,
        H, Nq, Nk, D, float(scale) * LOG2E, float(scale), threshold, keep_scale,
        HAS_MASK=has_mask, IEEE=ieee, DROPOUT=dropout,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_D2=bd2,
        num_warps=warps, num_stages=stages,
    )
