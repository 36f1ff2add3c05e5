// Runs the sm_90a kernels of csrc/hopper/ on the CPU (tools/*_sm90_emulate.cpp), on top of
// tools/cuda_emulate.h (threadIdx/blockIdx, __syncthreads, one std::thread per CUDA thread).
//
// Emulated from the PTX ISA, with the checks a GPU would not give:
//  * wgmma.mma_async (m64nNk16, f16/bf16 -> f32; A from shared memory or registers): the matrix
//    descriptor is decoded field by field (start address, leading / stride byte offsets, swizzle
//    mode 128/64/32 B or none, base offset), each element's address follows the canonical
//    K-major / MN-major layouts and the swizzle is applied to the address bits, as the hardware
//    does. Asynchrony: an mma runs at the wgmma.wait_group that retires its group (the latest
//    moment the ISA allows), so accumulators read before the wait are stale and a stage released
//    before the wait is read after the producer refilled it. Accumulator and register-A
//    fragments follow the ISA's m64nNk16 layouts. Checks: descriptor address inside the block's
//    shared memory, base offset 0 with the pattern starting on its boundary, and no operand byte
//    written by ordinary stores (or cp.async) without a fence.proxy.async after it.
//  * mbarrier: init / arrive / arrive.expect_tx / try_wait.parity with phases and transaction
//    counts; too many arrivals is an error. TMA (cp.async.bulk.tensor 2-5d) and cp.async
//    (16 B, zero fill, .mbarrier.arrive.noinc) are queued on their barrier and land only when a
//    thread waits on it (or the barrier's next phase gets its first arrival): data read without
//    waiting is not there (0xFF poison or a stale tile).
//    The tensor map is emulated: encode_tiled() has cuTensorMapEncodeTiled's signature and checks
//    (alignment, strides, box limits, inner box = swizzle span); OOB elements are zero filled;
//    the destination must be aligned to the swizzle pattern.
//  * named barriers (bar.sync / bar.arrive with thread counts), warp shuffles for up to 32 warps,
//    setmaxnreg (no-op), ex2.approx.
//  * a watchdog: no progress for DJEPA_EMU_DEADLOCK_S seconds (default 30) prints what every
//    waiting thread waits on and exits with status 3 (a missing arrive hangs a GPU).
//  * DJEPA_EMU_LAG="tids:ms": the given threads sleep after every barrier wait, to expose races
//    that need one thread to lag behind the others.
// Not emulated: clusters / multicast, the real concurrency of the copy engine with other work
// (copies land lazily, at waits), register-count limits of setmaxnreg, timing.
#pragma once

#ifndef DJEPA_HOPPER_EMULATE
#define DJEPA_HOPPER_EMULATE 1
#endif

#include "cuda_emulate.h"

#include <cuda.h>

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

// ------------------------------------------------------------------------------ errors / stats
inline std::atomic<int> g_errors{0};
inline std::mutex g_print_m;

inline void fail(const char* fmt, ...) {
  const int n = g_errors.fetch_add(1);
  if (n >= 12) return;
  std::lock_guard<std::mutex> lk(g_print_m);
  va_list ap;
  va_start(ap, fmt);
  std::printf("EMU-ERROR (block %u, thread %u): ", blockIdx.x, threadIdx.x);
  std::vprintf(fmt, ap);
  std::printf("\n");
  va_end(ap);
  std::fflush(stdout);
}
// Errors since the last call (a test case passes only with none).
inline int take_errors() { return g_errors.exchange(0); }

struct Stats {
  std::atomic<long> wgmma{0}, tma_boxes{0}, cp_async{0}, st_shared{0}, named_bar{0}, mbar_waits{0};
  void reset() { wgmma = tma_boxes = cp_async = st_shared = named_bar = mbar_waits = 0; }
};
inline Stats g_stats;

// ------------------------------------------------------------------------------ block state
alignas(4096) inline unsigned char g_window[kWindowBytes];
inline size_t g_dyn_offset = 16;  // dynamic smem starts here (as if 16 bytes of static smem)
inline size_t g_dyn_bytes = 0;
inline std::mutex g_m;                  // guards everything below
inline std::condition_variable g_cv;
inline std::atomic<unsigned long> g_progress{0};
inline unsigned g_block_id = 0;

constexpr int kClean = -1, kAnyFence = -2;  // chunk owners (16-byte chunks of the window)
inline std::unique_ptr<std::atomic<int>[]> g_owner(new std::atomic<int>[kWindowBytes / 16]);
inline std::vector<uint32_t> g_any_dirty;

struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};
struct Deferred {
  std::function<void()> tma;  // performs the copy and its complete_tx
  std::vector<Copy> cp;       // cp.async copies, then one arrival
};
struct Mbar {
  bool init = false;
  int count = 0, pending = 0;
  long long tx = 0;
  unsigned long phase = 0;
  std::vector<Deferred> deferred;
};
inline std::unordered_map<uint32_t, Mbar> g_bars;

struct NamedBar {
  int count = 0, arrived = 0;
  unsigned long gen = 0;
};
inline NamedBar g_named[16];

struct WaitInfo {
  const char* what;
  uint32_t addr;
  unsigned parity;
};
inline std::map<unsigned, WaitInfo> g_waiting;  // tid -> what it waits on

struct WarpX {
  Barrier bar{32};
  float f[32];
};
inline WarpX g_hwarps[32];
struct WgBar {
  Barrier bar{128};
};
inline WgBar g_wg_bar[8];
// Register-A fragments of wgmma_rs, published at issue: (warpgroup, sequence) -> 128 x 4 regs.
struct AExchange {
  std::array<uint32_t, 512> regs{};
  int readers = 0;
};
inline std::map<std::pair<int, long>, AExchange> g_aex;

inline void tick() {
  g_progress.fetch_add(1, std::memory_order_relaxed);
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
inline uint32_t smem_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < g_window || c >= g_window + kWindowBytes) {
    fail("address %p is not in the block's shared memory", p);
    return 0;
  }
  return static_cast<uint32_t>(c - g_window);
}
inline bool in_dyn(uint32_t off, size_t bytes) {
  return off >= g_dyn_offset && off + bytes <= g_dyn_offset + g_dyn_bytes;
}

// ------------------------------------------------------------------------------ proxy tracking
inline thread_local std::vector<uint32_t> t_dirty;

inline void mark_generic(uint32_t off, int owner) {
  const uint32_t ch = off / 16;
  g_owner[ch].store(owner);
  if (owner == kAnyFence) {
    g_any_dirty.push_back(ch);  // caller holds g_m
  } else {
    t_dirty.push_back(ch);
  }
}
inline void mark_async(uint32_t off, size_t bytes) {
  for (uint32_t ch = off / 16; ch < (off + bytes + 15) / 16; ++ch) g_owner[ch].store(kClean);
}

// ------------------------------------------------------------------------------ copies
inline void perform(const Copy& c) {
  std::memset(c.dst, 0, 16);
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
  mark_generic(smem_offset(c.dst), kAnyFence);
  g_stats.cp_async++;
}

// Caller holds g_m.
inline void check_phase(Mbar& b) {
  if (b.pending < 0) fail("mbarrier: more arrivals than its expected count %d", b.count);
  if (b.pending <= 0 && b.tx == 0) {
    b.phase++;
    b.pending = b.count;
    g_cv.notify_all();
  }
  tick();
}

inline Mbar& bar_at(uint32_t off, const char* what) {
  auto it = g_bars.find(off);
  if (it == g_bars.end() || !it->second.init) {
    fail("%s on an uninitialised mbarrier (smem offset %u)", what, off);
    return g_bars[off];
  }
  return it->second;
}

inline void flush(Mbar& b);
// A new arrival while the current phase only waits for bytes: its copies land first (a TMA
// lands within microseconds, long before a producer comes round the ring again), so the arrival
// opens the next phase, as on the GPU, instead of over-arriving a phase kept open by laziness.
inline void settle(Mbar& b) {
  if (b.pending == 0 && !b.deferred.empty()) flush(b);
}

// Lands every copy queued on the barrier (caller holds g_m).
inline void flush(Mbar& b) {
  while (!b.deferred.empty()) {
    std::vector<Deferred> work;
    work.swap(b.deferred);
    for (auto& d : work) {
      if (d.tma) {
        d.tma();
      } else {
        for (const Copy& c : d.cp) perform(c);
        b.pending--;
        check_phase(b);
      }
    }
  }
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

inline void tma_issue(void* dst, const CUtensorMap* map, const int* coords, int nc, uint64_t* bar) {
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
  std::lock_guard<std::mutex> lk(g_m);
  Mbar& mb = bar_at(b, "TMA completion");
  Mbar* mbp = &mb;
  mb.deferred.push_back(Deferred{[t, c, d, bytes, mbp]() {
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
      if (inside) std::memcpy(g_window + a, src, t.elem_bytes);
      else std::memset(g_window + a, 0, t.elem_bytes);
    }
    mark_async(d, bytes);
    g_stats.tma_boxes++;
    mbp->tx -= (long long)bytes;
    check_phase(*mbp);
  }, {}});
  tick();
  g_cv.notify_all();
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

struct Op {
  bool rs;
  int N, eb, ta, tb, scale_d;
  bool bf16;
  float* d;
  uint64_t da, db;
  long seq;  // register-A exchange sequence (rs)
};
struct WgThread {
  std::vector<Op> open;
  std::deque<std::vector<Op>> groups;
  long rs_seq = 0;
};
inline thread_local WgThread t_wg;

inline float bits_to_float(uint16_t v, bool bf16) {
  return bf16 ? emu::half_bits_to_float<__nv_bfloat16>(v) : emu::half_bits_to_float<__half>(v);
}

inline float read_operand(uint32_t addr, bool bf16, const char* which) {
  if (!in_dyn(addr, 2)) {
    fail("wgmma %s operand address %u outside the dynamic shared memory", which, addr);
    return NAN;
  }
  const int own = g_owner[addr / 16].load();
  if (own != kClean) {
    fail("wgmma reads %s at smem %u written by %s without a fence.proxy.async after it", which, addr,
         own == kAnyFence ? "cp.async" : "an ordinary store");
    g_owner[addr / 16].store(kClean);  // report once
  }
  uint16_t v;
  std::memcpy(&v, g_window + addr, 2);
  return bits_to_float(v, bf16);
}

inline void execute(const Op& op) {
  const int t = threadIdx.x % 128, w = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
  const int wg = threadIdx.x / 128;
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
    std::lock_guard<std::mutex> lk(g_m);
    auto it = g_aex.find({wg, op.seq});
    if (it == g_aex.end()) {
      fail("wgmma (register A): no fragment published for sequence %ld", op.seq);
      return;
    }
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        const uint32_t reg = it->second.regs[(32 * w + 4 * g + (k % 8) / 2) * 4 + h + 2 * (k / 8)];
        A[h][k] = bits_to_float(uint16_t((k & 1) ? reg >> 16 : reg & 0xffff), op.bf16);
      }
    if (++it->second.readers == 128) g_aex.erase(it);
  }
  for (int i = 0; i < op.N / 2; ++i) {
    const int h = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * c + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[h][k] * read_operand(operand_addr(fb, op.tb, col, k, op.eb), op.bf16, "B");
    op.d[i] = (op.scale_d ? op.d[i] : 0.f) + acc;
  }
  g_stats.wgmma++;
  tick();
}

// ------------------------------------------------------------------------------ watchdog + runner
inline double deadlock_seconds() {
  const char* s = std::getenv("DJEPA_EMU_DEADLOCK_S");
  return s ? std::atof(s) : 30.0;
}

inline void dump_waiters_and_exit() {
  std::lock_guard<std::mutex> lk(g_print_m);
  std::unique_lock<std::mutex> state(g_m, std::try_to_lock);  // best effort: a waiter may hold it
  std::printf("FAIL emulator deadlock: no progress for %.0f s; threads waiting on mbarriers / named barriers "
              "(others wait in __syncthreads, a warp or warpgroup collective):\n", deadlock_seconds());
  // Group the waiters by what they wait on: (kind, smem, parity) -> thread ranges.
  std::map<std::tuple<std::string, uint32_t, unsigned>, std::string> groups;
  for (auto& [tid, w] : g_waiting) {
    std::string& r = groups[{w.what, w.addr, w.parity}];
    if (r.size() < 160) r += (r.empty() ? "" : ",") + std::to_string(tid);
  }
  for (auto& [key, tids] : groups)
    std::printf("  %s (smem %u, parity %u): threads %s\n", std::get<0>(key).c_str(), std::get<1>(key),
                std::get<2>(key), tids.c_str());
  int shown = 0;
  std::printf("  block %u; mbarriers (smem: phase, pending arrivals / count, tx bytes, queued copies):\n", g_block_id);
  shown = 0;
  for (auto& [off, b] : g_bars) {
    if (shown++ >= 32) break;
    std::printf("    %u: phase %lu, %d/%d, tx %lld, %zu queued\n", off, b.phase, b.pending, b.count, b.tx,
                b.deferred.size());
  }
  std::printf("SOME FAILED\n");
  std::fflush(stdout);
  std::_Exit(3);
}

// Runs `body` as `threads` threads for every block of `grid` (one block at a time) with
// `smem_bytes` of dynamic shared memory; returns false if the emulator reported an error.
inline bool launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  if (smem_bytes > kSmemLimit) fail("launch asks for %zu bytes of shared memory (> %zu)", smem_bytes, kSmemLimit);
  if (threads > 1024 || threads % 32) fail("launch with %d threads", threads);
  g_dyn_bytes = std::min(smem_bytes, kWindowBytes - g_dyn_offset);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_id = x + grid.x * (y + grid.y * z);
        std::memset(g_window, 0xff, sizeof(g_window));
        for (size_t i = 0; i < kWindowBytes / 16; ++i) g_owner[i].store(kClean);
        g_any_dirty.clear();
        g_bars.clear();
        for (auto& nb : g_named) nb = NamedBar{};
        g_aex.clear();
        g_waiting.clear();
        g_block_bar.reset(threads);
        for (auto& w : g_hwarps) w.bar.reset(32);  // a block cannot inherit a half-used collective
        for (auto& w : g_wg_bar) w.bar.reset(128);
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
        ts.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = dim3(threads, 1, 1);
            gridDim = grid;
            body();
            if (!t_wg.open.empty() || !t_wg.groups.empty())
              fail("thread exits with wgmma issued but not waited for (wgmma.wait_group)");
            tick();
          });
        }
        for (auto& t : ts) t.join();
        done = true;
        watchdog.join();
        for (auto& [off, b] : g_bars)
          if (!b.deferred.empty()) fail("block ends with copies on the mbarrier at smem %u never waited for", off);
      }
  return take_errors() == 0;
}

}  // namespace hemu

// ------------------------------------------------------------------------------ device API
// The functions csrc/hopper/ptx.cuh declares for the GPU, defined on the emulator.
namespace djepa {
namespace hopper {

inline uint32_t smem_u32(const void* p) { return hemu::smem_offset(p); }
inline unsigned char* dynamic_smem() { return hemu::g_window + hemu::g_dyn_offset; }

inline void mbar_init(uint64_t* bar, int count) {
  const uint32_t off = hemu::smem_offset(bar);
  if (off % 8 || !hemu::in_dyn(off, 8)) hemu::fail("mbarrier at smem %u: misaligned or outside", off);
  if (count <= 0) hemu::fail("mbarrier.init with count %d", count);
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::Mbar& b = hemu::g_bars[off];
  b = hemu::Mbar{};
  b.init = true;
  b.count = b.pending = count;
  std::memset(bar, 0, 8);
  hemu::tick();
}
inline void mbar_init_fence() {}
inline void mbar_arrive(uint64_t* bar) {
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.arrive");
  hemu::settle(b);
  b.pending--;
  hemu::check_phase(b);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.arrive.expect_tx");
  hemu::settle(b);
  b.tx += bytes;
  b.pending--;
  hemu::check_phase(b);
}
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "mbarrier.try_wait");
  hemu::flush(b);
  return (parity & 1) != (b.phase & 1);
}
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t off = hemu::smem_offset(bar);
  std::unique_lock<std::mutex> lk(hemu::g_m);
  hemu::g_stats.mbar_waits++;
  hemu::Mbar& b = hemu::bar_at(off, "mbarrier wait");
  while (true) {
    hemu::flush(b);
    if ((parity & 1) != (b.phase & 1)) break;
    hemu::g_waiting[threadIdx.x] = hemu::WaitInfo{"an mbarrier phase", off, parity};
    hemu::g_cv.wait_for(lk, std::chrono::milliseconds(50));
  }
  hemu::g_waiting.erase(threadIdx.x);
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

inline thread_local std::vector<hemu::Copy> t_cp_pending;
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  const uint32_t off = hemu::smem_offset(dst);
  if (off % 16 || !hemu::in_dyn(off, 16)) hemu::fail("cp.async destination smem %u misaligned or outside", off);
  if (reinterpret_cast<uintptr_t>(src) % 16) hemu::fail("cp.async source %p not 16-byte aligned", src);
  if (src_bytes < 0 || src_bytes > 16) hemu::fail("cp.async src-size %d", src_bytes);
  t_cp_pending.push_back(hemu::Copy{dst, src, src_bytes});
}
inline void cp_async_mbar_arrive(uint64_t* bar) {
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::Mbar& b = hemu::bar_at(hemu::smem_offset(bar), "cp.async.mbarrier.arrive");
  hemu::settle(b);
  b.deferred.push_back(hemu::Deferred{{}, std::move(t_cp_pending)});
  t_cp_pending.clear();
  hemu::tick();
  hemu::g_cv.notify_all();
}

inline void fence_proxy_async() {
  for (uint32_t ch : hemu::t_dirty)
    if (hemu::g_owner[ch].load() == int(threadIdx.x)) hemu::g_owner[ch].store(hemu::kClean);
  hemu::t_dirty.clear();
  std::lock_guard<std::mutex> lk(hemu::g_m);
  for (uint32_t ch : hemu::g_any_dirty)
    if (hemu::g_owner[ch].load() == hemu::kAnyFence) hemu::g_owner[ch].store(hemu::kClean);
  hemu::g_any_dirty.clear();
}
inline void st_shared16(void* dst, uint4 v) {
  const uint32_t off = hemu::smem_offset(dst);
  if (off % 16 || !hemu::in_dyn(off, 16)) hemu::fail("16-byte shared store at %u misaligned or outside", off);
  std::memcpy(dst, &v, 16);
  hemu::mark_generic(off, int(threadIdx.x));
  hemu::g_stats.st_shared++;
}

inline void named_bar_sync(int id, int threads) {
  std::unique_lock<std::mutex> lk(hemu::g_m);
  hemu::NamedBar& nb = hemu::g_named[id & 15];
  if (nb.arrived == 0) nb.count = threads;
  else if (nb.count != threads) hemu::fail("bar.sync %d with %d threads while it counts %d", id, threads, nb.count);
  hemu::g_stats.named_bar++;
  const unsigned long gen = nb.gen;
  if (++nb.arrived == nb.count) {
    nb.arrived = 0;
    nb.gen++;
    hemu::g_cv.notify_all();
    hemu::tick();
    return;
  }
  hemu::g_waiting[threadIdx.x] = hemu::WaitInfo{"a named barrier", uint32_t(id), 0};
  while (nb.gen == gen) hemu::g_cv.wait_for(lk, std::chrono::milliseconds(50));
  hemu::g_waiting.erase(threadIdx.x);
}
inline void named_bar_arrive(int id, int threads) {
  std::lock_guard<std::mutex> lk(hemu::g_m);
  hemu::NamedBar& nb = hemu::g_named[id & 15];
  if (nb.arrived == 0) nb.count = threads;
  if (++nb.arrived == nb.count) {
    nb.arrived = 0;
    nb.gen++;
    hemu::g_cv.notify_all();
  }
  hemu::tick();
}

template <int R>
inline void setmaxnreg_inc() {}
template <int R>
inline void setmaxnreg_dec() {}

inline void wgmma_fence() {}
inline void wgmma_commit() {
  hemu::t_wg.groups.push_back(std::move(hemu::t_wg.open));
  hemu::t_wg.open.clear();
}
template <int N>
inline void wgmma_wait() {
  hemu::g_wg_bar[threadIdx.x / 128].bar.wait();  // every thread of the warpgroup has issued
  while (int(hemu::t_wg.groups.size()) > N) {
    for (const hemu::Op& op : hemu::t_wg.groups.front()) hemu::execute(op);
    hemu::t_wg.groups.pop_front();
  }
  hemu::g_wg_bar[threadIdx.x / 128].bar.wait();  // register-A exchange slots are read
}
template <int R>
inline void fence_regs(float (&)[R]) {}

template <typename T, int N, int TA, int TB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  hemu::t_wg.open.push_back(hemu::Op{false, N, 2, TA, TB, scale_d, std::is_same_v<T, __nv_bfloat16>, d, da, db, 0});
  hemu::tick();
}
template <typename T, int N, int TB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma N");
  const long seq = hemu::t_wg.rs_seq++;
  {
    std::lock_guard<std::mutex> lk(hemu::g_m);
    auto& x = hemu::g_aex[{int(threadIdx.x / 128), seq}];
    for (int i = 0; i < 4; ++i) x.regs[(threadIdx.x % 128) * 4 + i] = a[i];
  }
  hemu::t_wg.open.push_back(hemu::Op{true, N, 2, 0, TB, scale_d, std::is_same_v<T, __nv_bfloat16>, d, 0, db, seq});
  hemu::tick();
}

inline float ex2(float x) { return std::exp2(x); }
inline float shfl_xor(float v, int mask) {
  hemu::WarpX& w = hemu::g_hwarps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.f[lane] = v;
  w.bar.wait();
  const float r = w.f[lane ^ mask];
  w.bar.wait();
  return r;
}

}  // namespace hopper
}  // namespace djepa
