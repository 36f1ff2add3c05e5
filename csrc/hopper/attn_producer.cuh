// Producer stage of the sm_90a attention kernels: Q tiles (double buffered, one per work item)
// and K / V tiles (a ring of kStages, K and V with their own full barriers and a shared empty
// barrier) in the chunked, swizzled layout of Chunks<D> (attn_config.cuh).
//
// Three ways to fill a tile, chosen per stream by the host (Params::q_path / kv_path):
//   kPathTma    one thread arms the full barrier with the tile's bytes and issues one 4-d TMA box
//               per chunk; rows past the end are zero filled by TMA. Dense keys only: TMA cannot
//               gather rows.
//   kPathGather all 128 producer threads issue 16-byte cp.async copies, row j of the tile from
//               token kv_index[j] (identity without an index), zero filled (src-size 0) past the
//               visible count, each to its swizzled position; each thread then arrives on the full
//               barrier when its copies land (cp.async.mbarrier.arrive.noinc; count 128).
//               Consumers execute fence.proxy.async after the wait (cp.async writes through the
//               generic proxy, wgmma reads through the async proxy).
//   kPathManual all 128 producer threads load with ordinary loads (any alignment), store 16-byte
//               units, fence.proxy.async, arrive (count 128).
#pragma once

#include "hopper/attn_config.cuh"

namespace djepa {
namespace hopper {
namespace attn {

// Row j of the tile comes from token index(j) of a [tokens] x D view with token stride `ld`;
// rows j >= limit are zero.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void gather_tile(unsigned char* tile, const T* base, long long ld, const int* index,
                                            int row0, int limit, bool async, int ptid) {
  constexpr int kUnits = D / 8;
#pragma unroll 1
  for (int q = ptid; q < ROWS * kUnits; q += kWarpGroup) {
    const int r = q / kUnits, u = q % kUnits, j = row0 + r;
    unsigned char* dst = tile + Chunks<D>::unit_offset(r, u, ROWS);
    const bool in = j < limit;
    const long long n = in ? (index ? static_cast<long long>(__ldg(index + j)) : j) : 0;
    const T* src = base + n * ld + u * 8;
    if (async) {
      cp_async16(dst, in ? src : base, in ? 16 : 0);
    } else {
      alignas(16) T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = in ? src[e] : T(0.f);
      st_shared16(dst, *reinterpret_cast<const uint4*>(v));
    }
  }
}

// Fills one tile of ROWS rows (a Q tile: the item's query rows; a K or V tile: compacted keys
// row0 .. row0 + ROWS - 1) by `path`, completing `full`.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void fill(int path, unsigned char* tile, const CUtensorMap* maps, const T* base,
                                     long long ld, const int* index, int row0, int limit, int h, int b,
                                     uint64_t* full, int ptid) {
  if (path == kPathTma) {
    if (ptid == 0) {
      mbar_arrive_expect_tx(full, ROWS * D * 2);
#pragma unroll
      for (int ch = 0; ch < Chunks<D>::kN; ++ch)
        tma_load_4d(tile + Chunks<D>::region(ch, ROWS), &maps[ch], 0, row0, h, b, full);
    }
  } else if (path == kPathGather) {
    gather_tile<T, D, ROWS>(tile, base, ld, index, row0, limit, true, ptid);
    cp_async_mbar_arrive(full);
  } else {
    gather_tile<T, D, ROWS>(tile, base, ld, index, row0, limit, false, ptid);
    DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    mbar_arrive(full);
  }
}

// Barrier counts of a stream's full barriers.
__host__ __device__ inline int full_count(int path) { return path == kPathTma ? 1 : kWarpGroup; }

// Whether producer thread ptid takes part in filling a tile loaded by `path`. Only those threads
// may wait on the tile's empty barrier: a thread that waits on a stream it does not fill can
// fall two phases behind it (the others fill and the consumers release without it) and then
// waits on the wrong parity for ever. (The emulator found this hang in the backward.)
__host__ __device__ inline bool fills(int path, int ptid) { return path != kPathTma || ptid == 0; }

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
