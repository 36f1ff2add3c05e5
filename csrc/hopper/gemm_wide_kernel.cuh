// The 128x256 sm_90a denoise GEMM kernel: warp-specialised, persistent, 2-CTA clusters with TMA
// multicast of B, TMA-store epilogue. The 128x128 kernel (gemm_kernel.cuh) stays beside it
// (gemm_sm90's `kernel` argument, DJEPA_SM90_GEMM): both serve the same contract.
//
// Design (why this tile, from tools/perf_model.py, every number a prediction): the 128x128
// kernel's schedule keeps the tensor pipe busy (modelled 0.93 at K = 1536), but each of its k
// tiles brings 32 KiB for 2.1 MFLOP (64 FLOP/byte), ~12 TB/s from L2 over all SMs at the
// calibrated rate: the top of the H100's public L2 figures (5.5-12 TB/s). A 128x256 tile reads
// 48 KiB for 4.2 MFLOP (~9 TB/s), and a cluster of two CTAs that share each B tile by multicast
// 32 KiB per CTA (~6 TB/s). Ping-pong consumers at 128x128 (each warpgroup its own unit, the
// epilogue under the other's mainloop) model at 1.00 but keep the 12 TB/s.
//  * 384 threads = 3 warpgroups: one producer thread issues the TMA boxes of a 4-stage ring of
//    A [128 x 64] + B [256 x 64] (48 KiB per stage) (gemm_wide_producer.cuh; 40 registers);
//    two consumer warpgroups (232 registers) each hold a 64 x 256 fp32 tile (128 per thread),
//    four wgmma.m64n256k16 per stage with one stage's group in flight (gemm_wide_consumer.cuh).
//  * Clusters of 2 along M: CTA rank r takes tile rows 2 i + r of cluster unit i and loads
//    half r of the shared B tile, multicast to both; consumers release a stage in both CTAs.
//  * Persistent grid: min(cluster units, resident clusters) clusters; the producer runs ahead
//    into the next unit while the consumers store this one.
//  * Epilogue: 64 x 128-byte chunks staged in shared memory (2 x 8 KiB per consumer
//    warpgroup), TMA stores with one in flight (gemm_wide_epilogue.cuh); split-K partials the
//    same way into the workspace, reduced by gemm_epilogue.cuh's splitk_reduce_kernel.
//  * Shared memory: 1 KiB slack + 4 x 48 KiB + 32 KiB + barriers = 225.25 KiB of 227.
// Needs A and B loadable by TMA (16-byte aligned base and row pitch) and K > 0: the host runs
// the 128x128 kernel otherwise.
#pragma once

#include "hopper/gemm_wide_config.cuh"
#include "hopper/gemm_wide_consumer.cuh"
#include "hopper/gemm_wide_epilogue.cuh"
#include "hopper/gemm_wide_producer.cuh"

namespace djepa {
namespace hopper {
namespace gemm {
namespace wide {

// A_K: A stored [M, K]; else [K, M]. B_K: B stored [N, K]; else [K, N]. Launched with clusters
// of p.cluster CTAs along x (gridDim.x a multiple of p.cluster).
template <typename T, bool A_K, bool B_K>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_wide_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap tma_a,
                          const __grid_constant__ CUtensorMap tma_b, const __grid_constant__ OutMaps out) {
#if defined(DJEPA_HOPPER_BODY)
  unsigned char* raw = dynamic_smem();
  unsigned char* base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  unsigned char* stages = base;
  unsigned char* bufs = base + kStages * kStageBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(bufs + kOutBytes);
  uint64_t* empty = full + kStages;
  const int tid = threadIdx.x, wg = tid / kWarpGroup;
  const uint32_t rank = p.cluster > 1 ? cluster_ctarank() : 0u;
  const int cluster_id = int(blockIdx.x) / p.cluster, clusters = int(gridDim.x) / p.cluster;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers * 4 * DJEPA_FAULT_VALUE(kPlantPeerRelease, p.cluster, 1));
    }
    mbar_init_fence();
  }
  if (tid == kWarpGroup) {
    tma_prefetch(&tma_a);
    tma_prefetch(&tma_b);
  }
  // Every CTA's barriers are initialised before a peer arrives on them or multicasts to them.
  if (p.cluster > 1 && DJEPA_FAULT_VALUE(kPlantClusterSync, true, false)) {
    cluster_sync();
  } else {
    __syncthreads();
  }

  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) produce<A_K, B_K>(p, &tma_a, &tma_b, stages, full, empty, rank, cluster_id, clusters);
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp = (tid / 32) % 4, lane = tid % 32;
    const bool issuer = tid % kWarpGroup == 0;
    unsigned char* my_bufs = bufs + cw * kOutBuffers * kOutChunkBytes;
    int stage = 0, step = 0;
    uint32_t phase = 0;
    float acc[128];
    const int units = cluster_units(p);
    bool first = true;
    for (int u = cluster_id; u < units; u += clusters) {
      const Unit w = unit_of(p, u, int(rank));
      mainloop<T, A_K, B_K>(acc, w, smem_u32(stages), full, empty, stage, phase, cw, lane, p.cluster, rank, first);
      epilogue<T>(p, out, acc, w, cw, warp, lane, my_bufs, step, issuer);
      first = false;
    }
    if (issuer) bulk_wait<0>();
  }
#endif
}

}  // namespace wide
}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
