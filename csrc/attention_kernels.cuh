// Device side of csrc/attention.cu: tile helpers and the four kernels (see the comment at
// the top of attention.cu for the algorithm and the mma fragment layouts).
//
// DJEPA_ATTN_EMULATE: the few warp-collective primitives below (cp.async, ldmatrix, mma) are
// left for an emulator to define, so tools/attention_emulate.cpp can run these exact kernels
// on the CPU, one std::thread per CUDA thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace djepa {
namespace attention {

constexpr int kThreads = 128;  // 4 warps, each owning 16 rows of a 64-row tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* o;            // fwd: output; bwd: input
  const void* dout;   // bwd only, contiguous [B, H, Nq, D]
  float* lse;         // fwd: output; bwd: input; [B, H, Nq]
  float* delta;       // bwd workspace [B, H, Nq]
  void* dq;
  void* dk;
  void* dv;
  const int* kv_index;  // [B, Nk] or nullptr (dense)
  const int* kv_count;  // [B] or nullptr (dense)
  int B, H, Nq, Nk;
  long long qs[3], ks[3], vs[3];  // (batch, head, token) element strides
  float scale;
  float scale_log2;  // scale * log2(e): softmax runs in base 2
  bool vec_ok;       // every tile source is 16-byte aligned (rows can be copied with cp.async)
  // Dropout (the kDropout kernels): the keep rule of djepa/ops/attention.py.
  const long long* philox;    // device [2]: Philox seed (key), offset (counter word 3)
  unsigned drop_threshold;    // a probability is kept when its 16-bit Philox value >= this
  float keep_scale;           // 1 / (1 - p)
  unsigned char* keep_out;    // debug: the forward's keep bits [B, H, Nq, Nk] over compacted key
                              // positions (nullptr: none)
};

// ---------------------------------------------------------------------------------------------
// Small device helpers

#ifndef DJEPA_ATTN_EMULATE
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst_smem, const void* src_global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst_smem)),
               "l"(src_global)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l addresses row (l & 7) of matrix (l >> 3); register i of
// lane (g, c) receives M_i[g][2c..2c+1].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// Same, transposed: register i of lane (g, c) receives M_i[2c][g] and M_i[2c+1][g].
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// 2^x with subnormal results flushed to zero (MUFU.EX2 without the denormal fix-up of exp2f).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif  // DJEPA_ATTN_EMULATE

// Two floats -> one register of two T (the first in the low half, as mma expects).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// A fragment (16 rows x 16 cols) from a row-major smem tile with row stride S elements.
template <int S, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0,
                                       int lane) {
  ldmatrix_x4(a, tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + col0 + (lane >> 4) * 8);
}

// B fragments of two neighbouring n-tiles for acc += A * tile^T: tile rows n0 .. n0+15 are the
// n index, columns k0 .. k0+15 the k index. b[0], b[1] serve rows n0..n0+7; b[2], b[3] the rest.
template <int S, typename T>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], const T* tile, int n0, int k0,
                                            int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * S + k0 + ((lane >> 3) & 1) * 8);
}

// Two C tiles (16 x 8 each, columns 16*kk .. 16*kk+15) converted to one A fragment.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                       const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// acc[16 x N] += A[16 x 16(rows of B)] * B where B = tile[k0 .. k0+15][0 .. D-1] (row-major
// smem, row stride S), i.e. the B fragments come from transposed ldmatrix loads.
template <typename T, int D, int S>
__device__ __forceinline__ void mma_a_by_rows(float (&acc)[D / 8][4], const uint32_t (&a)[4],
                                              const T* tile, int k0, int lane) {
  const T* base = tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, base + dn * 16);
    mma16816<T>(acc[2 * dn], a, b[0], b[1]);
    mma16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
  }
}

// acc[16 x N] += A[16 x D] * tile^T where A = a_tile rows row0.. (smem) and tile holds N rows
// of D elements (each n-tile of 8 rows of `tile` is one B operand).
template <typename T, int D, int S, int N>
__device__ __forceinline__ void mma_rows_by_rows_t(float (&acc)[N / 8][4], const T* a_tile,
                                                   int row0, const T* tile, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    load_a<S>(a, a_tile, row0, ks * 16, lane);
#pragma unroll
    for (int j = 0; j < N / 8; j += 2) {
      uint32_t b[4];
      load_b_pair<S>(b, tile, j * 8, ks * 16, lane);
      mma16816<T>(acc[j], a, b[0], b[1]);
      mma16816<T>(acc[j + 1], a, b[2], b[3]);
    }
  }
}

// Copies ROWS rows of D elements into smem (row stride D + 8): tile row r is row row_of(r) of
// `base` (row stride stride_n elements), or zeros where row_of(r) < 0. Every thread issues a
// fixed set of 16-byte copies (cp.async when vec_ok, else scalar loads). Not unrolled: the loads
// are issued while a tile's scores and accumulators are live, and unrolling cost the forward
// 8-40 registers (nvcc 13, sm_90a); row_of is a shared-memory read, not a global one.
template <typename T, int D, int ROWS, typename RowOf>
__device__ __forceinline__ void copy_rows(T* tile, const T* base, long long stride_n, bool vec_ok,
                                          RowOf row_of) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int S = D + 8;
  constexpr int kTotal = ROWS * kChunks;
  constexpr int kIters = (kTotal + kThreads - 1) / kThreads;
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int i = threadIdx.x + it * kThreads;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int r = i / kChunks;
      const int col = (i % kChunks) * 8;
      const long long n = row_of(r);
      T* dst = tile + r * S + col;
      if (n >= 0) {
        const T* src = base + n * stride_n + col;
        if (vec_ok) {
          cp_async16(dst, src);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = src[e];
        }
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
}

// Rows row0 .. row0 + ROWS - 1 of a row-contiguous sequence (Q, dO); rows >= limit are zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* tile, const T* base, long long stride_n, int row0,
                                          int limit, bool vec_ok) {
  copy_rows<T, D, ROWS>(tile, base, stride_n, vec_ok,
                        [&](int r) { return row0 + r < limit ? (long long)(row0 + r) : -1LL; });
}

// K/V tile rows at token positions pos[r] (shared memory; -1 = zeros), resolved once per tile.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_gathered(T* tile, const T* base, long long stride_n,
                                              const int* pos, bool vec_ok) {
  copy_rows<T, D, ROWS>(tile, base, stride_n, vec_ok, [&](int r) { return (long long)pos[r]; });
}

// Thread r < ROWS: the token position of row r of the key tile starting at compacted row row0
// (kv_index[row0 + r], or row0 + r when dense), -1 past the visible keys. Threads load it one
// tile ahead into a register and store it to shared memory a tile later, so the gather never
// waits on an index load.
template <int ROWS>
__device__ __forceinline__ int key_position(const int* index, int row0, int count) {
  static_assert(ROWS <= kThreads, "one thread per tile row");
  const int j = row0 + static_cast<int>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) >= ROWS || j >= count) return -1;
  return index ? __ldg(index + j) : j;
}

// ---------------------------------------------------------------------------------------------
// Dropout: Philox-4x32-10 (Salmon et al. 2011, as curand and Triton compute it), one call per 8
// probabilities. For query i and compacted key j of head row bh, the counter is (i & ~8, j & ~9,
// bh, offset) and the value is half (j >> 3) & 1 of word ((i >> 3) & 1) + 2 (j & 1): a call
// covers queries {i, i + 8} x keys {j, j + 1, j + 8, j + 9}, the 8 probabilities one lane holds
// of a 16 x 16 block of m16n8k16 accumulators (rows i, i + 8; columns 2c, 2c + 1 of two n-tiles).

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// The seed and offset are read again (an L1 hit) for every call rather than held in registers
// for the whole kernel: the forward at D = 128 has none to spare.
struct Dropout {
  const long long* state;  // Params::philox: seed (key), offset (counter word 3)
  uint32_t bh;             // counter word 2: b * H + h
};

__device__ __forceinline__ Dropout dropout_state(const Params& p, int b, int h) {
  return {p.philox, static_cast<uint32_t>(b * p.H + h)};
}

// The 4 words of the call for queries {query, query + 8} and keys {key0, key0 + 1, key0 + 8,
// key0 + 9}: w[0] = (query; key0 | key0 + 8), w[1] = (query + 8; same keys), w[2] = (query;
// key0 + 1 | key0 + 9), w[3] = (query + 8; key0 + 1 | key0 + 9), low half | high half.
__device__ __forceinline__ void philox_words(uint32_t (&w)[4], const Dropout& d, int query, int key0) {
  const unsigned long long seed = static_cast<unsigned long long>(__ldg(d.state));
  uint32_t c0 = static_cast<uint32_t>(query), c1 = static_cast<uint32_t>(key0), c2 = d.bh;
  uint32_t c3 = static_cast<uint32_t>(__ldg(d.state + 1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;  // mul.wide.u32
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(p1);
    c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(p0);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

__device__ __forceinline__ bool kept(uint32_t word, int half, unsigned threshold) {
  return (half ? word >> 16 : word & 0xFFFFu) >= threshold;
}

// Row layout (forward, dq): a lane's accumulators lo = tile 2t, hi = tile 2t + 1 of rows
// query, query + 8 (element e: row + 8 (e >> 1), column 2c + (e & 1)); the dropped ones are
// zeroed; returns the 8 keep bits (bit 4 half + e) for the debug output.
__device__ __forceinline__ unsigned drop_rows(float (&lo)[4], float (&hi)[4], const Dropout& d,
                                              unsigned threshold, int query, int key0) {
  uint32_t w[4];
  philox_words(w, d, query, key0);
  unsigned bits = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint32_t word = w[(e >> 1) + 2 * (e & 1)];
    const bool k_lo = kept(word, 0, threshold), k_hi = kept(word, 1, threshold);
    lo[e] = k_lo ? lo[e] : 0.f;
    hi[e] = k_hi ? hi[e] : 0.f;
    bits |= (unsigned(k_lo) << e) | (unsigned(k_hi) << (4 + e));
  }
  return bits;
}

// Lane-to-lane exchange of 32 bits (shfl.bfly); an emulator defines its own.
#ifndef DJEPA_ATTN_EMULATE
__device__ __forceinline__ uint32_t shfl_xor_u32(uint32_t v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
#endif

// Transposed layout (dk/dv): a lane holds keys key_row, key_row + 8 (rows g, g + 8) and queries
// q0 + 2c + (e & 1) of tile 2t (lo), + 8 of tile 2t + 1 (hi). Lanes g and g ^ 1 share two calls
// (queries q0' and q0' + 1, keys from the even one): each computes one and they swap half.
// Returns the keep bits as 8 bits: bit e of tile 2t, bit 4 + e of tile 2t + 1.
__device__ __forceinline__ unsigned keep_bits_cols(const Dropout& d, unsigned threshold, int g,
                                                   int query0, int key_row) {
  const int odd = g & 1;
  uint32_t w[4];
  philox_words(w, d, query0 + odd, key_row - odd);
  const uint32_t r0 = shfl_xor_u32(odd ? w[0] : w[2], 4);  // lane g ^ 1 is 4 lanes away
  const uint32_t r1 = shfl_xor_u32(odd ? w[1] : w[3], 4);
  // Per query: low half = key_row, high half = key_row + 8.
  const uint32_t q_a = odd ? r0 : w[0];  // query0
  const uint32_t q_b = odd ? r1 : w[1];  // query0 + 8
  const uint32_t q_c = odd ? w[2] : r0;  // query0 + 1
  const uint32_t q_d = odd ? w[3] : r1;  // query0 + 9
  unsigned bits = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int half = e >> 1;
    bits |= unsigned(kept((e & 1) ? q_c : q_a, half, threshold)) << e;
    bits |= unsigned(kept((e & 1) ? q_d : q_b, half, threshold)) << (4 + e);
  }
  return bits;
}

// Forward variants: without dropout, with dropout, and with dropout writing its keep bits to
// Params::keep_out (the debug switch; the hot kernels have no trace of it).
enum FwdDropout : int { kNoDropout = 0, kDropout = 1, kDropoutRecord = 2 };

// keep_out[row][key] for the 8 bits drop_rows returned (rows query, query + 8; keys key0,
// key0 + 1, key0 + 8, key0 + 9), within Nq rows and the count visible keys.
__device__ __forceinline__ void record_keep(const Params& p, long long row_base, unsigned bits, int query,
                                            int key0, int count) {
  unsigned char* out = p.keep_out + (row_base + query) * p.Nk + key0;
#pragma unroll 1
  for (int i = 0; i < 8; ++i) {  // bit i: half i >> 2, element e = i & 3
    const int dr = 8 * ((i >> 1) & 1), dk = (i & 1) + 8 * (i >> 2);
    if (query + dr < p.Nq && key0 + dk < count) out[static_cast<long long>(dr) * p.Nk + dk] = (bits >> i) & 1u;
  }
}

__device__ __forceinline__ int visible_count(const Params& p, int b) {
  if (!p.kv_count) return p.Nk;
  return min(max(p.kv_count[b], 0), p.Nk);
}

template <bool kMax>
__device__ __forceinline__ float extreme(float a, float b) {
  return kMax ? fmaxf(a, b) : fminf(a, b);
}

// ---------------------------------------------------------------------------------------------
// Forward

// Rows per warp, keys per tile and where Q lives follow the registers ptxas reports for sm_90a
// (tools/check_cu.sh): 32 rows per warp everywhere (LDSM:HMMA 1:4 with Q in registers, 1:2.7
// with Q reloaded from smem, against 1:2 at 16 rows), 32 keys per tile (64 pushed D >= 64 to
// 227-255 registers, with spills at D >= 80), Q in registers up to D = 64 (beyond, 219-255).
template <int D>
struct FwdCfg {
  static constexpr int kMT = 2;             // 16-row m-tiles per warp: each K/V fragment feeds 2 rows of mma
  static constexpr int kBM = 4 * 16 * kMT;  // query rows per block (4 warps)
  static constexpr int kBN = 32;            // keys per iteration
  static constexpr bool kQRegs = D <= 64;   // Q fragments held in registers (else reloaded from smem)
  static constexpr int S = D + 8;           // smem row stride: conflict-free fragment loads
  static constexpr int kSmem = (kBM + 2 * kBN) * S * 2 + 2 * kBN * 4;
};

// acc[mt][16 x D] += A[mt] (16 x 16) * tile[k0 .. k0+15][0 .. D-1] for kMT m-tiles: each B
// fragment (transposed ldmatrix of the row-major tile) is loaded once and used kMT times.
template <typename T, int D, int S, int kMT>
__device__ __forceinline__ void mma_tiles_by_rows(float (&acc)[kMT][D / 8][4],
                                                  const uint32_t (&a)[kMT][4], const T* tile,
                                                  int k0, int lane) {
  const T* base = tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8;
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, base + dn * 16);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      mma16816<T>(acc[mt][2 * dn], a[mt], b[0], b[1]);
      mma16816<T>(acc[mt][2 * dn + 1], a[mt], b[2], b[3]);
    }
  }
}

// Online softmax of one tile of scores s (raw q.k, not yet scaled), in base 2: the running max
// is kept scaled (m = max_j s_j * scale * log2 e) and p = 2^(s * scale_log2 - m) is one FFMA and
// one ex2.approx.ftz per score. kPosScale: scale >= 0 (the max of the scaled scores is the
// scaled max of the raw ones; for a negative scale, the scaled min). Keys >= count are masked.
template <typename T, int D, int kBN, int kMT, bool kPosScale>
__device__ __forceinline__ void softmax_tile(float (&s)[kMT][kBN / 8][4], float (&acc)[kMT][D / 8][4],
                                             float (&row_max)[kMT][2], float (&row_sum)[kMT][2],
                                             float sl2, int kv0, int count, int c) {
  const bool partial = kv0 + kBN > count;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float ext[2] = {kPosScale ? -INFINITY : INFINITY, kPosScale ? -INFINITY : INFINITY};
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = !partial || kv0 + j * 8 + 2 * c + (e & 1) < count;
        if (ok) ext[e >> 1] = extreme<kPosScale>(ext[e >> 1], s[mt][j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ext[r] = extreme<kPosScale>(ext[r], __shfl_xor_sync(0xffffffffu, ext[r], 1));
      ext[r] = extreme<kPosScale>(ext[r], __shfl_xor_sync(0xffffffffu, ext[r], 2));
      // Every processed tile has a visible key (kv0 < count), so the scaled extreme is finite.
      const float new_max = fmaxf(row_max[mt][r], ext[r] * sl2);
      alpha[r] = exp2_ftz(row_max[mt][r] - new_max);
      row_max[mt][r] = new_max;
      row_sum[mt][r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      acc[mt][n][0] *= alpha[0];
      acc[mt][n][1] *= alpha[0];
      acc[mt][n][2] *= alpha[1];
      acc[mt][n][3] *= alpha[1];
    }
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = !partial || kv0 + j * 8 + 2 * c + (e & 1) < count;
        const float pr = ok ? exp2_ftz(fmaf(s[mt][j][e], sl2, -row_max[mt][e >> 1])) : 0.f;
        s[mt][j][e] = pr;
        row_sum[mt][e >> 1] += pr;
      }
    }
  }
}

template <typename T, int D, int kDrop>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const Params p) {
  using Cfg = FwdCfg<D>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, S = Cfg::S, kMT = Cfg::kMT;
  constexpr bool kQRegs = Cfg::kQRegs;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * S;
  T* sV = sK + kBN * S;
  int* sPos = reinterpret_cast<int*>(sV + kBN * S);  // [2][kBN] key positions, by tile parity

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int m0 = blockIdx.x * kBM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int count = visible_count(p, b);
  const int* index = p.kv_index ? p.kv_index + static_cast<long long>(b) * p.Nk : nullptr;
  const T* qb = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  const int n_tiles = (count + kBN - 1) / kBN;
  const int r0 = warp * 16 * kMT;      // this warp's first row in the block
  const bool active = m0 + r0 < p.Nq;  // warps wholly past the last query only help load
  Dropout drop{};
  if constexpr (kDrop != kNoDropout) drop = dropout_state(p, b, h);

  if (threadIdx.x < kBN) sPos[threadIdx.x] = key_position<kBN>(index, 0, count);
  int pos_next = key_position<kBN>(index, kBN, count);  // tile 1, stored in iteration 0
  // Groups in flight: Q, K0, V0; afterwards always K(t+1) then V(t+1) (possibly empty groups).
  load_tile<T, D, kBM>(sQ, qb, p.qs[2], m0, p.Nq, p.vec_ok);
  cp_async_commit();
  __syncthreads();  // sPos[0]
  if (n_tiles > 0) load_gathered<T, D, kBN>(sK, kb, p.ks[2], sPos, p.vec_ok);
  cp_async_commit();
  if (n_tiles > 0) load_gathered<T, D, kBN>(sV, vb, p.vs[2], sPos, p.vec_ok);
  cp_async_commit();
  cp_async_wait<2>();
  __syncthreads();

  uint32_t qf[kQRegs ? kMT : 1][kQRegs ? D / 16 : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) load_a<S>(qf[mt][ks], sQ, r0 + 16 * mt, ks * 16, lane);
  }

  float acc[kMT][D / 8][4];
  // Rows g and g + 8 of each m-tile: running max (scaled, base 2) and this lane's share of the
  // running sum (the quad's four shares are added at the end).
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<1>();
    __syncthreads();  // K(t) visible to all
    // Positions of tile t + 1 (read by its loads after the next barrier); fetch tile t + 2's.
    if (threadIdx.x < kBN) sPos[((t + 1) & 1) * kBN + threadIdx.x] = pos_next;
    pos_next = key_position<kBN>(index, (t + 2) * kBN, count);

    float s[kMT][kBN / 8][4];
    if (active) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kQRegs) {
#pragma unroll
            for (int i = 0; i < 4; ++i) a[mt][i] = qf[mt][ks][i];
          } else {
            load_a<S>(a[mt], sQ, r0 + 16 * mt, ks * 16, lane);
          }
        }
#pragma unroll
        for (int j = 0; j < kBN / 8; j += 2) {
          uint32_t kf[4];
          load_b_pair<S>(kf, sK, j * 8, ks * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma16816<T>(s[mt][j], a[mt], kf[0], kf[1]);
            mma16816<T>(s[mt][j + 1], a[mt], kf[2], kf[3]);
          }
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(t) visible to all; every warp is done reading K(t)
    if (t + 1 < n_tiles) load_gathered<T, D, kBN>(sK, kb, p.ks[2], sPos + ((t + 1) & 1) * kBN, p.vec_ok);
    cp_async_commit();

    if (active) {
      const int kv0 = t * kBN;
      if (p.scale_log2 >= 0.f) {
        softmax_tile<T, D, kBN, kMT, true>(s, acc, row_max, row_sum, p.scale_log2, kv0, count, c);
      } else {
        softmax_tile<T, D, kBN, kMT, false>(s, acc, row_max, row_sum, p.scale_log2, kv0, count, c);
      }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kDrop != kNoDropout) {  // after the row sums: they are of the undropped P
            const int query = m0 + r0 + 16 * mt + g, key0 = kv0 + 16 * kk + 2 * c;
            const unsigned bits = drop_rows(s[mt][2 * kk], s[mt][2 * kk + 1], drop, p.drop_threshold, query, key0);
            if constexpr (kDrop == kDropoutRecord) {
              record_keep(p, (static_cast<long long>(b) * p.H + h) * p.Nq, bits, query, key0, count);
            }
          }
          c_to_a<T>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
        }
        mma_tiles_by_rows<T, D, S, kMT>(acc, a, sV, kk * 16, lane);
      }
    }

    __syncthreads();  // every warp is done reading V(t)
    if (t + 1 < n_tiles) load_gathered<T, D, kBN>(sV, vb, p.vs[2], sPos + ((t + 1) & 1) * kBN, p.vec_ok);
    cp_async_commit();
  }

  if (!active) return;
  const long long row_base = (static_cast<long long>(b) * p.H + h) * p.Nq;
  T* ob = static_cast<T*>(p.o);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      float inv = l > 0.f ? 1.f / l : 0.f;
      if constexpr (kDrop != kNoDropout) inv *= p.keep_scale;
      const float lse = l > 0.f ? row_max[mt][r] * kLn2 + logf(l) : 0.f;
      const int row = m0 + r0 + 16 * mt + g + 8 * r;
      if (row < p.Nq) {
        T* orow = ob + (row_base + row) * D + 2 * c;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          *reinterpret_cast<uint32_t*>(orow + n * 8) =
              pack2<T>(acc[mt][n][2 * r] * inv, acc[mt][n][2 * r + 1] * inv);
        }
        if (c == 0) p.lse[row_base + row] = lse;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(const T* __restrict__ o,
                                                    const T* __restrict__ dout,
                                                    float* __restrict__ delta, long long rows,
                                                    int D) {
  const long long row = static_cast<long long>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* orow = o + row * D;
  const T* drow = dout + row * D;
  float acc = 0.f;
  for (int d = lane; d < D; d += 32) acc += to_float(orow[d]) * to_float(drow[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// Query rows per iteration: 16 at D = 128 keeps the kernel at 168 registers (3 blocks per SM, was
// 230 with 32: 2 blocks), at the cost of reloading the K/V fragments for half as many queries.
template <int D>
struct DkdvCfg {
  static constexpr int kBN = 64;  // keys per block (16 per warp)
  static constexpr int kBM = D <= 64 ? 64 : D <= 96 ? 32 : 16;
  static constexpr int S = D + 8;
  // K, V; two stages of Q, dO, lse * log2(e), delta; the key tile's token positions
  static constexpr int kSmem = (2 * kBN + 4 * kBM) * S * 2 + 4 * kBM * 4 + kBN * 4;
};

template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p) {
  using Cfg = DkdvCfg<D>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, S = Cfg::S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBN * S;
  T* sQ = sV + kBN * S;       // [2][kBM * S]
  T* sdO = sQ + 2 * kBM * S;  // [2][kBM * S]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBM * S);  // [2][kBM], lse * log2(e)
  float* sDelta = sLse + 2 * kBM;                              // [2][kBM]
  int* sRow = reinterpret_cast<int*>(sDelta + 2 * kBM);        // [kBN] token position, -1 past Nk

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int n0 = blockIdx.x * kBN;
  const int h = blockIdx.y, b = blockIdx.z;
  const int count = visible_count(p, b);
  const int* index = p.kv_index ? p.kv_index + static_cast<long long>(b) * p.Nk : nullptr;
  const long long kv_row_base = (static_cast<long long>(b) * p.H + h) * p.Nk;
  T* dkb = static_cast<T*>(p.dk) + kv_row_base * D;
  T* dvb = static_cast<T*>(p.dv) + kv_row_base * D;

  if (threadIdx.x < kBN) {
    const int j = n0 + threadIdx.x;
    sRow[threadIdx.x] = j < p.Nk ? (index ? __ldg(index + j) : j) : -1;
  }
  __syncthreads();

  if (n0 >= count) {
    // Only invisible keys here: their gradient rows are zero. kv_index is a permutation of
    // 0..Nk-1, so together with the visible tiles every dk/dv row is written exactly once.
    constexpr int kChunks = D / 8;
    for (int i = threadIdx.x; i < kBN * kChunks; i += kThreads) {
      const long long n = sRow[i / kChunks];
      if (n < 0) break;
      const int col = (i % kChunks) * 8;
      *reinterpret_cast<uint4*>(dkb + n * D + col) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dvb + n * D + col) = make_uint4(0u, 0u, 0u, 0u);
    }
    return;
  }

  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  const T* qb = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const long long q_row_base = (static_cast<long long>(b) * p.H + h) * p.Nq;
  const T* dob = static_cast<const T*>(p.dout) + q_row_base * D;
  const float* lseb = p.lse + q_row_base;
  const float* deltab = p.delta + q_row_base;

  auto key_row = [&](int r) { return n0 + r < count ? (long long)sRow[r] : -1LL; };
  copy_rows<T, D, kBN>(sK, kb, p.ks[2], p.vec_ok, key_row);
  copy_rows<T, D, kBN>(sV, vb, p.vs[2], p.vec_ok, key_row);
  cp_async_commit();

  // lse / delta of query tile mt, read into registers one tile before they are stored.
  auto row_stats = [&](int mt, float& l2, float& dl) {
    const int row = mt * kBM + static_cast<int>(threadIdx.x);
    const bool ok = threadIdx.x < kBM && row < p.Nq;
    l2 = ok ? lseb[row] * kLog2e : 0.f;
    dl = ok ? deltab[row] : 0.f;
  };
  const int m_tiles = (p.Nq + kBM - 1) / kBM;
  float lse_next, delta_next;
  row_stats(0, lse_next, delta_next);
  // Groups: K+V, then one per query tile (Q, dO), issued one tile ahead.
  load_tile<T, D, kBM>(sQ, qb, p.qs[2], 0, p.Nq, p.vec_ok);
  load_tile<T, D, kBM>(sdO, dob, D, 0, p.Nq, p.vec_ok);
  cp_async_commit();
  if (threadIdx.x < kBM) {
    sLse[threadIdx.x] = lse_next;
    sDelta[threadIdx.x] = delta_next;
  }
  row_stats(1, lse_next, delta_next);

  const int r0 = warp * 16;  // this warp's 16 keys within the tile
  const bool key_ok[2] = {n0 + r0 + g < count, n0 + r0 + g + 8 < count};
  Dropout drop{};
  if constexpr (kDropout) drop = dropout_state(p, b, h);
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  for (int mt = 0; mt < m_tiles; ++mt) {
    const int m0 = mt * kBM;
    const int cur = mt & 1, nxt = cur ^ 1;
    // The next stage was last read in iteration mt - 1, which ended with a barrier.
    if (mt + 1 < m_tiles) {
      load_tile<T, D, kBM>(sQ + nxt * kBM * S, qb, p.qs[2], m0 + kBM, p.Nq, p.vec_ok);
      load_tile<T, D, kBM>(sdO + nxt * kBM * S, dob, D, m0 + kBM, p.Nq, p.vec_ok);
      if (threadIdx.x < kBM) {
        sLse[nxt * kBM + threadIdx.x] = lse_next;
        sDelta[nxt * kBM + threadIdx.x] = delta_next;
      }
      row_stats(mt + 2, lse_next, delta_next);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // K, V and query tile mt visible to all
    const T* q_t = sQ + cur * kBM * S;
    const T* do_t = sdO + cur * kBM * S;
    const float* lse_t = sLse + cur * kBM;
    const float* delta_t = sDelta + cur * kBM;

    // Transposed scores: st = K Q^T and dpt = V dO^T, this warp's 16 keys x kBM queries.
    float st[kBM / 8][4], dpt[kBM / 8][4];
#pragma unroll
    for (int j = 0; j < kBM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.f;
    mma_rows_by_rows_t<T, D, S, kBM>(st, sK, r0, q_t, lane);
    mma_rows_by_rows_t<T, D, S, kBM>(dpt, sV, r0, do_t, lane);

    // st <- P^T = exp(scale * s - lse), dpt <- dS^T = P^T * (dP^T - delta); with dropout
    // st <- (P * keep)^T (dV's 1 / (1 - p) comes at the end), dS^T = P^T * (Z^T dP^T - delta).
#pragma unroll
    for (int t = 0; t < kBM / 16; ++t) {
      unsigned bits = 0xFFu;
      if constexpr (kDropout) bits = keep_bits_cols(drop, p.drop_threshold, g, m0 + 16 * t + 2 * c, n0 + r0 + g);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = 2 * t + jj;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = j * 8 + 2 * c + (e & 1);
          const bool ok = key_ok[e >> 1] && m0 + qc < p.Nq;
          const float pr = ok ? exp2_ftz(fmaf(st[j][e], p.scale_log2, -lse_t[qc])) : 0.f;
          if constexpr (kDropout) {
            const bool keep = (bits >> (4 * jj + e)) & 1u;
            st[j][e] = keep ? pr : 0.f;
            dpt[j][e] = pr * ((keep ? dpt[j][e] * p.keep_scale : 0.f) - delta_t[qc]);
          } else {
            st[j][e] = pr;
            dpt[j][e] = pr * (dpt[j][e] - delta_t[qc]);
          }
        }
      }
    }

    // dV += P^T dO, dK += dS^T Q (the scale is applied once at the end).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, st[2 * kk], st[2 * kk + 1]);
      mma_a_by_rows<T, D, S>(dv, a, do_t, kk * 16, lane);
      c_to_a<T>(a, dpt[2 * kk], dpt[2 * kk + 1]);
      mma_a_by_rows<T, D, S>(dk, a, q_t, kk * 16, lane);
    }
    __syncthreads();  // every warp is done with stage cur before iteration mt + 1 refills it
  }

  const float dv_scale = kDropout ? p.keep_scale : 1.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long n = sRow[r0 + g + 8 * r];
    if (n >= 0) {
      const bool ok = key_ok[r];
      T* dkr = dkb + n * D + 2 * c;
      T* dvr = dvb + n * D + 2 * c;
#pragma unroll
      for (int nn = 0; nn < D / 8; ++nn) {
        *reinterpret_cast<uint32_t*>(dkr + nn * 8) =
            ok ? pack2<T>(dk[nn][2 * r] * p.scale, dk[nn][2 * r + 1] * p.scale) : 0u;
        *reinterpret_cast<uint32_t*>(dvr + nn * 8) =
            ok ? pack2<T>(dv[nn][2 * r] * dv_scale, dv[nn][2 * r + 1] * dv_scale) : 0u;
      }
    }
  }
}

template <int D>
struct DqCfg {
  static constexpr int kBM = 64;                 // query rows per block (16 per warp)
  static constexpr int kBN = D <= 64 ? 64 : 32;  // keys per iteration
  static constexpr int S = D + 8;
  // Q, dO; two stages of K, V; key positions by tile parity
  static constexpr int kSmem = (2 * kBM + 4 * kBN) * S * 2 + 2 * kBN * 4;
};

// 4 blocks per SM (at most 128 registers, as before the second K/V stage): unbounded, ptxas took
// 136-160 (3 blocks) and spilled at D = 96, which gets 3 (128 spilled it on sm_80). With dropout,
// D = 64 and 128 get 3 too: the Philox rounds spilled 44 bytes at 128 registers at D = 64 (sm_90a)
// and 64 bytes at D = 128 (sm_80).
template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads, D == 96 || (kDropout && (D == 64 || D == 128)) ? 3 : 4)
    dq_kernel(const Params p) {
  using Cfg = DqCfg<D>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, S = Cfg::S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBM * S;
  T* sK = sdO + kBM * S;     // [2][kBN * S]
  T* sV = sK + 2 * kBN * S;  // [2][kBN * S]
  int* sPos = reinterpret_cast<int*>(sV + 2 * kBN * S);  // [2][kBN]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int m0 = blockIdx.x * kBM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int count = visible_count(p, b);
  const int* index = p.kv_index ? p.kv_index + static_cast<long long>(b) * p.Nk : nullptr;
  const T* qb = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1];
  const long long q_row_base = (static_cast<long long>(b) * p.H + h) * p.Nq;
  const T* dob = static_cast<const T*>(p.dout) + q_row_base * D;
  const int n_tiles = (count + kBN - 1) / kBN;
  const int r0 = warp * 16;
  Dropout drop{};
  if constexpr (kDropout) drop = dropout_state(p, b, h);

  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + r0 + g + 8 * r;
    lse2[r] = row < p.Nq ? p.lse[q_row_base + row] * kLog2e : 0.f;
    delta[r] = row < p.Nq ? p.delta[q_row_base + row] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[n][e] = 0.f;

  if (n_tiles > 0) {
    // Positions: tiles 0 and 1 in shared memory, tile 2 in a register; iteration t stores tile
    // t + 2's into the parity slot of tile t (whose loads every thread issued before its first
    // barrier), read by iteration t + 1's loads after the barrier that ends iteration t.
    if (threadIdx.x < kBN) {
      sPos[threadIdx.x] = key_position<kBN>(index, 0, count);
      sPos[kBN + threadIdx.x] = key_position<kBN>(index, kBN, count);
    }
    int pos_next = key_position<kBN>(index, 2 * kBN, count);
    load_tile<T, D, kBM>(sQ, qb, p.qs[2], m0, p.Nq, p.vec_ok);
    load_tile<T, D, kBM>(sdO, dob, D, m0, p.Nq, p.vec_ok);
    __syncthreads();  // sPos
    load_gathered<T, D, kBN>(sK, kb, p.ks[2], sPos, p.vec_ok);
    load_gathered<T, D, kBN>(sV, vb, p.vs[2], sPos, p.vec_ok);
    cp_async_commit();  // Q, dO, K0, V0; then one group per key tile, issued one tile ahead

    for (int t = 0; t < n_tiles; ++t) {
      const int kv0 = t * kBN;
      const int cur = t & 1, nxt = cur ^ 1;
      if (t + 1 < n_tiles) {  // stage nxt was last read in iteration t - 1 (ended by a barrier)
        load_gathered<T, D, kBN>(sK + nxt * kBN * S, kb, p.ks[2], sPos + nxt * kBN, p.vec_ok);
        load_gathered<T, D, kBN>(sV + nxt * kBN * S, vb, p.vs[2], sPos + nxt * kBN, p.vec_ok);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // key tile t visible to all; every thread is past its loads of tile t + 1
      if (threadIdx.x < kBN) sPos[cur * kBN + threadIdx.x] = pos_next;  // tile t + 2
      pos_next = key_position<kBN>(index, (t + 3) * kBN, count);
      const T* k_t = sK + cur * kBN * S;
      const T* v_t = sV + cur * kBN * S;

      float s[kBN / 8][4], dp[kBN / 8][4];
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      mma_rows_by_rows_t<T, D, S, kBN>(s, sQ, r0, k_t, lane);
      mma_rows_by_rows_t<T, D, S, kBN>(dp, sdO, r0, v_t, lane);

      // dp <- dS = P * (dP - delta); with dropout dS = P * (Z dP - delta): the dropped dP zeroed
      if constexpr (kDropout) {
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          drop_rows(dp[2 * kk], dp[2 * kk + 1], drop, p.drop_threshold, m0 + r0 + g, kv0 + 16 * kk + 2 * c);
        }
      }
      const float dp_scale = kDropout ? p.keep_scale : 1.f;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = kv0 + j * 8 + 2 * c + (e & 1) < count;
          const float pr = ok ? exp2_ftz(fmaf(s[j][e], p.scale_log2, -lse2[e >> 1])) : 0.f;
          dp[j][e] = pr * (dp[j][e] * dp_scale - delta[e >> 1]);
        }
      }
      // dQ += dS K
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t a[4];
        c_to_a<T>(a, dp[2 * kk], dp[2 * kk + 1]);
        mma_a_by_rows<T, D, S>(dq, a, k_t, kk * 16, lane);
      }
      __syncthreads();  // every warp is done with stage cur (and sPos slot cur is written)
    }
  }

  T* dqb = static_cast<T*>(p.dq) + q_row_base * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + r0 + g + 8 * r;
    if (row < p.Nq) {
      T* dqr = dqb + static_cast<long long>(row) * D + 2 * c;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(dqr + n * 8) =
            pack2<T>(dq[n][2 * r] * p.scale, dq[n][2 * r + 1] * p.scale);
      }
    }
  }
}

}  // namespace attention
}  // namespace djepa
