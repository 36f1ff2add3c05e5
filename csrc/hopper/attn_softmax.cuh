// Online softmax on wgmma accumulator fragments (the forward), and the accumulator -> register-A
// conversion that keeps P in registers between the two matmuls.
//
// m64nNk16 accumulator fragment (PTX ISA): thread (warp q, lane = 4 g + c) holds s[4 j + 2 h + e]
// = S[16 q + g + 8 h][8 j + 2 c + e], so each thread owns two rows (h = 0, 1) and the four threads
// of a quad (same g) share them: row reductions are two xor-shuffles (1, 2).
// The m64k16 A fragment (same layout as mma.m16n8k16's A) of key columns 16 kk .. 16 kk + 15 is
// exactly accumulator entries 8 kk .. 8 kk + 7: a0 = (s0, s1), a1 = (s2, s3), a2 = (s4, s5),
// a3 = (s6, s7).
#pragma once

#include "hopper/attn_config.cuh"

namespace djepa {
namespace hopper {
namespace attn {

template <typename T>
__device__ __forceinline__ void to_a_frag(uint32_t (&a)[4], const float* s8) {
  a[0] = pack2<T>(s8[0], s8[1]);
  a[1] = pack2<T>(s8[2], s8[3]);
  a[2] = pack2<T>(s8[4], s8[5]);
  a[3] = pack2<T>(s8[6], s8[7]);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

// Running max (base-2, scaled units) and this thread's share of the running sum for its two rows.
struct Softmax {
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};

  // s: one key tile's scores (kBN / 2 per thread). Keys at tile columns >= valid are masked.
  // Turns s into unnormalised probabilities and returns the factors alpha[h] the output rows
  // must be rescaled by.
  template <int N>
  __device__ __forceinline__ void step(float (&s)[N / 2], int valid, float scale_log2, float (&alpha)[2], int c) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const int col = 8 * (i >> 2) + 2 * c + (i & 1);
      s[i] = col < valid ? s[i] * scale_log2 : -INFINITY;
      mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
    }
    float ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mnew = fmaxf(m[h], quad_max(mx[h]));
      // Every tile processed has a visible key, so mnew is finite; the guard keeps ex2 away
      // from (-inf) - (-inf) regardless.
      ref[h] = mnew == -INFINITY ? 0.f : mnew;
      alpha[h] = ex2(m[h] - ref[h]);
      m[h] = mnew;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const int h = (i >> 1) & 1;
      s[i] = ex2(s[i] - ref[h]);
      l[h] += s[i];
    }
  }
};

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
