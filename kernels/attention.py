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
padded to a power of two (at least 16) inside the kernels with masked loads and stores.
"""
import torch
import triton
import triton.language as tl

from djepa import backends

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_INDEX, KV_COUNT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Nq
    d_mask = offs_d < D

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
    else:
        count = Nk
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        # Every block holds at least one visible key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, 0.0)
    row = bh.to(tl.int64) * Nq + offs_m
    tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + row, lse, mask=m_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, KV_INDEX, KV_COUNT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale, scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Nq
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    row = bh.to(tl.int64) * Nq + offs_m

    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    o = tl.load(O + row[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=m_mask)
    lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * 1.4426950408889634

    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
    else:
        count = Nk
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < count
        if HAS_MASK:
            idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=n_mask, other=0).to(tl.int64)
        else:
            idx = offs_n.to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        p = tl.where(n_mask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(DQ + row[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_INDEX, KV_COUNT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, Nq, Nk, D, qk_scale, scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # positions in the compacted key order
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    pos_mask = offs_n < Nk
    if HAS_MASK:
        count = tl.load(KV_COUNT + b)
        idx = tl.load(KV_INDEX + b * Nk + offs_n, mask=pos_mask, other=0).to(tl.int64)
    else:
        count = Nk
        idx = offs_n.to(tl.int64)
    vis = offs_n < count
    kv_mask = vis[:, None] & d_mask[None, :]
    k = tl.load(K + b * skb + h * skh + idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Blocks made only of invisible keys skip the loop and write zeros.
    q_end = tl.where(pid_n * BLOCK_N < count, Nq, 0)
    q_base = Q + b * sqb + h * sqh
    row0 = bh.to(tl.int64) * Nq
    for start in range(0, q_end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        md_mask = m_mask[:, None] & d_mask[None, :]
        row = row0 + offs_m
        q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
        lse2 = tl.load(LSE + row, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
        if IEEE:
            s_t = tl.dot(k, tl.trans(q), input_precision="ieee")
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            s_t = tl.dot(k, tl.trans(q))
            dp_t = tl.dot(v, tl.trans(do))
        p_t = tl.where(vis[:, None] & m_mask[None, :], tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if IEEE:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
        else:
            dv += tl.dot(p_t.to(do.dtype), do)
            dk += tl.dot(ds_t.to(q.dtype), q)
    dk = dk * scale
    out = (bh.to(tl.int64) * Nk + idx)[:, None] * D + offs_d[None, :]
    store_mask = pos_mask[:, None] & d_mask[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _config(kind, D, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel."""
    if backends.interpreter_enabled():
        # The interpreter runs one program at a time: small blocks still exercise tails.
        return 16, 16, 1, 1
    big_d = _block_d(D) > 64
    wide = dtype == torch.float32
    if kind == "fwd":
        if wide:
            return (64, 32, 4, 2) if big_d else (64, 64, 4, 2)
        return (128, 64, 8, 3) if big_d else (128, 64, 4, 3)
    if kind == "dq":
        if wide:
            return 64, 32, 4, 1
        return (64, 64, 4, 2) if big_d else (128, 64, 8, 2)
    # dkdv: BLOCK_N keys per program, BLOCK_M queries per step
    if wide:
        return 32, 64, 4, 1
    return (64, 64, 8, 2) if big_d else (64, 128, 8, 2)


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


def attention_fwd(q, k, v, o, lse, kv_index, kv_count, scale):
    """Fill o [B,H,Nq,D] (contiguous) and lse [B,H,Nq] (float32). Validation is the caller's."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    block_m, block_n, warps, stages = _config("fwd", D, q.dtype)
    idx, cnt, has_mask = _mask_args(kv_index, kv_count, q)
    grid = (triton.cdiv(Nq, block_m), B * H)
    _fwd_kernel[grid](
        q, k, v, o, lse, idx, cnt, *_common_args(q, k, v),
        H, Nq, Nk, D, float(scale) * LOG2E,
        HAS_MASK=has_mask, IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        num_warps=warps, num_stages=stages,
    )


def attention_bwd(q, k, v, o, do, lse, kv_index, kv_count, dq, dk, dv, delta, scale):
    """Fill dq, dk, dv (contiguous, input dtype) and the float32 workspace delta [B,H,Nq]."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    idx, cnt, has_mask = _mask_args(kv_index, kv_count, q)
    common = _common_args(q, k, v)
    ieee = q.dtype == torch.float32
    block_m, block_n, warps, stages = _config("dq", D, q.dtype)
    _bwd_dq_kernel[(triton.cdiv(Nq, block_m), B * H)](
        q, k, v, o, do, lse, delta, dq, idx, cnt, *common,
        H, Nq, Nk, D, float(scale) * LOG2E, float(scale),
        HAS_MASK=has_mask, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        num_warps=warps, num_stages=stages,
    )
    block_n, block_m, warps, stages = _config("dkdv", D, q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, idx, cnt, *common,
        H, Nq, Nk, D, float(scale) * LOG2E, float(scale),
        HAS_MASK=has_mask, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        num_warps=warps, num_stages=stages,
    )
