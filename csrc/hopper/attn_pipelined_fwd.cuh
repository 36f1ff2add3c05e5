// The pipelined sm_90a masked-attention forward (FlashAttention-3's schedule, tools/perf_designs.py
// attn_fwd_pipelined): warp-specialised, persistent, wgmma + TMA / cp.async gathers + TMA stores.
//
// o = softmax(scale q k[visible]^T) v[visible] and lse = ln sum exp(scale q k^T) per query row, as the
// baseline kernel (attn_fwd_kernel.cuh; contract in attn_config.cuh). 384 threads: warpgroup 0
// produces (attn_pipelined_producer.cuh, 56 registers), warpgroups 1 and 2 consume (224), 64 query
// rows each of a 128-row work item; persistent over items, Q double buffered, the K / V ring runs
// across items.
//
// One consumer warpgroup, per 128-key tile t of an item with n tiles (FlashAttention-3's mainloop):
//   turn   : wait for its turn (named barrier kBarTurn + cw), issue S_t = Q K_t^T and
//            O += P_{t-1} V_{t-1} (O rescaled first), hand the turn to the other warpgroup;
//   wait<1>: S_t is done (P V still runs) -> release K_t -> online softmax of S_t (masked only on
//            the last tile) under the P V;
//   wait<0>: P V is done -> release V_{t-1} -> P_t to 16-bit register fragments.
// The first tile issues S alone, the last P V runs after the loop. So per tile the tensor pipe has
// one warpgroup's S and P V queued while the other warpgroup runs its softmax, and within a
// warpgroup the softmax of S_t overlaps its own P V: tools/perf_model.py models the loop at ~1.0
// tensor-busy at D = 128 (the baseline: 0.49), bounded by the exponentials at D = 64.
// K and V have their own empty barriers, so the producer refills K_t as soon as S_t is done.
// The last tile runs 64 keys wide (n64 S, 4 P V k steps, half the loads) when at most 64 keys of the
// item remain: a sample with 64 visible keys (D-JEPA at 25% of 256) costs a 64-key tile.
//
// Epilogue: O / l to 16-bit in the warpgroup's 64 rows of a staging tile (the Q layout), then one
// TMA store per chunk (rows past Nq are not written); the tile is written again only after the
// store has read it (bulk_wait_read in the storing thread, then the warpgroup's barrier). lse by
// register stores. Where o cannot take a tensor map, register stores as the baseline.
#pragma once

#include "hopper/attn_fwd_mainloop.cuh"
#include "hopper/attn_pipelined_producer.cuh"
#include "hopper/attn_softmax.cuh"

namespace djepa {
namespace hopper {
namespace attn {
namespace pipe {

// ---------------------------------------------------------------------------- descriptors
// K-major (Q, K: d contiguous) chunk ch of a tile laid out for `rows` rows, from row row0, k step 0.
template <int D>
__device__ __forceinline__ uint64_t kmajor(uint32_t tile, int rows, int ch, int row0) {
  using C = Chunks<D>;
  const int mode = DJEPA_FAULT_VALUE(kPlantSwizzle, C::mode(ch), kSwizzle64);
  const uint32_t sbo = DJEPA_FAULT_VALUE(kPlantStride, 8 * C::span(ch), 4 * C::span(ch));
  return make_desc(tile + C::region(ch, rows) + row0 * C::span(ch), 16, sbo, mode);
}
// N-major (V as B: d contiguous, keys = k) chunk ch of a tile laid out for `rows` rows, key 0.
template <int D>
__device__ __forceinline__ uint64_t nmajor(uint32_t tile, int rows, int ch) {
  using C = Chunks<D>;
  return make_desc(tile + C::region(ch, rows), rows * C::span(ch), 8 * C::span(ch), C::mode(ch));
}
// A descriptor moved by `bytes` (a multiple of 16): shared addresses stay below 2^18, so the start
// field (address >> 4, 14 bits) takes the sum without a carry.
__device__ __forceinline__ uint64_t desc_at(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// s (64 x NS) = Q K^T: D / 16 wgmma.m64nNSk16, both operands K-major.
template <typename T, int D, int NS>
__device__ __forceinline__ void issue_qk(float (&s)[NS / 2], const uint64_t (&qd)[2], const uint64_t (&kd)[2]) {
  using C = Chunks<D>;
#pragma unroll
  for (int ch = 0; ch < C::kN; ++ch)
#pragma unroll
    for (int kk = 0; kk < C::width(ch) / 16; ++kk)
      wgmma_ss<T, NS, 0, 0>(s, desc_at(qd[ch], 32 * kk), desc_at(kd[ch], 32 * kk), ch > 0 || kk > 0);
}

// acc (64 x D) += A (registers: 64 x KS, KS / 16 fragments) B (KS rows of a tile, N-major): per 16-row
// k step one wgmma per head-dim chunk.
// accumulate = 0: acc = A B (acc is not read).
template <typename T, int D, int KS>
__device__ __forceinline__ void issue_rows(OAcc<D>& acc, const uint32_t (&a)[KS / 16][4], const uint64_t (&bd)[2],
                                           int accumulate = 1) {
  constexpr int W1 = Chunks<D>::kW1;
#pragma unroll
  for (int kk = 0; kk < KS / 16; ++kk) {
    const int scale_d = kk > 0 ? 1 : accumulate;
    wgmma_rs<T, 64, 1>(acc.o0, a[kk], desc_at(bd[0], 16 * kk * Chunks<D>::span(0)), scale_d);
    if constexpr (W1 > 0)
      wgmma_rs<T, (W1 > 0 ? W1 : 64), 1>(acc.o1, a[kk], desc_at(bd[1], 16 * kk * Chunks<D>::span(1)), scale_d);
  }
}

template <int D>
__device__ __forceinline__ void scale_rows(OAcc<D>& acc, const float (&f)[2]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) acc.o0[i] *= f[(i >> 1) & 1];
  if constexpr (Chunks<D>::kW1 > 0) {
#pragma unroll
    for (int i = 0; i < Chunks<D>::kW1 / 2; ++i) acc.o1[i] *= f[(i >> 1) & 1];
  }
}

// After the wgmma.wait_group that retires them: the accumulators are read only from here on (the
// compiler must not move those reads above the wait, which it sees as touching no register).
template <int D>
__device__ __forceinline__ void fence_rows(OAcc<D>& acc) {
  fence_regs(acc.o0);
  fence_regs(acc.o1);
}

template <int D>
__device__ __forceinline__ void zero_rows(OAcc<D>& acc) {
#pragma unroll
  for (int i = 0; i < 32; ++i) acc.o0[i] = 0.f;
#pragma unroll
  for (int i = 0; i < int(sizeof(acc.o1) / sizeof(float)); ++i) acc.o1[i] = 0.f;
}

// ---------------------------------------------------------------------------- softmax
// Online softmax of one tile's scores (NS / 2 per thread; entry i in row (i >> 1) & 1, column
// 8 (i >> 2) + 2 c + (i & 1), m64nN accumulator layout). m: the rows' running maxima of the raw
// scores; l: this thread's share of the running sums; alpha: the factor the old O and l take.
// p = 2^(s scale log2(e) - m scale log2(e)): one FFMA and one ex2 per score (scale > 0: the host
// runs the baseline kernels otherwise). MASK: columns >= valid are no keys (the last tile only).
// Every processed tile holds a key, so the new maxima are finite and nothing computes inf - inf.
template <int NS, bool MASK>
__device__ __forceinline__ void softmax_tile(float (&s)[NS / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             float scale_log2, int valid, int c) {
  if (MASK && valid < NS) {
#pragma unroll
    for (int i = 0; i < NS / 2; ++i)
      if (8 * (i >> 2) + 2 * c + (i & 1) >= valid) s[i] = -INFINITY;
  }
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int i = 0; i < NS / 2; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
  float ms[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mx[h] = quad_max(mx[h]);
    alpha[h] = ex2((m[h] - mx[h]) * scale_log2);
    m[h] = mx[h];
    ms[h] = mx[h] * scale_log2;
    l[h] *= alpha[h];
  }
#pragma unroll
  for (int i = 0; i < NS / 2; ++i) {
    const int h = (i >> 1) & 1;
    s[i] = ex2(fmaf(s[i], scale_log2, -ms[h]));
    l[h] += s[i];
  }
}

template <typename T, int NS>
__device__ __forceinline__ void to_frags(uint32_t (&a)[NS / 16][4], const float (&s)[NS / 2]) {
#pragma unroll
  for (int kk = 0; kk < NS / 16; ++kk) to_a_frag<T>(a[kk], &s[8 * kk]);
}

// ---------------------------------------------------------------------------- shared memory
// One pointer and constant offsets (a struct of pointers would hold a register pair each).
template <int D>
struct FwdSmem {
  using P = FwdPlan<D>;
  static constexpr int kO = 2 * P::kQBytes;              // [2][kQBytes] Q, then the O staging tile:
  static constexpr int kKV = kO + P::kOBytes;            // consumer warpgroup cw's 64 rows at cw * kRows * D * 2
  static constexpr int kBars = kKV + P::kStages * 2 * P::kKVTile;  // then [kStages][K tile | V tile]
  unsigned char* base;
  __device__ FwdSmem() {
    unsigned char* raw = dynamic_smem();
    base = raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
  }
  __device__ __forceinline__ unsigned char* q(int slot) const { return base + slot * P::kQBytes; }
  __device__ __forceinline__ unsigned char* o(int cw) const { return base + kO + cw * kRows * D * 2; }
  __device__ __forceinline__ unsigned char* k_tile(int s) const { return base + kKV + s * 2 * P::kKVTile; }
  __device__ __forceinline__ unsigned char* v_tile(int s) const { return k_tile(s) + P::kKVTile; }
  __device__ __forceinline__ uint64_t* bar(int i) const { return reinterpret_cast<uint64_t*>(base + kBars) + i; }
  __device__ __forceinline__ uint64_t* q_full(int slot) const { return bar(slot); }
  __device__ __forceinline__ uint64_t* q_empty(int slot) const { return bar(2 + slot); }
  __device__ __forceinline__ uint64_t* k_full(int s) const { return bar(4 + s); }
  __device__ __forceinline__ uint64_t* v_full(int s) const { return bar(4 + P::kStages + s); }
  __device__ __forceinline__ uint64_t* k_empty(int s) const { return bar(4 + 2 * P::kStages + s); }
  __device__ __forceinline__ uint64_t* v_empty(int s) const { return bar(4 + 3 * P::kStages + s); }
  __device__ void init(int q_path, int kv_path) const {
    for (int i = 0; i < 2; ++i) {
      mbar_init(q_full(i), full_count(q_path));
      mbar_init(q_empty(i), 2 * 4);  // lane 0 of every consumer warp
    }
    for (int s = 0; s < P::kStages; ++s) {
      mbar_init(k_full(s), full_count(kv_path));
      mbar_init(v_full(s), full_count(kv_path));
      mbar_init(k_empty(s), 2 * 4);
      mbar_init(v_empty(s), 2 * 4);
    }
    mbar_init_fence();
  }
};

// ---------------------------------------------------------------------------- producer
// One loop per pair of load paths (Q_PATH, KV_PATH), so each holds only its own paths' state in the
// producer's registers.
template <typename T, int D, int Q_PATH, int KV_PATH>
__device__ __forceinline__ void fwd_producer(const Params& p, const Maps& maps, const FwdSmem<D> sm, int ptid) {
  using P = FwdPlan<D>;
  Pos<P::kStages> pos;
  int n_q = 0;
  for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
    const Item it = item_of(p, i);
    const int count = visible_count(p, it.b);
    if (count == 0) continue;
    const int slot = n_q & 1;
    if (fills(Q_PATH, ptid)) mbar_wait(sm.q_empty(slot), ((n_q >> 1) & 1) ^ 1);
    ++n_q;
    fill_tile<T, D, kBM>(Q_PATH, sm.q(slot), maps.q,
                         static_cast<const T*>(p.q) + it.b * p.qs[0] + it.h * p.qs[1], p.qs[2], nullptr, it.m0, kBM,
                         p.Nq, it.h, it.b, sm.q_full(slot), ptid);
    const int n = (count + kBN - 1) / kBN;
    const bool half = count - (n - 1) * kBN <= kHalf;
    for (int t = 0; t < n; ++t) {
      if (fills(KV_PATH, ptid)) {
        mbar_wait(sm.k_empty(pos.stage), pos.phase ^ 1);
        mbar_wait(sm.v_empty(pos.stage), pos.phase ^ 1);
      }
      fill_kv<T, D, kBN>(KV_PATH, sm.k_tile(pos.stage), sm.v_tile(pos.stage), maps,
                         static_cast<const T*>(p.k) + it.b * p.ks[0] + it.h * p.ks[1], p.ks[2],
                         static_cast<const T*>(p.v) + it.b * p.vs[0] + it.h * p.vs[1], p.vs[2],
                         p.kv_index ? p.kv_index + static_cast<long long>(it.b) * p.Nk : nullptr, t * kBN,
                         t == n - 1 && half ? kHalf : kBN, count, it.h, it.b, sm.k_full(pos.stage),
                         sm.v_full(pos.stage), ptid);
      pos.next();
    }
  }
}

// ---------------------------------------------------------------------------- consumer
template <typename T, int D>
struct FwdConsumer {
  using P = FwdPlan<D>;
  const Params& p;
  const Maps& maps;
  const FwdSmem<D> sm;
  const int cw, warp, lane, c;
  Pos<P::kStages> kpos, vpos;  // the next K tile to read; the next V tile (one behind while P V waits)
  int n_q = 0;
  bool first = true;
  uint64_t qd[2];
  OAcc<D> o;
  float m[2], l[2], alpha[2];

  __device__ FwdConsumer(const Params& p_, const Maps& maps_, const FwdSmem<D> sm_, int cw_)
      : p(p_), maps(maps_), sm(sm_), cw(cw_), warp((threadIdx.x / 32) % 4), lane(threadIdx.x % 32), c(lane & 3) {}

  // The ping-pong turns: warpgroup cw issues its GEMMs between its own barrier and the other's.
  __device__ __forceinline__ void turn_wait() { named_bar_sync(kBarTurn + cw, 2 * kWarpGroup); }
  __device__ __forceinline__ void turn_pass() { named_bar_arrive(kBarTurn + 1 - cw, 2 * kWarpGroup); }

  template <int N>
  __device__ __forceinline__ void fence_softmax(float (&s)[N]) {
    fence_regs(s);
    fence_regs(m);
    fence_regs(l);
    fence_regs(alpha);
  }

  __device__ __forceinline__ void wait_k(bool plant_skip) {
    DJEPA_FAULT_SKIP(kPlantWait, plant_skip) mbar_wait(sm.k_full(kpos.stage), kpos.phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
  }
  __device__ __forceinline__ void release_k(bool last, int slot) {
    if (lane == 0) {
      mbar_arrive(sm.k_empty(kpos.stage));
      if (last) mbar_arrive(sm.q_empty(slot));  // the item's last S has read Q
    }
    kpos.next();
  }
  __device__ __forceinline__ void kdesc(uint64_t (&kd)[2]) const {
    const uint32_t kt = smem_u32(sm.k_tile(kpos.stage));
#pragma unroll
    for (int ch = 0; ch < Chunks<D>::kN; ++ch) kd[ch] = kmajor<D>(kt, kBN, ch, 0);
  }
  __device__ __forceinline__ void vdesc(uint64_t (&vd)[2]) {
    mbar_wait(sm.v_full(vpos.stage), vpos.phase);
    if (p.kv_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    const uint32_t vt = smem_u32(sm.v_tile(vpos.stage));
#pragma unroll
    for (int ch = 0; ch < Chunks<D>::kN; ++ch) vd[ch] = nmajor<D>(vt, kBN, ch);
  }
  __device__ __forceinline__ void release_v() {
    mbar_arrive_if(sm.v_empty(vpos.stage), lane == 0);
    vpos.next();
  }

  // The item's first tile: S_0 alone (NS keys; MASK when it is also the last).
  template <int NS, bool MASK>
  __device__ __forceinline__ void first_tile(float (&s)[NS / 2], uint32_t (&pn)[NS / 16][4], int valid, int slot,
                                             bool last) {
    wait_k(first);
    uint64_t kd[2];
    kdesc(kd);
    turn_wait();
    wgmma_fence();
    issue_qk<T, D, NS>(s, qd, kd);
    wgmma_commit();
    turn_pass();
    const bool early = DJEPA_FAULT_VALUE(kPlantEarlyRelease, false, true);
    if (early) release_k(last, slot);
    wgmma_wait<0>();
    fence_regs(s);
    if (!early) release_k(last, slot);
    softmax_tile<NS, MASK>(s, m, l, alpha, p.scale_log2, valid, c);
    to_frags<T, NS>(pn, s);
  }

  // Tile t: S_t (NS keys) with P_{t-1} V_{t-1} (128 keys) in flight, then S_t's softmax under the P V.
  // first_pv (t = 1): O = P_0 V_0 (O holds the last item's values, rescaled for nothing).
  template <int NS, bool MASK>
  __device__ __forceinline__ void step(float (&s)[NS / 2], uint32_t (&pn)[NS / 16][4],
                                       uint32_t (&pp)[kBN / 16][4], int valid, int slot, bool last, bool first_pv) {
    wait_k(false);
    uint64_t kd[2], vd[2];
    kdesc(kd);
    turn_wait();
    wgmma_fence();
    issue_qk<T, D, NS>(s, qd, kd);
    wgmma_commit();
    scale_rows<D>(o, alpha);
    vdesc(vd);
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
    issue_rows<T, D, kBN>(o, pp, vd, first_pv ? 0 : 1);
    wgmma_commit();
    turn_pass();
    wgmma_wait<1>();
    fence_regs(s);
    softmax_tile<NS, MASK>(s, m, l, alpha, p.scale_log2, valid, c);
    // The softmax must run here, under the P V. ptxas issues a wait_group as early as its basic block
    // allows, and nothing ties the softmax to it: K's release, a branch (lane 0), placed after the
    // softmax starts the block the wait lands in, so the wait stays after the softmax (K is released
    // a softmax later; the ring has a stage to spare).
    fence_softmax(s);
    release_k(last, slot);
    wgmma_wait<0>();
    fence_rows(o);
    release_v();
    to_frags<T, NS>(pn, s);
  }

  // The item's last P V (KS keys); only: its first.
  template <int KS>
  __device__ __forceinline__ void last_pv(uint32_t (&pp)[KS / 16][4], bool only) {
    uint64_t vd[2];
    if (!only) scale_rows<D>(o, alpha);
    vdesc(vd);
    DJEPA_FAULT_SKIP(kPlantRegFence, true) wgmma_fence();
    issue_rows<T, D, KS>(o, pp, vd, only ? 0 : 1);
    wgmma_commit();
    DJEPA_FAULT_SKIP(kPlantWgmmaWait, true) wgmma_wait<0>();
    fence_rows(o);
    release_v();
  }

  __device__ __forceinline__ void tiles(int count) {
    const int slot = n_q & 1;
    DJEPA_FAULT_SKIP(kPlantWait, first) mbar_wait(sm.q_full(slot), (n_q >> 1) & 1);
    if (p.q_path != kPathTma) DJEPA_FAULT_SKIP(kPlantFence, true) fence_proxy_async();
    const uint32_t qt = smem_u32(sm.q(slot));
#pragma unroll
    for (int ch = 0; ch < Chunks<D>::kN; ++ch) qd[ch] = kmajor<D>(qt, kBM, ch, kRows * cw);
    const int n = (count + kBN - 1) / kBN, rem = count - (n - 1) * kBN;
    float s[kBN / 2];
    uint32_t pf[kBN / 16][4];
    if (n == 1) {
      if (rem <= kHalf) {
        float sh[kHalf / 2];
        uint32_t ph[kHalf / 16][4];
        first_tile<kHalf, true>(sh, ph, rem, slot, true);
        last_pv<kHalf>(ph, true);
      } else {
        first_tile<kBN, true>(s, pf, rem, slot, true);
        last_pv<kBN>(pf, true);
      }
    } else {
      first_tile<kBN, false>(s, pf, kBN, slot, false);
      const int full_end = rem <= kHalf ? n - 1 : n;
      for (int t = 1; t < full_end; ++t) step<kBN, true>(s, pf, pf, t == n - 1 ? rem : kBN, slot, t == n - 1, t == 1);
      if (rem <= kHalf) {
        float sh[kHalf / 2];
        uint32_t ph[kHalf / 16][4];
        step<kHalf, true>(sh, ph, pf, rem, slot, true, n == 2);
        last_pv<kHalf>(ph, false);
      } else {
        last_pv<kBN>(pf, false);
      }
    }
    ++n_q;
    first = false;
  }

  // o = O / l, lse = ln l + scale m per row; zeros for rows without a visible key.
  __device__ __forceinline__ void epilogue(const Item& it) {
    const int g = lane >> 2;
    const long long row_base = (static_cast<long long>(it.b) * p.H + it.h) * p.Nq;
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float lt = quad_sum(l[h]);
      inv[h] = lt > 0.f ? 1.f / lt : 0.f;
      const int row = it.m0 + kRows * cw + 16 * warp + g + 8 * h;
      if (c == 0 && row < p.Nq) p.lse[row_base + row] = lt > 0.f ? m[h] * p.scale + logf(lt) : 0.f;
    }
    const int fx = DJEPA_FAULT_VALUE(kPlantFragment, 0, 1);
    constexpr int W1 = Chunks<D>::kW1;
    if (p.o_path == kOTma) {
      const bool storer = threadIdx.x % kWarpGroup == 0;
      unsigned char* so = sm.o(cw);
      if (storer) bulk_wait_read<0>();  // the previous item's store has read the tile
      named_bar_sync(kBarEpilogue + cw, kWarpGroup);
      // One stmatrix.x4 per pair of 16-byte units (8 columns) of the warp's 16 rows: matrix m holds
      // rows 8 (m & 1) .. + 7 of unit 2 k + (m >> 1); lane l gives row (l & 7) + 8 ((l >> 3) & 1) of
      // unit 2 k + (l >> 4). Units 0..7 are O's first chunk (o0), 8.. its second (o1).
      const int row = 16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        uint32_t r[4];
#pragma unroll
        for (int mtx = 0; mtx < 4; ++mtx) {
          const int h = mtx & 1, j = 2 * k + (mtx >> 1), i = 4 * (j % 8) + 2 * h;
          if (j < 8) r[mtx] = pack2<T>(o.o0[(i + fx) & 31] * inv[h], o.o0[(i + 1 + fx) & 31] * inv[h]);
          else r[mtx] = pack2<T>(o.o1[i % (W1 > 0 ? W1 / 2 : 2)] * inv[h], o.o1[(i + 1) % (W1 > 0 ? W1 / 2 : 2)] * inv[h]);
        }
        stmatrix_x4(so + Chunks<D>::unit_offset(row, 2 * k + (lane >> 4), kRows), r);
      }
      fence_proxy_async();
      named_bar_sync(kBarEpilogue + cw, kWarpGroup);
      if (storer && it.m0 + kRows * cw < p.Nq) {
#pragma unroll
        for (int ch = 0; ch < Chunks<D>::kN; ++ch)
          tma_store_4d(&maps.o[ch], so + Chunks<D>::region(ch, kRows), 0, it.m0 + kRows * cw, it.h, it.b);
        bulk_commit();
      }
      return;
    }
    T* ob = static_cast<T*>(p.o);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = it.m0 + kRows * cw + 16 * warp + g + 8 * h;
      if (row >= p.Nq) continue;
      T* orow = ob + (row_base + row) * D;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int i = 4 * j + 2 * h;
        *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * c) =
            pack2<T>(o.o0[(i + fx) & 31] * inv[h], o.o0[(i + 1 + fx) & 31] * inv[h]);
      }
      if constexpr (W1 > 0) {
#pragma unroll
        for (int j = 0; j < W1 / 8; ++j) {
          const int i = 4 * j + 2 * h;
          *reinterpret_cast<uint32_t*>(orow + 64 + 8 * j + 2 * c) = pack2<T>(o.o1[i] * inv[h], o.o1[i + 1] * inv[h]);
        }
      }
    }
  }

  __device__ __forceinline__ void run() {
    if (cw == 0) named_bar_arrive(kBarTurn, 2 * kWarpGroup);  // the first turn is warpgroup 0's
    zero_rows<D>(o);  // an item's first P V overwrites O; only an item without keys stores these zeros
    for (int i = blockIdx.x; i < p.items; i += gridDim.x) {
      const Item it = item_of(p, i);
      const int count = visible_count(p, it.b);
      m[0] = m[1] = -INFINITY;
      l[0] = l[1] = 0.f;
      if (count > 0) tiles(count);
      else zero_rows<D>(o);
      epilogue(it);
    }
    if (p.o_path == kOTma && threadIdx.x % kWarpGroup == 0) bulk_wait_read<0>();  // before the CTA's smem goes
  }
};

}  // namespace pipe

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attn_fwd_pipelined_sm90_kernel(const __grid_constant__ Params p, const __grid_constant__ pipe::Maps maps) {
#if defined(DJEPA_HOPPER_BODY)
  pipe::FwdSmem<D> sm;
  const int tid = threadIdx.x, wg = pipe::uniform_warpgroup();
  if (tid == 0) sm.init(p.q_path, p.kv_path);
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<pipe::FwdSplit::kProducer>();
    if (p.q_path == kPathTma && p.kv_path == kPathTma && tid != 0) return;
    pipe::with_paths(p.q_path, p.kv_path, [&](auto qp, auto kvp) {
      pipe::fwd_producer<T, D, decltype(qp)::value, decltype(kvp)::value>(p, maps, sm, tid);
    });
  } else {
    setmaxnreg_inc<pipe::FwdSplit::kConsumer>();
    pipe::FwdConsumer<T, D> consumer(p, maps, sm, wg - 1);
    consumer.run();
  }
#endif
}

}  // namespace attn
}  // namespace hopper
}  // namespace djepa
