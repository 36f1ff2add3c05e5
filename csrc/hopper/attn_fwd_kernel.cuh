// The sm_90a masked-attention forward: warp-specialised, persistent, wgmma + TMA / cp.async.
//
// Structure (after FlashAttention-3's, simplified):
//  * 384 threads: warpgroup 0 produces (attn_producer.cuh; 48 registers: at 40 ptxas spilled its
//    loop state to the stack), warpgroups 1 and 2 consume (attn_fwd_mainloop.cuh; 224 registers),
//    64 query rows each of a 128-row work item.
//  * Work items (b, h, 128 query rows) are spread over a persistent grid of min(#items, #SMs)
//    CTAs; Q is double buffered and the K / V ring (2-3 stages of 128 keys) runs across items, so
//    the producer fetches the next item's Q and first keys while the consumers finish this one.
//    D-JEPA's shapes (N = 256, 25% of the keys visible: one key tile per item) are latency bound
//    per item: without persistence every CTA would pay its loads' latency unhidden.
//  * Per key tile: S = Q K^T (wgmma, smem x smem), online softmax in registers, O += P V
//    (wgmma with P from registers); K and V have separate full barriers so S starts as soon as K
//    lands; one empty barrier per stage releases K and V after P V.
//  * Head dims 64, 80, 96, 128 as one or two swizzled column chunks (Chunks<D>): 80 = 64 + 16 and
//    96 = 64 + 32 run exactly D / 16 k steps for S and an n64 + n16 / n32 pair for P V, no padding.
//  * Empty samples (no visible key): no loads at all; o = 0, lse = 0.
//
// Masked keys: gather with cp.async, or compact once and use TMA? TMA cannot gather rows, so the
// alternative to gathering is a pre-pass writing the visible K / V rows of every (b, h) into a
// packed buffer that TMA then streams. Cost model per (b, h) with c visible keys of D elements:
//   gather : the kernel reads 2 c D 2 bytes per 128-row query tile (from L2 after the first
//            tile), issued as 16-byte cp.async by 128 producer threads: 2 c D / 8 / 128
//            instructions per thread per query tile (c = 128, D = 128: 32), against
//            4 * 128 * c * D FLOP of wgmma for that tile (~2000 tensor cycles at c = D = 128), so
//            the issue cost is ~2% of the producer warpgroup's cycles and none of the consumers'.
//   compact: an extra kernel (a launch, ~3-5 us) reading and writing 2 c D 2 bytes, i.e. 2x the
//            K / V traffic of the attention itself when Nq / 128 is small: D-JEPA's Nq = 256 gives
//            2 query tiles, so the pre-pass costs as much HBM traffic as the attention, for a
//            saving of ~2% of the producer's issue slots.
// So masked keys are gathered with cp.async into the same swizzled layout TMA would write, and
// TMA serves the dense case (no index) directly. A compaction pass would only pay off for very
// long query sequences over few visible keys, where the gather is amortised anyway.
#pragma once

#include "hopper/attn_config.cuh"
#include "hopper/attn_fwd_mainloop.cuh"
#include "hopper/attn_producer.cuh"

namespace djepa {
namespace hopper {
namespace attn {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  using C = Chunks<D>;
  unsigned char* raw = dynamic_smem();
  unsigned char* base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  unsigned char* sq = base;                                  // [2][kQBytes]
  unsigned char* stages = sq + 2 * C::kQBytes;               // [kStages][K | V]
  uint64_t* bars = reinterpret_cast<uint64_t*>(stages + C::kStages * 2 * C::kKVBytes);
  uint64_t* q_full = bars;
  uint64_t* q_empty = q_full + 2;
  uint64_t* k_full = q_empty + 2;
  uint64_t* v_full = k_full + C::kStages;
  uint64_t* kv_empty = v_full + C::kStages;
  const int tid = threadIdx.x, wg = tid / kWarpGroup;
  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbar_init(&q_full[i], full_count(p.q_path));
      mbar_init(&q_empty[i], kConsumers * 4);
    }
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(&k_full[s], full_count(p.kv_path));
      mbar_init(&v_full[s], full_count(p.kv_path));
      mbar_init(&kv_empty[s], kConsumers * 4);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    const int ptid = tid;
    if (p.q_path == kPathTma && p.kv_path == kPathTma && ptid != 0) return;
    int stage = 0, n_q = 0;
    uint32_t phase = 0;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      if (count == 0) continue;
      const int slot = n_q & 1;
      if (fills(p.q_path, ptid)) mbar_wait(&q_empty[slot], ((n_q >> 1) & 1) ^ 1);
      ++n_q;
      fill<T, D, kBM>(p.q_path, sq + slot * C::kQBytes, maps.q, Q + it.b * p.qs[0] + it.h * p.qs[1], p.qs[2],
                      nullptr, it.m0, p.Nq, it.h, it.b, &q_full[slot], ptid);
      const int* index = p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr;
      const T* kb = K + it.b * p.ks[0] + it.h * p.ks[1];
      const T* vb = V + it.b * p.vs[0] + it.h * p.vs[1];
      for (int t = 0; t * kBN < count; ++t) {
        if (fills(p.kv_path, ptid)) mbar_wait(&kv_empty[stage], phase ^ 1);
        unsigned char* kt = stages + stage * 2 * C::kKVBytes;
        fill<T, D, kBN>(p.kv_path, kt, maps.k, kb, p.ks[2], index, t * kBN, count, it.h, it.b, &k_full[stage], ptid);
        fill<T, D, kBN>(p.kv_path, kt + C::kKVBytes, maps.v, vb, p.vs[2], index, t * kBN, count, it.h, it.b,
                        &v_full[stage], ptid);
        if (++stage == C::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp = (tid / 32) % 4, lane = tid % 32;
    int stage = 0, n_q = 0;
    uint32_t phase = 0;
    bool first = true;
    OAcc<D> acc;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
#pragma unroll
      for (int e = 0; e < 32; ++e) acc.o0[e] = 0.f;
#pragma unroll
      for (int e = 0; e < int(sizeof(acc.o1) / sizeof(float)); ++e) acc.o1[e] = 0.f;
      Softmax sm;
      if (count > 0) {
        const int slot = n_q & 1;
        DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(&q_full[slot], (n_q >> 1) & 1);
        if (p.q_path != kPathTma) fence_proxy_async();
        fwd_tiles<T, D>(p, acc, sm, count, smem_u32(sq + slot * C::kQBytes), stages, k_full, v_full, kv_empty,
                        stage, phase, cw, lane, first);
        if (lane == 0) mbar_arrive(&q_empty[slot]);
        ++n_q;
        first = false;
      }
      fwd_epilogue<T, D>(p, it, acc, sm, cw, warp, lane);
    }
  }
#endif
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
