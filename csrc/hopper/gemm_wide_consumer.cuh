// Consumer main loop of the 128x256 sm_90a GEMM: one warpgroup's 64 x 256 accumulator tile.
//
// Consumer warpgroup cw (0, 1) owns rows 64 cw .. 64 cw + 63 of the block tile. Per k tile it
// issues four wgmma.m64n256k16 (k steps kk = 0..3) as one group and keeps one group in flight:
// after issuing k tile t it waits for t - 1's group and only then releases t - 1's stage: lane 0
// of each of its 4 warps arrives on empty[t - 1] of every CTA of the cluster (its own and, with
// a cluster of 2, the peer's, whose producer multicasts into this CTA's stage).
//
// Descriptors (128B swizzle, base offset 0), gemm_consumer.cuh's operand_desc:
//   A: as the 128x128 kernel's (the cw-th 64 rows / 64-wide m half).
//   B K-major: start = B + 32 kk, SBO = 1024: 256 rows of 128 bytes, 32 groups of 8 rows.
//   B N-major: start = B + 2048 kk, SBO = 1024, LBO = 8192: n 64 q .. 64 q + 63 in quarter q.
#pragma once

#include "hopper/gemm_consumer.cuh"
#include "hopper/gemm_wide_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {
namespace wide {

__device__ __forceinline__ void release(uint64_t* bar, int cluster, uint32_t rank) {
  mbar_arrive(bar);
  if (cluster > 1) DJEPA_FAULT_SKIP(kPlantPeerRelease, true) mbar_arrive_remote(bar, rank ^ 1u);
}

template <typename T, bool A_K, bool B_K>
__device__ __forceinline__ void mainloop(float (&acc)[128], const Unit& w, uint32_t stages, uint64_t* full,
                                         uint64_t* empty, int& stage, uint32_t& phase, int cw, int lane,
                                         int cluster, uint32_t rank, bool first_unit) {
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  int prev = -1;
  for (int kt = w.kt0; kt < w.kt1; ++kt) {
    DJEPA_FAULT_SKIP(kPlantWait, first_unit && kt == w.kt0) mbar_wait(&full[stage], phase);
    const uint32_t sa = stages + uint32_t(stage) * kStageBytes, sb = sa + kATileBytes;
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      wgmma_ss<T, kBN, A_K ? 0 : 1, B_K ? 0 : 1>(acc, operand_desc<A_K>(sa, cw, kk), operand_desc<B_K>(sb, 0, kk), 1);
    }
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantEarlyRelease, true) wgmma_wait<1>();
    if (prev >= 0 && lane == 0) release(&empty[prev], cluster, rank);
    prev = stage;
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
  fence_regs(acc);
  if (prev >= 0 && lane == 0) release(&empty[prev], cluster, rank);
}

}  // namespace wide
}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
