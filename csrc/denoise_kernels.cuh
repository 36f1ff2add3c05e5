// Device code of the denoising-MLP kernels (csrc/denoise.cu holds the launches and bindings).
//
// DJEPA_DENOISE_EMULATE: the warp-collective primitives (cp.async, ldmatrix, mma) are left for
// an emulator to define, so tools/denoise_emulate.cpp runs these exact kernels on the CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "convert.cuh"

namespace djepa {
namespace denoise {

// ------------------------------------------------------------------------------------------
// vector access (element conversion: convert.cuh)
// ------------------------------------------------------------------------------------------
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// The LayerNorm affine parameters, or `fill` (1 for the weight, 0 for the bias) without them.
template <typename T, int VEC>
__device__ __forceinline__ void load_or_fill(const T* p, int col, float fill, float (&out)[VEC]) {
  if (p) {
    load_vec<T, VEC>(p + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = fill;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
constexpr int vec_width() {
  return 16 / int(sizeof(T));
}

inline bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

// ------------------------------------------------------------------------------------------
// LayerNorm + modulate
// ------------------------------------------------------------------------------------------
// A lane owns columns (c * 32 + lane) * VEC .. + VEC - 1 for chunks c < ceil(W / (32 VEC)).
// NC (> 0) is the compile-time bound on that chunk count (chosen >= the actual count).
constexpr int kLnWarps = 8;          // rows per block in the forward (one per warp)
constexpr int kLnBwdRows = 64;       // rows per block in the backward = partial-sum granularity
constexpr int kLnMaxChunks = 8;      // largest register-resident chunk count (NC)

// Blocks per SM (of 256 threads) the forward is compiled for, i.e. its register cap (40, 48, 64,
// 80, 128): left to itself ptxas aimed at 64 registers and spilled the cached row at NC = 4 and 6
// (W = 1024 / 1536 in 16-bit: the B and H heads) and at NC = 0 on sm_90, at NC = 2 on sm_80.
constexpr int ln_fwd_min_blocks(int nc) {
  return nc == 1 ? 6 : nc == 0 ? 5 : nc == 2 ? 4 : nc <= 4 ? 3 : 2;
}

// NC > 0: the lane's chunks are unrolled and the row (forward) or the d(ln_w), d(ln_b)
// accumulators (backward) live in registers. NC == 0: any W, runtime chunk loop, nothing cached.
template <typename T, int VEC, int NC>
__global__ void __launch_bounds__(kLnWarps * 32, ln_fwd_min_blocks(NC))
    adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ mod, const T* __restrict__ ln_w,
                     const T* __restrict__ ln_b, T* __restrict__ h, float* __restrict__ stats,
                     int M, int W, int64_t mod_ld, float eps) {
  constexpr bool kCache = NC > 0;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kLnWarps + (threadIdx.x >> 5);
  if (row >= M) return;
  const T* xr = x + row * W;
  const int nch = (W + 32 * VEC - 1) / (32 * VEC);
  const int cend = kCache ? NC : nch;
  float xc[kCache ? NC : 1][VEC];

  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < cend; ++c) {
    const int col = (c * 32 + lane) * VEC;
    if (c < nch && col < W) {
      float v[VEC];
      load_vec<T, VEC>(xr + col, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        sum += v[i];
        if constexpr (kCache) xc[c][i] = v[i];
      }
    }
  }
  const float mean = warp_sum(sum) / W;

  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < cend; ++c) {
    const int col = (c * 32 + lane) * VEC;
    if (c < nch && col < W) {
      float v[VEC];
      if constexpr (kCache) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = xc[c][i];
      } else {
        load_vec<T, VEC>(xr + col, v);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sq += (v[i] - mean) * (v[i] - mean);
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) / W + eps);

  const T* shr = mod + row * mod_ld;
  const T* scr = shr + W;
  T* hr = h + row * W;
#pragma unroll
  for (int c = 0; c < cend; ++c) {
    const int col = (c * 32 + lane) * VEC;
    if (c < nch && col < W) {
      float v[VEC], sh[VEC], sc[VEC], w[VEC], b[VEC], o[VEC];
      if constexpr (kCache) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = xc[c][i];
      } else {
        load_vec<T, VEC>(xr + col, v);
      }
      load_vec<T, VEC>(shr + col, sh);
      load_vec<T, VEC>(scr + col, sc);
      load_or_fill<T, VEC>(ln_w, col, 1.f, w);
      load_or_fill<T, VEC>(ln_b, col, 0.f, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] = ((v[i] - mean) * rstd * w[i] + b[i]) * (1.f + sc[i]) + sh[i];
      store_vec<T, VEC>(hr + col, o);
    }
  }
  if (stats && lane == 0) {
    stats[2 * row] = mean;
    stats[2 * row + 1] = rstd;
  }
}

// Backward of h = (xhat * w + b) * (1 + scale) + shift, xhat = (x - mean) * rstd.
// Block b handles rows [b * kLnBwdRows, (b + 1) * kLnBwdRows); warp k takes rows k, k + 8, ...
// of that range. d(ln_w), d(ln_b) partials of the block are summed in a fixed order (per lane
// over its rows, then warps in order through shared memory; or, when NC == 0, one thread per
// column over the block's rows), so they are bitwise reproducible.
template <typename T, int VEC, int NC>
__global__ void __launch_bounds__(kLnWarps * 32)
    adaln_bwd_kernel(const T* __restrict__ x, const T* __restrict__ mod, const T* __restrict__ ln_w,
                     const T* __restrict__ ln_b, const float* __restrict__ stats,
                     const T* __restrict__ dh, T* __restrict__ dx, T* __restrict__ dmod,
                     float* __restrict__ dw_part, float* __restrict__ db_part, int M, int W) {
  extern __shared__ float red[];  // [2][W] when NC > 0 and dw_part is set
  constexpr bool kRegAcc = NC > 0;
  constexpr int kAcc = kRegAcc ? NC : 1;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nch = (W + 32 * VEC - 1) / (32 * VEC);
  const int cend = kRegAcc ? NC : nch;
  const int64_t ld3 = 3 * int64_t(W);
  float dw_acc[kAcc][VEC], db_acc[kAcc][VEC];
#pragma unroll
  for (int c = 0; c < kAcc; ++c)
#pragma unroll
    for (int i = 0; i < VEC; ++i) dw_acc[c][i] = db_acc[c][i] = 0.f;

  const int64_t row0 = int64_t(blockIdx.x) * kLnBwdRows;
  for (int r = warp; r < kLnBwdRows; r += kLnWarps) {
    const int64_t row = row0 + r;
    if (row >= M) break;
    const float mean = stats[2 * row];
    const float rstd = stats[2 * row + 1];
    const T* xr = x + row * W;
    const T* dhr = dh + row * W;
    const T* scr = mod + row * ld3 + W;
    T* dshr = dmod + row * ld3;
    T* dscr = dshr + W;

    float s1 = 0.f, s2 = 0.f;  // sums of dxhat and dxhat * xhat over the row
#pragma unroll
    for (int c = 0; c < cend; ++c) {
      const int col = (c * 32 + lane) * VEC;
      if (c < nch && col < W) {
        float v[VEC], g[VEC], sc[VEC], w[VEC], b[VEC], dsc[VEC];
        load_vec<T, VEC>(xr + col, v);
        load_vec<T, VEC>(dhr + col, g);
        load_vec<T, VEC>(scr + col, sc);
        load_or_fill<T, VEC>(ln_w, col, 1.f, w);
        load_or_fill<T, VEC>(ln_b, col, 0.f, b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (v[i] - mean) * rstd;
          const float dn = g[i] * (1.f + sc[i]);
          dsc[i] = g[i] * (xh * w[i] + b[i]);
          if constexpr (kRegAcc) {
            dw_acc[c][i] += dn * xh;
            db_acc[c][i] += dn;
          }
          const float dxh = dn * w[i];
          s1 += dxh;
          s2 += dxh * xh;
        }
        store_vec<T, VEC>(dshr + col, g);
        store_vec<T, VEC>(dscr + col, dsc);
      }
    }
    const float m1 = warp_sum(s1) / W;
    const float m2 = warp_sum(s2) / W;
    // The second pass re-reads the row (the warp just read it, so it is in L1) instead of
    // caching it, leaving the registers to the accumulators.
#pragma unroll
    for (int c = 0; c < cend; ++c) {
      const int col = (c * 32 + lane) * VEC;
      if (c < nch && col < W) {
        float v[VEC], g[VEC], sc[VEC], w[VEC], o[VEC];
        load_vec<T, VEC>(xr + col, v);
        load_vec<T, VEC>(dhr + col, g);
        load_vec<T, VEC>(scr + col, sc);
        load_or_fill<T, VEC>(ln_w, col, 1.f, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (v[i] - mean) * rstd;
          const float dxh = g[i] * (1.f + sc[i]) * w[i];
          o[i] = rstd * (dxh - m1 - xh * m2);
        }
        store_vec<T, VEC>(dx + row * W + col, o);
      }
    }
  }

  if (dw_part == nullptr) return;  // uniform over the block
  float* dwr = dw_part + int64_t(blockIdx.x) * W;
  float* dbr = db_part ? db_part + int64_t(blockIdx.x) * W : nullptr;
  if constexpr (kRegAcc) {
    for (int k = 0; k < kLnWarps; ++k) {
      if (warp == k) {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int col = (c * 32 + lane) * VEC;
          if (c < nch && col < W) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              red[col + i] = (k == 0 ? 0.f : red[col + i]) + dw_acc[c][i];
              red[W + col + i] = (k == 0 ? 0.f : red[W + col + i]) + db_acc[c][i];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int col = threadIdx.x; col < W; col += blockDim.x) {
      dwr[col] = red[col];
      if (dbr) dbr[col] = red[W + col];
    }
  } else {
    const int64_t rend = min(int64_t(M), row0 + kLnBwdRows);
    for (int col = threadIdx.x; col < W; col += blockDim.x) {
      float sw = 0.f, sb = 0.f;
      for (int64_t row = row0; row < rend; ++row) {
        const float xh = (to_f(x[row * W + col]) - stats[2 * row]) * stats[2 * row + 1];
        const float dn = to_f(dh[row * W + col]) * (1.f + to_f(mod[row * ld3 + W + col]));
        sw += dn * xh;
        sb += dn;
      }
      dwr[col] = sw;
      if (dbr) dbr[col] = sb;
    }
  }
}

// ------------------------------------------------------------------------------------------
// GEMM
// ------------------------------------------------------------------------------------------
constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kGemmThreads = 256;
constexpr int kTileElems = kBM * kBK;  // = kBN * kBK: one operand tile of one stage
constexpr int kGemmSmem = kStages * 2 * kTileElems * 2;  // bytes (16-bit elements)
static_assert(kBM == kBN, "one tile loader serves both operands");

enum Epilogue : int { kEpNone = 0, kEpSilu = 1, kEpGate = 2, kEpSiluBwd = 3, kEpF32 = 16 };

struct GemmParams {
  const void* a;
  const void* b;
  void* c;
  const void* bias;
  const void* aux1;
  const void* aux2;
  void* aux_out;
  int M, N, K;
  int64_t aux2_ld;
  int epilogue;
  bool a_fast, b_fast;  // cp.async path allowed for the operand
  bool pair_ok;         // c / aux_out / aux1 may be accessed two elements at a time
  // Split-K (float32 output, no epilogue, no bias: the weight gradients): block z sums k-tiles
  // [z * ktiles_per_split, (z + 1) * ktiles_per_split) into c (z = 0) or workspace[z - 1]
  // ([M, N] float32 each); splitk_reduce_kernel then adds the workspace into c in order.
  int splits;
  int ktiles_per_split;
  float* workspace;
};

#ifndef DJEPA_DENOISE_EMULATE
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// The "memory" clobbers keep the compiler from moving shared-memory reads and writes across
// the copy, the wait and the fragment loads (it cannot see that the asm touches shared memory).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif  // DJEPA_DENOISE_EMULATE


// Shared-memory tile layouts (elements), both 4096 elements, 16-byte chunks XOR-swizzled so that
// the 8 rows one ldmatrix phase reads fall into 8 distinct bank groups:
//   K-major  [128 rows (m or n)][32 k]: 64-byte rows, chunk c (0..3) of row r at c ^ ((r>>1)&3);
//   MN-major [32 k][128 (m or n)]:     256-byte rows, chunk c (0..15) of row r at c ^ (r&7).
__device__ __forceinline__ int off_kmajor(int r, int k) {
  return r * kBK + ((((k >> 3) ^ ((r >> 1) & 3))) << 3);
}
__device__ __forceinline__ int off_mnmajor(int k, int x) {
  return k * kBM + ((((x >> 3) ^ (k & 7))) << 3);
}

// Loads one operand tile: rows [row0, row0 + 128) of the M (or N) extent `rows`, k in
// [k0, k0 + 32) of K. Out-of-range elements become zero.
template <typename T, bool KMAJOR>
__device__ __forceinline__ void load_tile(T* s, const T* g, int rows, int K, int row0, int k0,
                                          bool fast, int tid) {
#pragma unroll
  for (int i = 0; i < (kTileElems / 8) / kGemmThreads; ++i) {
    const int q = tid + i * kGemmThreads;
    T* dst;
    const T* src;
    int valid;  // elements of this 8-element chunk inside the matrix
    if constexpr (KMAJOR) {
      const int r = q >> 2, c = q & 3;
      const int grow = row0 + r, gk = k0 + c * 8;
      dst = s + off_kmajor(r, c * 8);
      src = g + int64_t(grow) * K + gk;
      valid = grow < rows ? min(max(K - gk, 0), 8) : 0;
    } else {
      const int r = q >> 4, c = q & 15;
      const int gk = k0 + r, gcol = row0 + c * 8;
      dst = s + off_mnmajor(r, c * 8);
      src = g + int64_t(gk) * rows + gcol;
      valid = gk < K ? min(max(rows - gcol, 0), 8) : 0;
    }
    if (fast) {
      cp_async16(dst, valid > 0 ? src : g, valid * int(sizeof(T)));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = e < valid ? src[e] : from_f<T>(0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(void* base, bool f32, int64_t idx, float v0, float v1,
                                           bool two, bool pair_ok) {
  if (f32) {
    float* p = static_cast<float*>(base) + idx;
    if (two && pair_ok) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
      p[0] = v0;
      if (two) p[1] = v1;
    }
  } else {
    T* p = static_cast<T*>(base) + idx;
    if (two && pair_ok) {
      Pack<T, 2> pk;
      pk.v[0] = from_f<T>(v0);
      pk.v[1] = from_f<T>(v1);
      *reinterpret_cast<Pack<T, 2>*>(p) = pk;
    } else {
      p[0] = from_f<T>(v0);
      if (two) p[1] = from_f<T>(v1);
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_pair(const T* p, float& v0, float& v1, bool two, bool pair_ok) {
  if (two && pair_ok) {
    Pack<T, 2> pk = *reinterpret_cast<const Pack<T, 2>*>(p);
    v0 = to_f(pk.v[0]);
    v1 = to_f(pk.v[1]);
  } else {
    v0 = to_f(p[0]);
    v1 = two ? to_f(p[1]) : 0.f;
  }
}

__device__ __forceinline__ float sigmoidf_(float v) { return 1.f / (1.f + __expf(-v)); }

// A_K: A stored [M, K] (a_trans = 0); otherwise [K, M]. B_K: B stored [N, K] (b_trans = 1);
// otherwise [K, N]. Block tile 128x128, warp (wm, wn) = (warp & 1, warp >> 1) owns a 64x32 tile.
template <typename T, bool A_K, bool B_K>
__global__ void __launch_bounds__(kGemmThreads, 2) gemm_kernel(const GemmParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 1, wn = warp >> 1;
  const int bm0 = blockIdx.y * kBM, bn0 = blockIdx.x * kBN;
  const T* A = static_cast<const T*>(p.a);
  const T* B = static_cast<const T*>(p.b);
  const int M = p.M, N = p.N, K = p.K;

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // This block's k-tiles: all of them, or its split's share.
  const int kt_all = (K + kBK - 1) / kBK;
  const int kt0 = p.splits > 1 ? blockIdx.z * p.ktiles_per_split : 0;
  const int ktiles = p.splits > 1 ? min(kt_all - kt0, p.ktiles_per_split) : kt_all;
  auto load_stage = [&](int stage, int kt) {
    T* sA = smem + stage * 2 * kTileElems;
    load_tile<T, A_K>(sA, A, M, K, bm0, (kt0 + kt) * kBK, p.a_fast, tid);
    load_tile<T, B_K>(sA + kTileElems, B, N, K, bn0, (kt0 + kt) * kBK, p.b_fast, tid);
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    // Makes tile kt visible to all warps and guarantees every warp is done with tile kt - 1,
    // whose stage the load below overwrites.
    __syncthreads();
    const int nk = kt + kStages - 1;
    if (nk < ktiles) load_stage(nk % kStages, nk);
    cp_async_commit();

    const T* sA = smem + (kt % kStages) * 2 * kTileElems;
    const T* sB = sA + kTileElems;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int m0 = wm * 64 + mi * 16;
        if constexpr (A_K) {
          const int r = m0 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int k = kk + (lane >> 4) * 8;
          ldmatrix_x4<false>(af[mi], sA + off_kmajor(r, k));
        } else {
          const int k = kk + (lane & 7) + (lane >> 4) * 8;
          const int m = m0 + ((lane >> 3) & 1) * 8;
          ldmatrix_x4<true>(af[mi], sA + off_mnmajor(k, m));
        }
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int n0 = wn * 32 + nj * 16;
        unsigned r[4];
        if constexpr (B_K) {
          const int n = n0 + (lane & 7) + (lane >> 4) * 8;
          const int k = kk + ((lane >> 3) & 1) * 8;
          ldmatrix_x4<false>(r, sB + off_kmajor(n, k));
        } else {
          const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int n = n0 + (lane >> 4) * 8;
          ldmatrix_x4<true>(r, sB + off_mnmajor(k, n));
        }
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
  }

  // Epilogue straight from the accumulators: thread (g, t) = (lane >> 2, lane & 3) holds rows
  // g and g + 8 and columns 2t, 2t + 1 of each 16x8 tile.
  const int ep = p.epilogue & 15;
  const bool f32 = (p.epilogue & kEpF32) != 0;
  void* out = blockIdx.z == 0 ? p.c : p.workspace + int64_t(blockIdx.z - 1) * M * N;
  const T* bias = static_cast<const T*>(p.bias);
  const T* aux1 = static_cast<const T*>(p.aux1);
  const T* aux2 = static_cast<const T*>(p.aux2);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int col = bn0 + wn * 32 + ni * 8 + 2 * t;
    if (col >= N) continue;
    const bool two = col + 1 < N;
    float b0 = 0.f, b1 = 0.f;
    if (bias) load_pair(bias + col, b0, b1, two, p.pair_ok);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = bm0 + wm * 64 + mi * 16 + g + hf * 8;
        if (row >= M) continue;
        const int64_t idx = int64_t(row) * N + col;
        const float y0 = acc[mi][ni][2 * hf] + b0;
        const float y1 = acc[mi][ni][2 * hf + 1] + b1;
        float o0 = y0, o1 = y1;
        if (ep == kEpSilu) {
          o0 = y0 * sigmoidf_(y0);
          o1 = y1 * sigmoidf_(y1);
        } else if (ep == kEpGate) {
          float r0, r1;
          load_pair(aux1 + idx, r0, r1, two, p.pair_ok);
          const T* gr = aux2 + int64_t(row) * p.aux2_ld + col;
          const float g0 = to_f(gr[0]);
          const float g1 = two ? to_f(gr[1]) : 0.f;
          o0 = r0 + g0 * y0;
          o1 = r1 + g1 * y1;
        } else if (ep == kEpSiluBwd) {
          float p0, p1;
          load_pair(aux1 + idx, p0, p1, two, p.pair_ok);
          const float s0 = sigmoidf_(p0), s1 = sigmoidf_(p1);
          o0 = y0 * s0 * (1.f + p0 * (1.f - s0));
          o1 = y1 * s1 * (1.f + p1 * (1.f - s1));
        }
        store_pair<T>(out, f32, idx, o0, o1, two, p.pair_ok);
        if (p.aux_out) store_pair<T>(p.aux_out, f32, idx, y0, y1, two, p.pair_ok);
      }
    }
  }
}

// Split-K only where it cannot change the result's rounding order across runs and pays: a
// float32 output with no epilogue and no bias (the weight gradients dW = dY^T X, whose M = N =
// W tiles are few, e.g. 64 at W = 1024, against K = tokens), and fewer output tiles than the
// GPU has block slots (2 per SM: __launch_bounds__(kGemmThreads, 2)). Each split keeps >= 8
// k-tiles (256 of K) so the pipeline stays full; the split count fills at most one wave.
inline int split_k_for(int64_t M, int64_t N, int64_t K, int epilogue, bool has_bias, int sms) {
  if (epilogue != kEpF32 || has_bias || M <= 0 || N <= 0 || K <= 0 || sms <= 0) return 1;
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  const int64_t slots = 2 * int64_t(sms);
  const int64_t ktiles = (K + kBK - 1) / kBK;
  int64_t splits = std::min<int64_t>({slots / tiles, ktiles / 8, 16});
  if (splits <= 1) return 1;
  const int64_t per = (ktiles + splits - 1) / splits;
  return int((ktiles + per - 1) / per);  // no empty split
}

// c[i] += workspace[0][i] + workspace[1][i] + ... (parts [n] float32 slices, fixed order: the
// split-K result is the same bits on every run).
__global__ void __launch_bounds__(256) splitk_reduce_kernel(float* __restrict__ c,
                                                            const float* __restrict__ ws,
                                                            int64_t n, int parts, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec) {  // c and ws 16-byte aligned, n % 4 == 0 (so is every slice)
    const int64_t n4 = n / 4;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
      float4 acc = reinterpret_cast<const float4*>(c)[i];
      for (int s = 0; s < parts; ++s) {
        const float4 w = reinterpret_cast<const float4*>(ws + int64_t(s) * n)[i];
        acc.x += w.x;
        acc.y += w.y;
        acc.z += w.z;
        acc.w += w.w;
      }
      reinterpret_cast<float4*>(c)[i] = acc;
    }
    return;
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float acc = c[i];
    for (int s = 0; s < parts; ++s) acc += ws[int64_t(s) * n + i];
    c[i] = acc;
  }
}

// ------------------------------------------------------------------------------------------
// denoise_update
// ------------------------------------------------------------------------------------------
struct UpdateParams {
  const float* x;
  const void* model_out;
  const float* noise;
  float* out;
  void* xin_out;
  int64_t B, ld;
  int C;
  bool cfg;
  const float* cfg_scale;  // on the device: a CUDA graph of the sampler reads it at each replay
  float coef_x, coef_eps, min_log, max_log, noise_scale;
};

template <typename T>
__global__ void denoise_update_kernel(const UpdateParams p) {
  const T* mo = static_cast<const T*>(p.model_out);
  T* xin = static_cast<T*>(p.xin_out);
  const int64_t total = p.B * p.C;
  const float cfg_scale = p.cfg ? *p.cfg_scale : 1.f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.C;
    const int64_t j = i - r * p.C;
    float e = to_f(mo[r * p.ld + j]);
    if (p.cfg) {
      const float u = to_f(mo[(r + p.B) * p.ld + j]);
      e = u + cfg_scale * (e - u);
    }
    const float frac = (to_f(mo[r * p.ld + p.C + j]) + 1.f) * 0.5f;
    const float logvar = frac * p.max_log + (1.f - frac) * p.min_log;
    float o = p.coef_x * p.x[i] - p.coef_eps * e;
    if (p.noise_scale != 0.f) o += expf(0.5f * logvar) * p.noise_scale * p.noise[i];
    p.out[i] = o;
    if (xin) {
      const T v = from_f<T>(o);
      xin[i] = v;
      if (p.cfg) xin[i + p.B * p.C] = v;
    }
  }
}

}  // namespace denoise
}  // namespace djepa
