// Consumer stages of the sm_90a attention backward (deterministic: every gradient element is
// written once, by one thread, with no atomics).
//
// dK / dV, one warpgroup's 64 compacted keys of a 128-key work item, per R-query tile (R =
// stream_rows<D>(): 64, 32 at D >= 96):
//   S^T = K Q^T and dP^T = V dO^T  (wgmma.m64nRk16, K and V from the item's fixed tiles as A,
//                                   Q and dO from the stage as B, all K-major)
//   P^T = exp(scale s - lse[q]), dS^T = P^T (dP^T - delta[q])   (in registers; rows = keys;
//                                   P^T as its 16-bit A fragments, dS^T formed from them)
//   dV += P^T dO, dK += dS^T Q     (wgmma with A = P^T / dS^T from registers, B = dO / Q of the
//                                   stage, N-major: one n64 (+ n16 / n32 / n64) per 16 queries)
// Register budget at D = 128 (224 per consumer thread): dK + dV 128, S^T 16, dP^T 16, fragments.
// dQ, one warpgroup's 64 queries of a 128-query work item, per R-key tile:
//   S = Q K^T, dP = dO V^T; P = exp(scale s - lse), dS = P (dP - delta); dQ += dS K.
// Scales: dK and dQ are multiplied by `scale` once at the end.
#pragma once

#include "hopper/attn_fwd_mainloop.cuh"

namespace djepa {
namespace hopper {
namespace attn {

// Accumulators of one chunked [64 x D] gradient tile.
template <int D>
using GAcc = OAcc<D>;

template <int D>
__device__ __forceinline__ void zero(GAcc<D>& a) {
#pragma unroll
  for (int e = 0; e < 32; ++e) a.o0[e] = 0.f;
#pragma unroll
  for (int e = 0; e < int(sizeof(a.o1) / sizeof(float)); ++e) a.o1[e] = 0.f;
}

// The register-A fragments of a 64 x 64 accumulator tile (rows x 64 k), 16 k per fragment.
template <typename T, int R>
__device__ __forceinline__ void to_frags(uint32_t (&a)[R / 16][4], const float (&acc)[R / 2]) {
#pragma unroll
  for (int kk = 0; kk < R / 16; ++kk) to_a_frag<T>(a[kk], &acc[8 * kk]);
}

// Element i (accumulator order) of a tile held as register-A fragments.
template <typename T, int R>
__device__ __forceinline__ float frag_value(const uint32_t (&a)[R / 16][4], int i) {
  const uint32_t r = a[i >> 3][(i & 7) >> 1];
  const uint16_t b = uint16_t((i & 1) ? r >> 16 : r & 0xffffu);
  if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(b));
  else return __bfloat162float(__ushort_as_bfloat16(b));
}

// acc += A (register fragments: rows x the R rows of `tile`) * tile (R rows x D, N-major).
template <typename T, int D, int R>
__device__ __forceinline__ void mma_rows(GAcc<D>& acc, const uint32_t (&a)[R / 16][4], uint32_t tile) {
  constexpr int W1 = Chunks<D>::kW1;
#pragma unroll
  for (int kk = 0; kk < R / 16; ++kk) {
    wgmma_rs<T, 64, 1>(acc.o0, a[kk], nmajor_desc<D>(tile, R, 0, 16 * kk), 1);
    if constexpr (W1 > 0) wgmma_rs<T, (W1 > 0 ? W1 : 64), 1>(acc.o1, a[kk], nmajor_desc<D>(tile, R, 1, 16 * kk), 1);
  }
}

// s = A_tile rows [row0, row0 + 64) (rows_a rows in all) x B_tile^T (R rows): K-major both.
template <typename T, int D, int R>
__device__ __forceinline__ void mma_scores(float (&s)[R / 2], uint32_t a_tile, int rows_a, int row0, uint32_t b_tile) {
#pragma unroll
  for (int ch = 0; ch < Chunks<D>::kN; ++ch)
#pragma unroll
    for (int kk = 0; kk < Chunks<D>::width(ch) / 16; ++kk)
      wgmma_ss<T, R, 0, 0>(s, kmajor_desc<D>(a_tile, rows_a, ch, row0, kk), kmajor_desc<D>(b_tile, R, ch, 0, kk),
                           ch > 0 || kk > 0);
}

// Writes rows of a chunked gradient tile: row h of this thread (0, 1) goes to `dst[h]` (or is
// skipped when null), values times `mul`.
template <typename T, int D>
__device__ __forceinline__ void store_rows(const GAcc<D>& acc, T* const (&dst)[2], float mul, int lane) {
  constexpr int W1 = Chunks<D>::kW1;
  const int c = lane & 3;
  const int fx = DJEPA_FAULT_VALUE(kPlantFragment, 0, 1);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!dst[h]) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int i = 4 * j + 2 * h;
      *reinterpret_cast<uint32_t*>(dst[h] + 8 * j + 2 * c) =
          pack2<T>(acc.o0[(i + fx) & 31] * mul, acc.o0[(i + 1 + fx) & 31] * mul);
    }
    if constexpr (W1 > 0) {
#pragma unroll
      for (int j = 0; j < W1 / 8; ++j) {
        const int i = 4 * j + 2 * h;
        *reinterpret_cast<uint32_t*>(dst[h] + 64 + 8 * j + 2 * c) = pack2<T>(acc.o1[i] * mul, acc.o1[i + 1] * mul);
      }
    }
  }
}

// dK / dV over every 64-query tile of the item. kt / vt: the item's K and V (128 rows).
template <typename T, int D>
__device__ __forceinline__ void dkdv_tiles(const Params& p, const Item& it, int j0, int count, uint32_t kt,
                                           uint32_t vt, unsigned char* stages, uint64_t* s_full, uint64_t* s_empty,
                                           int& stage, uint32_t& phase, GAcc<D>& dk, GAcc<D>& dv, int cw, int warp,
                                           int lane, bool first_item) {
  using S = BwdShape<D>;
  constexpr int R = S::kStreamRows;
  const int g = lane >> 2, c = lane & 3;
  const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
  const float* lse = p.lse + row_base;
  const float* delta = p.delta + row_base;
  bool key_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) key_ok[h] = j0 + 64 * cw + 16 * warp + g + 8 * h < count;
  const int m_tiles = (p.Nq + R - 1) / R;
  for (int mt = 0; mt < m_tiles; ++mt) {
    const uint32_t qt = smem_u32(stages + stage * S::kStreamBytes), dot = qt + S::kStreamTile;
    DJEPA_FAULT_SKIP(kPlantWait, first_item && mt == 0) mbar_wait(&s_full[2 * stage], phase);
    if (p.q_path != kPathTma) fence_proxy_async();
    // Register budget (D = 128: dK + dV are 128 fp32 per thread): P^T is kept only as its bf16 /
    // fp16 A fragments, from which dS^T is formed (P^T is rounded for the dK matmul anyway), and
    // dV += P^T dO runs while dP^T = V dO^T is computed.
    float st[R / 2];
    wgmma_fence();
    mma_scores<T, D, R>(st, kt, kFixedRows, 64 * cw, qt);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(st);
    const int m0 = mt * R;
#pragma unroll
    for (int i = 0; i < R / 2; ++i) {
      const int q = m0 + 8 * (i >> 2) + 2 * c + (i & 1);
      const bool ok = key_ok[(i >> 1) & 1] && q < p.Nq;
      st[i] = ok ? ex2(st[i] * p.scale_log2 - __ldg(lse + (ok ? q : 0)) * kLog2e) : 0.f;
    }
    uint32_t pa[R / 16][4];
    to_frags<T, R>(pa, st);
    mbar_wait(&s_full[2 * stage + 1], phase);
    if (p.do_path != kPathTma) fence_proxy_async();
    float dpt[R / 2];
    wgmma_fence();
    mma_rows<T, D, R>(dv, pa, dot);
    mma_scores<T, D, R>(dpt, vt, kFixedRows, 64 * cw, dot);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dpt);
#pragma unroll
    for (int i = 0; i < R / 2; ++i) {
      const int q = m0 + 8 * (i >> 2) + 2 * c + (i & 1);
      const bool ok = key_ok[(i >> 1) & 1] && q < p.Nq;
      dpt[i] = ok ? frag_value<T, R>(pa, i) * (dpt[i] - __ldg(delta + q)) : 0.f;
    }
    uint32_t dsa[R / 16][4];
    to_frags<T, R>(dsa, dpt);
    wgmma_fence();
    mma_rows<T, D, R>(dk, dsa, qt);
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_regs(dk.o0);
    fence_regs(dk.o1);
    fence_regs(dv.o0);
    fence_regs(dv.o1);
    if (lane == 0) mbar_arrive(&s_empty[stage]);
    if (++stage == S::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// dQ over the item's visible 64-key tiles. qt / dot: the item's Q and dO (128 rows).
template <typename T, int D>
__device__ __forceinline__ void dq_tiles(const Params& p, const Item& it, int count, uint32_t qt, uint32_t dot,
                                         unsigned char* stages, uint64_t* s_full, uint64_t* s_empty, int& stage,
                                         uint32_t& phase, GAcc<D>& dq, int cw, int warp, int lane, bool first_item) {
  using S = BwdShape<D>;
  constexpr int R = S::kStreamRows;
  const int g = lane >> 2, c = lane & 3;
  const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
  float lse2[2], dl[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = it.m0 + 64 * cw + 16 * warp + g + 8 * h;
    lse2[h] = row < p.Nq ? p.lse[row_base + row] * kLog2e : 0.f;
    dl[h] = row < p.Nq ? p.delta[row_base + row] : 0.f;
  }
  const int n_tiles = (count + R - 1) / R;
  for (int t = 0; t < n_tiles; ++t) {
    const uint32_t ks = smem_u32(stages + stage * S::kStreamBytes), vs = ks + S::kStreamTile;
    DJEPA_FAULT_SKIP(kPlantWait, first_item && t == 0) mbar_wait(&s_full[2 * stage], phase);
    if (p.kv_path != kPathTma) fence_proxy_async();
    float s[R / 2], dp[R / 2];
    wgmma_fence();
    mma_scores<T, D, R>(s, qt, kFixedRows, 64 * cw, ks);
    wgmma_commit();
    mbar_wait(&s_full[2 * stage + 1], phase);
    if (p.kv_path != kPathTma) fence_proxy_async();
    wgmma_fence();
    mma_scores<T, D, R>(dp, dot, kFixedRows, 64 * cw, vs);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);
    fence_regs(dp);
    const int valid = count - t * R;
#pragma unroll
    for (int i = 0; i < R / 2; ++i) {
      const int col = 8 * (i >> 2) + 2 * c + (i & 1), h = (i >> 1) & 1;
      const float pr = col < valid ? ex2(s[i] * p.scale_log2 - lse2[h]) : 0.f;
      dp[i] = pr * (dp[i] - dl[h]);
    }
    uint32_t dsa[R / 16][4];
    to_frags<T, R>(dsa, dp);
    wgmma_fence();
    mma_rows<T, D, R>(dq, dsa, ks);
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_regs(dq.o0);
    fence_regs(dq.o1);
    if (lane == 0) mbar_arrive(&s_empty[stage]);
    if (++stage == S::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
