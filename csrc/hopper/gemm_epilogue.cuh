// Epilogue stage of the sm_90a GEMM, straight from the accumulators, and the split-K reduction.
//
// Accumulator layout of m64n128k16 (PTX ISA, wgmma .m64nNk16 D fragment): in warp q (0..3) of
// the warpgroup, lane (g, c) = (lane / 4, lane % 4) holds acc[4 j + 2 h + e] = D[16 q + g + 8 h]
// [8 j + 2 c + e] for j < 16, h, e in {0, 1}: pairs of neighbouring columns, stored two at a time.
// Fused epilogues (djepa._C.gemm): y = acc + bias; c = y | silu(y) | aux1 + aux2 * y |
// y * s (1 + pre (1 - s)) with s = sigmoid(pre), pre = aux1; aux_out = y for 1 and 2; fp32 or T.
// With split-K (splits > 1) each split writes fp32 acc to partial[split] and
// splitk_reduce_kernel sums the splits in order (deterministic), then applies the same epilogue.
#pragma once

#include "convert.cuh"
#include "hopper/gemm_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

template <typename T>
__device__ __forceinline__ void load2(const T* p, float& v0, float& v1, bool two, bool pair_ok) {
  if (two && pair_ok) {
    const Pack<T, 2> pk = *reinterpret_cast<const Pack<T, 2>*>(p);
    v0 = to_f(pk.v[0]);
    v1 = to_f(pk.v[1]);
  } else {
    v0 = to_f(p[0]);
    v1 = two ? to_f(p[1]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store2(void* base, bool f32, int64_t idx, float v0, float v1, bool two, bool pair_ok) {
  if (f32) {
    float* q = static_cast<float*>(base) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<float2*>(q) = make_float2(v0, v1);
    } else {
      q[0] = v0;
      if (two) q[1] = v1;
    }
  } else {
    T* q = static_cast<T*>(base) + idx;
    if (two && pair_ok) {
      Pack<T, 2> pk;
      pk.v[0] = from_f<T>(v0);
      pk.v[1] = from_f<T>(v1);
      *reinterpret_cast<Pack<T, 2>*>(q) = pk;
    } else {
      q[0] = from_f<T>(v0);
      if (two) q[1] = from_f<T>(v1);
    }
  }
}

// The fused op on y = (y0, y1) (bias included) at (row, col), col + 1 if `two`: c's values.
template <typename T>
__device__ __forceinline__ void fused_op(const Params& p, int row, int col, float y0, float y1, bool two, float& o0,
                                         float& o1) {
  const int ep = p.epilogue & 15;
  const int64_t idx = int64_t(row) * p.N + col;
  o0 = y0;
  o1 = y1;
  if (ep == kEpSilu) {
    o0 = y0 * sigmoid(y0);
    o1 = y1 * sigmoid(y1);
  } else if (ep == kEpGate) {
    float r0, r1;
    load2(static_cast<const T*>(p.aux1) + idx, r0, r1, two, p.pair_ok);
    const T* gr = static_cast<const T*>(p.aux2) + int64_t(row) * p.aux2_ld + col;
    const float g0 = to_f(gr[0]), g1 = two ? to_f(gr[1]) : 0.f;
    o0 = r0 + g0 * y0;
    o1 = r1 + g1 * y1;
  } else if (ep == kEpSiluBwd) {
    float q0, q1;
    load2(static_cast<const T*>(p.aux1) + idx, q0, q1, two, p.pair_ok);
    const float s0 = sigmoid(q0), s1 = sigmoid(q1);
    o0 = y0 * s0 * (1.f + q0 * (1.f - s0));
    o1 = y1 * s1 * (1.f + q1 * (1.f - s1));
  }
}

// Applies the epilogue to y = (y0, y1) (bias included) at (row, col), col + 1 if `two`, and
// stores c (and aux_out = y).
template <typename T>
__device__ __forceinline__ void finish(const Params& p, int row, int col, float y0, float y1, bool two) {
  const bool f32 = (p.epilogue & kEpF32) != 0;
  const int64_t idx = int64_t(row) * p.N + col;
  float o0, o1;
  fused_op<T>(p, row, col, y0, y1, two, o0, o1);
  store2<T>(p.c, f32, idx, o0, o1, two, p.pair_ok);
  if (p.aux_out) store2<T>(p.aux_out, f32, idx, y0, y1, two, p.pair_ok);
}

// The pair stores from the registers: consumer warpgroup cw's m64 x (2 kAcc) accumulator fragment
// (kAcc fp32 per thread; 64 for the 128x128 tile, 128 for gemm_wide's 128x256), as 4- or 8-byte
// stores of (column, column + 1) pairs, bias and the fused op applied (or split-K partials).
template <typename T, int kAcc>
__device__ __forceinline__ void store_pairs(const Params& p, const float (&acc)[kAcc], const Unit& w, int cw,
                                            int warp, int lane) {
  static_assert((kAcc & (kAcc - 1)) == 0, "the fragment index wraps with a power-of-two mask");
  const int g = lane >> 2, c = lane & 3;
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t mn = int64_t(p.M) * p.N;
#pragma unroll
  for (int j = 0; j < kAcc / 4; ++j) {
    const int col = w.n0 + 8 * j + 2 * c;
    if (col >= p.N) continue;
    const bool two = col + 1 < p.N;
    float b0 = 0.f, b1 = 0.f;
    if (bias && p.splits == 1) load2(bias + col, b0, b1, two, p.pair_ok);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = w.m0 + 64 * cw + 16 * warp + g + 8 * h;
      if (row >= p.M) continue;
      const int i = 4 * j + 2 * h + DJEPA_FAULT_VALUE(kPlantFragment, 0, 1);
      const float y0 = acc[i & (kAcc - 1)], y1 = acc[(i + 1) & (kAcc - 1)];
      if (p.splits > 1) {
        store2<T>(p.partial + w.split * mn, true, int64_t(row) * p.N + col, y0, y1, two, (p.N % 2) == 0);
      } else {
        finish<T>(p, row, col, y0 + b0, y1 + b1, two);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void epilogue(const Params& p, const float (&acc)[64], const Unit& w, int cw, int warp,
                                         int lane) {
  static_assert(kBN / 8 == 64 / 4, "a 128x128 tile's fragment holds kBN / 2 values per thread");
  store_pairs<T>(p, acc, w, cw, warp, lane);
}

// Sums the splits' fp32 partials in split order and applies the epilogue (one thread per pair).
template <typename T>
__global__ void __launch_bounds__(256) splitk_reduce_kernel(const Params p) {
  const int64_t per_row = (p.N + 1) / 2, total = int64_t(p.M) * per_row, mn = int64_t(p.M) * p.N;
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int row = int(i / per_row), col = int(i % per_row) * 2;
    const bool two = col + 1 < p.N;
    const int64_t idx = int64_t(row) * p.N + col;
    float y0 = 0.f, y1 = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      float v0, v1;
      load2(p.partial + s * mn + idx, v0, v1, two, (p.N % 2) == 0);
      y0 += v0;
      y1 += v1;
    }
    if (bias) {
      float b0, b1;
      load2(bias + col, b0, b1, two, p.pair_ok);
      y0 += b0;
      y1 += b1;
    }
    finish<T>(p, row, col, y0, y1, two);
  }
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
