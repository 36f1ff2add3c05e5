// Consumer stage of the sm_90a attention forward: one warpgroup's 64 query rows of one work item.
//
// Per key tile (kBN = 128 compacted keys): S = Q K^T as D / 16 wgmma.m64n128k16 (both operands
// K-major: d contiguous), the online softmax on the accumulators (attn_softmax.cuh), then
// O += P V with P from registers: per 16-key step one wgmma_rs per head-dim chunk (n64, and
// n16 / n32 / n64 for d 64..D-1), V N-major (d contiguous in smem, the wgmma transposes it).
//
// Descriptors, chunk ch of span sp = 2 * width bytes (Chunks<D>):
//   Q (A, K-major): start = Q + region + 64 cw rows * sp + 32 kk, SBO = 8 sp.
//   K (B, K-major): start = K + region + 32 kk,                   SBO = 8 sp.
//   V (B, N-major): start = V + region + 16 keys * sp * kk,        SBO = 8 sp (next 8 keys);
//                   one N block per instruction (N = the chunk width = the swizzle atom).
#pragma once

#include "hopper/attn_config.cuh"
#include "hopper/attn_softmax.cuh"

namespace djepa {
namespace hopper {
namespace attn {

template <int D>
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t tile, int rows, int ch, int row0, int kk) {
  using C = Chunks<D>;
  const int mode = DJEPA_FAULT_VALUE(kPlantSwizzle, C::mode(ch), kSwizzle64);
  const uint32_t sbo = DJEPA_FAULT_VALUE(kPlantStride, 8 * C::span(ch), 4 * C::span(ch));
  return make_desc(tile + C::region(ch, rows) + row0 * C::span(ch) + 32 * kk, 16, sbo, mode);
}

template <int D>
__device__ __forceinline__ uint64_t nmajor_desc(uint32_t tile, int rows, int ch, int k0) {
  using C = Chunks<D>;
  return make_desc(tile + C::region(ch, rows) + k0 * C::span(ch), rows * C::span(ch), 8 * C::span(ch), C::mode(ch));
}

// Accumulators of one warpgroup's O rows: o0 = d 0..63, o1 = d 64..D-1.
template <int D>
struct OAcc {
  static constexpr int kW1 = Chunks<D>::kW1;
  float o0[32];
  float o1[kW1 > 0 ? kW1 / 2 : 2];
};

template <typename T, int D>
__device__ __forceinline__ void fwd_tiles(const Params& p, OAcc<D>& acc, Softmax& sm, int count, uint32_t sq,
                                          unsigned char* stages, uint64_t* k_full, uint64_t* v_full,
                                          uint64_t* kv_empty, int& stage, uint32_t& phase, int cw, int lane,
                                          bool first_item) {
  using C = Chunks<D>;
  constexpr int W1 = C::kW1;
  const int c = lane & 3;
  const int n_tiles = (count + kBN - 1) / kBN;
  for (int t = 0; t < n_tiles; ++t) {
    unsigned char* kt = stages + stage * 2 * C::kKVBytes;
    const uint32_t ks = smem_u32(kt), vs = ks + C::kKVBytes;
    DJEPA_FAULT_SKIP(kPlantWait, first_item && t == 0) mbar_wait(&k_full[stage], phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();

    float s[kBN / 2];
    wgmma_fence();
#pragma unroll
    for (int ch = 0; ch < C::kN; ++ch)
#pragma unroll
      for (int kk = 0; kk < C::width(ch) / 16; ++kk)
        wgmma_ss<T, kBN, 0, 0>(s, kmajor_desc<D>(sq, kBM, ch, 64 * cw, kk), kmajor_desc<D>(ks, kBN, ch, 0, kk),
                               ch > 0 || kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);

    float alpha[2];
    sm.step<kBN>(s, count - t * kBN, p.scale_log2, alpha, c);
#pragma unroll
    for (int i = 0; i < 32; ++i) acc.o0[i] *= alpha[(i >> 1) & 1];
    if constexpr (W1 > 0) {
#pragma unroll
      for (int i = 0; i < W1 / 2; ++i) acc.o1[i] *= alpha[(i >> 1) & 1];
    }

    // P as register-A fragments, all converted before the fence so no wgmma waits on them.
    uint32_t pa[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) to_a_frag<T>(pa[kk], &s[8 * kk]);
    mbar_wait(&v_full[stage], phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      wgmma_rs<T, 64, 1>(acc.o0, pa[kk], nmajor_desc<D>(vs, kBN, 0, 16 * kk), 1);
      if constexpr (W1 > 0) wgmma_rs<T, (W1 > 0 ? W1 : 64), 1>(acc.o1, pa[kk], nmajor_desc<D>(vs, kBN, 1, 16 * kk), 1);
    }
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_regs(acc.o0);
    fence_regs(acc.o1);
    if (lane == 0) mbar_arrive(&kv_empty[stage]);
    if (++stage == C::kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// o = O / l and lse = ln(sum exp) per row; zeros for rows without a visible key.
template <typename T, int D>
__device__ __forceinline__ void fwd_epilogue(const Params& p, const Item& it, const OAcc<D>& acc, const Softmax& sm,
                                             int cw, int warp, int lane) {
  constexpr int W1 = Chunks<D>::kW1;
  const int g = lane >> 2, c = lane & 3;
  const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
  T* ob = static_cast<T*>(p.o);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(sm.l[h]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? sm.m[h] * kLn2 + logf(l) : 0.f;
    const int row = it.m0 + 64 * cw + 16 * warp + g + 8 * h;
    if (row >= p.Nq) continue;
    T* orow = ob + (row_base + row) * D;
    const int fx = DJEPA_FAULT_VALUE(kPlantFragment, 0, 1);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int i = 4 * j + 2 * h;
      *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * c) =
          pack2<T>(acc.o0[(i + fx) & 31] * inv, acc.o0[(i + 1 + fx) & 31] * inv);
    }
    if constexpr (W1 > 0) {
#pragma unroll
      for (int j = 0; j < W1 / 8; ++j) {
        const int i = 4 * j + 2 * h;
        *reinterpret_cast<uint32_t*>(orow + 64 + 8 * j + 2 * c) = pack2<T>(acc.o1[i] * inv, acc.o1[i + 1] * inv);
      }
    }
    if (c == 0) p.lse[row_base + row] = lse;
  }
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
