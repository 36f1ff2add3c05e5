// The sm_90a denoise GEMM: tile shape, shared-memory plan, parameters, and the host-side plan
// (tensor maps, split-K) shared by csrc/denoise_sm90.cu and the CPU emulator.
//
// c = epilogue(op(a) @ op(b) + bias) with the contract of djepa._C.gemm (djepa/ops/denoise.py):
// a [M, K] (a_trans = 0, K-major) or stored [K, M] (a_trans = 1, M-major); b [N, K] (b_trans = 1,
// K-major: x @ W.T) or [K, N] (b_trans = 0, N-major); epilogue & 15 in {0 none, 1 SiLU (+ aux_out
// = y), 2 aux1 + aux2 * y (+ aux_out = y), 3 dSiLU(aux1) * y}; epilogue & 16: fp32 c / aux_out.
#pragma once

#include <algorithm>
#include <cstdint>

#include "hopper/ptx.cuh"

namespace djepa {
namespace hopper {
namespace gemm {

// Block tile 128 x 128 x 64: two consumer warpgroups of 64 x 128 (m64n128k16, four per k tile),
// one producer warpgroup. 64 k of 16-bit data = 128 bytes: every operand tile is 128B-swizzled.
constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kStages = 6;
constexpr int kConsumers = 2;
constexpr int kThreads = kWarpGroup * (1 + kConsumers);
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 * 40 + 256 * 232 = 64512 <= 65536
constexpr int kTileBytes = kBM * kBK * 2;               // one operand, one stage (= kBN * kBK * 2)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kBarrierBytes = 1024;                     // full[kStages], empty[kStages]
constexpr int kSmemBytes = 1024 /* alignment slack */ + kStages * kStageBytes + kBarrierBytes;
static_assert(kBM == kBN, "one tile loader and one descriptor plan serve both operands");
static_assert(kSmemBytes <= 232448, "sm_90 allows 227 KiB of shared memory per block");

enum Epilogue : int { kEpNone = 0, kEpSilu = 1, kEpGate = 2, kEpSiluBwd = 3, kEpF32 = 16 };

struct Params {
  const void* a;
  const void* b;
  void* c;
  const void* bias;
  const void* aux1;
  const void* aux2;
  void* aux_out;
  float* partial;       // split-K workspace [splits][M][N] (splits > 1), else nullptr
  int M, N, K;
  int64_t aux2_ld;
  int epilogue;
  bool a_tma, b_tma;    // operand loaded by TMA; otherwise by the producer's ordinary loads
  bool pair_ok;         // c / aux_out / aux1 / bias may be accessed two elements at a time
  int tiles_m, tiles_n;
  int splits;           // K ranges per output tile
  int k_tiles;          // ceil(K / kBK)
  int k_per_split;      // k tiles per split (the last split may get fewer)
  // The 128x256 kernel only (gemm_wide_*.cuh): outputs stored by TMA (c with aux_out; the
  // split-K partials), and the CTAs per cluster (2: B tiles multicast to both; 1: none).
  bool c_tma, partial_tma;
  int cluster;
};

// Work unit u = (tile, split): consecutive units share a tile's A rows (split-minor, then the
// tile row-major), so the CTAs working at one time read a band of A and all of B.
struct Unit {
  int m0, n0, kt0, kt1, split;
};
__host__ __device__ inline Unit unit_of(const Params& p, int u) {
  const int split = u % p.splits, t = u / p.splits;
  Unit w;
  w.m0 = (t / p.tiles_n) * kBM;
  w.n0 = (t % p.tiles_n) * kBN;
  w.split = split;
  w.kt0 = split * p.k_per_split;
  w.kt1 = w.kt0 + p.k_per_split < p.k_tiles ? w.kt0 + p.k_per_split : p.k_tiles;
  return w;
}
__host__ __device__ inline int units_of(const Params& p) { return p.tiles_m * p.tiles_n * p.splits; }

// ---------------------------------------------------------------------------------- host plan
// The k-split for a grid of `sms` persistent CTAs: minimise waves * k tiles per split plus the
// cost of writing and re-reading the fp32 partials (split > 1), in k-tile-times of one CTA:
// one 128x128x64 k tile is 2.1 MFLOP (~0.4 us at a CTA's share of the tensor rate); one fp32
// 128x128 partial is 64 KiB, written once and read once (~4 us at a CTA's share of HBM).
inline int choose_splits(int tiles, int k_tiles, int sms) {
  if (tiles >= sms || k_tiles < 8) return 1;
  constexpr double kPartialCost = 9.0;  // k-tile-times per partial tile written + read
  int best = 1;
  double best_t = 1e300;
  for (int s = 1; s <= 8; ++s) {
    const int per = (k_tiles + s - 1) / s;
    if (per < 4) break;
    const int units = tiles * s;
    const double waves = double((units + sms - 1) / sms);
    const double t = waves * per + (s > 1 ? kPartialCost * units / sms : 0.0);
    if (t < best_t - 1e-9) {
      best_t = t;
      best = s;
    }
  }
  return best;
}

// Fills the tiling and split fields of `p` (M, N, K set) for a grid of `sms` CTAs; splits_arg > 0
// forces the split count (it is clamped so that no split is empty).
inline void plan_units(Params& p, int sms, int splits_arg) {
  p.tiles_m = (p.M + kBM - 1) / kBM;
  p.tiles_n = (p.N + kBN - 1) / kBN;
  p.k_tiles = (p.K + kBK - 1) / kBK;
  int s = splits_arg > 0 ? splits_arg : choose_splits(p.tiles_m * p.tiles_n, p.k_tiles, sms);
  s = std::max(1, std::min(s, std::max(p.k_tiles, 1)));
  p.k_per_split = std::max(1, (p.k_tiles + s - 1) / s);
  p.splits = std::max(1, (p.k_tiles + p.k_per_split - 1) / p.k_per_split);
}

// cuTensorMapEncodeTiled, or the emulator's stand-in with the same signature.
using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The tensor map of one operand tile stream: K-major [mn][K] in boxes of 64 k x 128 rows, or
// MN-major [K][mn] in boxes of 64 mn x 64 k (two per tile). Returns false when TMA cannot serve
// the operand (unaligned base or row pitch, or the encoder refuses): the producer then loads it
// with ordinary loads.
inline bool make_operand_map(EncodeFn enc, CUtensorMap* map, const void* base, bool bf16, bool k_major, int mn,
                             int K) {
  if (enc == nullptr || base == nullptr || mn <= 0 || K <= 0) return false;
  const int64_t inner = k_major ? K : mn, outer = k_major ? mn : K;
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || (inner * 2) % 16 != 0) return false;
  const cuuint64_t dims[2] = {cuuint64_t(inner), cuuint64_t(outer)};
  const cuuint64_t strides[1] = {cuuint64_t(inner) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kBK), cuuint32_t(k_major ? kBM : kBK)};
  const cuuint32_t es[2] = {1, 1};
  return enc(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
             const_cast<void*>(base), dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor map of an output stored by TMA from 64-row x 128-byte boxes of a 128B-swizzled
// staging tile: `rows` x `cols` elements of `elem_bytes` (2 or 4), row-major with a pitch of
// `cols`, repeated `depth` times (split-K partials: [depth][rows][cols], so one split's tile
// never spills into the next). False when TMA cannot store it (base or pitch not 16-byte aligned,
// or the encoder refuses).
inline bool make_store_map(EncodeFn enc, CUtensorMap* map, const void* base, int elem_bytes, bool bf16, int rows,
                           int cols, int depth = 1) {
  if (enc == nullptr || base == nullptr || rows <= 0 || cols <= 0 || depth <= 0) return false;
  if (reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || (int64_t(cols) * elem_bytes) % 16 != 0) return false;
  const cuuint64_t dims[3] = {cuuint64_t(cols), cuuint64_t(rows), cuuint64_t(depth)};
  const cuuint64_t strides[2] = {cuuint64_t(cols) * elem_bytes, cuuint64_t(cols) * elem_bytes * cuuint64_t(rows)};
  const cuuint32_t box[3] = {cuuint32_t(128 / elem_bytes), 64, 1};
  const cuuint32_t es[3] = {1, 1, 1};
  const CUtensorMapDataType type = elem_bytes == 4 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : bf16         ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return enc(map, type, depth > 1 ? 3 : 2, const_cast<void*>(base), dims, strides, box, es,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
