// Consumer stage of the sm_90a GEMM: one warpgroup's 64 x 128 accumulator tile for one unit.
//
// Consumer warpgroup cw (0, 1) owns rows 64 cw .. 64 cw + 63 of the block tile. Per k tile (one
// ring stage) it issues four wgmma.m64n128k16 (k steps kk = 0..3), commits them as one group,
// and keeps one group in flight: after issuing k tile t it waits for k tile t - 1's group and
// only then releases t - 1's stage (lane 0 of each of its 4 warps arrives on empty; the barrier
// counts all 8 consumer warps).
//
// Descriptors (128B swizzle, base offset 0: every stage is 1024-byte aligned):
//   A K-major : start = A + 8192 cw + 32 kk   (64 rows x 128 B per warpgroup; k step = 32 B),
//               SBO = 1024 (8 rows x 128 B), LBO unused (16).
//   A M-major : start = A + 8192 cw + 2048 kk (the cw-th 64-wide m half; k step = 16 rows),
//               SBO = 1024 (next 8 k rows), LBO = 8192 (next 64 m: not reached by m64).
//   B K-major : start = B + 32 kk, SBO = 1024.
//   B N-major : start = B + 2048 kk, SBO = 1024, LBO = 8192 (n 64-127 in the second half).
#pragma once

#include "hopper/gemm_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {

template <bool KMAJOR>
__device__ __forceinline__ uint64_t operand_desc(uint32_t tile, int half, int kk) {
  const int mode = DJEPA_FAULT_VALUE(kPlantSwizzle, kSwizzle128, kSwizzle64);
  const uint32_t sbo = DJEPA_FAULT_VALUE(kPlantStride, 1024, 512);
  if constexpr (KMAJOR) {
    return make_desc(tile + half * 8192 + kk * 32, 16, sbo, mode);
  } else {
    return make_desc(tile + half * 8192 + kk * 2048, 8192, sbo, mode);
  }
}

template <typename T, bool A_K, bool B_K>
__device__ __forceinline__ void mainloop(float (&acc)[64], const Unit& w, uint32_t stages, uint64_t* full,
                                         uint64_t* empty, int& stage, uint32_t& phase, int cw, int lane,
                                         bool first_unit) {
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  int prev = -1;
  for (int kt = w.kt0; kt < w.kt1; ++kt) {
    DJEPA_FAULT_SKIP(kPlantWait, first_unit && kt == w.kt0) mbar_wait(&full[stage], phase);
    const uint32_t sa = stages + uint32_t(stage) * kStageBytes, sb = sa + kTileBytes;
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // B N-major: N = 128 spans both 64-wide halves (LBO); B K-major: all 128 rows.
      wgmma_ss<T, kBN, A_K ? 0 : 1, B_K ? 0 : 1>(acc, operand_desc<A_K>(sa, cw, kk), operand_desc<B_K>(sb, 0, kk), 1);
    }
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantEarlyRelease, true) wgmma_wait<1>();
    if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
    prev = stage;
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
  DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
  fence_regs(acc);
  if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
