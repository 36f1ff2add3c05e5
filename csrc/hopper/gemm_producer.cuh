// Producer stage of the sm_90a GEMM: fills the kStages ring of (A, B) tiles.
//
// Each stage holds A [128 x 64 k] and B [128 x 64 k] in the 128B-swizzled layouts the consumer's
// descriptors describe (gemm_consumer.cuh):
//   K-major operand  : 128 rows of 128 bytes (64 k), 16-byte chunk c of row r at c ^ (r % 8);
//                      one TMA box {64 k, 128 rows}.
//   MN-major operand : two [64 k][64 mn] halves 8 KiB apart (mn 0-63, 64-127), each 64 rows of
//                      128 bytes (64 mn), chunk c of k row r at c ^ (r % 8); TMA boxes {64 mn, 64 k}.
// Synchronisation per stage s: the producer waits empty[s] (the 8 consumer warps released it),
// fills it and completes full[s]; consumers wait full[s]. Phase parities flip each time the
// ring wraps.
//   TMA operands      : one thread arms full[s] with the operands' bytes (arrive.expect_tx) and
//                       issues the boxes; out-of-range rows and k are zero filled by TMA.
//   fallback operands : (unaligned base or row pitch) all 128 producer threads load with ordinary
//                       bounds-checked loads, store 16-byte chunks at the swizzled positions,
//                       fence.proxy.async (the wgmma reads through the async proxy), and arrive:
//                       full[s] then counts 128 arrivals (thread 0 arrives last, with the TMA
//                       bytes if any operand is TMA's).
#pragma once

#include "hopper/gemm_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {

// Loads chunk q (8 elements) of a tile with ordinary loads: K-major source [mn][K], MN-major
// source [K][mn]; elements outside the matrix are zero.
template <typename T, bool KMAJOR>
__device__ __forceinline__ void load_chunk(unsigned char* tile, const T* g, int mn_extent, int K, int mn0, int k0,
                                           int q) {
  uint32_t off;
  int mn, k;
  if constexpr (KMAJOR) {
    const int r = q >> 3, c = q & 7;  // row = mn, chunk = 8 k
    mn = mn0 + r;
    k = k0 + c * 8;
    off = swizzle_offset(kSwizzle128, uint32_t(r * 128 + c * 16));
  } else {
    const int half = q >> 9, r = (q >> 3) & 63, c = q & 7;  // row = k, chunk = 8 mn
    mn = mn0 + half * 64 + c * 8;
    k = k0 + r;
    off = uint32_t(half * (kTileBytes / 2)) + swizzle_offset(kSwizzle128, uint32_t(r * 128 + c * 16));
  }
  alignas(16) T v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int mm = KMAJOR ? mn : mn + e, kk = KMAJOR ? k + e : k;
    v[e] = (mm < mn_extent && kk < K) ? g[KMAJOR ? int64_t(mm) * K + kk : int64_t(kk) * mn_extent + mm]
                                      : T(0.f);
  }
  st_shared16(tile + off, *reinterpret_cast<const uint4*>(v));
}

template <typename T, bool A_K, bool B_K>
__device__ __forceinline__ void produce(const Params& p, const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                        unsigned char* stages, uint64_t* full, uint64_t* empty, int ptid) {
  const bool manual = !p.a_tma || !p.b_tma;
  if (!manual && ptid != 0) return;
  const uint32_t tx = (p.a_tma ? kTileBytes : 0) + (p.b_tma ? kTileBytes : 0);
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  int stage = 0;
  uint32_t phase = 0;
  const int units = units_of(p);
  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const Unit w = unit_of(p, u);
    for (int kt = w.kt0; kt < w.kt1; ++kt) {
      mbar_wait(&empty[stage], phase ^ 1);
      unsigned char* sa = stages + stage * kStageBytes;
      unsigned char* sb = sa + kTileBytes;
      const int k0 = kt * kBK;
      if (manual) {
        for (int q = ptid; q < kTileBytes / 16; q += kWarpGroup) {
          if (!p.a_tma) load_chunk<T, A_K>(sa, A, p.M, p.K, w.m0, k0, q);
          if (!p.b_tma) load_chunk<T, B_K>(sb, B, p.N, p.K, w.n0, k0, q);
        }
        DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
        if (ptid != 0) mbar_arrive(&full[stage]);
      }
      if (ptid == 0) {
        if (tx) {
          mbar_arrive_expect_tx(&full[stage], tx);
        } else {
          mbar_arrive(&full[stage]);
        }
        if (p.a_tma) {
          if constexpr (A_K) {
            tma_load_2d(sa, tma_a, k0, w.m0, &full[stage]);
          } else {
            tma_load_2d(sa, tma_a, w.m0, k0, &full[stage]);
            tma_load_2d(sa + kTileBytes / 2, tma_a, w.m0 + 64, k0, &full[stage]);
          }
        }
        if (p.b_tma) {
          if constexpr (B_K) {
            tma_load_2d(sb, tma_b, k0, w.n0, &full[stage]);
          } else {
            tma_load_2d(sb, tma_b, w.n0, k0, &full[stage]);
            tma_load_2d(sb + kTileBytes / 2, tma_b, w.n0 + 64, k0, &full[stage]);
          }
        }
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
