// The 128x256 sm_90a denoise GEMM (gemm_wide_kernel.cuh): tile shape, shared-memory plan, the
// work units of a cluster, and the host plan (which design serves a call, its split-K).
//
// Same contract and Params as the 128x128 kernel (gemm_config.cuh); what differs:
//  * block tile 128 x 256 x 64: two consumer warpgroups of 64 x 256 (m64n256k16, 128 fp32
//    accumulators per thread), 4 stages of A [128 x 64 k] + B [256 x 64 k] (48 KiB each);
//  * a cluster of 2 CTAs (p.cluster = 2) on vertically adjacent tiles (rows m, m + 128, the same
//    256 columns): each CTA loads its A tile and one 128-row half of the shared B tile, which TMA
//    multicasts into both CTAs, so B is read from L2 once per pair (p.cluster = 1: each CTA loads
//    all of B);
//  * the epilogue stages 64-row x 128-byte chunks of the outputs in shared memory (two buffers
//    per consumer warpgroup) and stores them with TMA (gemm_wide_epilogue.cuh).
#pragma once

#include "hopper/gemm_config.cuh"

namespace djepa {
namespace hopper {
namespace gemm {
namespace wide {

constexpr int kBM = 128, kBN = 256, kBK = 64;
constexpr int kStages = 4;
constexpr int kConsumers = 2;
constexpr int kThreads = kWarpGroup * (1 + kConsumers);
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 * 40 + 256 * 232 = 64512 <= 65536
constexpr int kClusterMax = 2;
constexpr int kATileBytes = kBM * kBK * 2;               // 16 KiB
constexpr int kBTileBytes = kBN * kBK * 2;               // 32 KiB: two 128-row halves of 16 KiB
constexpr int kBHalfBytes = kBTileBytes / 2;
constexpr int kStageBytes = kATileBytes + kBTileBytes;   // 48 KiB
constexpr int kOutChunkBytes = 64 * 128;                 // one TMA-store box: 64 rows x 128 bytes
constexpr int kOutBuffers = 2;                           // per consumer warpgroup
constexpr int kOutBytes = kConsumers * kOutBuffers * kOutChunkBytes;
constexpr int kBarrierBytes = 256;                       // full[kStages], empty[kStages]
constexpr int kSmemBytes = 1024 /* alignment slack */ + kStages * kStageBytes + kOutBytes + kBarrierBytes;
static_assert(kSmemBytes <= 232448, "sm_90 allows 227 KiB of shared memory per block");
static_assert(2 * kStages * 8 <= kBarrierBytes, "barriers");
static_assert(kStageBytes % 1024 == 0 && kOutChunkBytes % 1024 == 0, "128B-swizzled tiles start on 1 KiB");

// Work unit of a cluster: cluster-unit u = (row pair, tile column, split), split-minor then row
// pair, then column, as the 128x128 kernel orders its tiles; CTA `rank` of the cluster takes the
// tile of rows (2 * pair + rank) * 128 (p.cluster = 2) or pair * 128 (p.cluster = 1).
__host__ __device__ inline int row_groups(const Params& p) { return (p.tiles_m + p.cluster - 1) / p.cluster; }
__host__ __device__ inline int cluster_units(const Params& p) { return row_groups(p) * p.tiles_n * p.splits; }
__host__ __device__ inline Unit unit_of(const Params& p, int u, int rank) {
  const int split = u % p.splits, t = u / p.splits;
  Unit w;
  w.m0 = ((t / p.tiles_n) * p.cluster + rank) * kBM;
  w.n0 = (t % p.tiles_n) * kBN;
  w.split = split;
  w.kt0 = split * p.k_per_split;
  w.kt1 = w.kt0 + p.k_per_split < p.k_tiles ? w.kt0 + p.k_per_split : p.k_tiles;
  return w;
}

// Fills the tiling and split fields of `p` (M, N, K and cluster set) for `clusters` resident
// clusters; splits_arg > 0 forces the split count (clamped as the 128x128 plan clamps it, so a
// forced count gives both designs the same splits and workspace).
inline void plan_units(Params& p, int clusters, int splits_arg) {
  p.tiles_m = (p.M + kBM - 1) / kBM;
  p.tiles_n = (p.N + kBN - 1) / kBN;
  p.k_tiles = (p.K + kBK - 1) / kBK;
  const int groups = (p.tiles_m + p.cluster - 1) / p.cluster;
  int s = splits_arg > 0 ? splits_arg : choose_splits(groups * p.tiles_n, p.k_tiles, clusters);
  s = std::max(1, std::min(s, std::max(p.k_tiles, 1)));
  p.k_per_split = std::max(1, (p.k_tiles + s - 1) / s);
  p.splits = std::max(1, (p.k_tiles + p.k_per_split - 1) / p.k_per_split);
}

// The cluster size for a call: 2 where there are two tile rows to pair, else 1.
inline int cluster_for(int M) { return (M + kBM - 1) / kBM >= 2 ? kClusterMax : 1; }

// Tensor maps of the outputs (a kernel parameter; unused ones are zero).
struct OutMaps {
  CUtensorMap c, aux, partial;
};

// Encodes the output maps of a planned call (p.partial set when it splits) and sets p.c_tma (c
// and aux_out both storable by TMA) and p.partial_tma.
inline void make_out_maps(EncodeFn enc, Params& p, bool bf16, OutMaps* out) {
  const int ob = (p.epilogue & kEpF32) ? 4 : 2;
  p.c_tma = make_store_map(enc, &out->c, p.c, ob, bf16, p.M, p.N) &&
            (p.aux_out == nullptr || make_store_map(enc, &out->aux, p.aux_out, ob, bf16, p.M, p.N));
  p.partial_tma = p.splits > 1 && make_store_map(enc, &out->partial, p.partial, 4, bf16, p.M, p.N, p.splits);
}

}  // namespace wide

// ---------------------------------------------------------------------------------- design choice
// gemm_sm90's `kernel` argument: 0 chooses by shape (choose_design), 1 the 128x128 kernel,
// 2 the 128x256 one (a call whose A or B TMA cannot load runs the 128x128 kernel, whose
// producer falls back to ordinary loads).
enum Design : int { kDesignAuto = 0, kDesign128 = 1, kDesign256 = 2 };

// Estimated time of a plan in k-tile-times of the 128x128 kernel (choose_splits' unit; a 128x256
// k tile is two): waves of units (per SM, or per cluster: units of a cluster run side by side) x
// the k tiles of a unit, plus the split-K partials written and read back.
inline double plan_time(const Params& p, int slots, int tile_scale) {
  const int units = tile_scale == 1 ? p.tiles_m * p.tiles_n * p.splits : wide::cluster_units(p);
  const double waves = double((units + slots - 1) / slots);
  const double partial = p.splits > 1 ? 9.0 * units / slots : 0.0;
  return tile_scale * (waves * p.k_per_split + partial);
}

// The design that serves (M, N, K) with `splits_arg` (0 = each design's own split) on a GPU of
// `sms` SMs and `clusters` resident 2-CTA clusters of the 128x256 kernel (0: none, it then runs
// without clusters): `requested`, or for kDesignAuto the shorter estimated time, the 128x256
// kernel on a tie (it reads less from L2 per FLOP and stores through TMA). Fills `p` (M, N, K
// set) with the chosen design's plan and returns the design. A forced split count is clamped
// alike for both designs, so the split count (and workspace) gemm_sm90_splits reports holds
// whichever design a call with it then runs.
inline int choose_design(Params& p, int requested, int sms, int clusters, int splits_arg) {
  Params small = p, large = p;
  plan_units(small, sms, splits_arg);
  large.cluster = clusters > 0 ? wide::cluster_for(p.M) : 1;
  const int slots = large.cluster > 1 ? clusters : sms;
  wide::plan_units(large, slots, splits_arg);
  int d = requested;
  if (d == kDesignAuto) d = plan_time(large, slots, 2) <= plan_time(small, sms, 1) ? kDesign256 : kDesign128;
  p = d == kDesign256 ? large : small;
  return d;
}

// The host plan of a call (csrc/denoise_sm90.cu; the emulator driver runs the same): the design
// choose_design picks, or the 128x128 one where the 128x256 kernel cannot load the operands
// (p.a_tma and p.b_tma set: make_operand_map's answers; K > 0).
inline int plan_call(Params& p, int requested, int sms, int clusters, int splits_arg) {
  const int d = choose_design(p, requested, sms, clusters, splits_arg);
  if (d == kDesign256 && !(p.K > 0 && p.a_tma && p.b_tma)) {
    return choose_design(p, kDesign128, sms, clusters, splits_arg);
  }
  return d;
}

}  // namespace gemm
}  // namespace hopper
}  // namespace djepa
