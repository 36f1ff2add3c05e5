// The sm_90a masked-attention kernels: parameters, head-dim chunking, shared-memory plan, work
// items, and the host-side tensor-map plan (shared by csrc/attention_sm90.cu and the emulator).
//
// Contract (djepa._C.masked_attention_fwd / _bwd, djepa/ops/attention.py): q, k, v [B, H, N, D]
// with (batch, head, token) element strides and a contiguous last dim; kv_index[b] a permutation
// of 0..Nk-1 whose first kv_count[b] entries are the visible keys (both null: dense); o [B, H,
// Nq, D] contiguous, lse [B, H, Nq] float32 (natural log; 0 and o = 0 where no key is visible).
#pragma once

#include <algorithm>
#include <cstdint>

#include "hopper/ptx.cuh"

namespace djepa {
namespace hopper {
namespace attn {

constexpr int kBM = 128;  // query rows per work item: 2 consumer warpgroups x 64
constexpr int kBN = 128;  // keys per K / V tile
constexpr int kConsumers = 2;
constexpr int kThreads = kWarpGroup * (1 + kConsumers);
constexpr int kProducerRegs = 48, kConsumerRegs = 224;  // 128 * 48 + 256 * 224 = 63488 <= 65536
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// How a tile stream is loaded: TMA boxes (dense, 16-byte aligned strides), cp.async 16-byte
// gathers through kv_index (masked keys; or when the tensor map cannot be encoded), or ordinary
// loads (strides or pointers not 16-byte aligned).
enum Path : int { kPathTma = 0, kPathGather = 1, kPathManual = 2 };

// A row of D elements is stored as up to two column chunks, each its own swizzled region:
// chunk 0 = d 0..63 (128-byte rows, 128B swizzle), chunk 1 = d 64..D-1 (D = 80: 32-byte rows,
// 32B swizzle; 96: 64-byte rows, 64B; 128: 128-byte rows, 128B). So D = 80 and 96 are served
// without padding: every wgmma k step (16 d) and every TMA box lies inside one chunk.
template <int D>
struct Chunks {
  static_assert(D == 64 || D == 80 || D == 96 || D == 128, "head dims 64, 80, 96, 128");
  static constexpr int kW0 = 64, kW1 = D - 64;
  static constexpr int kN = kW1 > 0 ? 2 : 1;
  __host__ __device__ static constexpr int width(int ch) { return ch == 0 ? kW0 : kW1; }
  __host__ __device__ static constexpr int span(int ch) { return width(ch) * 2; }  // bytes per row
  __host__ __device__ static constexpr int mode(int ch) {
    return span(ch) == 128 ? kSwizzle128 : span(ch) == 64 ? kSwizzle64 : kSwizzle32;
  }
  // Byte offset of chunk ch in a tile of `rows` rows (chunk 0 first; 1024-aligned regions).
  __host__ __device__ static constexpr int region(int ch, int rows) { return ch == 0 ? 0 : rows * kW0 * 2; }
  // The swizzled byte offset of 16-byte unit u (0 .. D/8 - 1) of row r in a tile of `rows` rows.
  __host__ __device__ static constexpr uint32_t unit_offset(int r, int u, int rows) {
    return u < kW0 / 8 ? uint32_t(region(0, rows)) + swizzle_offset(mode(0), uint32_t(r * span(0) + u * 16))
                       : uint32_t(region(1, rows)) + swizzle_offset(mode(1), uint32_t(r * span(1) + (u - kW0 / 8) * 16));
  }
  static constexpr int kQBytes = kBM * D * 2;
  static constexpr int kKVBytes = kBN * D * 2;  // one K (or V) tile
  static constexpr int kStages = (232448 - 2048 - 2 * kQBytes) / (2 * kKVBytes) >= 3 ? 3 : 2;
  static constexpr int kBarrierBytes = 1024;
  static constexpr int kSmemBytes = 1024 + 2 * kQBytes + kStages * 2 * kKVBytes + kBarrierBytes;
  static_assert(kSmemBytes <= 232448, "shared memory per block on sm_90");
};

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* o;               // fwd: output; bwd: input
  float* lse;            // fwd: output; bwd: input (natural log)
  const void* dout;      // bwd: [B, H, Nq, D] contiguous
  float* delta;          // bwd: rowsum(dO * O), [B, H, Nq]
  void* dq;
  void* dk;
  void* dv;
  const int* kv_index;   // [B, Nk] or nullptr
  const int* kv_count;   // [B] or nullptr
  int B, H, Nq, Nk;
  long long qs[3], ks[3], vs[3];
  float scale, scale_log2;
  int q_path, kv_path, do_path;
  int o_path;            // pipelined forward: pipe::OPath
  int tiles_m;           // forward, dq: ceil(Nq / kBM); dk/dv: ceil(Nk / kBN) key tiles
  int items;             // B * H * tiles_m
};

// The backward kernels keep two 128-row tiles per work item (dk/dv: K and V of 128 compacted
// keys; dq: Q and dO of 128 queries), double buffered across items, and stream pairs of 64-row
// tiles (32 at D >= 96, where dK + dV alone take 96-128 fp32 registers per consumer thread and
// 64-row tiles spill) through a ring (dk/dv: Q and dO; dq: K and V).
constexpr int kFixedRows = 128;
template <int D>
__host__ __device__ constexpr int stream_rows() {
  return D >= 96 ? 32 : 64;
}
template <int D>
struct BwdShape {
  static constexpr int kStreamRows = stream_rows<D>();
  static constexpr int kFixedTile = kFixedRows * D * 2, kStreamTile = kStreamRows * D * 2;
  static constexpr int kFixedBytes = 2 * kFixedTile;    // one buffer: two tiles
  static constexpr int kStreamBytes = 2 * kStreamTile;  // one stage: two tiles
  static constexpr int kStages = (232448 - 2048 - 2 * kFixedBytes) / kStreamBytes >= 3 ? 3 : 2;
  static constexpr int kSmemBytes = 1024 + 2 * kFixedBytes + kStages * kStreamBytes + 1024;
  static_assert(kSmemBytes <= 232448, "shared memory per block on sm_90");
};

// The tensor maps of the TMA paths: [chunk] for q, k, v (4-d: d, token, head, batch).
struct Maps {
  CUtensorMap q[2], k[2], v[2], dout[2];
};

struct Item {
  int b, h, m0;
};
__host__ __device__ inline Item item_of(const Params& p, int i) {
  Item it;
  it.m0 = (i % p.tiles_m) * kBM;
  const int bh = i / p.tiles_m;
  it.h = bh % p.H;
  it.b = bh / p.H;
  return it;
}

__host__ __device__ inline int visible_count(const Params& p, int b) {
  if (!p.kv_count) return p.Nk;
  const int c = p.kv_count[b];
  return c < 0 ? 0 : (c > p.Nk ? p.Nk : c);
}

// ---------------------------------------------------------------------------------- host plan
using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// One chunk's map over a [B, H, N, D] view: box {chunk width, rows, 1, 1}.
template <int D>
inline bool make_map(EncodeFn enc, CUtensorMap* map, const void* base, bool bf16, int B, int H, int N,
                     const long long (&st)[3], int ch, int rows) {
  if (enc == nullptr || N <= 0) return false;
  const int w = Chunks<D>::width(ch);
  const char* p0 = static_cast<const char*>(base) + size_t(Chunks<D>::kW0) * 2 * ch;
  if (reinterpret_cast<std::uintptr_t>(p0) % 16) return false;
  for (int i = 0; i < 3; ++i)
    if (st[i] <= 0 || (st[i] * 2) % 16) return false;
  const cuuint64_t dims[4] = {cuuint64_t(w), cuuint64_t(N), cuuint64_t(H), cuuint64_t(B)};
  const cuuint64_t strides[3] = {cuuint64_t(st[2]) * 2, cuuint64_t(st[1]) * 2, cuuint64_t(st[0]) * 2};
  const cuuint32_t box[4] = {cuuint32_t(w), cuuint32_t(rows), 1, 1};
  const cuuint32_t es[4] = {1, 1, 1, 1};
  const int mode = Chunks<D>::mode(ch);
  const CUtensorMapSwizzle sw = mode == kSwizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                : mode == kSwizzle64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                     : CU_TENSOR_MAP_SWIZZLE_32B;
  return enc(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<char*>(p0), dims, strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, sw,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Strides of size-1 dims are arbitrary in torch (never used); give them the contiguous values so
// alignment checks and tensor maps see valid ones. st: (batch, head, token) element strides.
inline void normalize_strides(long long (&st)[3], int B, int H, int N, int D) {
  if (N <= 1) st[2] = (D + 7) / 8 * 8;
  if (H <= 1) st[1] = st[2] * (N > 0 ? N : 1);
  if (B <= 1) st[0] = st[1] * (H > 0 ? H : 1);
}

// Chooses the load paths and encodes the maps. vec_ok: every base pointer 16-byte aligned and
// every stride (of a dim longer than 1) a multiple of 8 elements.
template <int D>
inline void plan(Params& p, Maps& m, EncodeFn enc, bool bf16, bool vec_ok) {
  p.tiles_m = (p.Nq + kBM - 1) / kBM;
  p.items = p.B * p.H * p.tiles_m;
  p.q_path = kPathManual;
  p.kv_path = kPathManual;
  p.do_path = kPathManual;
  if (!vec_ok) return;
  bool q_ok = true, kv_ok = p.kv_index == nullptr;
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) {
    q_ok = q_ok && make_map<D>(enc, &m.q[ch], p.q, bf16, p.B, p.H, p.Nq, p.qs, ch, kBM);
    if (kv_ok) {
      kv_ok = make_map<D>(enc, &m.k[ch], p.k, bf16, p.B, p.H, p.Nk, p.ks, ch, kBN) &&
              make_map<D>(enc, &m.v[ch], p.v, bf16, p.B, p.H, p.Nk, p.vs, ch, kBN);
    }
  }
  p.q_path = q_ok ? kPathTma : kPathGather;
  p.kv_path = kv_ok ? kPathTma : kPathGather;
}

// The backward's paths and maps: dk/dv (`dkdv`) streams 64-row Q / dO tiles and keeps 128-row
// K / V tiles; dq streams 64-row K / V tiles and keeps 128-row Q / dO tiles. dO is contiguous.
template <int D>
inline void plan_bwd(Params& p, Maps& m, EncodeFn enc, bool bf16, bool vec_ok, bool dkdv) {
  const int q_rows = dkdv ? stream_rows<D>() : kFixedRows, kv_rows = dkdv ? kFixedRows : stream_rows<D>();
  p.tiles_m = dkdv ? (p.Nk + kFixedRows - 1) / kFixedRows : (p.Nq + kFixedRows - 1) / kFixedRows;
  p.items = p.B * p.H * p.tiles_m;
  const long long ds[3] = {static_cast<long long>(p.H) * p.Nq * D, static_cast<long long>(p.Nq) * D, D};
  bool do_ok = reinterpret_cast<std::uintptr_t>(p.dout) % 16 == 0;
  bool q_ok = vec_ok, kv_ok = vec_ok && p.kv_index == nullptr;
  for (int ch = 0; ch < Chunks<D>::kN; ++ch) {
    do_ok = do_ok && make_map<D>(enc, &m.dout[ch], p.dout, bf16, p.B, p.H, p.Nq, ds, ch, q_rows);
    q_ok = q_ok && make_map<D>(enc, &m.q[ch], p.q, bf16, p.B, p.H, p.Nq, p.qs, ch, q_rows);
    kv_ok = kv_ok && make_map<D>(enc, &m.k[ch], p.k, bf16, p.B, p.H, p.Nk, p.ks, ch, kv_rows) &&
            make_map<D>(enc, &m.v[ch], p.v, bf16, p.B, p.H, p.Nk, p.vs, ch, kv_rows);
  }
  p.do_path = do_ok ? kPathTma : (reinterpret_cast<std::uintptr_t>(p.dout) % 16 == 0 ? kPathGather : kPathManual);
  p.q_path = q_ok ? kPathTma : (vec_ok ? kPathGather : kPathManual);
  p.kv_path = kv_ok ? kPathTma : (vec_ok ? kPathGather : kPathManual);
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
