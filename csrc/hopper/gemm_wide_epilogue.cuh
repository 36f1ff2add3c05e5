// Epilogue of the 128x256 sm_90a GEMM: the fused op of gemm_epilogue.cuh (bias, SiLU, gate,
// dSiLU; fp32 or 16-bit outputs; aux_out = y), stored through TMA.
//
// Accumulator layout of m64n256k16 (as m64n128k16, 32 column groups): in warp q of the
// warpgroup, lane (g, c) holds acc[4 j + 2 h + e] = D[16 q + g + 8 h][8 j + 2 c + e], j < 32.
// TMA path (p.c_tma for c and aux_out, p.partial_tma for split-K partials): each consumer
// warpgroup walks its 64 x 256 tile in chunks of 128 bytes per row (64 16-bit or 32 fp32
// columns). Per chunk: the warpgroup's store thread waits until the buffer it is about to reuse
// has been read by its previous TMA store (bulk_wait_read), a named barrier passes that on, every
// thread computes its values and writes them with 4- or 8-byte stores at their 128B-swizzled
// place (conflict-free: the 8 rows of a store instruction land on 8 different 16-byte columns),
// fence.proxy.async, a second named barrier, and the store thread issues the TMA store(s) of the
// chunk and commits them as one bulk group. Two buffers of 8 KiB per warpgroup: c alternates
// between them (one store in flight while the next chunk is written); with aux_out, c and y take
// one each. TMA clips rows >= M and columns >= N. Split-K partials (fp32, no bias) go to
// partial[split] through a 3-d map, so a tile never spills into the next split's rows.
// Direct path (an output TMA cannot store: pitch or base not 16-byte aligned): the register
// epilogue of the 128x128 kernel, 256 columns wide.
#pragma once

#include "hopper/gemm_epilogue.cuh"
#include "hopper/gemm_wide_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {
namespace wide {

template <typename O>
__device__ __forceinline__ void put2(unsigned char* dst, float v0, float v1) {
  if constexpr (std::is_same_v<O, float>) {
    st_shared8(dst, make_float2(v0, v1));
  } else {
    st_shared4(dst, pack2<O>(v0, v1));
  }
}

// The TMA path with output element type O (T, or float for fp32 outputs and partials).
template <typename T, typename O>
__device__ __forceinline__ void store_chunks(const Params& p, const OutMaps& maps, const float (&acc)[128],
                                             const Unit& w, int cw, int warp, int lane, unsigned char* bufs,
                                             int& step, bool issuer) {
  constexpr int kCols = 128 / int(sizeof(O));  // columns per chunk
  constexpr int kJ = kCols / 8;                // accumulator column groups per chunk
  const bool split = p.splits > 1;
  const bool aux = !split && p.aux_out != nullptr;
  const T* bias = split ? nullptr : static_cast<const T*>(p.bias);
  const int g = lane >> 2, c = lane & 3, bar = 1 + cw;
  const int row0 = w.m0 + 64 * cw;
#pragma unroll
  for (int ch = 0; ch < kBN / kCols; ++ch) {
    if (issuer) {
      if (aux) {
        bulk_wait_read<0>();
      } else {
        bulk_wait_read<1>();
      }
    }
    named_bar_sync(bar, kWarpGroup);
    unsigned char* buf_c = bufs + (aux ? 0 : (step & 1)) * kOutChunkBytes;
    unsigned char* buf_y = bufs + kOutChunkBytes;
#pragma unroll
    for (int jj = 0; jj < kJ; ++jj) {
      const int col = w.n0 + ch * kCols + 8 * jj + 2 * c;
      const bool two = col + 1 < p.N;
      float b0 = 0.f, b1 = 0.f;
      if (bias && col < p.N) load2(bias + col, b0, b1, two, p.pair_ok);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = 16 * warp + g + 8 * h, row = row0 + lr;
        const int i = 4 * (ch * kJ + jj) + 2 * h + DJEPA_FAULT_VALUE(kPlantFragment, 0, 1);
        const float y0 = acc[i & 127] + b0, y1 = acc[(i + 1) & 127] + b1;
        float o0 = y0, o1 = y1;
        if (!split && row < p.M && col < p.N) fused_op<T>(p, row, col, y0, y1, two, o0, o1);
        const uint32_t off = swizzle_offset(kSwizzle128, uint32_t(lr * 128 + (8 * jj + 2 * c) * int(sizeof(O))));
        put2<O>(buf_c + off, o0, o1);
        if (aux) put2<O>(buf_y + off, y0, y1);
      }
    }
    DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    named_bar_sync(bar, kWarpGroup);
    if (issuer) {
      const int col0 = w.n0 + ch * kCols;
      if (split) {
        tma_store_3d(&maps.partial, buf_c, col0, row0, w.split);
      } else {
        tma_store_2d(&maps.c, buf_c, col0, row0);
        if (aux) tma_store_2d(&maps.aux, buf_y, col0, row0);
      }
      bulk_commit();
    }
    ++step;
  }
}

template <typename T>
__device__ __forceinline__ void epilogue(const Params& p, const OutMaps& maps, const float (&acc)[128], const Unit& w,
                                         int cw, int warp, int lane, unsigned char* bufs, int& step, bool issuer) {
  if (p.splits > 1 ? p.partial_tma : p.c_tma) {
    if (p.splits > 1 || (p.epilogue & kEpF32)) {
      store_chunks<T, float>(p, maps, acc, w, cw, warp, lane, bufs, step, issuer);
    } else {
      store_chunks<T, T>(p, maps, acc, w, cw, warp, lane, bufs, step, issuer);
    }
  } else {
    gemm::store_pairs<T>(p, acc, w, cw, warp, lane);  // the direct path
  }
}

}  // namespace wide
}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
