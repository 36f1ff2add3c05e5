// Producer stage of the pipelined sm_90a attention kernels: tiles in the chunked, swizzled layout of
// Chunks<D> (attn_config.cuh), by the load paths of attn_producer.cuh:
//   kPathTma    one thread arms the full barrier with the bytes and issues one TMA box of 64 rows per
//               chunk and 64 rows (so the forward's 64-key half tile loads half the bytes).
//   kPathGather the 128 producer threads gather rows with 16-byte cp.async, each thread arriving on
//               the full barrier when its copies land. Warp w copies rows w R/4 .. (w + 1) R/4 - 1 of
//               an R-row tile: lane l loads the token index of its warp's row l once (one coalesced
//               load per lane for the K and the V tile of a stage), and every copy takes the index
//               of its row by a shuffle, so the copies of a tile issue back to back without waiting
//               on a load (the baseline's loop waits on an index load before each copy).
//   kPathManual ordinary loads and 16-byte shared stores, then fence.proxy.async (unaligned views).
#pragma once

#include "hopper/attn_pipelined_config.cuh"
#include "hopper/attn_producer.cuh"

namespace djepa {
namespace hopper {
namespace attn {
namespace pipe {

// Calls f(std::integral_constant<int, a>, std::integral_constant<int, b>) for the runtime paths
// (a, b): the producers are compiled per pair of load paths. Mixed pairs that the host plans never
// make fall back to (kPathManual, kPathManual), which serves any input.
template <typename F>
__device__ __forceinline__ void with_paths(int a, int b, F&& f) {
  using Tma = std::integral_constant<int, kPathTma>;
  using Gather = std::integral_constant<int, kPathGather>;
  using Manual = std::integral_constant<int, kPathManual>;
  if (a == kPathTma && b == kPathTma) f(Tma{}, Tma{});
  else if (a == kPathTma && b == kPathGather) f(Tma{}, Gather{});
  else if (a == kPathGather && b == kPathGather) f(Gather{}, Gather{});
  else if (a == kPathGather && b == kPathTma) f(Gather{}, Tma{});
  else f(Manual{}, Manual{});
}

// This thread's warpgroup, broadcast from lane 0 so that the compiler knows it is uniform: wgmma
// descriptors derived from it then live in uniform registers (a value derived from threadIdx
// alone would be copied into them, R2UR, before every wgmma).
__device__ __forceinline__ int uniform_warpgroup() { return shfl_idx(int(threadIdx.x) / kWarpGroup, 0); }

// A position in a ring of S stages and the parity of its current phase.
template <int S>
struct Pos {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void next() {
    if (++stage == S) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// TMA: rows row0 .. row0 + rows - 1 (rows = 64 or 128) of the maps' [B, H, N, D] view into a tile
// laid out for LAYOUT rows. One thread; completes `full`.
template <int D, int LAYOUT>
__device__ __forceinline__ void tma_rows(unsigned char* tile, const CUtensorMap* maps, int row0, int rows, int h,
                                         int b, uint64_t* full) {
  using C = Chunks<D>;
  mbar_arrive_expect_tx(full, uint32_t(rows * D * 2));
#pragma unroll
  for (int ch = 0; ch < C::kN; ++ch)
    for (int r = 0; r < rows; r += kRows)
      tma_load_4d(tile + C::region(ch, LAYOUT) + r * C::span(ch), &maps[ch], 0, row0 + r, h, b, full);
}

// The token of row row0 + warp FILL / 4 + lane of a gathered tile (lanes below FILL / 4): index[j]
// (j itself without an index), -1 past `limit`.
template <int FILL>
__device__ __forceinline__ int row_token(const int* index, int row0, int limit, int warp, int lane) {
  constexpr int kRw = FILL / 4;
  const int j = row0 + warp * kRw + lane;
  return lane < kRw && j < limit ? (index ? __ldg(index + j) : j) : -1;
}

// cp.async of rows 0 .. FILL - 1 of a tile laid out for LAYOUT rows: row r from token `tok` of lane
// r % (FILL / 4) of warp r / (FILL / 4) (row_token), zero filled where that token is -1.
template <typename T, int D, int LAYOUT, int FILL>
__device__ __forceinline__ void gather_rows(unsigned char* tile, const T* base, long long ld, int tok, int warp,
                                            int lane) {
  constexpr int kUnits = D / 8, kRw = FILL / 4, kIters = kRw * kUnits / 32;
  static_assert(kRw <= 32 && (kRw * kUnits) % 32 == 0, "a warp's rows split evenly over its lanes");
  // Every copy's destination offset is a function of the lane alone: the compiler would compute
  // them all once, outside the item loop, and keep 2 x kIters of them live across it (more than
  // the producer's registers). The empty asm makes the lane opaque here, so they are recomputed
  // per tile (a few integer instructions per copy); unrolled by 4, so the copies of 4 rows issue
  // together without all kIters offsets and shuffled tokens live at once.
  int ln = lane;
  asm volatile("" : "+r"(ln));
#pragma unroll 4
  for (int i = 0; i < kIters; ++i) {
    const int q = ln + 32 * i, r = q / kUnits, u = q % kUnits;
    const int n = shfl_idx(tok, r);
    unsigned char* dst = tile + Chunks<D>::unit_offset(warp * kRw + r, u, LAYOUT);
    cp_async16(dst, n >= 0 ? base + n * ld + u * 8 : base, n >= 0 ? 16 : 0);
  }
}

// The manual path: ordinary loads (any alignment) of all LAYOUT rows, then the proxy fence and an
// arrival on `full` (count 128).
template <typename T, int D, int LAYOUT>
__device__ __forceinline__ void manual_tile(unsigned char* tile, const T* base, long long ld, const int* index,
                                            int row0, int limit, uint64_t* full, int ptid) {
  gather_tile<T, D, LAYOUT>(tile, base, ld, index, row0, limit, false, ptid);
  DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
  mbar_arrive(full);
}

// One tile of `rows` rows (64 or LAYOUT) from row0: rows row0 + j of the [tokens] x D view `base`
// (token index[row0 + j]; j without an index), zero past `limit`, completing `full`. Every producer
// thread calls it (fills() says which take part on the TMA path).
template <typename T, int D, int LAYOUT>
__device__ __forceinline__ void fill_tile(int path, unsigned char* tile, const CUtensorMap* maps, const T* base,
                                          long long ld, const int* index, int row0, int rows, int limit, int h,
                                          int b, uint64_t* full, int ptid) {
  const int warp = ptid / 32, lane = ptid % 32;
  if (path == kPathTma) {
    if (ptid == 0) tma_rows<D, LAYOUT>(tile, maps, row0, rows, h, b, full);
  } else if (path == kPathGather) {
    if (rows == LAYOUT) {
      gather_rows<T, D, LAYOUT, LAYOUT>(tile, base, ld, row_token<LAYOUT>(index, row0, limit, warp, lane), warp, lane);
    } else {
      gather_rows<T, D, LAYOUT, kRows>(tile, base, ld, row_token<kRows>(index, row0, limit, warp, lane), warp, lane);
    }
    cp_async_mbar_arrive(full);
  } else {
    manual_tile<T, D, LAYOUT>(tile, base, ld, index, row0, limit, full, ptid);
  }
}

// The K and the V tile of one stage (same rows; on the gather path one index load serves both):
// completes k_full when K lands and v_full when V does.
template <typename T, int D, int LAYOUT, int FILL>
__device__ __forceinline__ void gather_kv(unsigned char* kt, unsigned char* vt, const T* kb, long long kld,
                                          const T* vb, long long vld, const int* index, int row0, int limit,
                                          uint64_t* k_full, uint64_t* v_full, int warp, int lane) {
  const int tok = row_token<FILL>(index, row0, limit, warp, lane);
  gather_rows<T, D, LAYOUT, FILL>(kt, kb, kld, tok, warp, lane);
  cp_async_mbar_arrive(k_full);
  gather_rows<T, D, LAYOUT, FILL>(vt, vb, vld, tok, warp, lane);
  cp_async_mbar_arrive(v_full);
}

template <typename T, int D, int LAYOUT>
__device__ __forceinline__ void fill_kv(int path, unsigned char* kt, unsigned char* vt, const Maps& maps,
                                        const T* kb, long long kld, const T* vb, long long vld, const int* index,
                                        int row0, int rows, int limit, int h, int b, uint64_t* k_full,
                                        uint64_t* v_full, int ptid) {
  const int warp = ptid / 32, lane = ptid % 32;
  if (path == kPathTma) {
    if (ptid == 0) {
      tma_rows<D, LAYOUT>(kt, maps.k, row0, rows, h, b, k_full);
      tma_rows<D, LAYOUT>(vt, maps.v, row0, rows, h, b, v_full);
    }
  } else if (path == kPathGather) {
    if (rows == LAYOUT) {
      gather_kv<T, D, LAYOUT, LAYOUT>(kt, vt, kb, kld, vb, vld, index, row0, limit, k_full, v_full, warp, lane);
    } else {
      gather_kv<T, D, LAYOUT, kRows>(kt, vt, kb, kld, vb, vld, index, row0, limit, k_full, v_full, warp, lane);
    }
  } else {
    manual_tile<T, D, LAYOUT>(kt, kb, kld, index, row0, limit, k_full, ptid);
    manual_tile<T, D, LAYOUT>(vt, vb, vld, index, row0, limit, v_full, ptid);
  }
}

}  // namespace pipe
}  // namespace attn
}  // namespace hopper
}  // namespace djepa
