// The sm_90a denoise GEMM kernel: warp-specialised, persistent, TMA + wgmma.
//
// Design (the roofline it is built for: W = 1024..1536, M >= 8192, bf16):
//  * 384 threads = 3 warpgroups. Warpgroup 0 is the producer (gemm_producer.cuh): one thread
//    issues TMA boxes into a 6-stage ring of 128x64 A and B tiles (32 KiB per stage, 192 KiB in
//    all) and the others idle; it drops to 40 registers (setmaxnreg.dec). Warpgroups 1 and 2 are
//    consumers (gemm_consumer.cuh, 232 registers each): 64 x 128 fp32 accumulators (64 per
//    thread), four wgmma.m64n128k16 per stage with one stage's group in flight, so TMA, the
//    tensor cores and the release of stages overlap.
//  * Full / empty mbarriers per stage (full: TMA transaction bytes; empty: the 8 consumer warps).
//  * Persistent grid: min(#units, #SMs) CTAs (one per SM: 194 KiB of shared memory); CTA b takes
//    units b, b + grid, ... in the same order in producer and consumers, so the producer runs
//    ahead into the next unit while the consumers run the epilogue (gemm_epilogue.cuh) of this one.
//  * Split-K for the weight gradients (W x W outputs, K = tokens): with fewer tiles than SMs the
//    host (choose_splits) splits K so the units fill the SMs; splits write fp32 partials that a
//    second kernel sums in split order (deterministic) and finishes with the epilogue.
//  * Unaligned operands (pointer or row pitch not a multiple of 16 bytes) cannot use TMA: the
//    whole producer warpgroup loads them with ordinary loads into the same swizzled layout (then
//    fence.proxy.async), so every shape of the djepa._C.gemm contract is served.
// Expected: mainloop issue is wgmma-bound (a stage's 4 wgmmas ~ 256 tensor cycles per warpgroup
// against 32 KiB of TMA per stage ~ 128 B/cycle at full rate); the register epilogue writes 4-byte
// pairs (50% sector efficiency), which a later smem-staged TMA-store epilogue could remove.
#pragma once

#include "hopper/gemm_config.cuh"
#include "hopper/gemm_consumer.cuh"
#include "hopper/gemm_epilogue.cuh"
#include "hopper/gemm_producer.cuh"

namespace djepa {
namespace hopper {
namespace gemm {

// A_K: A stored [M, K]; else [K, M]. B_K: B stored [N, K]; else [K, N].
template <typename T, bool A_K, bool B_K>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tma_a,
                     const __grid_constant__ CUtensorMap tma_b) {
#if defined(DJEPA_HOPPER_BODY)
  unsigned char* raw = dynamic_smem();
  unsigned char* base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  unsigned char* stages = base;
  uint64_t* full = reinterpret_cast<uint64_t*>(base + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x, wg = tid / kWarpGroup;
  const bool manual = !p.a_tma || !p.b_tma;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], manual ? kWarpGroup : 1);
      mbar_init(&empty[s], kConsumers * 4);
    }
    mbar_init_fence();
  }
  if (tid == kWarpGroup) {
    if (p.a_tma) tma_prefetch(&tma_a);
    if (p.b_tma) tma_prefetch(&tma_b);
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    produce<T, A_K, B_K>(p, &tma_a, &tma_b, stages, full, empty, tid);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp = (tid / 32) % 4, lane = tid % 32;
    int stage = 0;
    uint32_t phase = 0;
    float acc[64];
    const int units = units_of(p);
    bool first = true;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      const Unit w = unit_of(p, u);
      mainloop<T, A_K, B_K>(acc, w, smem_u32(stages), full, empty, stage, phase, cw, lane, first);
      epilogue<T>(p, acc, w, cw, warp, lane);
      first = false;
    }
  }
#endif
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
