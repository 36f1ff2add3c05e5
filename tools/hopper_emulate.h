// Runs the sm_90a kernels of csrc/hopper/ on the CPU (tools/*_sm90_emulate.cpp), on top of
// tools/cuda_emulate.h (threadIdx/blockIdx, one std::thread per CUDA thread).
//
// Emulated from the PTX ISA, with the checks a GPU would not give (each an EMU-ERROR):
//  * wgmma.mma_async (m64nNk16, f16/bf16 -> f32; A from shared memory or registers): the matrix
//    descriptor is decoded field by field (start address, leading / stride byte offsets, swizzle
//    mode 128/64/32 B or none, base offset), each element's address follows the canonical
//    K-major / MN-major layouts and the swizzle is applied to the address bits, as the hardware
//    does; accumulator and register-A fragments follow the ISA's m64nNk16 layouts.
//    Asynchrony: an mma runs at the wgmma.wait_group that retires its group (the latest moment
//    the ISA allows). Between issue and that wait the accumulator and register-A fragment hold
//    signalling NaNs (the values live in a shadow copy): a write to them there is an error (found
//    at the next issue or at the retirement), and a read traps (SIGFPE on the arithmetic, with
//    FE_INVALID unmasked while registers are in flight; DJEPA_EMU_FPE=0 turns that off).
//    wgmma.fence: a thread's stack is snapshotted at each wgmma.fence; an accumulator or A
//    fragment written after the fence and before the wgmma.mma_async that uses it (not chained
//    in flight) is an error, as is a wgmma with no wgmma.fence before it.
//  * Happens-before: every thread, warpgroup (its retired wgmma groups) and mbarrier (its
//    completed phases) has a vector-clock component. mbarrier arrive / complete and wait,
//    bar.sync / bar.arrive and __syncthreads order threads as the ISA's release / acquire
//    patterns do; a second clock per thread tracks which generic-proxy writes a
//    fence.proxy.async has made visible to the async proxy, and travels along the same edges.
//    Shared memory is tracked in 16-byte chunks (last writer, in-flight copies, the wgmma groups
//    reading it). Errors, whatever the thread schedule:
//      - a wgmma reading a chunk a TMA / cp.async has not finished writing, or whose copy's
//        mbarrier phase it has not observed, or that nothing wrote;
//      - a wgmma reading ordinary stores (st.shared, or landed cp.async: both the generic proxy)
//        without a fence.proxy.async that comes after the store (in the storing thread, or in a
//        thread that observed the store) and before the wgmma: a fence by another thread that
//        has not synchronised with the store does not count;
//      - a chunk written (st.shared, or a TMA / cp.async issued into it) before the wgmma groups
//        reading it have retired (wgmma.wait_group) and that retirement is ordered before the
//        write (a stage released on its empty barrier too early);
//      - a TMA (async proxy) overwriting ordinary stores without a proxy fence between them, and
//        writes not ordered after the previous copy into the chunk completed.
//    The other direction (an async-proxy access, then a generic access) needs no fence once the
//    completion is observed: the ISA follows the completion of cp.async.bulk and of
//    wgmma.mma_async by an implicit generic-async proxy fence; before it is observed, it is the
//    race above.
//  * mbarrier: init / arrive / arrive.expect_tx / try_wait.parity with phases and transaction
//    counts; too many arrivals is an error, as is a use not ordered after the init. TMA
//    (cp.async.bulk.tensor 2-5d) and cp.async (16 B, zero fill, .mbarrier.arrive.noinc) are
//    queued on their barrier and land only when a thread waits on it (or the barrier's next
//    phase gets its first arrival): data read without waiting is not there (0xFF poison or a
//    stale tile). The tensor map is emulated: encode_tiled() has cuTensorMapEncodeTiled's
//    signature and checks; OOB elements are zero filled; the destination must be aligned to the
//    swizzle pattern.
//  * setmaxnreg: 24..256 in multiples of 8, .inc never below and .dec never above the warp's
//    count, the same sequence in every warp of a warpgroup and every lane of a warp, and the
//    registers come from the CTA's pool (threads x the count at entry, 65536 / threads rounded
//    down to 8): an .inc waits for registers released by .dec, and one that no warp can satisfy
//    any more (the warpgroups ask for more than the CTA holds) is an error.
//  * CTAs: blocks run two at a time (DJEPA_EMU_CTAS), each with its own shared memory and
//    barriers, the higher-numbered one started first and the next once it is under way, so a
//    persistent grid's CTAs interleave as on the GPU and a kernel that relies on CTAs running in
//    order (or one at a time) is caught. atomicAdd / atomicExch / atomicCAS / __threadfence for global memory.
//  * Clusters (launch(..., cluster)): the CTAs of a cluster run at the same time and share one
//    clock space (the happens-before rules above hold across them); %cluster_ctarank;
//    barrier.cluster (arrive.release + wait.acquire, every thread of every CTA); mbarrier arrive
//    on a peer CTA's barrier (mapa + mbarrier.arrive.shared::cluster); TMA multicast (the box
//    lands at the same offset in every CTA of the mask and completes bytes on each one's
//    mbarrier at the same offset; the write rules are checked in each destination). Errors: a
//    remote arrive, or a multicast into a CTA, after all of that CTA's threads have exited (a
//    CTA must not exit while its peers may still access its shared memory).
//  * TMA stores (cp.async.bulk.tensor shared -> global, bulk groups): checked at issue like a
//    wgmma read (the staged bytes written by the issuing thread, or by threads it synchronised
//    with, and made visible to the async proxy by a fence.proxy.async ordered before the store),
//    performed at the cp.async.bulk.wait_group(.read) that retires their group (the latest moment
//    the ISA allows; elements outside the tensor are not written). Errors: a chunk written while a
//    store still reads it, or not ordered after the wait_group.read that ended the read; a thread
//    exiting with stores not waited for. 4- and 8-byte shared stores (st_shared4 / st_shared8)
//    are tracked per 4-byte word, so lanes writing neighbouring words of one 16-byte chunk do not
//    race.
//  * stmatrix.m8n8.x4 (each lane's 16-byte row a generic store of that lane).
//  * named barriers (bar.sync / bar.arrive with thread counts), warp shuffles for up to 32 warps,
//    ex2.approx.
//  * a watchdog: no progress for DJEPA_EMU_DEADLOCK_S seconds (default 30) prints what every
//    waiting thread waits on and exits with status 3 (a missing arrive hangs a GPU).
//  * DJEPA_EMU_LAG="tids:ms": the given threads sleep after every barrier wait, to expose races
//    that need one thread to lag behind the others.
// Not emulated: clusters along y / z, distributed shared memory loads and stores, generic loads
// of shared memory (so no generic-read -> async-write check), the real concurrency of the copy
// engine (copies land lazily, at waits), timing. Limits: shared memory written by plain C++
// stores is invisible to the checks (kernels store through st_shared16; a wgmma reading such
// bytes is reported as reading what nothing wrote); a warpgroup's wgmma operands are checked
// with the clocks of its first thread (every consumer thread of these kernels waits and fences).
#pragma once

#ifndef DJEPA_HOPPER_EMULATE
#define DJEPA_HOPPER_EMULATE 1
#endif

#include "cuda_emulate.h"

#include <cuda.h>
#include <fenv.h>
#include <signal.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>

namespace hemu {

constexpr size_t kWindowBytes = 256 * 1024;   // the emulated shared window of one block
constexpr size_t kSmemLimit = 232448;          // 227 KiB: sm_90's per-block opt-in maximum
constexpr size_t kChunks = kWindowBytes / 16;
constexpr int kMaxWarpGroups = 8;
constexpr int kMaxBars = 64;                   // mbarriers per block with a clock component
constexpr int kSmRegisters = 65536;

// ------------------------------------------------------------------------------ errors / stats
inline std::atomic<int> g_errors{0};
inline std::mutex g_print_m;

inline void vfail(const char* fmt, va_list ap) {
  const int n = g_errors.fetch_add(1);
  if (n >= 16) return;
  std::lock_guard<std::mutex> lk(g_print_m);
  std::printf("EMU-ERROR (block %u, thread %u): ", blockIdx.x, threadIdx.x);
  std::vprintf(fmt, ap);
  std::printf("\n");
  std::fflush(stdout);
}
inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
  va_end(ap);
}
// Rules whose message is printed once per launch (every violation still counts as an error).
enum Rule : int {
  kRuleInFlightWrite, kRuleNoFence, kRuleFenceWrite, kRuleReadPending, kRuleReadUnwritten, kRuleReadUnordered,
  kRuleProxy, kRuleWriteWhileRead, kRuleWriteRace, kRuleProxyWaw, kRuleBulkWrite, kRuleBulkRead, kRuleCount
};
inline std::atomic<unsigned> g_reported{0};
inline void fail_rule(Rule r, const char* fmt, ...) {
  if (g_reported.fetch_or(1u << r) & (1u << r)) {
    g_errors.fetch_add(1);
    return;
  }
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
  va_end(ap);
}
// Errors since the last call (a test case passes only with none).
inline int take_errors() {
  g_reported = 0;
  return g_errors.exchange(0);
}

struct Stats {
  std::atomic<long> wgmma{0}, tma_boxes{0}, cp_async{0}, st_shared{0}, named_bar{0}, mbar_waits{0}, tma_stores{0},
      multicasts{0}, remote_arrives{0};
  void reset() {
    wgmma = tma_boxes = cp_async = st_shared = named_bar = mbar_waits = tma_stores = multicasts = remote_arrives = 0;
  }
};
inline Stats g_stats;

// ------------------------------------------------------------------------------ vector clocks
using VC = std::vector<uint32_t>;
inline void join(VC& a, const VC& b) {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) a[i] = a[i] < b[i] ? b[i] : a[i];
}

// ------------------------------------------------------------------------------ block state
struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};
struct Mbar;
struct Deferred {
  std::function<void()> tma;  // performs the copy and its complete_tx
  std::vector<Copy> cp;       // cp.async copies, then one arrival ...
  VC vc, av;                  // ... carrying the arriving thread's clocks
};
struct Block;
struct Mbar {
  Block* owner = nullptr;      // the CTA whose shared memory holds it
  bool init = false;
  int count = 0, pending = 0;
  long long tx = 0;
  unsigned long phase = 0;
  int comp = -1;               // clock component: the number of completed phases
  uint32_t completions = 0;
  unsigned init_tid = 0;
  uint32_t init_clock = 0;
  VC acc_vc, acc_av, done_vc, done_av;  // arrivals so far (cumulative); as of the last completion
  std::vector<Deferred> deferred;
};
struct NamedBar {
  int count = 0, arrived = 0;
  unsigned long gen = 0;
  VC acc_vc, acc_av, done_vc[2], done_av[2];
};
struct WaitInfo {
  const char* what;
  uint32_t addr;
  unsigned parity;
};
struct WarpX {
  Barrier bar{32};
  float f[32];
  uint32_t x[32][5];  // stmatrix: each lane's row address and registers
};
struct WgBar {
  Barrier bar{128};
};
// Register-A fragments of wgmma_rs, published at issue: (warpgroup, sequence) -> 128 x 4 regs.
struct AExchange {
  std::array<uint32_t, 512> regs{};
  int readers = 0;
};
// A 16-byte chunk of shared memory: its last write (kind, writer component, clock), the copies
// in flight into it, per warpgroup the last wgmma group reading it (0: none), and the TMA stores
// reading it (below).
enum ChunkKind : uint32_t { kNone = 0, kGeneric = 1, kCpAsync = 2, kTma = 3 };
struct Chunk {
  uint32_t who;  // kind << 24 | component
  uint32_t clock;
  uint32_t pending;
  uint32_t read[kMaxWarpGroups];
  uint32_t bulk;                   // TMA stores reading it, issued and not yet waited for
  uint32_t bulk_who, bulk_clock;   // the wait_group.read that ended the last one (component + 1, clock)
};
inline uint32_t ld(const uint32_t& x) { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
inline void st(uint32_t& x, uint32_t v) { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

struct WarpRegs {
  int cur = 0;                // the warp's per-thread register count
  std::vector<int> seq;       // its setmaxnreg calls (+R: .inc, -R: .dec)
  int exited = 0;             // lanes that returned
  bool waiting = false;       // blocked in setmaxnreg.inc
  int applying = -1;          // the call a lane of the warp is applying
};

struct Cluster;
struct Block {
  unsigned char* window = nullptr;  // kWindowBytes, 4096-aligned
  size_t dyn_offset = 16, dyn_bytes = 0;  // dynamic smem starts 16 bytes in (as after static smem)
  std::mutex m;  // guards the barriers, waiting, setmaxnreg state
  std::condition_variable cv;
  std::atomic<unsigned long> progress{0};
  std::atomic<int> started{0}, finished{0};
  unsigned id = 0;
  int threads = 0, nwg = 0, ncomp = 0, next_bar = 0;
  int base = 0, rank = 0;      // its first clock component; its rank in its cluster
  Cluster* cluster = nullptr;
  std::vector<Chunk> chunks;
  std::vector<uint32_t> wwho, wclock;  // per 4-byte word: the 4/8-byte store (component + 1, clock), 0: none
  std::unordered_map<uint32_t, Mbar> bars;
  NamedBar named[16];
  std::map<unsigned, WaitInfo> waiting;  // tid -> what it waits on
  WarpX warps[32];
  WgBar wg[kMaxWarpGroups];
  std::map<std::pair<int, long>, AExchange> aex;
  int entry_regs = 0, pool = 0;
  WarpRegs wregs[32];
  std::vector<long> fences, commits;  // per thread, checked per warpgroup at the end
  std::vector<int> nreg_calls;        // per thread

  Block() {
    window = static_cast<unsigned char*>(std::aligned_alloc(4096, kWindowBytes));
    chunks.resize(kChunks);
    wwho.resize(kWindowBytes / 4);
    wclock.resize(kWindowBytes / 4);
  }
  ~Block() { std::free(window); }
  int comp_wg(int w) const { return base + threads + w; }
  static int span(int nthreads) { return nthreads + (nthreads + 127) / 128 + kMaxBars; }
  // cta_rank / cluster_size: its place in its cluster, whose CTAs share one clock space (each
  // CTA's components at rank * span).
  void reset(unsigned block_id, int nthreads, size_t smem_bytes, int cta_rank = 0, int cluster_size = 1,
             Cluster* cl = nullptr) {
    id = block_id;
    threads = nthreads;
    nwg = (nthreads + 127) / 128;
    rank = cta_rank;
    base = cta_rank * span(nthreads);
    cluster = cl;
    ncomp = cluster_size * span(nthreads);
    next_bar = 0;
    dyn_bytes = std::min(smem_bytes, kWindowBytes - dyn_offset);
    progress = 0;
    started = 0;
    finished = 0;
    std::memset(window, 0xff, kWindowBytes);
    std::memset(chunks.data(), 0, chunks.size() * sizeof(Chunk));
    std::fill(wwho.begin(), wwho.end(), 0u);
    bars.clear();
    for (auto& nb : named) {
      nb = NamedBar{};
      nb.acc_vc.assign(ncomp, 0);
      nb.acc_av.assign(ncomp, 0);
    }
    waiting.clear();
    for (auto& w : warps) w.bar.reset(32);  // a block cannot inherit a half-used collective
    for (auto& w : wg) w.bar.reset(128);
    aex.clear();
    entry_regs = std::min(256, (kSmRegisters / std::max(nthreads, 1)) / 8 * 8);
    pool = 0;
    for (auto& w : wregs) w = WarpRegs{entry_regs, {}, 0, false, -1};
    fences.assign(nthreads, 0);
    commits.assign(nthreads, 0);
    nreg_calls.assign(nthreads, 0);
  }
};
// The CTAs of one cluster, and its barrier.cluster (every thread of every CTA).
struct Cluster {
  int size = 1;
  Block* cta[8] = {};
  std::mutex m;
  std::condition_variable cv;
  int count = 0, arrived = 0;
  unsigned long gen = 0;
  VC acc_vc, acc_av, done_vc[2], done_av[2];
  void reset(int n, int threads, int ncomp) {
    size = n;
    count = n * threads;
    arrived = 0;
    gen = 0;
    acc_vc.assign(ncomp, 0);
    acc_av.assign(ncomp, 0);
  }
};

inline thread_local Block* t_blk = nullptr;
inline std::atomic<unsigned long> g_progress{0};

inline void tick() {
  g_progress.fetch_add(1, std::memory_order_relaxed);
  if (t_blk) t_blk->progress.fetch_add(1, std::memory_order_relaxed);
}

// ------------------------------------------------------------------------------ thread state
struct Reg {  // an accumulator or A fragment between wgmma issue and retirement
  size_t bytes = 0;
  std::vector<uint32_t> saved;  // the values the wgmma reads and writes (the "real" registers)
  uint32_t poison = 0;
  int inflight = 0;
};
struct Op {
  bool rs;
  int N, eb, ta, tb, scale_d;
  bool bf16;
  uintptr_t d, a;  // register keys
  uint64_t da, db;
  long seq;        // register-A exchange sequence (rs)
};
struct BulkStore {  // one TMA store: the box at smem `src` of the map, at the coordinates
  std::array<unsigned char, 128> map;
  std::array<int, 5> c;
  uint32_t src;
  size_t bytes;
};
struct Thr {
  unsigned tid = 0;
  unsigned me = 0;  // its clock component (base of its CTA + tid)
  int wg = 0;
  VC vc, av;  // happens-before; generic writes made visible to the async proxy
  uintptr_t stack_top = 0, snap_lo = 0;
  std::vector<unsigned char> snap;  // the stack at the last wgmma.fence
  long fences = 0;
  std::map<uintptr_t, Reg> regs;
  std::vector<Op> open;
  std::deque<std::pair<long, std::vector<Op>>> groups;  // (group number, ops), oldest first
  long committed = 0, retired = 0, rs_seq = 0;
  std::vector<Copy> cp_pending;
  std::vector<BulkStore> bulk_open;                  // TMA stores not yet committed
  std::deque<std::vector<BulkStore>> bulk_groups;    // committed, oldest first
  bool trap = false;
  int nreg_calls = 0;
};
inline thread_local Thr* t_thr = nullptr;

inline void release() { t_thr->vc[t_thr->me]++; }  // after publishing this thread's clocks

// FE_INVALID unmasked while registers are in flight (a read of a signalling NaN traps); masked
// inside the emulator's own code.
inline bool fpe_enabled() {
  static const bool on = [] {
    const char* s = std::getenv("DJEPA_EMU_FPE");
    return !(s && std::atoi(s) == 0);
  }();
  return on;
}
inline void set_trap(bool on) {
  on = on && fpe_enabled();
  if (on) {
    feclearexcept(FE_ALL_EXCEPT);  // an unmasked flag already raised would trap at once (x87)
    feenableexcept(FE_INVALID);
  }
  else fedisableexcept(FE_INVALID);
}
struct EmuCall {  // every device-API entry point: traps off inside, back on if registers are in flight
  EmuCall() {
    if (t_thr && t_thr->trap) set_trap(false);
  }
  ~EmuCall() {
    if (!t_thr) return;
    t_thr->trap = !t_thr->regs.empty();
    if (t_thr->trap) set_trap(true);
  }
};

inline void on_sigfpe(int) {
  char buf[640];
  const int n = std::snprintf(
      buf, sizeof(buf),
      "EMU-ERROR (block %u, thread %u): floating-point invalid operation while wgmma accumulators / register-A "
      "fragments are in flight: a register was read between wgmma.mma_async and the wgmma.wait_group that retires "
      "it (the emulator holds signalling NaNs there until then), or the kernel computed inf - inf / 0 * inf there\n"
      "FAIL emulator: wgmma register read in flight\nSOME FAILED\n",
      blockIdx.x, threadIdx.x);
  if (n > 0) (void)!write(1, buf, size_t(n));
  _exit(4);
}
inline void install_fpe_handler() {
  static const bool done = [] {
    struct sigaction sa {};
    sa.sa_handler = on_sigfpe;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGFPE, &sa, nullptr);
    return true;
  }();
  (void)done;
}

// DJEPA_EMU_LAG="t1,t2,...:ms": threads t1, t2, ... of every block sleep `ms` after each barrier
// wait, so they fall behind the others as a GPU's warp scheduler may let them. Races that need
// one lagging thread (e.g. a thread waiting on a barrier of a stream it does not fill, which can
// then miss a phase and wait on the wrong parity for ever) show up as a hang or wrong data.
struct Lag {
  std::vector<unsigned> tids;
  int ms = 0;
};
inline const Lag& lag_config() {
  static const Lag lag = [] {
    Lag l;
    const char* s = std::getenv("DJEPA_EMU_LAG");
    if (!s) return l;
    std::string v(s);
    const size_t colon = v.find(':');
    if (colon == std::string::npos) return l;
    l.ms = std::atoi(v.c_str() + colon + 1);
    size_t pos = 0;
    while (pos < colon) {
      const size_t comma = std::min(v.find(',', pos), colon);
      l.tids.push_back(unsigned(std::atoi(v.substr(pos, comma - pos).c_str())));
      pos = comma + 1;
    }
    return l;
  }();
  return lag;
}
inline void lag() {
  const Lag& l = lag_config();
  if (l.ms <= 0) return;
  for (unsigned t : l.tids)
    if (t == threadIdx.x) std::this_thread::sleep_for(std::chrono::milliseconds(l.ms));
}

// ------------------------------------------------------------------------------ addresses
inline unsigned char* window() { return t_blk->window; }
inline uint32_t smem_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < t_blk->window || c >= t_blk->window + kWindowBytes) {
    fail("address %p is not in the block's shared memory", p);
    return 0;
  }
  return static_cast<uint32_t>(c - t_blk->window);
}
inline bool in_dyn(uint32_t off, size_t bytes) {
  return off >= t_blk->dyn_offset && off + bytes <= t_blk->dyn_offset + t_blk->dyn_bytes;
}

// ------------------------------------------------------------------------------ shared-memory chunks
inline const char* who_name(uint32_t kind) {
  return kind == kGeneric ? "an ordinary store" : kind == kCpAsync ? "a cp.async" : kind == kTma ? "a TMA" : "nothing";
}

// A write of `kind` by this thread (a store, or a TMA / cp.async issued) into [off, off + bytes):
// it must be ordered after the retirement of every wgmma group reading the chunks, after the
// previous write, and (an async-proxy write after ordinary stores) after a proxy fence.
inline void check_write(uint32_t off, size_t bytes, uint32_t kind, Block* blk = nullptr, bool words = false) {
  Block& B = blk ? *blk : *t_blk;
  Thr& T = *t_thr;
  for (uint32_t ch = off / 16; ch < (off + bytes + 15) / 16 && ch < kChunks; ++ch) {
    Chunk& c = B.chunks[ch];
    if (ld(c.pending))
      fail_rule(kRuleWriteRace, "%s into smem %u while a TMA / cp.async into it is still in flight", who_name(kind),
                ch * 16);
    if (ld(c.bulk))
      fail_rule(kRuleBulkWrite,
                "%s into smem %u while a TMA store still reads it (no cp.async.bulk.wait_group.read for that store "
                "before the write)",
                who_name(kind), ch * 16);
    else if (const uint32_t bw = ld(c.bulk_who); bw && T.vc[bw - 1] < ld(c.bulk_clock))
      fail_rule(kRuleBulkWrite,
                "%s into smem %u not ordered after the cp.async.bulk.wait_group.read (thread component %u) that "
                "ended the TMA store reading it (no barrier between)",
                who_name(kind), ch * 16, bw - 1);
    for (int w = 0; w < B.nwg; ++w) {
      const uint32_t r = ld(c.read[w]);
      if (r && T.vc[B.comp_wg(w)] < r)
        fail_rule(kRuleWriteWhileRead,
                  "%s into smem %u before warpgroup %d's wgmma group %u reading it has retired and its "
                  "wgmma.wait_group is ordered before the write (stage released on its empty barrier too early, "
                  "or refilled without waiting for the release)",
                  who_name(kind), ch * 16, w, r);
    }
    const uint32_t who = ld(c.who), pk = who >> 24, pc = who & 0xffffff, clock = ld(c.clock);
    bool word_writes = false;  // 4/8-byte stores: checked per word below
    for (uint32_t w = ch * 4; w < ch * 4 + 4; ++w) word_writes = word_writes || ld(B.wwho[w]) != 0;
    if (word_writes) {
      for (uint32_t w = std::max<uint32_t>(ch * 4, off / 4); w < ch * 4 + 4 && w < (off + bytes + 3) / 4; ++w) {
        const uint32_t ww = ld(B.wwho[w]);
        if (ww && T.vc[ww - 1] < ld(B.wclock[w]))
          fail_rule(kRuleWriteRace, "%s into smem %u not ordered after thread %u's store to it (no barrier between)",
                    who_name(kind), w * 4, ww - 1);
        else if (ww && kind == kTma && T.av[ww - 1] < ld(B.wclock[w]))
          fail_rule(kRuleProxyWaw,
                    "a TMA (async proxy) overwrites smem %u, stored by thread %u through the generic proxy, with no "
                    "fence.proxy.async between them",
                    w * 4, ww - 1);
      }
    } else if (words && pk == kGeneric) {
      // a 4/8-byte store after a 16-byte one: the same rule as below
      if (T.vc[pc] < clock)
        fail_rule(kRuleWriteRace, "%s into smem %u not ordered after thread %u's store to it (no barrier between)",
                  who_name(kind), ch * 16, pc);
    } else if (pk == kGeneric) {
      if (T.vc[pc] < clock)
        fail_rule(kRuleWriteRace, "%s into smem %u not ordered after thread %u's store to it (no barrier between)",
                  who_name(kind), ch * 16, pc);
      else if (kind == kTma && T.av[pc] < clock)
        fail_rule(kRuleProxyWaw,
                  "a TMA (async proxy) overwrites smem %u, stored by thread %u through the generic proxy, with no "
                  "fence.proxy.async between them",
                  ch * 16, pc);
    } else if (pk == kCpAsync || pk == kTma) {
      if (T.vc[pc] < clock)
        fail_rule(kRuleWriteRace,
                  "%s into smem %u before the completion of %s that filled it was observed (its mbarrier phase)",
                  who_name(kind), ch * 16, who_name(pk));
    }
  }
}
inline void record_write(uint32_t off, size_t bytes, uint32_t kind, uint32_t comp, uint32_t clock,
                         Block* blk = nullptr) {
  Block& B = blk ? *blk : *t_blk;
  for (uint32_t ch = off / 16; ch < (off + bytes + 15) / 16 && ch < kChunks; ++ch) {
    Chunk& c = B.chunks[ch];
    st(c.who, kind << 24 | comp);
    st(c.clock, clock);
    for (int w = 0; w < B.nwg; ++w) st(c.read[w], 0);
    for (uint32_t w = ch * 4; w < ch * 4 + 4; ++w) st(B.wwho[w], 0);
  }
}
// A 4- or 8-byte ordinary store (st_shared4 / st_shared8): its words, and the chunk as last
// written by this thread.
inline void record_word_write(uint32_t off, size_t bytes, uint32_t comp, uint32_t clock) {
  Block& B = *t_blk;
  for (uint32_t w = off / 4; w < (off + bytes) / 4; ++w) {
    st(B.wwho[w], comp + 1);
    st(B.wclock[w], clock);
  }
  Chunk& c = B.chunks[off / 16];
  st(c.who, kGeneric << 24 | comp);
  st(c.clock, clock);
  for (int w = 0; w < B.nwg; ++w) st(c.read[w], 0);
}
inline void add_pending(uint32_t off, size_t bytes, int d, Block* blk = nullptr) {
  Block& B = blk ? *blk : *t_blk;
  for (uint32_t ch = off / 16; ch < (off + bytes + 15) / 16 && ch < kChunks; ++ch)
    __atomic_add_fetch(&B.chunks[ch].pending, uint32_t(d), __ATOMIC_RELAXED);
}

// A wgmma group of warpgroup `wg` reads the chunks (checked with this thread's clocks).
inline void check_read(const std::vector<uint32_t>& chunks, long group) {
  Block& B = *t_blk;
  Thr& T = *t_thr;
  for (uint32_t ch : chunks) {
    Chunk& c = B.chunks[ch];
    const uint32_t who = ld(c.who), kind = who >> 24, comp = who & 0xffffff, clock = ld(c.clock);
    if (ld(c.pending)) {
      fail_rule(kRuleReadPending,
                "wgmma reads smem %u that a TMA / cp.async has not finished writing (its full barrier was not "
                "waited for)",
                ch * 16);
    } else if (kind == kNone) {
      fail_rule(kRuleReadUnwritten, "wgmma reads smem %u that nothing wrote in this block", ch * 16);
    } else if (kind == kGeneric) {
      if (T.vc[comp] < clock)
        fail_rule(kRuleReadUnordered, "wgmma reads smem %u stored by thread %u with no barrier ordering the store first",
                  ch * 16, comp);
      else if (T.av[comp] < clock)
        fail_rule(kRuleProxy,
                  "wgmma reads smem %u stored by thread %u through the generic proxy without a fence.proxy.async "
                  "between the store and the wgmma (by the storing thread before it releases, or by this "
                  "warpgroup after it observed the store; another thread's fence does not count)",
                  ch * 16, comp);
    } else {
      if (T.vc[comp] < clock)
        fail_rule(kRuleReadUnordered,
                  "wgmma reads smem %u filled by %s whose mbarrier phase this warpgroup has not waited for", ch * 16,
                  who_name(kind));
      else if (kind == kCpAsync && T.av[comp] < clock)
        fail_rule(kRuleProxy,
                  "wgmma reads smem %u written by cp.async (the generic proxy) without a fence.proxy.async after "
                  "the barrier wait that observed it",
                  ch * 16);
    }
    st(c.read[T.wg], uint32_t(group));
  }
}

// ------------------------------------------------------------------------------ copies
// Caller holds the block's mutex.
inline void check_phase(Mbar& b) {
  if (b.pending < 0) fail("mbarrier: more arrivals than its expected count %d", b.count);
  if (b.pending <= 0 && b.tx == 0) {
    b.phase++;
    b.pending = b.count;
    b.completions++;
    if (b.comp >= 0) b.acc_vc[b.comp] = b.completions;
    b.done_vc = b.acc_vc;
    b.done_av = b.acc_av;
    (b.owner ? b.owner : t_blk)->cv.notify_all();
  }
  tick();
}

inline void perform(const Copy& c, Mbar& b) {
  std::memset(c.dst, 0, 16);
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  const uint32_t off = smem_offset(c.dst);
  add_pending(off, 16, -1);
  record_write(off, 16, kCpAsync, uint32_t(b.comp), b.completions + 1);
  g_stats.cp_async++;
}

inline Mbar& bar_at(uint32_t off, const char* what, Block* blk = nullptr) {
  Block& B = blk ? *blk : *t_blk;
  auto it = B.bars.find(off);
  if (it == B.bars.end() || !it->second.init) {
    fail("%s on an uninitialised mbarrier (smem offset %u)", what, off);
    Mbar& b = B.bars[off];
    b.owner = &B;
    if (b.acc_vc.empty()) b.acc_vc.assign(B.ncomp, 0), b.acc_av.assign(B.ncomp, 0);
    return b;
  }
  Mbar& b = it->second;
  if (t_thr && t_thr->vc[b.init_tid] < b.init_clock)
    fail("%s on the mbarrier at smem %u before its mbarrier.init (thread %u) is ordered before it", what, off,
         b.init_tid);
  return b;
}

inline void flush(Mbar& b);
// A new arrival while the current phase only waits for bytes: its copies land first (a TMA
// lands within microseconds, long before a producer comes round the ring again), so the arrival
// opens the next phase, as on the GPU, instead of over-arriving a phase kept open by laziness.
inline void settle(Mbar& b) {
  if (b.pending == 0 && !b.deferred.empty()) flush(b);
}

// Lands every copy queued on the barrier (caller holds the block's mutex).
inline void flush(Mbar& b) {
  while (!b.deferred.empty()) {
    std::vector<Deferred> work;
    work.swap(b.deferred);
    for (auto& d : work) {
      if (d.tma) {
        d.tma();
      } else {
        for (const Copy& c : d.cp) perform(c, b);
        join(b.acc_vc, d.vc);
        join(b.acc_av, d.av);
        b.pending--;
        check_phase(b);
      }
    }
  }
}

inline void acquire(const VC& vc, const VC& av) {
  join(t_thr->vc, vc);
  join(t_thr->av, av);
}
inline void publish(VC& vc, VC& av) {
  join(vc, t_thr->vc);
  join(av, t_thr->av);
  release();
}

// ------------------------------------------------------------------------------ tensor maps
struct TmapEmu {
  uint32_t magic;
  int rank, elem_bytes, swizzle;
  const void* base;
  uint64_t dims[5];
  uint64_t strides[5];  // bytes; strides[0] = element size
  uint32_t box[5];
};
static_assert(sizeof(TmapEmu) <= sizeof(CUtensorMap), "emulated tensor map must fit the opaque one");
constexpr uint32_t kTmapMagic = 0x7e45a11u;

inline int elem_size(CUtensorMapDataType t) {
  switch (t) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: return 4;
    default: return 8;
  }
}

// cuTensorMapEncodeTiled's signature and argument checks (documented in cuda.h); additionally,
// with a swizzle the inner box must span exactly the swizzle width (all this code uses).
inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* base,
                             const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                             const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  if (reinterpret_cast<uintptr_t>(map) % 64) return CUDA_ERROR_INVALID_VALUE;
  if (rank < 1 || rank > 5 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return CUDA_ERROR_INVALID_VALUE;
  if (reinterpret_cast<uintptr_t>(base) % 16) return CUDA_ERROR_INVALID_VALUE;
  if (oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) return CUDA_ERROR_INVALID_VALUE;
  TmapEmu t{};
  t.magic = kTmapMagic;
  t.rank = int(rank);
  t.elem_bytes = elem_size(dtype);
  t.base = base;
  t.strides[0] = t.elem_bytes;
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (box[i] == 0 || box[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (elem_strides[i] != 1) return CUDA_ERROR_INVALID_VALUE;  // not used here
    t.dims[i] = dims[i];
    t.box[i] = box[i];
    if (i > 0) {
      const cuuint64_t s = strides[i - 1];
      if (s % 16 || s >= (1ull << 40)) return CUDA_ERROR_INVALID_VALUE;
      t.strides[i] = s;
    }
  }
  const uint32_t inner = box[0] * t.elem_bytes;
  if (inner % 16) return CUDA_ERROR_INVALID_VALUE;
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: t.swizzle = 0; break;
    case CU_TENSOR_MAP_SWIZZLE_32B: t.swizzle = 3; if (inner != 32) return CUDA_ERROR_INVALID_VALUE; break;
    case CU_TENSOR_MAP_SWIZZLE_64B: t.swizzle = 2; if (inner != 64) return CUDA_ERROR_INVALID_VALUE; break;
    case CU_TENSOR_MAP_SWIZZLE_128B: t.swizzle = 1; if (inner != 128) return CUDA_ERROR_INVALID_VALUE; break;
    default: return CUDA_ERROR_INVALID_VALUE;
  }
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &t, sizeof(t));
  return CUDA_SUCCESS;
}

inline uint32_t swz(int mode, uint32_t addr) {
  const uint32_t mask = mode == 1 ? 7u : mode == 2 ? 3u : mode == 3 ? 1u : 0u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

inline void tma_issue(void* dst, const CUtensorMap* map, const int* coords, int nc, uint64_t* bar,
                      uint16_t mask = 0) {
  EmuCall guard;
  TmapEmu t;
  std::memcpy(&t, map, sizeof(t));
  if (t.magic != kTmapMagic) {
    fail("TMA with a tensor map that encode_tiled() did not write");
    return;
  }
  if (t.rank != nc) fail("TMA %dd with a rank-%d tensor map", nc, t.rank);
  const uint32_t d = smem_offset(dst), b = smem_offset(bar);
  const uint32_t align = t.swizzle == 1 ? 1024 : t.swizzle == 2 ? 512 : t.swizzle == 3 ? 256 : 128;
  size_t bytes = t.elem_bytes;
  for (int i = 0; i < t.rank; ++i) bytes *= t.box[i];
  if (d % align) fail("TMA destination (smem offset %u) not aligned to %u bytes", d, align);
  if (!in_dyn(d, bytes)) fail("TMA box [%u, +%zu) leaves the dynamic shared memory", d, bytes);
  std::array<int, 5> c{};
  for (int i = 0; i < nc && i < 5; ++i) c[i] = coords[i];
  // The CTAs it lands in: this one, or (multicast) those of the mask in this CTA's cluster.
  std::vector<Block*> dests;
  if (mask == 0) {
    dests.push_back(t_blk);
  } else {
    Cluster* cl = t_blk->cluster;
    const int size = cl ? cl->size : 1;
    if (mask >> size) fail("TMA multicast mask 0x%x names CTAs beyond the cluster's %d", unsigned(mask), size);
    if (!((mask >> t_blk->rank) & 1u))
      fail("TMA multicast mask 0x%x leaves out the issuing CTA (rank %d): not emulated", unsigned(mask), t_blk->rank);
    for (int r = 0; r < size && r < 16; ++r)
      if ((mask >> r) & 1u) dests.push_back(cl ? cl->cta[r] : t_blk);
    g_stats.multicasts++;
  }
  for (Block* blk : dests) {
    std::lock_guard<std::mutex> lk(blk->m);
    if (blk != t_blk && blk->finished.load() == blk->threads)
      fail("TMA multicast into CTA %d of the cluster after all its threads exited", blk->rank);
    Mbar& mb = bar_at(b, "TMA completion", blk);
    check_write(d, bytes, kTma, blk);
    add_pending(d, bytes, +1, blk);
    Mbar* mbp = &mb;
    mb.deferred.push_back(Deferred{[t, c, d, bytes, mbp, blk]() {
      std::array<uint32_t, 5> e{};
      for (size_t lin = 0; lin < bytes / t.elem_bytes; ++lin) {
        size_t rest = lin;
        bool inside = true;
        const unsigned char* src = static_cast<const unsigned char*>(t.base);
        for (int i = 0; i < t.rank; ++i) {
          e[i] = uint32_t(rest % t.box[i]);
          rest /= t.box[i];
          const long long g = (long long)c[i] + e[i];
          if (g < 0 || g >= (long long)t.dims[i]) inside = false;
          else src += g * t.strides[i];
        }
        const uint32_t a = swz(t.swizzle, d + uint32_t(lin * t.elem_bytes));
        if (inside) std::memcpy(blk->window + a, src, t.elem_bytes);
        else std::memset(blk->window + a, 0, t.elem_bytes);
      }
      add_pending(d, bytes, -1, blk);
      record_write(d, bytes, kTma, uint32_t(mbp->comp), mbp->completions + 1, blk);
      g_stats.tma_boxes++;
      mbp->tx -= (long long)bytes;
      check_phase(*mbp);
    }, {}, {}, {}});
    tick();
    blk->cv.notify_all();
  }
}

// A TMA store of the box at `src` (checked now, performed when its bulk group is waited for).
inline void tma_store_issue(const CUtensorMap* map, const void* src, const int* coords, int nc) {
  EmuCall guard;
  TmapEmu t;
  std::memcpy(&t, map, sizeof(t));
  if (t.magic != kTmapMagic) {
    fail("TMA store with a tensor map that encode_tiled() did not write");
    return;
  }
  if (t.rank != nc) fail("TMA store %dd with a rank-%d tensor map", nc, t.rank);
  const uint32_t s = smem_offset(src);
  const uint32_t align = t.swizzle == 1 ? 1024 : t.swizzle == 2 ? 512 : t.swizzle == 3 ? 256 : 128;
  size_t bytes = t.elem_bytes;
  for (int i = 0; i < t.rank; ++i) bytes *= t.box[i];
  if (s % align) fail("TMA store source (smem offset %u) not aligned to %u bytes", s, align);
  if (!in_dyn(s, bytes)) fail("TMA store box [%u, +%zu) leaves the dynamic shared memory", s, bytes);
  Block& B = *t_blk;
  Thr& T = *t_thr;
  for (uint32_t ch = s / 16; ch < (s + bytes + 15) / 16 && ch < kChunks; ++ch) {
    Chunk& c = B.chunks[ch];
    const uint32_t who = ld(c.who), kind = who >> 24, comp = who & 0xffffff, clock = ld(c.clock);
    bool word_writes = false;
    for (uint32_t w = ch * 4; w < ch * 4 + 4; ++w) {
      const uint32_t ww = ld(B.wwho[w]);
      if (!ww) continue;
      word_writes = true;
      if (T.vc[ww - 1] < ld(B.wclock[w]))
        fail_rule(kRuleBulkRead, "TMA store reads smem %u stored by thread %u with no barrier ordering the store first",
                  w * 4, ww - 1);
      else if (T.av[ww - 1] < ld(B.wclock[w]))
        fail_rule(kRuleBulkRead,
                  "TMA store reads smem %u stored by thread %u through the generic proxy without a fence.proxy.async "
                  "between the store and the TMA store (by the storing thread before the barrier)",
                  w * 4, ww - 1);
    }
    if (word_writes) {
    } else if (ld(c.pending)) {
      fail_rule(kRuleBulkRead, "TMA store reads smem %u that a TMA / cp.async has not finished writing", ch * 16);
    } else if (kind == kNone) {
      fail_rule(kRuleBulkRead, "TMA store reads smem %u that nothing wrote in this block", ch * 16);
    } else if (T.vc[comp] < clock) {
      fail_rule(kRuleBulkRead, "TMA store reads smem %u written by %s not ordered before it", ch * 16, who_name(kind));
    } else if (kind != kTma && T.av[comp] < clock) {
      fail_rule(kRuleBulkRead, "TMA store reads smem %u written through the generic proxy without a fence.proxy.async",
                ch * 16);
    }
    __atomic_add_fetch(&c.bulk, 1u, __ATOMIC_RELAXED);
  }
  BulkStore op;
  std::memcpy(op.map.data(), map, sizeof(op.map));
  for (int i = 0; i < 5; ++i) op.c[i] = i < nc ? coords[i] : 0;
  op.src = s;
  op.bytes = bytes;
  T.bulk_open.push_back(op);
  tick();
}

// Performs one TMA store: reads the staged box and writes the elements inside the tensor.
inline void tma_store_perform(const BulkStore& op) {
  Block& B = *t_blk;
  TmapEmu t;
  std::memcpy(&t, op.map.data(), sizeof(t));
  std::array<uint32_t, 5> e{};
  for (size_t lin = 0; lin < op.bytes / t.elem_bytes; ++lin) {
    size_t rest = lin;
    bool inside = true;
    unsigned char* dst = static_cast<unsigned char*>(const_cast<void*>(t.base));
    for (int i = 0; i < t.rank; ++i) {
      e[i] = uint32_t(rest % t.box[i]);
      rest /= t.box[i];
      const long long g = (long long)op.c[i] + e[i];
      if (g < 0 || g >= (long long)t.dims[i]) inside = false;
      else dst += g * t.strides[i];
    }
    if (inside) std::memcpy(dst, B.window + swz(t.swizzle, op.src + uint32_t(lin * t.elem_bytes)), t.elem_bytes);
  }
  for (uint32_t ch = op.src / 16; ch < (op.src + op.bytes + 15) / 16 && ch < kChunks; ++ch) {
    Chunk& c = B.chunks[ch];
    __atomic_sub_fetch(&c.bulk, 1u, __ATOMIC_RELAXED);
    st(c.bulk_who, t_thr->me + 1);
    st(c.bulk_clock, t_thr->vc[t_thr->me]);
  }
  g_stats.tma_stores++;
  tick();
}
// cp.async.bulk.wait_group(.read) N: the groups beyond the newest N are performed.
inline void bulk_wait_groups(int n) {
  EmuCall guard;
  Thr& T = *t_thr;
  while (int(T.bulk_groups.size()) > n) {
    for (const BulkStore& op : T.bulk_groups.front()) tma_store_perform(op);
    T.bulk_groups.pop_front();
  }
}

// ------------------------------------------------------------------------------ wgmma
struct DescFields {
  uint32_t start, lbo, sbo;
  int base_offset, mode;
};
inline DescFields decode_desc(uint64_t desc) {
  return DescFields{uint32_t(desc & 0x3FFF) << 4, uint32_t((desc >> 16) & 0x3FFF) << 4,
                    uint32_t((desc >> 32) & 0x3FFF) << 4, int((desc >> 49) & 7), int(desc >> 62)};
}

// Shared-memory byte address of element (mn, k) of a wgmma operand (A: mn = m; B: mn = n) whose
// descriptor is `f`, per the canonical layouts of the PTX ISA (in 16-byte units T elements):
//   K-major : ((8,m),(T,2k)) : ((W,SBO),(1,16B))       swizzled, W = the swizzle span
//             ((8,m),(T,2k)) : ((16B,SBO),(1,LBO))     no swizzle
//   MN-major: ((T,W/16,m),(8,k)) : ((1,16B,LBO),(W,SBO))  swizzled
//             ((T,1,m),(8,k))    : ((1,-,SBO),(16B,LBO))  no swizzle
// then the swizzle of the mode on the address bits.
inline uint32_t operand_addr(const DescFields& f, bool mn_major, int mn, int k, int eb) {
  const int T = 16 / eb;
  const int W = f.mode == 1 ? 128 : f.mode == 2 ? 64 : f.mode == 3 ? 32 : 0;
  uint32_t off;
  if (!mn_major) {
    const int r0 = mn % 8, r1 = mn / 8, k0 = k % T, k1 = k / T;
    off = W ? r0 * W + r1 * f.sbo + k0 * eb + k1 * 16 : r0 * 16 + r1 * f.sbo + k0 * eb + k1 * f.lbo;
  } else {
    const int k0 = k % 8, k1 = k / 8;
    if (W) {
      const int i0 = mn % T, i1 = (mn / T) % (W / 16), i2 = mn / (T * (W / 16));
      off = i0 * eb + i1 * 16 + i2 * f.lbo + k0 * W + k1 * f.sbo;
    } else {
      off = (mn % T) * eb + (mn / T) * f.sbo + k0 * 16 + k1 * f.lbo;
    }
  }
  return swz(f.mode, f.start + off);
}

inline bool check_desc(const DescFields& f, const char* which) {
  bool ok = true;
  if (f.base_offset != 0) {
    fail("wgmma %s descriptor: base offset %d (only 0 is emulated)", which, f.base_offset);
    ok = false;
  }
  const uint32_t mask = f.mode == 1 ? 7u : f.mode == 2 ? 3u : f.mode == 3 ? 1u : 0u;
  if ((f.start >> 7) & mask) {
    fail("wgmma %s descriptor: start %u is not on a swizzle-pattern boundary (base offset 0 assumed)", which,
         f.start);
    ok = false;
  }
  return ok;
}

// The 16-byte chunks an operand of `ext` rows (M or N) x 16 k occupies.
inline void operand_chunks(std::vector<uint32_t>& out, uint64_t desc, bool mn_major, int ext, int eb) {
  const DescFields f = decode_desc(desc);
  for (int mn = 0; mn < ext; ++mn)
    for (int k = 0; k < 16; ++k) out.push_back(operand_addr(f, mn_major, mn, k, eb) / 16);
}

inline float bits_to_float(uint16_t v, bool bf16) {
  return bf16 ? emu::half_bits_to_float<__nv_bfloat16>(v) : emu::half_bits_to_float<__half>(v);
}

inline float read_operand(uint32_t addr, bool bf16, const char* which) {
  if (!in_dyn(addr, 2)) {
    fail("wgmma %s operand address %u outside the dynamic shared memory", which, addr);
    return NAN;
  }
  uint16_t v;
  std::memcpy(&v, t_blk->window + addr, 2);
  return bits_to_float(v, bf16);
}

inline void execute(const Op& op) {
  Thr& T = *t_thr;
  const int t = threadIdx.x % 128, w = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
  const DescFields fa = decode_desc(op.da), fb = decode_desc(op.db);
  if (!op.rs) check_desc(fa, "A");
  check_desc(fb, "B");
  float A[2][16];
  if (!op.rs) {
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) A[h][k] = read_operand(operand_addr(fa, op.ta, 16 * w + g + 8 * h, k, op.eb), op.bf16, "A");
  } else {
    // Row 16w + g (+ 8) of A lives in the quad of lanes 4g .. 4g + 3 of warp w: register
    // h + 2 * (k / 8) of lane 4g + (k % 8) / 2, low half for even k (the m64k16 A fragment).
    std::lock_guard<std::mutex> lk(t_blk->m);
    auto it = t_blk->aex.find({T.wg, op.seq});
    if (it == t_blk->aex.end()) {
      fail("wgmma (register A): no fragment published for sequence %ld", op.seq);
      return;
    }
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        const uint32_t reg = it->second.regs[(32 * w + 4 * g + (k % 8) / 2) * 4 + h + 2 * (k / 8)];
        A[h][k] = bits_to_float(uint16_t((k & 1) ? reg >> 16 : reg & 0xffff), op.bf16);
      }
    if (++it->second.readers == 128) t_blk->aex.erase(it);
  }
  float* d = reinterpret_cast<float*>(T.regs.at(op.d).saved.data());
  for (int i = 0; i < op.N / 2; ++i) {
    const int h = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * c + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[h][k] * read_operand(operand_addr(fb, op.tb, col, k, op.eb), op.bf16, "B");
    d[i] = (op.scale_d ? d[i] : 0.f) + acc;
  }
  g_stats.wgmma++;
  tick();
}

// The stack of the calling thread from here up, as of its last wgmma.fence.
__attribute__((noinline)) inline void snapshot_stack() {
  Thr& T = *t_thr;
  volatile unsigned char probe = 0;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(&probe) & ~uintptr_t(63);
  (void)probe;
  if (lo >= T.stack_top) return;
  T.snap_lo = lo;
  T.snap.resize(T.stack_top - lo);
  std::memcpy(T.snap.data(), reinterpret_cast<const void*>(lo), T.snap.size());
}
inline bool in_snapshot(uintptr_t addr, size_t bytes) {
  const Thr& T = *t_thr;
  return !T.snap.empty() && addr >= T.snap_lo && addr + bytes <= T.snap_lo + T.snap.size();
}
inline void snapshot_store(uintptr_t addr, const void* src, size_t bytes) {
  if (in_snapshot(addr, bytes)) std::memcpy(t_thr->snap.data() + (addr - t_thr->snap_lo), src, bytes);
}

// An accumulator (or A fragment) at `addr` becomes an operand of a wgmma just issued: checks the
// fence rule (written since the last wgmma.fence?) or, chained in flight, that nobody wrote it;
// then moves its values to a shadow copy and fills the registers with signalling NaNs.
// `overwritten`: a wgmma with scale-d = 0, which ignores the registers' values: their memory may
// hold other variables of the emulated kernel until then (the compiler shares stack slots with
// an array not yet used), so only the in-flight rule applies to them.
inline void take_reg(uintptr_t addr, size_t bytes, uint32_t poison, const char* what, bool overwritten = false) {
  Thr& T = *t_thr;
  const size_t words = bytes / 4;
  auto* p = reinterpret_cast<uint32_t*>(addr);
  auto it = T.regs.find(addr);
  if (it != T.regs.end()) {
    if (it->second.bytes != bytes) fail("wgmma %s registers reused in flight with another shape", what);
    for (size_t i = 0; i < words; ++i)
      if (p[i] != it->second.poison) {
        fail_rule(kRuleInFlightWrite,
                  "wgmma %s registers written between a wgmma.mma_async using them and the wgmma.wait_group that "
                  "retires it",
                  what);
        break;
      }
    it->second.inflight++;
    return;
  }
  for (auto& [a, r] : T.regs)
    if (addr < a + r.bytes && a < addr + bytes) fail("wgmma %s registers overlap other registers in flight", what);
  if (T.fences == 0) {
    fail_rule(kRuleNoFence, "wgmma.mma_async with no wgmma.fence before it in this thread");
  } else if (!overwritten && in_snapshot(addr, bytes) &&
             std::memcmp(p, T.snap.data() + (addr - T.snap_lo), bytes) != 0) {
    size_t i = 0;
    uint32_t was = 0;
    for (; i < words; ++i) {
      std::memcpy(&was, T.snap.data() + (addr - T.snap_lo) + 4 * i, 4);
      if (was != p[i]) break;
    }
    fail_rule(kRuleFenceWrite,
              "wgmma %s registers (%zu bytes; word %zu: 0x%08x at the fence, now 0x%08x) written after the last "
              "wgmma.fence and before the wgmma.mma_async that uses them (wgmma.fence must come between a register "
              "access and the wgmma accessing those registers)",
              what, bytes, i, was, i < words ? p[i] : 0u);
  }
  Reg r;
  r.bytes = bytes;
  r.saved.assign(p, p + words);
  r.poison = poison;
  r.inflight = 1;
  for (size_t i = 0; i < words; ++i) p[i] = poison;
  snapshot_store(addr, p, bytes);
  T.regs.emplace(addr, std::move(r));
}
// One wgmma using the registers retired: the last one writes the values back.
inline void give_reg(uintptr_t addr, const char* what) {
  Thr& T = *t_thr;
  auto it = T.regs.find(addr);
  if (it == T.regs.end()) return;
  if (--it->second.inflight > 0) return;
  auto* p = reinterpret_cast<uint32_t*>(addr);
  for (size_t i = 0; i < it->second.saved.size(); ++i)
    if (p[i] != it->second.poison) {
      fail_rule(kRuleInFlightWrite,
                "wgmma %s registers written between a wgmma.mma_async using them and the wgmma.wait_group that "
                "retires it",
                what);
      break;
    }
  std::memcpy(p, it->second.saved.data(), it->second.bytes);
  snapshot_store(addr, p, it->second.bytes);
  T.regs.erase(it);
}

constexpr uint32_t kPoisonF32 = 0x7F800BADu;       // a signalling NaN
constexpr uint32_t kPoisonBf16x2 = 0x7F817F81u;    // two bf16 signalling NaNs
constexpr uint32_t kPoisonF16x2 = 0x7C017C01u;     // two f16 signalling NaNs

inline void issue(const Op& op_in, float* d, const uint32_t* a) {
  EmuCall guard;
  Thr& T = *t_thr;
  Op op = op_in;
  op.d = reinterpret_cast<uintptr_t>(d);
  op.a = reinterpret_cast<uintptr_t>(a);
  uint32_t afrag[4] = {};
  if (op.rs) {  // the fragment's values (its shadow, when it is already in flight)
    auto it = T.regs.find(op.a);
    if (it != T.regs.end()) std::memcpy(afrag, it->second.saved.data(), 16);
    else std::memcpy(afrag, a, 16);
    take_reg(op.a, 16, op.bf16 ? kPoisonBf16x2 : kPoisonF16x2, "register-A fragment");
    std::lock_guard<std::mutex> lk(t_blk->m);
    auto& x = t_blk->aex[{T.wg, op.seq}];
    for (int i = 0; i < 4; ++i) x.regs[(threadIdx.x % 128) * 4 + i] = afrag[i];
  }
  take_reg(op.d, size_t(op.N / 2) * 4, kPoisonF32, "accumulator", op.scale_d == 0);
  if (threadIdx.x % 128 == 0) {  // the warpgroup's operands, checked once
    std::vector<uint32_t> chunks;
    chunks.reserve(size_t(64 + op.N) * 16);
    if (!op.rs) operand_chunks(chunks, op.da, op.ta, 64, op.eb);
    operand_chunks(chunks, op.db, op.tb, op.N, op.eb);
    std::sort(chunks.begin(), chunks.end());
    chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
    for (uint32_t& ch : chunks) ch = std::min<uint32_t>(ch, kChunks - 1);
    check_read(chunks, T.committed + 1);
  }
  T.open.push_back(op);
  tick();
}

// ------------------------------------------------------------------------------ setmaxnreg
inline void setmaxnreg(int R, bool inc) {
  EmuCall guard;
  Block& B = *t_blk;
  Thr& T = *t_thr;
  const char* name = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  const int w = int(threadIdx.x / 32), k = T.nreg_calls++;
  if ((R < 24 || R > 256 || R % 8) && threadIdx.x % 32 == 0)
    fail("%s %d in warp %d: the count must be a multiple of 8 in 24..256", name, R, w);
  const int want = inc ? R : -R;
  std::unique_lock<std::mutex> lk(B.m);
  WarpRegs& W = B.wregs[w];
  if (W.applying == k)  // another lane of the warp is applying call k: the warp goes on together
    while (int(W.seq.size()) <= k) B.cv.wait_for(lk, std::chrono::milliseconds(20));
  if (int(W.seq.size()) > k) {
    if (W.seq[k] != want) fail("%s %d: lanes of warp %d disagree (%d)", name, R, w, W.seq[k]);
    return;
  }
  if (int(W.seq.size()) < k) fail("%s: lane %u of warp %d is ahead of its warp", name, threadIdx.x % 32, w);
  W.applying = k;
  if (inc && R < W.cur) fail("setmaxnreg.inc %d below the warp's %d registers", R, W.cur);
  if (!inc && R > W.cur) fail("setmaxnreg.dec %d above the warp's %d registers", R, W.cur);
  if (!inc) {
    B.pool += (W.cur - R) * 32;
  } else {
    const int need = (R - W.cur) * 32;
    W.waiting = true;
    B.waiting[threadIdx.x] = WaitInfo{"setmaxnreg.inc (registers from the CTA's pool)", uint32_t(need), 0};
    while (B.pool < need) {
      // Can any warp still release registers? Not if every other warp has made at least this
      // many calls (or waits in an .inc, or has returned).
      bool hopeless = true;
      for (int o = 0; o < B.threads / 32; ++o) {
        if (o == w) continue;
        const WarpRegs& O = B.wregs[o];
        if (!(O.waiting || O.exited == 32 || int(O.seq.size()) > k)) hopeless = false;
      }
      if (hopeless) {
        int asked = 0;
        for (int o = 0; o < B.threads / 32; ++o) asked += 32 * (o == w ? R : B.wregs[o].cur);
        fail("setmaxnreg.inc %d in warp %d: the warps ask for %d registers in all, more than the CTA's %d (%d threads "
             "x %d at entry); on the GPU it waits for ever",
             R, w, asked, B.threads * B.entry_regs, B.threads, B.entry_regs);
        B.pool = need;  // go on, the error is reported
        break;
      }
      B.cv.wait_for(lk, std::chrono::milliseconds(20));
    }
    B.pool -= need;
    W.waiting = false;
    B.waiting.erase(threadIdx.x);
  }
  W.cur = R;
  W.seq.push_back(want);
  W.applying = -1;
  B.cv.notify_all();
  tick();
}

// ------------------------------------------------------------------------------ watchdog + runner
inline double deadlock_seconds() {
  const char* s = std::getenv("DJEPA_EMU_DEADLOCK_S");
  return s ? std::atof(s) : 30.0;
}

inline std::vector<Block*> g_running;  // the blocks of the current wave (for the watchdog)

inline void dump_waiters_and_exit() {
  std::lock_guard<std::mutex> lk(g_print_m);
  std::printf("FAIL emulator deadlock: no progress for %.0f s; threads waiting on mbarriers / named barriers "
              "(others wait in a warp or warpgroup collective):\n", deadlock_seconds());
  for (Block* blk : g_running) {
    std::unique_lock<std::mutex> state(blk->m, std::try_to_lock);  // best effort: a waiter may hold it
    // Group the waiters by what they wait on: (kind, smem, parity) -> thread ranges.
    std::map<std::tuple<std::string, uint32_t, unsigned>, std::string> groups;
    for (auto& [tid, w] : blk->waiting) {
      std::string& r = groups[{w.what, w.addr, w.parity}];
      if (r.size() < 160) r += (r.empty() ? "" : ",") + std::to_string(tid);
    }
    std::printf("  block %u:\n", blk->id);
    for (auto& [key, tids] : groups)
      std::printf("  %s (smem / id / count %u, parity %u): threads %s\n", std::get<0>(key).c_str(), std::get<1>(key),
                  std::get<2>(key), tids.c_str());
    std::printf("  mbarriers (smem: phase, pending arrivals / count, tx bytes, queued copies):\n");
    int shown = 0;
    for (auto& [off, b] : blk->bars) {
      if (shown++ >= 32) break;
      std::printf("    %u: phase %lu, %d/%d, tx %lld, %zu queued\n", off, b.phase, b.pending, b.count, b.tx,
                  b.deferred.size());
    }
  }
  std::printf("SOME FAILED\n");
  std::fflush(stdout);
  std::_Exit(3);
}

inline int ctas_at_once() {
  const char* s = std::getenv("DJEPA_EMU_CTAS");
  return s ? std::max(1, std::atoi(s)) : 2;
}

// End-of-block checks: every warp of a warpgroup ran the same setmaxnreg sequence (and every
// lane of a warp), the same number of wgmma.fence and commits; no copy was left unwaited.
inline void finish_block(Block& B) {
  for (auto& [off, b] : B.bars)
    if (!b.deferred.empty()) fail("block ends with copies on the mbarrier at smem %u never waited for", off);
  for (int w = 0; w < B.threads / 32; ++w)
    for (int l = 0; l < 32; ++l)
      if (B.nreg_calls[w * 32 + l] != int(B.wregs[w].seq.size()))
        fail("setmaxnreg not executed by every thread of warp %d (thread %d: %d calls, the warp %zu)", w, w * 32 + l,
             B.nreg_calls[w * 32 + l], B.wregs[w].seq.size());
  for (int g = 0; g < B.nwg; ++g) {
    const int w0 = 4 * g;
    if (w0 + 3 >= B.threads / 32) break;
    for (int w = w0 + 1; w < w0 + 4; ++w)
      if (B.wregs[w].seq != B.wregs[w0].seq)
        fail("setmaxnreg: warp %d runs another sequence than warp %d of its warpgroup (every warp of the warpgroup "
             "must execute the same setmaxnreg)",
             w, w0);
    for (int t = 128 * g + 1; t < 128 * (g + 1) && t < B.threads; ++t)
      if (B.commits[t] != B.commits[128 * g] || (B.commits[t] && B.fences[t] != B.fences[128 * g])) {
        fail("warpgroup %d: thread %d ran %ld wgmma.fence / %ld commit_group, thread %d %ld / %ld (wgmma is "
             "warpgroup-wide: every thread runs the same sequence)",
             g, t, B.fences[t], B.commits[t], 128 * g, B.fences[128 * g], B.commits[128 * g]);
        break;
      }
  }
}

// Runs `body` as `threads` threads for every block of `grid` with `smem_bytes` of dynamic shared
// memory, DJEPA_EMU_CTAS (2) blocks at a time (whole clusters of `cluster` CTAs along x, at least
// one); returns false if the emulator reported an error.
inline bool launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body, int cluster = 1) {
  if (smem_bytes > kSmemLimit) fail("launch asks for %zu bytes of shared memory (> %zu)", smem_bytes, kSmemLimit);
  if (threads > 1024 || threads % 32) fail("launch with %d threads", threads);
  if (cluster < 1 || cluster > 8 || grid.x % unsigned(cluster))
    fail("launch with clusters of %d CTAs over a grid of %u (x a multiple of the cluster, at most 8)", cluster, grid.x);
  cluster = std::max(1, std::min(cluster, 8));
  install_fpe_handler();
  static std::vector<std::unique_ptr<Block>> blocks;
  static std::vector<std::unique_ptr<Cluster>> clusters;
  const int C = (std::max(ctas_at_once(), cluster) + cluster - 1) / cluster * cluster;
  while (int(blocks.size()) < C) blocks.emplace_back(new Block);
  while (int(clusters.size()) < C / cluster) clusters.emplace_back(new Cluster);
  std::vector<uint3> ids;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ids.push_back(make_uint3(x, y, z));
  for (size_t w0 = 0; w0 < ids.size(); w0 += C) {
    const int n = int(std::min<size_t>(C, ids.size() - w0));
    g_running.clear();
    for (int j = 0; j < n; ++j) {
      const uint3 b = ids[w0 + j];
      Cluster* cl = clusters[j / cluster].get();
      if (j % cluster == 0) cl->reset(cluster, threads, cluster * Block::span(threads));
      cl->cta[j % cluster] = blocks[j].get();
      blocks[j]->reset(b.x + grid.x * (b.y + grid.y * b.z), threads, smem_bytes, j % cluster, cluster, cl);
      g_running.push_back(blocks[j].get());
    }
    std::atomic<bool> done{false};
    std::thread watchdog([&] {
      unsigned long last = g_progress.load();
      auto since = std::chrono::steady_clock::now();
      while (!done.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        const unsigned long now = g_progress.load();
        if (now != last) {
          last = now;
          since = std::chrono::steady_clock::now();
        } else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() >
                   deadlock_seconds()) {
          dump_waiters_and_exit();
        }
      }
    });
    std::vector<std::thread> ts;
    ts.reserve(size_t(threads) * n);
    // The highest block first; each next one once the previous is under way (as many emulated
    // operations as threads, or finished, or stalled 250 ms: waiting on the others).
    for (int j = n - 1; j >= 0; --j) {
      Block* blk = blocks[j].get();
      const uint3 bidx = ids[w0 + j];
      for (int t = 0; t < threads; ++t) {
        ts.emplace_back([&, blk, bidx, t] {
          threadIdx = make_uint3(t, 0, 0);
          blockIdx = bidx;
          blockDim = dim3(threads, 1, 1);
          gridDim = grid;
          std::unique_ptr<Thr> thr(new Thr);
          thr->tid = unsigned(t);
          thr->me = unsigned(blk->base + t);
          thr->wg = t / 128;
          thr->vc.assign(blk->ncomp, 0);
          thr->av.assign(blk->ncomp, 0);
          thr->vc[thr->me] = 1;
          thr->stack_top = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
          t_blk = blk;
          t_thr = thr.get();
          blk->started++;
          body();
          {
            EmuCall guard;
            if (!thr->open.empty() || !thr->groups.empty())
              fail("thread exits with wgmma issued but not waited for (wgmma.wait_group)");
            if (!thr->bulk_open.empty() || !thr->bulk_groups.empty()) {
              fail("thread exits with TMA stores not committed or not waited for (cp.async.bulk.wait_group)");
              if (!thr->bulk_open.empty()) thr->bulk_groups.push_back(std::move(thr->bulk_open));
              bulk_wait_groups(0);
            }
            thr->regs.clear();
            std::lock_guard<std::mutex> lk(blk->m);
            blk->fences[t] = thr->fences;
            blk->commits[t] = thr->committed;
            blk->nreg_calls[t] = thr->nreg_calls;
            blk->wregs[t / 32].exited++;
            blk->cv.notify_all();
          }
          set_trap(false);
          t_thr = nullptr;
          blk->finished++;
          tick();
        });
      }
      if (j > 0) {
        unsigned long last = blk->progress.load();
        auto since = std::chrono::steady_clock::now();
        while (blk->finished.load() < threads && blk->progress.load() < unsigned(threads)) {
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
          const unsigned long now = blk->progress.load();
          if (now != last) {
            last = now;
            since = std::chrono::steady_clock::now();
          } else if (blk->started.load() == threads &&
                     std::chrono::steady_clock::now() - since > std::chrono::milliseconds(250)) {
            break;
          }
        }
      }
    }
    for (auto& t : ts) t.join();
    done = true;
    watchdog.join();
    for (int j = 0; j < n; ++j) {
      t_blk = blocks[j].get();
      finish_block(*blocks[j]);
    }
    t_blk = nullptr;
    g_running.clear();
  }
  return take_errors() == 0;
}

}  // namespace hemu

// __syncthreads is bar.sync 0 over the whole block (the hopper emulator's, with happens-before).
#undef __syncthreads
#define __syncthreads() ::djepa::hopper::named_bar_sync(0, int(blockDim.x))

// Global-memory atomics and fences of the device API (sequentially consistent on the CPU).
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
  float old, sum;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    sum = old + v;
  } while (!__atomic_compare_exchange(p, &old, &sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int cmp, int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------------------ device API
// The functions csrc/hopper/ptx.cuh declares for the GPU, defined on the emulator.
namespace djepa {
namespace hopper {

inline uint32_t smem_u32(const void* p) { return hemu::smem_offset(p); }
inline unsigned char* dynamic_smem() { return hemu::t_blk->window + hemu::t_blk->dyn_offset; }

inline void mbar_init(uint64_t* bar, int count) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(bar);
  if (off % 8 || !hemu::in_dyn(off, 8)) hemu::fail("mbarrier at smem %u: misaligned or outside", off);
  if (count <= 0) hemu::fail("mbarrier.init with count %d", count);
  hemu::Block& B = *hemu::t_blk;
  std::lock_guard<std::mutex> lk(B.m);
  hemu::Mbar& b = B.bars[off];
  if (!b.deferred.empty()) hemu::fail("mbarrier.init at smem %u while copies are queued on it", off);
  int comp = b.comp;
  if (comp < 0) {
    if (B.next_bar >= hemu::kMaxBars) hemu::fail("more than %d mbarriers in one block", hemu::kMaxBars);
    comp = B.base + B.threads + B.nwg + std::min(B.next_bar++, hemu::kMaxBars - 1);
  }
  const uint32_t completions = b.completions;
  b = hemu::Mbar{};
  b.owner = &B;
  b.init = true;
  b.count = b.pending = count;
  b.comp = comp;
  b.completions = completions;
  b.init_tid = hemu::t_thr->me;
  b.init_clock = hemu::t_thr->vc[hemu::t_thr->me];
  b.acc_vc.assign(B.ncomp, 0);
  b.acc_av.assign(B.ncomp, 0);
  b.acc_vc[comp] = completions;
  b.done_vc = b.acc_vc;
  b.done_av = b.acc_av;
  std::memset(bar, 0, 8);
  hemu::tick();
}
// fence.mbarrier_init.release.cluster (the inits reach other threads through a barrier, which
// the happens-before check of every use of an mbarrier covers).
inline void mbar_init_fence() {}
inline void mbar_arrive(uint64_t* bar) {
  hemu::EmuCall guard;
  std::lock_guard<std::mutex> lk(hemu::t_blk->m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.arrive");
  hemu::settle(b);
  hemu::publish(b.acc_vc, b.acc_av);
  b.pending--;
  hemu::check_phase(b);
}
inline void mbar_arrive_if(uint64_t* bar, bool pred) {
  if (pred) mbar_arrive(bar);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  hemu::EmuCall guard;
  std::lock_guard<std::mutex> lk(hemu::t_blk->m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.arrive.expect_tx");
  hemu::settle(b);
  hemu::publish(b.acc_vc, b.acc_av);
  b.tx += bytes;
  b.pending--;
  hemu::check_phase(b);
}
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  hemu::EmuCall guard;
  std::lock_guard<std::mutex> lk(hemu::t_blk->m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.try_wait");
  hemu::flush(b);
  const bool done = (parity & 1) != (b.phase & 1);
  if (done) hemu::acquire(b.done_vc, b.done_av);
  return done;
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(bar);
  hemu::Block& B = *hemu::t_blk;
  std::unique_lock<std::mutex> lk(B.m);
  hemu::g_stats.mbar_waits++;
  hemu::Mbar& b = hemu::bar_at(off, "mbarrier wait");
  while (true) {
    hemu::flush(b);
    if ((parity & 1) != (b.phase & 1)) break;
    B.waiting[threadIdx.x] = hemu::WaitInfo{"an mbarrier phase", off, parity};
    B.cv.wait_for(lk, std::chrono::milliseconds(50));
  }
  hemu::acquire(b.done_vc, b.done_av);
  B.waiting.erase(threadIdx.x);
  hemu::tick();
  lk.unlock();
  hemu::lag();
}

inline void tma_prefetch(const CUtensorMap*) {}
inline void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  const int c[2] = {c0, c1};
  hemu::tma_issue(dst, map, c, 2, bar);
}
inline void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, uint64_t* bar) {
  const int c[4] = {c0, c1, c2, c3};
  hemu::tma_issue(dst, map, c, 4, bar);
}

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(dst);
  if (off % 16 || !hemu::in_dyn(off, 16)) hemu::fail("cp.async destination smem %u misaligned or outside", off);
  if (reinterpret_cast<uintptr_t>(src) % 16) hemu::fail("cp.async source %p not 16-byte aligned", src);
  if (src_bytes < 0 || src_bytes > 16) hemu::fail("cp.async src-size %d", src_bytes);
  hemu::check_write(off, 16, hemu::kCpAsync);
  hemu::add_pending(off, 16, +1);
  hemu::t_thr->cp_pending.push_back(hemu::Copy{dst, src, src_bytes});
}
inline void cp_async_mbar_arrive(uint64_t* bar) {
  hemu::EmuCall guard;
  hemu::Block& B = *hemu::t_blk;
  hemu::Thr& T = *hemu::t_thr;
  std::lock_guard<std::mutex> lk(B.m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "cp.async.mbarrier.arrive");
  hemu::settle(b);
  b.deferred.push_back(hemu::Deferred{{}, std::move(T.cp_pending), T.vc, T.av});
  T.cp_pending.clear();
  hemu::release();
  hemu::tick();
  B.cv.notify_all();
}

// fence.proxy.async: every generic write this thread has observed becomes visible to the async
// proxy for whoever observes the fence.
inline void fence_proxy_async() {
  hemu::EmuCall guard;
  hemu::Thr& T = *hemu::t_thr;
  hemu::join(T.av, T.vc);
  hemu::release();
}
inline void st_shared16(void* dst, uint4 v) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(dst);
  if (off % 16 || !hemu::in_dyn(off, 16)) hemu::fail("16-byte shared store at %u misaligned or outside", off);
  hemu::check_write(off, 16, hemu::kGeneric);
  std::memcpy(dst, &v, 16);
  hemu::record_write(off, 16, hemu::kGeneric, hemu::t_thr->me, hemu::t_thr->vc[hemu::t_thr->me]);
  hemu::g_stats.st_shared++;
}
// 4- and 8-byte ordinary shared stores (tracked per word).
inline void st_shared_small(void* dst, const void* v, size_t bytes) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(dst);
  if (off % bytes || !hemu::in_dyn(off, bytes))
    hemu::fail("%zu-byte shared store at %u misaligned or outside", bytes, off);
  hemu::check_write(off, bytes, hemu::kGeneric, nullptr, true);
  std::memcpy(dst, v, bytes);
  hemu::record_word_write(off, bytes, hemu::t_thr->me, hemu::t_thr->vc[hemu::t_thr->me]);
  hemu::g_stats.st_shared++;
}
inline void st_shared4(void* dst, uint32_t v) { st_shared_small(dst, &v, 4); }
inline void st_shared8(void* dst, float2 v) { st_shared_small(dst, &v, 8); }

// ---- TMA stores and bulk groups
inline void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1) {
  const int c[2] = {c0, c1};
  hemu::tma_store_issue(map, src, c, 2);
}
inline void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  const int c[3] = {c0, c1, c2};
  hemu::tma_store_issue(map, src, c, 3);
}
inline void tma_store_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3) {
  const int c[4] = {c0, c1, c2, c3};
  hemu::tma_store_issue(map, src, c, 4);
}
inline void bulk_commit() {
  hemu::EmuCall guard;
  hemu::Thr& T = *hemu::t_thr;
  T.bulk_groups.push_back(std::move(T.bulk_open));
  T.bulk_open.clear();
}
template <int N>
inline void bulk_wait_read() {
  hemu::bulk_wait_groups(N);
}
template <int N>
inline void bulk_wait() {
  hemu::bulk_wait_groups(N);
}

// ---- clusters
inline void named_bar_sync(int id, int threads);
inline uint32_t cluster_ctarank() { return uint32_t(hemu::t_blk->rank); }
inline void cluster_sync() {
  hemu::EmuCall guard;
  hemu::Cluster* cl = hemu::t_blk->cluster;
  if (cl == nullptr || cl->size == 1) {
    named_bar_sync(0, int(blockDim.x));
    return;
  }
  std::unique_lock<std::mutex> lk(cl->m);
  hemu::publish(cl->acc_vc, cl->acc_av);
  const unsigned long gen = cl->gen;
  if (++cl->arrived == cl->count) {
    cl->done_vc[gen & 1] = cl->acc_vc;
    cl->done_av[gen & 1] = cl->acc_av;
    cl->acc_vc.assign(cl->acc_vc.size(), 0);
    cl->acc_av.assign(cl->acc_av.size(), 0);
    cl->arrived = 0;
    cl->gen++;
    cl->cv.notify_all();
  } else {
    {
      std::lock_guard<std::mutex> bl(hemu::t_blk->m);
      hemu::t_blk->waiting[threadIdx.x] = hemu::WaitInfo{"barrier.cluster", 0, 0};
    }
    while (cl->gen == gen) cl->cv.wait_for(lk, std::chrono::milliseconds(50));
    std::lock_guard<std::mutex> bl(hemu::t_blk->m);
    hemu::t_blk->waiting.erase(threadIdx.x);
  }
  hemu::acquire(cl->done_vc[gen & 1], cl->done_av[gen & 1]);
  hemu::tick();
}
// mbarrier.arrive.shared::cluster on the barrier at the same offset in CTA `cta` of the cluster.
inline void mbar_arrive_remote(uint64_t* bar, uint32_t cta) {
  hemu::EmuCall guard;
  const uint32_t off = hemu::smem_offset(bar);
  hemu::Cluster* cl = hemu::t_blk->cluster;
  if (cl == nullptr || int(cta) >= cl->size) {
    hemu::fail("mbarrier arrive on CTA %u of a cluster of %d", cta, cl ? cl->size : 1);
    return;
  }
  hemu::Block& D = *cl->cta[cta];
  std::lock_guard<std::mutex> lk(D.m);
  if (&D != hemu::t_blk && D.finished.load() == D.threads)
    hemu::fail("mbarrier arrive on CTA %u of the cluster after all its threads exited (a CTA must not exit while "
               "its peers may still arrive on its barriers)",
               cta);
  hemu::Mbar& b = hemu::bar_at(off, "mbarrier.arrive (remote)", &D);
  hemu::settle(b);
  hemu::publish(b.acc_vc, b.acc_av);
  b.pending--;
  hemu::check_phase(b);
  hemu::g_stats.remote_arrives++;
}
inline void tma_load_2d_multicast(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar, uint16_t mask) {
  const int c[2] = {c0, c1};
  hemu::tma_issue(dst, map, c, 2, bar, mask);
}

// stmatrix.m8n8.x4 (warp-wide): lane l writes the 16-byte row it addresses, row l % 8 of matrix
// l / 8, from register l / 8 of lanes 4 (l % 8) .. 4 (l % 8) + 3 (a generic store of that lane).
inline void stmatrix_x4(void* row, const uint32_t (&r)[4]) {
  hemu::EmuCall guard;
  hemu::WarpX& w = hemu::t_blk->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  const uint32_t off = hemu::smem_offset(row);
  if (off % 16 || !hemu::in_dyn(off, 16)) hemu::fail("stmatrix row address smem %u misaligned or outside", off);
  for (int i = 0; i < 4; ++i) w.x[lane][i] = r[i];
  w.bar.wait();
  uint32_t v[4];
  for (int j = 0; j < 4; ++j) v[j] = w.x[4 * (lane % 8) + j][lane / 8];
  w.bar.wait();
  hemu::check_write(off, 16, hemu::kGeneric);
  std::memcpy(row, v, 16);
  hemu::record_write(off, 16, hemu::kGeneric, hemu::t_thr->me, hemu::t_thr->vc[hemu::t_thr->me]);
  hemu::g_stats.st_shared++;
}

inline void named_bar_sync(int id, int threads) {
  hemu::EmuCall guard;
  hemu::Block& B = *hemu::t_blk;
  if (threads % 32 || threads <= 0 || threads > B.threads)
    hemu::fail("bar.sync %d with %d threads (a multiple of 32, at most the block's %d)", id, threads, B.threads);
  std::unique_lock<std::mutex> lk(B.m);
  hemu::NamedBar& nb = B.named[id & 15];
  if (nb.arrived == 0) nb.count = threads;
  else if (nb.count != threads) hemu::fail("bar.sync %d with %d threads while it counts %d", id, threads, nb.count);
  hemu::g_stats.named_bar++;
  hemu::publish(nb.acc_vc, nb.acc_av);
  const unsigned long gen = nb.gen;
  if (++nb.arrived == nb.count) {
    nb.done_vc[gen & 1] = nb.acc_vc;
    nb.done_av[gen & 1] = nb.acc_av;
    nb.acc_vc.assign(B.ncomp, 0);
    nb.acc_av.assign(B.ncomp, 0);
    nb.arrived = 0;
    nb.gen++;
    B.cv.notify_all();
  } else {
    B.waiting[threadIdx.x] = hemu::WaitInfo{"a named barrier", uint32_t(id), 0};
    while (nb.gen == gen) B.cv.wait_for(lk, std::chrono::milliseconds(50));
    B.waiting.erase(threadIdx.x);
  }
  hemu::acquire(nb.done_vc[gen & 1], nb.done_av[gen & 1]);
  hemu::tick();
}
inline void named_bar_arrive(int id, int threads) {
  hemu::EmuCall guard;
  hemu::Block& B = *hemu::t_blk;
  std::lock_guard<std::mutex> lk(B.m);
  hemu::NamedBar& nb = B.named[id & 15];
  if (nb.arrived == 0) nb.count = threads;
  else if (nb.count != threads) hemu::fail("bar.arrive %d with %d threads while it counts %d", id, threads, nb.count);
  hemu::publish(nb.acc_vc, nb.acc_av);
  if (++nb.arrived == nb.count) {
    const unsigned long gen = nb.gen;
    nb.done_vc[gen & 1] = nb.acc_vc;
    nb.done_av[gen & 1] = nb.acc_av;
    nb.acc_vc.assign(B.ncomp, 0);
    nb.acc_av.assign(B.ncomp, 0);
    nb.arrived = 0;
    nb.gen++;
    B.cv.notify_all();
  }
  hemu::tick();
}

template <int R>
inline void setmaxnreg_inc() {
  hemu::setmaxnreg(R, true);
}
template <int R>
inline void setmaxnreg_dec() {
  hemu::setmaxnreg(R, false);
}

inline void wgmma_fence() {
  hemu::EmuCall guard;
  hemu::t_thr->fences++;
  hemu::snapshot_stack();
}
// wgmma.commit_group.sync.aligned: the lanes of a warp reach it together (so a lane cannot
// release a stage on behalf of its warp before the warp's other lanes have waited for it).
inline void wgmma_commit() {
  hemu::EmuCall guard;
  hemu::Thr& T = *hemu::t_thr;
  T.groups.emplace_back(++T.committed, std::move(T.open));
  T.open.clear();
  hemu::t_blk->warps[threadIdx.x / 32].bar.wait();
}
template <int N>
inline void wgmma_wait() {
  hemu::EmuCall guard;
  hemu::Thr& T = *hemu::t_thr;
  hemu::Block& B = *hemu::t_blk;
  B.wg[threadIdx.x / 128].bar.wait();  // every thread of the warpgroup has issued
  while (int(T.groups.size()) > N) {
    auto& [number, ops] = T.groups.front();
    for (const hemu::Op& op : ops) hemu::execute(op);
    for (const hemu::Op& op : ops) {
      hemu::give_reg(op.d, "accumulator");
      if (op.rs) hemu::give_reg(op.a, "register-A fragment");
    }
    T.retired = number;
    T.groups.pop_front();
  }
  B.wg[threadIdx.x / 128].bar.wait();  // register-A exchange slots are read
  uint32_t& r = T.vc[B.comp_wg(T.wg)];
  r = std::max<uint32_t>(r, uint32_t(T.retired));
}
template <int R>
inline void fence_regs(float (&)[R]) {}

template <typename T, int N, int TA, int TB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  hemu::issue(hemu::Op{false, N, 2, TA, TB, scale_d, std::is_same_v<T, __nv_bfloat16>, 0, 0, da, db, 0}, d, nullptr);
}
template <typename T, int N, int TB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  const long seq = hemu::t_thr->rs_seq++;
  hemu::issue(hemu::Op{true, N, 2, 0, TB, scale_d, std::is_same_v<T, __nv_bfloat16>, 0, 0, 0, db, seq}, d,
              const_cast<uint32_t*>(a));
}

inline float ex2(float x) { return std::exp2(x); }
inline int shfl_idx(int v, int src) {
  hemu::EmuCall guard;
  hemu::WarpX& w = hemu::t_blk->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  std::memcpy(&w.f[lane], &v, 4);
  w.bar.wait();
  int r;
  std::memcpy(&r, &w.f[src & 31], 4);
  w.bar.wait();
  return r;
}
inline float shfl_xor(float v, int mask) {
  hemu::EmuCall guard;
  hemu::WarpX& w = hemu::t_blk->warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.f[lane] = v;
  w.bar.wait();
  const float r = w.f[lane ^ mask];
  w.bar.wait();
  return r;
}

}  // namespace hopper
}  // namespace djepa
