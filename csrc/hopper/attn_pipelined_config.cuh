// The pipelined sm_90a attention kernels (attn_pipelined_fwd.cuh, attn_pipelined_bwd.cuh): tiles,
// shared-memory plans, register split, named barriers, and the host plan (load paths, tensor maps).
//
// Same contract as the baseline kernels (attn_config.cuh: Params, the chunked swizzled layout
// Chunks<D>, work items); what differs is the schedule, which tools/perf_designs.py declares and
// tools/perf_model.py checks against the SASS:
//  * forward: 128 query rows per work item (2 consumer warpgroups of 64) over 128-key tiles; the
//    next tile's S = Q K^T and this tile's O += P V in flight together (wgmma.wait_group 1), K and
//    V released apart; the two consumer warpgroups take turns issuing (named barriers, ping-pong),
//    so one's softmax runs under the other's GEMMs; O leaves through shared memory and TMA stores;
//    the last tile of a work item runs 64 keys wide when at most 64 keys remain.
//  * backward: 64-row stream tiles; dK/dV with the statistics staged in shared memory by the
//    producer and dS^T formed from fp32 P^T; dQ with S and dP in flight together.
#pragma once

#include "hopper/attn_config.cuh"

namespace djepa {
namespace hopper {
namespace attn {

// The kernels the sm_90a entry points run (their `design` argument; djepa: DJEPA_SM90_ATTENTION).
enum Design : int { kDesignPipelined = 0, kDesignBaseline = 1 };

namespace pipe {

constexpr int kRows = 64;            // rows per consumer warpgroup, per TMA box, per backward stream tile
constexpr int kBN = 128;             // keys per forward tile
constexpr int kHalf = kBN / 2;       // the forward's last tile when at most 64 keys remain
constexpr int kMaxStages = 4;
constexpr int kSmemLimit = 232448;   // bytes per block on sm_90 (227 KiB)
// Register splits: the CTA holds 384 x 168 = 64512 registers at launch (__launch_bounds__(384, 1));
// setmaxnreg moves them between the producer warpgroup and the two consumer warpgroups, in
// multiples of 8: 128 P + 256 C <= 64512. The forward's consumers need ~216 at D = 128 (S, P and O
// of 128 x 128 tiles with two tiles in flight: 64 + 32 + 64, and the loop state), its producer
// more than 40 on the gather path (24, FlashAttention-3's TMA-only producer, spills there): 56 / 224.
template <int P, int C>
struct Split {
  static_assert(P % 8 == 0 && C % 8 == 0 && P >= 24 && C <= 256, "setmaxnreg counts");
  static_assert(kWarpGroup * P + 2 * kWarpGroup * C <= 384 * 168, "the CTA's registers at launch");
  static constexpr int kProducer = P, kConsumer = C;
};
using FwdSplit = Split<56, 224>;

// Named barriers (0 is __syncthreads): the consumers' turns (warpgroup cw syncs on kBarTurn + cw and
// hands the turn over on the other's), and each consumer warpgroup's epilogue.
constexpr int kBarTurn = 1, kBarEpilogue = 3;

// Forward tiles, per head dim. Keys per tile (kBN): 128 at every head dim. D = 128: the largest the
// shared memory holds with a double-buffered Q, the O staging tile and a 2-stage K / V ring. D <= 96:
// the shared memory would hold 192-256 keys, but the registers of a 128 x 192 tile (S, P and O of
// two tiles in flight) leave no room at D = 96, the exponentials bound D = 64 whatever the tile
// (tools/perf_model.py: MUFU as busy as the tensor pipe), and D-JEPA's sequences (256 tokens, 320
// with MAR's class buffer) split into 128-key tiles and one 64-key half tile without waste; the
// room goes to a deeper K / V ring instead (more loads in flight, the next item's tiles early).
template <int D>
struct FwdPlan {
  static constexpr int kQBytes = kBM * D * 2;    // one Q tile; two (double buffered across items)
  static constexpr int kOBytes = kBM * D * 2;    // the O staging tile, 64 rows per consumer warpgroup
  static constexpr int kKVTile = kBN * D * 2;    // one K or V tile
  static constexpr int kBarrierBytes = 1024;
  static constexpr int kFixed = 1024 + 2 * kQBytes + kOBytes + kBarrierBytes;  // 1024: alignment slack
  static constexpr int kFit = (kSmemLimit - kFixed) / (2 * kKVTile);
  static constexpr int kStages = kFit > kMaxStages ? kMaxStages : kFit;
  static constexpr int kSmemBytes = kFixed + kStages * 2 * kKVTile;
  static_assert(kStages >= 2 && kSmemBytes <= kSmemLimit, "shared memory per block on sm_90");
};

// Backward tiles: a work item keeps two 128-row tiles (dK/dV: K and V of 128 compacted keys; dQ:
// Q and dO of 128 queries), double buffered, and streams pairs of 64-row tiles (dK/dV: Q and dO,
// with each tile's statistics: -lse log2(e) and delta of its 64 queries; dQ: K and V) through a
// ring as deep as the shared memory allows (2 stages at D = 128, 4 below).
template <int D>
struct BwdPlan {
  static constexpr int kFixedTile = kFixedRows * D * 2, kStreamTile = kRows * D * 2;
  static constexpr int kFixedBytes = 2 * kFixedTile;     // one buffer: two tiles
  static constexpr int kStageBytes = 2 * kStreamTile;    // one stage: two tiles (multiples of 1024)
  static constexpr int kStatBytes = 2 * kRows * 4;       // one stage's -lse log2(e) and delta
  static constexpr int kBarrierBytes = 512;
  static constexpr int kFixed = 1024 + 2 * kFixedBytes + kBarrierBytes + kMaxStages * kStatBytes;
  static constexpr int kFit = (kSmemLimit - kFixed) / kStageBytes;
  static constexpr int kStages = kFit > kMaxStages ? kMaxStages : kFit;
  static constexpr int kSmemBytes = kFixed + kStages * kStageBytes;
  static_assert(kStages >= 2 && kSmemBytes <= kSmemLimit, "shared memory per block on sm_90");
};

// The tensor maps of the TMA paths, [chunk] each, 64-row boxes: loads of q, k, v, dout and the
// forward's stores of o.
struct Maps {
  CUtensorMap q[2], k[2], v[2], dout[2], o[2];
};

// How the forward writes O: TMA stores from shared memory, or register stores (o not 16-byte
// aligned, or no tensor-map encoder).
enum OPath : int { kOTma = 0, kOStores = 1 };

// Chooses the forward's load paths and encodes its maps (host). vec_ok: every q / k / v base pointer
// 16-byte aligned and every stride a multiple of 8 elements.
template <int D>
inline void plan_fwd(Params& p, Maps& m, EncodeFn enc, bool bf16, bool vec_ok, int& o_path) {
  p.tiles_m = (p.Nq + kBM - 1) / kBM;
  p.items = p.B * p.H * p.tiles_m;
  p.q_path = p.kv_path = p.do_path = kPathManual;
  o_path = kOStores;
  const long long os[3] = {static_cast<long long>(p.H) * p.Nq * D, static_cast<long long>(p.Nq) * D, D};
  bool o_ok = reinterpret_cast<std::uintptr_t>(p.o) % 16 == 0;
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) o_ok = o_ok && make_map<D>(enc, &m.o[ch], p.o, bf16, p.B, p.H, p.Nq, os, ch, kRows);
  if (o_ok) o_path = kOTma;
  if (!vec_ok) return;
  bool q_ok = true, kv_ok = p.kv_index == nullptr;
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) {
    q_ok = q_ok && make_map<D>(enc, &m.q[ch], p.q, bf16, p.B, p.H, p.Nq, p.qs, ch, kRows);
    kv_ok = kv_ok && make_map<D>(enc, &m.k[ch], p.k, bf16, p.B, p.H, p.Nk, p.ks, ch, kRows) &&
            make_map<D>(enc, &m.v[ch], p.v, bf16, p.B, p.H, p.Nk, p.vs, ch, kRows);
  }
  p.q_path = q_ok ? kPathTma : kPathGather;  // every (TMA | gather)^2 pair has a producer (pipe::with_paths)
  p.kv_path = kv_ok ? kPathTma : kPathGather;
}

// The backward's paths and maps (host): dK/dV (`dkdv`) keeps K / V and streams Q / dO, dQ keeps Q /
// dO and streams K / V; dO is contiguous.
template <int D>
inline void plan_bwd(Params& p, Maps& m, EncodeFn enc, bool bf16, bool vec_ok, bool dkdv) {
  p.tiles_m = dkdv ? (p.Nk + kFixedRows - 1) / kFixedRows : (p.Nq + kFixedRows - 1) / kFixedRows;
  p.items = p.B * p.H * p.tiles_m;
  const long long ds[3] = {static_cast<long long>(p.H) * p.Nq * D, static_cast<long long>(p.Nq) * D, D};
  const bool do_aligned = reinterpret_cast<std::uintptr_t>(p.dout) % 16 == 0;
  bool do_ok = do_aligned, q_ok = vec_ok, kv_ok = vec_ok && p.kv_index == nullptr;
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) {
    do_ok = do_ok && make_map<D>(enc, &m.dout[ch], p.dout, bf16, p.B, p.H, p.Nq, ds, ch, kRows);
    q_ok = q_ok && make_map<D>(enc, &m.q[ch], p.q, bf16, p.B, p.H, p.Nq, p.qs, ch, kRows);
    kv_ok = kv_ok && make_map<D>(enc, &m.k[ch], p.k, bf16, p.B, p.H, p.Nk, p.ks, ch, kRows) &&
            make_map<D>(enc, &m.v[ch], p.v, bf16, p.B, p.H, p.Nk, p.vs, ch, kRows);
  }
  p.do_path = do_ok ? kPathTma : (do_aligned ? kPathGather : kPathManual);
  p.q_path = q_ok ? kPathTma : (vec_ok ? kPathGather : kPathManual);
  p.kv_path = kv_ok ? kPathTma : (vec_ok ? kPathGather : kPathManual);
  // The producers are compiled for these combinations (pipe::with_bwd_paths); any other takes the
  // manual path for all three streams, which serves any alignment.
  const bool compiled = p.do_path == kPathTma && ((p.q_path == kPathTma && p.kv_path != kPathManual) ||
                                                  (p.q_path == kPathGather && p.kv_path == kPathGather));
  if (!compiled) p.q_path = p.do_path = p.kv_path = kPathManual;
}

}  // namespace pipe
}  // namespace attn
}  // namespace hopper
}  // namespace djepa
