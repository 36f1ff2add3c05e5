// Producer of the 128x256 sm_90a GEMM: one thread fills the kStages ring of (A, B) tiles by TMA.
//
// Stage layout (1 KiB aligned, 128B swizzle, the layouts of gemm_producer.cuh):
//   A [128 x 64 k] (16 KiB): K-major one box {64 k, 128 rows}; M-major two boxes {64 m, 64 k}.
//   B [256 x 64 k] (32 KiB) in two 128-row halves of 16 KiB: K-major half h = rows n0 + 128 h,
//     one box {64 k, 128 rows} at B + 16 KiB h; N-major quarter q = n0 + 64 q .. + 63 as a
//     [64 k][64 n] box at B + 8 KiB q (the layout of the consumer's LBO = 8 KiB descriptor).
// With a cluster of 2, CTA `rank` loads half `rank` of B and multicasts it to both CTAs; the
// other half arrives from the peer. Each CTA's full[s] expects the whole stage (48 KiB: its A,
// both halves of B) on one arrival; the peer's bytes may land before that arrival (the
// transaction count goes negative until the expect_tx, as the PTX ISA allows). empty[s] counts
// the consumer warps of every CTA of the cluster (each releases the stage in both CTAs), so no
// producer multicasts into a stage a peer still reads.
// The tail: before it exits, the producer waits until every stage has been released once more,
// so no peer arrives on this CTA's barriers after it has exited (CUTLASS's producer tail).
#pragma once

#include "hopper/gemm_wide_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {
namespace wide {

template <bool A_K, bool B_K>
__device__ __forceinline__ void produce(const Params& p, const CUtensorMap* tma_a, const CUtensorMap* tma_b,
                                        unsigned char* stages, uint64_t* full, uint64_t* empty, uint32_t rank,
                                        int cluster_id, int clusters) {
  const uint16_t both = uint16_t((1u << p.cluster) - 1u);
  int stage = 0;
  uint32_t phase = 0;
  const int units = cluster_units(p);
  for (int u = cluster_id; u < units; u += clusters) {
    const Unit w = unit_of(p, u, int(rank));
    for (int kt = w.kt0; kt < w.kt1; ++kt) {
      mbar_wait(&empty[stage], phase ^ 1);
      unsigned char* sa = stages + stage * kStageBytes;
      unsigned char* sb = sa + kATileBytes;
      const int k0 = kt * kBK;
      mbar_arrive_expect_tx(&full[stage], kStageBytes);
      if constexpr (A_K) {
        tma_load_2d(sa, tma_a, k0, w.m0, &full[stage]);
      } else {
        tma_load_2d(sa, tma_a, w.m0, k0, &full[stage]);
        tma_load_2d(sa + kATileBytes / 2, tma_a, w.m0 + 64, k0, &full[stage]);
      }
      for (int h = 0; h < 2; ++h) {
        if (p.cluster > 1 && h != int(rank)) continue;  // the peer's half
        unsigned char* dst = sb + h * kBHalfBytes;
        const int n = w.n0 + 128 * h;
        if (p.cluster > 1) {
          if constexpr (B_K) {
            tma_load_2d_multicast(dst, tma_b, k0, n, &full[stage], both);
          } else {
            tma_load_2d_multicast(dst, tma_b, n, k0, &full[stage], both);
            tma_load_2d_multicast(dst + kBHalfBytes / 2, tma_b, n + 64, k0, &full[stage], both);
          }
        } else {
          if constexpr (B_K) {
            tma_load_2d(dst, tma_b, k0, n, &full[stage]);
          } else {
            tma_load_2d(dst, tma_b, n, k0, &full[stage]);
            tma_load_2d(dst + kBHalfBytes / 2, tma_b, n + 64, k0, &full[stage]);
          }
        }
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }
  for (int i = 0; i < kStages; ++i) {
    mbar_wait(&empty[stage], phase ^ 1);
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

}  // namespace wide
}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
