// The sm_90a masked-attention backward: delta = rowsum(dO * O), then dK / dV and dQ as two
// warp-specialised persistent kernels (attn_bwd_mainloop.cuh), deterministic like the sm_80 one.
//
// Both kernels share one structure: a work item keeps two 128-row tiles in shared memory (dk/dv:
// the gathered K and V of 128 compacted keys; dq: Q and dO of 128 queries), double buffered so
// the producer fetches the next item's while the consumers work, and streams pairs of 64-row
// (D >= 96: 32-row) tiles through a 2-3 stage ring (dk/dv: Q and dO over all queries; dq: the gathered K and V
// over the visible keys). Loads follow the forward's paths (attn_producer.cuh): TMA for dense
// streams and dO, cp.async gathers for masked keys, ordinary loads for unaligned views.
// dk/dv items cover every key tile, also the invisible ones, whose rows are written as zeros
// (kv_index is a permutation, so every dk / dv row is written exactly once).
#pragma once

#include "convert.cuh"
#include "hopper/attn_bwd_mainloop.cuh"
#include "hopper/attn_producer.cuh"

namespace djepa {
namespace hopper {
namespace attn {

template <typename T>
__global__ void __launch_bounds__(256) delta_sm90_kernel(const T* __restrict__ o, const T* __restrict__ dout,
                                                         float* __restrict__ delta, long long rows, int D) {
  const long long row = static_cast<long long>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_f(o[row * D + d]) * to_f(dout[row * D + d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += shfl_xor(acc, off);
  if (lane == 0) delta[row] = acc;
}

// The barriers and buffers of a backward kernel (BwdShape<D> layout).
template <int D>
struct BwdSmem {
  using S = BwdShape<D>;
  unsigned char* fixed;   // [2 buffers][2 tiles][kFixedTile]
  unsigned char* stages;  // [kStages][2 tiles][kStreamTile]
  uint64_t* f_full;       // [2 buffers][2 tiles]
  uint64_t* f_empty;      // [2]
  uint64_t* s_full;       // [kStages][2 tiles]
  uint64_t* s_empty;      // [kStages]
  __device__ BwdSmem() {
    unsigned char* raw = dynamic_smem();
    unsigned char* base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
    fixed = base;
    stages = fixed + 2 * S::kFixedBytes;
    f_full = reinterpret_cast<uint64_t*>(stages + S::kStages * S::kStreamBytes);
    f_empty = f_full + 4;
    s_full = f_empty + 2;
    s_empty = s_full + 2 * S::kStages;
  }
  __device__ void init(int fixed_path0, int fixed_path1, int stream_path0, int stream_path1) {
    for (int b = 0; b < 2; ++b) {
      mbar_init(&f_full[2 * b], full_count(fixed_path0));
      mbar_init(&f_full[2 * b + 1], full_count(fixed_path1));
      mbar_init(&f_empty[b], kConsumers * 4);
    }
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(&s_full[2 * s], full_count(stream_path0));
      mbar_init(&s_full[2 * s + 1], full_count(stream_path1));
      mbar_init(&s_empty[s], kConsumers * 4);
    }
    mbar_init_fence();
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dkdv_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  using S = BwdShape<D>;
  BwdSmem<D> sm;
  const int tid = threadIdx.x, wg = tid / kWarpGroup;
  if (tid == 0) sm.init(p.kv_path, p.kv_path, p.q_path, p.do_path);
  __syncthreads();
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);
  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    const int ptid = tid;
    if (p.q_path == kPathTma && p.do_path == kPathTma && p.kv_path == kPathTma && ptid != 0) return;
    int stage = 0, n_f = 0;
    uint32_t phase = 0;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);  // it.m0 = the item's first compacted key
      const int count = visible_count(p, it.b);
      if (it.m0 >= count) continue;
      const int slot = n_f & 1;
      if (fills(p.kv_path, ptid)) mbar_wait(&sm.f_empty[slot], ((n_f >> 1) & 1) ^ 1);
      ++n_f;
      const int* index = p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr;
      unsigned char* f = sm.fixed + slot * S::kFixedBytes;
      fill<T, D, kFixedRows>(p.kv_path, f, maps.k, K + it.b * p.ks[0] + it.h * p.ks[1], p.ks[2], index, it.m0, count,
                             it.h, it.b, &sm.f_full[2 * slot], ptid);
      fill<T, D, kFixedRows>(p.kv_path, f + S::kFixedTile, maps.v, V + it.b * p.vs[0] + it.h * p.vs[1], p.vs[2], index,
                             it.m0, count, it.h, it.b, &sm.f_full[2 * slot + 1], ptid);
      const T* qb = Q + it.b * p.qs[0] + it.h * p.qs[1];
      const T* db = dO + (static_cast<long long>(it.b) * p.H + it.h) * p.Nq * D;
      const bool streams = fills(p.q_path, ptid) || fills(p.do_path, ptid);
      for (int m0 = 0; m0 < p.Nq; m0 += S::kStreamRows) {
        if (streams) mbar_wait(&sm.s_empty[stage], phase ^ 1);
        unsigned char* st = sm.stages + stage * S::kStreamBytes;
        fill<T, D, S::kStreamRows>(p.q_path, st, maps.q, qb, p.qs[2], nullptr, m0, p.Nq, it.h, it.b, &sm.s_full[2 * stage],
                                ptid);
        fill<T, D, S::kStreamRows>(p.do_path, st + S::kStreamTile, maps.dout, db, D, nullptr, m0, p.Nq, it.h, it.b,
                                &sm.s_full[2 * stage + 1], ptid);
        if (++stage == S::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp = (tid / 32) % 4, lane = tid % 32, g = lane >> 2;
    int stage = 0, n_f = 0;
    uint32_t phase = 0;
    bool first = true;
    GAcc<D> dk, dv;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      zero<D>(dk);
      zero<D>(dv);
      if (it.m0 < count) {
        const int slot = n_f & 1;
        const uint32_t fp = ((n_f >> 1) & 1);
        DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(&sm.f_full[2 * slot], fp);
        mbar_wait(&sm.f_full[2 * slot + 1], fp);
        if (p.kv_path != kPathTma) fence_proxy_async();
        const uint32_t kt = smem_u32(sm.fixed + slot * S::kFixedBytes), vt = kt + S::kFixedTile;
        dkdv_tiles<T, D>(p, it, it.m0, count, kt, vt, sm.stages, sm.s_full, sm.s_empty, stage, phase, dk, dv, cw, warp,
                         lane, first);
        if (lane == 0) mbar_arrive(&sm.f_empty[slot]);
        ++n_f;
        first = false;
      }
      const long long kv_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nk;
      const int* index = p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr;
      T* dkr[2];
      T* dvr[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = it.m0 + 64 * cw + 16 * warp + g + 8 * h;
        const long long n = j < p.Nk ? (index ? index[j] : j) : -1;
        dkr[h] = n >= 0 ? static_cast<T*>(p.dk) + (kv_base + n) * D : nullptr;
        dvr[h] = n >= 0 ? static_cast<T*>(p.dv) + (kv_base + n) * D : nullptr;
      }
      store_rows<T, D>(dk, dkr, p.scale, lane);  // rows of invisible keys hold zeros
      store_rows<T, D>(dv, dvr, 1.f, lane);
    }
  }
#endif
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_dq_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  using S = BwdShape<D>;
  BwdSmem<D> sm;
  const int tid = threadIdx.x, wg = tid / kWarpGroup;
  if (tid == 0) sm.init(p.q_path, p.do_path, p.kv_path, p.kv_path);
  __syncthreads();
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);
  if (wg == 0) {
    setmaxnreg_dec<kProducerRegs>();
    const int ptid = tid;
    if (p.q_path == kPathTma && p.do_path == kPathTma && p.kv_path == kPathTma && ptid != 0) return;
    int stage = 0, n_f = 0;
    uint32_t phase = 0;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      if (count == 0) continue;
      const int slot = n_f & 1;
      if (fills(p.q_path, ptid) || fills(p.do_path, ptid)) mbar_wait(&sm.f_empty[slot], ((n_f >> 1) & 1) ^ 1);
      ++n_f;
      unsigned char* f = sm.fixed + slot * S::kFixedBytes;
      fill<T, D, kFixedRows>(p.q_path, f, maps.q, Q + it.b * p.qs[0] + it.h * p.qs[1], p.qs[2], nullptr, it.m0, p.Nq,
                             it.h, it.b, &sm.f_full[2 * slot], ptid);
      fill<T, D, kFixedRows>(p.do_path, f + S::kFixedTile, maps.dout,
                             dO + (static_cast<long long>(it.b) * p.H + it.h) * p.Nq * D, D, nullptr, it.m0, p.Nq,
                             it.h, it.b, &sm.f_full[2 * slot + 1], ptid);
      const int* index = p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr;
      const T* kb = K + it.b * p.ks[0] + it.h * p.ks[1];
      const T* vb = V + it.b * p.vs[0] + it.h * p.vs[1];
      for (int j0 = 0; j0 < count; j0 += S::kStreamRows) {
        if (fills(p.kv_path, ptid)) mbar_wait(&sm.s_empty[stage], phase ^ 1);
        unsigned char* st = sm.stages + stage * S::kStreamBytes;
        fill<T, D, S::kStreamRows>(p.kv_path, st, maps.k, kb, p.ks[2], index, j0, count, it.h, it.b, &sm.s_full[2 * stage],
                                ptid);
        fill<T, D, S::kStreamRows>(p.kv_path, st + S::kStreamTile, maps.v, vb, p.vs[2], index, j0, count, it.h, it.b,
                                &sm.s_full[2 * stage + 1], ptid);
        if (++stage == S::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp = (tid / 32) % 4, lane = tid % 32, g = lane >> 2;
    int stage = 0, n_f = 0;
    uint32_t phase = 0;
    bool first = true;
    GAcc<D> dq;
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      zero<D>(dq);
      if (count > 0) {
        const int slot = n_f & 1;
        const uint32_t fp = ((n_f >> 1) & 1);
        DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(&sm.f_full[2 * slot], fp);
        mbar_wait(&sm.f_full[2 * slot + 1], fp);
        if (p.q_path != kPathTma || p.do_path != kPathTma) fence_proxy_async();
        const uint32_t qt = smem_u32(sm.fixed + slot * S::kFixedBytes), dot = qt + S::kFixedTile;
        dq_tiles<T, D>(p, it, count, qt, dot, sm.stages, sm.s_full, sm.s_empty, stage, phase, dq, cw, warp, lane, first);
        if (lane == 0) mbar_arrive(&sm.f_empty[slot]);
        ++n_f;
        first = false;
      }
      const long long q_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
      T* rows[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = it.m0 + 64 * cw + 16 * warp + g + 8 * h;
        rows[h] = row < p.Nq ? static_cast<T*>(p.dq) + (q_base + row) * D : nullptr;
      }
      store_rows<T, D>(dq, rows, p.scale, lane);
    }
  }
#endif
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
