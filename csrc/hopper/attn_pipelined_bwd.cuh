// The pipelined sm_90a masked-attention backward: dK / dV and dQ as two warp-specialised,
// persistent, deterministic kernels (every gradient element written once, no atomics), after the
// baseline's delta kernel (attn_bwd_kernel.cuh: delta = rowsum(dO * O)). Declared to the cost model
// as attn_dkdv_pipelined / attn_dq_pipelined (tools/perf_designs.py).
//
// Both keep two 128-row tiles per work item (dK/dV: K and V of 128 compacted keys; dQ: Q and dO of
// 128 queries), double buffered across items, and stream 64-row tiles through a 2-4 stage ring. The
// baseline streamed 32-row tiles at D >= 96, which makes every S / dP wgmma an m64n32k16 bound by
// its shared-memory operand reads, and waited for each of its three wgmma groups in turn.
//
// dK / dV, one consumer warpgroup's 64 keys, per 64-query stream tile (Q, dO, and the tile's
// statistics -lse log2(e) and delta, staged in shared memory by the producer):
//   S^T = K Q^T, dP^T = V dO^T             issued together (two groups)
//   wait<1>: P^T = 2^(S^T scale log2(e) - lse log2(e))  (fp32, in S^T's registers) -> 16-bit A
//   dV += P^T dO                           issued; runs under the next line
//   wait<1>: dS^T = P^T (dP^T - delta)     from fp32 P^T (FlashAttention's rounding; the baseline
//                                          rounded P^T to 16 bits first) -> 16-bit A
//   dK += dS^T Q; wait<0>; release the stage.
// Registers at D = 128: dK + dV 128, S^T / P^T 32, dP^T 32 and the two 16-bit fragments 16 + 16:
// consumers take 232 (DkdvSplit). Rows of keys past the visible count are computed (their K and V rows are
// zero, so their values stay finite) and stored as zeros; a warpgroup whose 64 keys are all past
// it only keeps the ring's pace (waits, releases). Queries past Nq have zero Q / dO rows and
// statistics 0, so they add nothing.
//
// dQ, one consumer warpgroup's 64 queries (lse log2(e) and delta of its two rows per thread in
// registers), per 64-key stream tile (K, V):
//   S = Q K^T, dP = dO V^T                 issued together
//   wait<1>: P = 2^(S scale log2(e) - lse log2(e)) (columns past the visible keys are 0, on the last
//            tile: a zero K row would give P = 2^-lse, which can overflow)
//   wait<0>: dS = P (dP - delta) -> 16-bit A; dQ += dS K; wait<0>; release the stage.
// dK and dQ are multiplied by `scale` once, at the end.
#pragma once

#include "hopper/attn_bwd_kernel.cuh"
#include "hopper/attn_pipelined_fwd.cuh"

namespace djepa {
namespace hopper {
namespace attn {
namespace pipe {

// Register splits (pipe::Split): dK/dV's consumers hold dK + dV (64 + 64 at D = 128), S^T / P^T,
// dP^T and two fragments: ~226 at D = 128, so 40 / 232 (its producer: one gather of the fixed tiles
// per item, the streams, a statistic per thread; 24 spills). dQ's consumers need ~152; its producer
// gathers every stream tile and takes the forward's 56.
using DkdvSplit = Split<40, 232>;
using DqSplit = Split<56, 224>;

// One pointer and constant offsets: [2 buffers][2 fixed tiles], [kStages][2 stream tiles], the
// barriers, [kStages] statistics (-lse log2(e) and delta of 64 queries; dK/dV only).
template <int D>
struct BwdSmem {
  using P = BwdPlan<D>;
  static constexpr int kStream = 2 * P::kFixedBytes;
  static constexpr int kBars = kStream + P::kStages * P::kStageBytes;
  static constexpr int kStats = kBars + P::kBarrierBytes;
  unsigned char* base;
  __device__ BwdSmem() {
    unsigned char* raw = dynamic_smem();
    base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  }
  __device__ __forceinline__ unsigned char* fixed(int slot, int which) const {
    return base + slot * P::kFixedBytes + which * P::kFixedTile;
  }
  __device__ __forceinline__ unsigned char* stream(int s, int which) const {
    return base + kStream + s * P::kStageBytes + which * P::kStreamTile;
  }
  __device__ __forceinline__ float* stats(int s) const {
    return reinterpret_cast<float*>(base + kStats + s * P::kStatBytes);
  }
  __device__ __forceinline__ uint64_t* bar(int i) const { return reinterpret_cast<uint64_t*>(base + kBars) + i; }
  __device__ __forceinline__ uint64_t* f_full(int slot, int which) const { return bar(2 * slot + which); }
  __device__ __forceinline__ uint64_t* f_empty(int slot) const { return bar(4 + slot); }
  __device__ __forceinline__ uint64_t* s_full(int s, int which) const { return bar(6 + 2 * s + which); }
  __device__ __forceinline__ uint64_t* s_empty(int s) const { return bar(6 + 2 * P::kStages + s); }
  __device__ __forceinline__ uint64_t* stat_full(int s) const { return bar(6 + 3 * P::kStages + s); }
  __device__ void init(int fixed_path0, int fixed_path1, int stream_path0, int stream_path1, bool stats) const {
    for (int b = 0; b < 2; ++b) {
      mbar_init(f_full(b, 0), full_count(fixed_path0));
      mbar_init(f_full(b, 1), full_count(fixed_path1));
      mbar_init(f_empty(b), 2 * 4);
    }
    for (int s = 0; s < P::kStages; ++s) {
      mbar_init(s_full(s, 0), full_count(stream_path0));
      mbar_init(s_full(s, 1), full_count(stream_path1));
      mbar_init(s_empty(s), 2 * 4);
      if (stats) mbar_init(stat_full(s), kWarpGroup);
    }
    mbar_init_fence();
  }
};
static_assert(6 + 4 * kMaxStages <= BwdPlan<64>::kBarrierBytes / 8, "barriers");

// s (64 x 64) = A rows row0 .. row0 + 63 of a tile laid out for `rows` rows x B^T (a 64-row stream
// tile): D / 16 wgmma.m64n64k16, both K-major.
template <typename T, int D>
__device__ __forceinline__ void issue_scores(float (&s)[kRows / 2], uint32_t a_tile, int rows, int row0,
                                             uint32_t b_tile) {
  uint64_t ad[2], bd[2];
#pragma unroll
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) {
    ad[ch] = kmajor<D>(a_tile, rows, ch, row0);
    bd[ch] = kmajor<D>(b_tile, kRows, ch, 0);
  }
  issue_qk<T, D, kRows>(s, ad, bd);
}

// acc += A (64 x 64, four 16-bit fragments) x a 64-row stream tile (N-major).
template <typename T, int D>
__device__ __forceinline__ void issue_stream_rows(OAcc<D>& acc, const uint32_t (&a)[kRows / 16][4], uint32_t tile) {
  uint64_t bd[2];
#pragma unroll
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) bd[ch] = nmajor<D>(tile, kRows, ch);
  issue_rows<T, D, kRows>(acc, a, bd);
}

// ---------------------------------------------------------------------------- dK / dV
template <typename T, int D, int Q_PATH, int DO_PATH, int KV_PATH>
__device__ __forceinline__ void dkdv_producer(const Params& p, const Maps& maps, const BwdSmem<D> sm, int ptid) {
  using P = BwdPlan<D>;
  Pos<P::kStages> pos;
  int n_f = 0;
  for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
    const Item it = item_of(p, i);  // it.m0: the item's first compacted key
    const int count = visible_count(p, it.b);
    if (it.m0 >= count) continue;
    const int slot = n_f & 1;
    if (fills(KV_PATH, ptid)) mbar_wait(sm.f_empty(slot), ((n_f >> 1) & 1) ^ 1);
    ++n_f;
    fill_kv<T, D, kFixedRows>(KV_PATH, sm.fixed(slot, 0), sm.fixed(slot, 1), maps,
                              static_cast<const T*>(p.k) + it.b * p.ks[0] + it.h * p.ks[1], p.ks[2],
                              static_cast<const T*>(p.v) + it.b * p.vs[0] + it.h * p.vs[1], p.vs[2],
                              p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr, it.m0,
                              kFixedRows, count, it.h, it.b, sm.f_full(slot, 0), sm.f_full(slot, 1), ptid);
    const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
    for (int m0 = 0; m0 < p.Nq; m0 += kRows) {
      // Every producer thread stages one statistic per stream tile, so every one waits.
      const int q = m0 + (ptid & (kRows - 1));
      const float stat = q >= p.Nq ? 0.f : ptid < kRows ? -p.lse[row_base + q] * kLog2e : p.delta[row_base + q];
      mbar_wait(sm.s_empty(pos.stage), pos.phase ^ 1);
      fill_tile<T, D, kRows>(Q_PATH, sm.stream(pos.stage, 0), maps.q,
                             static_cast<const T*>(p.q) + it.b * p.qs[0] + it.h * p.qs[1], p.qs[2], nullptr, m0, kRows,
                             p.Nq, it.h, it.b, sm.s_full(pos.stage, 0), ptid);
      fill_tile<T, D, kRows>(DO_PATH, sm.stream(pos.stage, 1), maps.dout, static_cast<const T*>(p.dout) + row_base * D,
                             D, nullptr, m0, kRows, p.Nq, it.h, it.b, sm.s_full(pos.stage, 1), ptid);
      sm.stats(pos.stage)[ptid] = stat;
      mbar_arrive(sm.stat_full(pos.stage));
      pos.next();
    }
  }
}

template <typename T, int D>
struct DkdvConsumer {
  using P = BwdPlan<D>;
  const Params& p;
  const BwdSmem<D> sm;
  const int cw, warp, lane, c;
  Pos<P::kStages> pos;
  int n_f = 0;
  bool first = true;
  OAcc<D> dk, dv;

  __device__ DkdvConsumer(const Params& p_, const BwdSmem<D> sm_, int cw_)
      : p(p_), sm(sm_), cw(cw_), warp((threadIdx.x / 32) % 4), lane(threadIdx.x % 32), c(lane & 3) {}

  // One stream tile: kt / vt the item's K and V (128 rows), this warpgroup's rows 64 cw.
  __device__ __forceinline__ void tile(uint32_t kt, uint32_t vt, bool plant_skip) {
    const uint32_t qt = smem_u32(sm.stream(pos.stage, 0)), dot = smem_u32(sm.stream(pos.stage, 1));
    float st[kRows / 2], dpt[kRows / 2];
    DJEPA_FAULT_SKIP(kPlantWait, plant_skip) mbar_wait(sm.s_full(pos.stage, 0), pos.phase);
    if (p.q_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    wgmma_fence();
    issue_scores<T, D>(st, kt, kFixedRows, kRows * cw, qt);
    wgmma_commit();
    mbar_wait(sm.s_full(pos.stage, 1), pos.phase);
    if (p.do_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    wgmma_fence();
    issue_scores<T, D>(dpt, vt, kFixedRows, kRows * cw, dot);
    wgmma_commit();
    mbar_wait(sm.stat_full(pos.stage), pos.phase);
    const float* nlse = sm.stats(pos.stage);
    const float* delta = nlse + kRows;
    wgmma_wait<1>();
    fence_regs(st);
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
      const float2 ls = *reinterpret_cast<const float2*>(nlse + 8 * j + 2 * c);
      st[4 * j + 0] = ex2(fmaf(st[4 * j + 0], p.scale_log2, ls.x));
      st[4 * j + 1] = ex2(fmaf(st[4 * j + 1], p.scale_log2, ls.y));
      st[4 * j + 2] = ex2(fmaf(st[4 * j + 2], p.scale_log2, ls.x));
      st[4 * j + 3] = ex2(fmaf(st[4 * j + 3], p.scale_log2, ls.y));
    }
    uint32_t pa[kRows / 16][4];
    to_frags<T, kRows>(pa, st);
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
    issue_stream_rows<T, D>(dv, pa, dot);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(dpt);
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
      const float2 dl = *reinterpret_cast<const float2*>(delta + 8 * j + 2 * c);
      dpt[4 * j + 0] = st[4 * j + 0] * (dpt[4 * j + 0] - dl.x);
      dpt[4 * j + 1] = st[4 * j + 1] * (dpt[4 * j + 1] - dl.y);
      dpt[4 * j + 2] = st[4 * j + 2] * (dpt[4 * j + 2] - dl.x);
      dpt[4 * j + 3] = st[4 * j + 3] * (dpt[4 * j + 3] - dl.y);
    }
    uint32_t dsa[kRows / 16][4];
    to_frags<T, kRows>(dsa, dpt);
    wgmma_fence();
    issue_stream_rows<T, D>(dk, dsa, qt);
    wgmma_commit();
    const bool early = DJEPA_FAULT_VALUE(kPlantEarlyRelease, false, true);
    if (early && lane == 0) mbar_arrive(sm.s_empty(pos.stage));
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_rows(dk);
    fence_rows(dv);
    if (!early && lane == 0) mbar_arrive(sm.s_empty(pos.stage));
    pos.next();
  }

  // A stream tile this warpgroup has no visible key for: keep the ring's pace.
  __device__ __forceinline__ void skip_tile() {
    mbar_wait(sm.s_full(pos.stage, 0), pos.phase);
    mbar_wait(sm.s_full(pos.stage, 1), pos.phase);
    if (lane == 0) mbar_arrive(sm.s_empty(pos.stage));
    pos.next();
  }

  __device__ __forceinline__ void store(const Item& it, int count) {
    const int g = lane >> 2;
    const long long kv_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nk;
    const int* index = p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr;
    T* dkr[2];
    T* dvr[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = it.m0 + kRows * cw + 16 * warp + g + 8 * h;
      const long long n = j < p.Nk ? (index ? index[j] : j) : -1;
      dkr[h] = n >= 0 ? static_cast<T*>(p.dk) + (kv_base + n) * D : nullptr;
      dvr[h] = n >= 0 ? static_cast<T*>(p.dv) + (kv_base + n) * D : nullptr;
    }
    // Rows of invisible keys hold finite values that are no gradients: they store zeros.
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const bool ok = it.m0 + kRows * cw + 16 * warp + g + 8 * ((i >> 1) & 1) < count;
      dk.o0[i] = ok ? dk.o0[i] : 0.f;
      dv.o0[i] = ok ? dv.o0[i] : 0.f;
    }
    if constexpr (Chunks<D>::kW1 > 0) {
#pragma unroll
      for (int i = 0; i < Chunks<D>::kW1 / 2; ++i) {
        const bool ok = it.m0 + kRows * cw + 16 * warp + g + 8 * ((i >> 1) & 1) < count;
        dk.o1[i] = ok ? dk.o1[i] : 0.f;
        dv.o1[i] = ok ? dv.o1[i] : 0.f;
      }
    }
    store_rows<T, D>(dk, dkr, p.scale, lane);
    store_rows<T, D>(dv, dvr, 1.f, lane);
  }

  __device__ __forceinline__ void run() {
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      zero<D>(dk);
      zero<D>(dv);
      if (it.m0 < count) {
        const int slot = n_f & 1;
        const uint32_t fp = (n_f >> 1) & 1;
        const int m_tiles = (p.Nq + kRows - 1) / kRows;
        if (it.m0 + kRows * cw < count) {
          DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(sm.f_full(slot, 0), fp);
          mbar_wait(sm.f_full(slot, 1), fp);
          if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
          const uint32_t kt = smem_u32(sm.fixed(slot, 0)), vt = smem_u32(sm.fixed(slot, 1));
          for (int mt = 0; mt < m_tiles; ++mt) tile(kt, vt, first && mt == 0);
        } else {
          for (int mt = 0; mt < m_tiles; ++mt) skip_tile();
        }
        if (lane == 0) mbar_arrive(sm.f_empty(slot));
        ++n_f;
        first = false;
      }
      store(it, count);
    }
  }
};

// ---------------------------------------------------------------------------- dQ
template <typename T, int D, int Q_PATH, int DO_PATH, int KV_PATH>
__device__ __forceinline__ void dq_producer(const Params& p, const Maps& maps, const BwdSmem<D> sm, int ptid) {
  using P = BwdPlan<D>;
  Pos<P::kStages> pos;
  int n_f = 0;
  for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
    const Item it = item_of(p, i);
    const int count = visible_count(p, it.b);
    if (count == 0) continue;
    const int slot = n_f & 1;
    if (fills(Q_PATH, ptid) || fills(DO_PATH, ptid)) mbar_wait(sm.f_empty(slot), ((n_f >> 1) & 1) ^ 1);
    ++n_f;
    const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
    fill_tile<T, D, kFixedRows>(Q_PATH, sm.fixed(slot, 0), maps.q,
                                static_cast<const T*>(p.q) + it.b * p.qs[0] + it.h * p.qs[1], p.qs[2], nullptr, it.m0,
                                kFixedRows, p.Nq, it.h, it.b, sm.f_full(slot, 0), ptid);
    fill_tile<T, D, kFixedRows>(DO_PATH, sm.fixed(slot, 1), maps.dout, static_cast<const T*>(p.dout) + row_base * D,
                                D, nullptr, it.m0, kFixedRows, p.Nq, it.h, it.b, sm.f_full(slot, 1), ptid);
    for (int j0 = 0; j0 < count; j0 += kRows) {
      if (fills(KV_PATH, ptid)) mbar_wait(sm.s_empty(pos.stage), pos.phase ^ 1);
      fill_kv<T, D, kRows>(KV_PATH, sm.stream(pos.stage, 0), sm.stream(pos.stage, 1), maps,
                           static_cast<const T*>(p.k) + it.b * p.ks[0] + it.h * p.ks[1], p.ks[2],
                           static_cast<const T*>(p.v) + it.b * p.vs[0] + it.h * p.vs[1], p.vs[2],
                           p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr, j0, kRows, count,
                           it.h, it.b, sm.s_full(pos.stage, 0), sm.s_full(pos.stage, 1), ptid);
      pos.next();
    }
  }
}

template <typename T, int D>
struct DqConsumer {
  using P = BwdPlan<D>;
  const Params& p;
  const BwdSmem<D> sm;
  const int cw, warp, lane, c;
  Pos<P::kStages> pos;
  int n_f = 0;
  bool first = true;
  OAcc<D> dq;
  float lse2[2], dl[2];

  __device__ DqConsumer(const Params& p_, const BwdSmem<D> sm_, int cw_)
      : p(p_), sm(sm_), cw(cw_), warp((threadIdx.x / 32) % 4), lane(threadIdx.x % 32), c(lane & 3) {}

  // One 64-key stream tile; `valid` keys of it are visible (64 but on the last tile).
  template <bool MASK>
  __device__ __forceinline__ void tile(uint32_t qt, uint32_t dot, int valid, bool plant_skip) {
    const uint32_t ks = smem_u32(sm.stream(pos.stage, 0)), vs = smem_u32(sm.stream(pos.stage, 1));
    float s[kRows / 2], dp[kRows / 2];
    DJEPA_FAULT_SKIP(kPlantWait, plant_skip) mbar_wait(sm.s_full(pos.stage, 0), pos.phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    wgmma_fence();
    issue_scores<T, D>(s, qt, kFixedRows, kRows * cw, ks);
    wgmma_commit();
    mbar_wait(sm.s_full(pos.stage, 1), pos.phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    wgmma_fence();
    issue_scores<T, D>(dp, dot, kFixedRows, kRows * cw, vs);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(s);
#pragma unroll
    for (int i = 0; i < kRows / 2; ++i) {
      if (MASK && 8 * (i >> 2) + 2 * c + (i & 1) >= valid) s[i] = -INFINITY;
      s[i] = ex2(fmaf(s[i], p.scale_log2, -lse2[(i >> 1) & 1]));
    }
    fence_regs(s);  // P under the dP wgmma, not sunk below the wait by the compiler
    wgmma_wait<0>();
    fence_regs(dp);
#pragma unroll
    for (int i = 0; i < kRows / 2; ++i) dp[i] = s[i] * (dp[i] - dl[(i >> 1) & 1]);
    uint32_t dsa[kRows / 16][4];
    to_frags<T, kRows>(dsa, dp);
    wgmma_fence();
    issue_stream_rows<T, D>(dq, dsa, ks);
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_rows(dq);
    if (lane == 0) mbar_arrive(sm.s_empty(pos.stage));
    pos.next();
  }

  __device__ __forceinline__ void run() {
    const int g = lane >> 2;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
      zero<D>(dq);
      if (count > 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = it.m0 + kRows * cw + 16 * warp + g + 8 * h;
          lse2[h] = row < p.Nq ? p.lse[row_base + row] * kLog2e : 0.f;
          dl[h] = row < p.Nq ? p.delta[row_base + row] : 0.f;
        }
        const int slot = n_f & 1;
        const uint32_t fp = (n_f >> 1) & 1;
        DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(sm.f_full(slot, 0), fp);
        mbar_wait(sm.f_full(slot, 1), fp);
        if (p.q_path != kPathTma || p.do_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
        const uint32_t qt = smem_u32(sm.fixed(slot, 0)), dot = smem_u32(sm.fixed(slot, 1));
        const int n = (count + kRows - 1) / kRows;
        for (int t = 0; t < n - 1; ++t) tile<false>(qt, dot, kRows, first && t == 0);
        tile<true>(qt, dot, count - (n - 1) * kRows, first && n == 1);
        if (lane == 0) mbar_arrive(sm.f_empty(slot));
        ++n_f;
        first = false;
      }
      T* rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = it.m0 + kRows * cw + 16 * warp + g + 8 * h;
        rows[h] = row < p.Nq ? static_cast<T*>(p.dq) + (row_base + row) * D : nullptr;
      }
      store_rows<T, D>(dq, rows, p.scale, lane);
    }
  }
};

// Calls f with the (q, dout, k / v) paths as compile-time constants: the combinations plan_bwd
// makes (it sends any other to the manual path for all three).
template <typename F>
__device__ __forceinline__ void with_bwd_paths(int q, int d, int kv, F&& f) {
  using Tma = std::integral_constant<int, kPathTma>;
  using Gather = std::integral_constant<int, kPathGather>;
  using Manual = std::integral_constant<int, kPathManual>;
  (void)d;
  if (q == kPathTma && kv == kPathTma) f(Tma{}, Tma{}, Tma{});
  else if (q == kPathTma && kv == kPathGather) f(Tma{}, Tma{}, Gather{});
  else if (q == kPathGather) f(Gather{}, Tma{}, Gather{});
  else f(Manual{}, Manual{}, Manual{});
}

}  // namespace pipe

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dkdv_pipelined_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ pipe::Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  pipe::BwdSmem<D> sm;
  const int tid = threadIdx.x, wg = pipe::uniform_warpgroup();
  if (tid == 0) sm.init(p.kv_path, p.kv_path, p.q_path, p.do_path, true);
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<pipe::DkdvSplit::kProducer>();
    pipe::with_bwd_paths(p.q_path, p.do_path, p.kv_path, [&](auto qp, auto dp, auto kvp) {
      pipe::dkdv_producer<T, D, decltype(qp)::value, decltype(dp)::value, decltype(kvp)::value>(p, maps, sm, tid);
    });
  } else {
    setmaxnreg_inc<pipe::DkdvSplit::kConsumer>();
    pipe::DkdvConsumer<T, D> consumer(p, sm, wg - 1);
    consumer.run();
  }
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dq_pipelined_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ pipe::Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  pipe::BwdSmem<D> sm;
  const int tid = threadIdx.x, wg = pipe::uniform_warpgroup();
  if (tid == 0) sm.init(p.q_path, p.do_path, p.kv_path, p.kv_path, false);
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<pipe::DqSplit::kProducer>();
    if (p.q_path == kPathTma && p.do_path == kPathTma && p.kv_path == kPathTma && tid != 0) return;
    pipe::with_bwd_paths(p.q_path, p.do_path, p.kv_path, [&](auto qp, auto dp, auto kvp) {
      pipe::dq_producer<T, D, decltype(qp)::value, decltype(dp)::value, decltype(kvp)::value>(p, maps, sm, tid);
    });
  } else {
    setmaxnreg_inc<pipe::DqSplit::kConsumer>();
    pipe::DqConsumer<T, D> consumer(p, sm, wg - 1);
    consumer.run();
  }
#endif
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
