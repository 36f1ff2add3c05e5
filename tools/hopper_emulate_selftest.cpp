// Self-test of tools/hopper_emulate.h: the emulated wgmma, descriptors, TMA, mbarrier, cp.async
// and proxy-fence rules against the PTX ISA's own definitions, and against each other.
//
//   g++ -std=c++17 -O2 -pthread -I/usr/local/cuda/include -I csrc -I tools \
//       tools/hopper_emulate_selftest.cpp -o /tmp/hopper_selftest && /tmp/hopper_selftest [section]
//
// Sections (all by default): desc | tma | wgmma | mbar | proxy | cpasync | regs | stage |
// setmaxnreg | ctas | tmastore | cluster; `deadlock` (not in the default run) must end the process with status 3
// through the watchdog. Cases that end their process (a trap, a watchdog report) run in a child.
//  desc    descriptor decode == the "exact layouts" the PTX ISA gives as examples for its LBO / SBO
//          encodings (K-major none / 32 B, MN-major none / 32 B / 64 B), element by element.
//  tma     TMA boxes land where the swizzle tables put 16-byte chunks (128 B: chunk c of row r at
//          c ^ (r % 8); 64 B: c ^ (r / 2 % 4); 32 B: c ^ (r / 4 % 2)), OOB is zero, and the
//          encoder refuses what cuTensorMapEncodeTiled refuses.
//  wgmma   D = A * B (+ C) in float64 for f16/bf16, every swizzle mode, K- and MN-major A and B,
//          A from registers, N = 8 .. 256, every k step inside a swizzle row, LBO and SBO each
//          carrying the block pitch; results read through the ISA's accumulator layout.
//  mbar    phases, parity, arrival counts, transaction bytes; arrivals beyond the count in a
//          phase still waiting for bytes, and arrivals on an uninitialised barrier, are errors.
//  proxy   wgmma on ordinary stores needs a fence.proxy.async after the stores: by the storing
//          threads before they arrive, or by the consumer after its wait (both clean); none, or
//          a fence by a thread not ordered after the stores, is an error; cp.async data read
//          without a fence after the wait, and a TMA overwriting ordinary stores without a fence,
//          are errors.
//  cpasync a cp.async ring with .mbarrier.arrive.noinc feeding wgmma; the same ring whose
//          consumer skips the full-barrier wait (of its last tile) is caught, also with a slow
//          producer lane.
//  regs    accumulators / register-A fragments stored between wgmma issue and its wait_group are
//          errors, read there trap (d[0] += 1000; the newer group after wait_group 1); written
//          after wgmma.fence and before the wgmma, or a wgmma with no fence, are errors.
//  stage   a stage released on its empty barrier before the wgmma reading it retired, then
//          refilled by st.shared / cp.async / TMA, is an error; released after the wait, clean.
//  setmaxnreg  40/232 and 24/240 splits are clean; asking for more registers than the CTA
//          holds, a count not a multiple of 8, an .inc below the count, and a warp of the
//          warpgroup skipping it, are errors.
//  tmastore  stmatrix (accumulator-layout registers to 16-byte rows), fence.proxy.async and a TMA
//          store of a 128-byte-swizzled tile write the tensor's rows and none past its end; a store
//          without the fence, the tile written again before cp.async.bulk.wait_group.read, and a
//          thread exiting with its store not retired are errors; shfl.idx returns the source lane's.
//  ctas    two CTAs of a grid run at once (a handshake completes; one at a time it hangs); a CTA
//          that reads the others' results without waiting for them is caught (one at a time, as
//          the emulator ran before, it passes).
//  tmastore  a staged 128B-swizzled box stored by TMA lands clipped at the tensor's end; a 3-d
//          map keeps a box in its slice; a store with no proxy fence after the stores, or issued
//          without a barrier after the other threads' stores, a box rewritten before
//          wait_group.read or after it without a barrier, and a store never waited for, are errors.
//  cluster TMA multicast lands in both CTAs of a cluster and completes bytes on each barrier;
//          remote arrives complete the peer's phase; without barrier.cluster after the inits, or
//          an arrive on a CTA whose threads have exited, errors.
#include "hopper_emulate.h"

#include "hopper/ptx.cuh"

#include <functional>

#include <sys/wait.h>
#include <unistd.h>

using namespace djepa::hopper;

static bool report(bool ok, const std::string& what, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.empty() ? "" : "  ", detail.c_str());
  return ok;
}

template <typename T>
static T to_t(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
template <typename T>
static float to_f(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}
template <typename T>
static uint16_t bits(T x) {
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return b;
}
template <typename T>
static const char* tname() {
  return std::is_same_v<T, __half> ? "f16" : "bf16";
}

// ----------------------------------------------------------------------------------- desc
// CuTe layout ((s0,s1,..),(t0,t1,..)):((d0,d1,..),(e0,e1,..)) of element coordinates (mn, k),
// offsets in elements, then the swizzle on byte addresses (as the ISA's examples state them).
// CuTe's Swizzle<B, M=4, S=3> on a byte address: the B bits above M + S fold onto bits [M, M + B).
static uint32_t cute_swizzle(int mode, uint32_t addr) {
  const int B = mode == kSwizzle128 ? 3 : mode == kSwizzle64 ? 2 : mode == kSwizzle32 ? 1 : 0;
  const uint32_t yyy = ((1u << B) - 1) << (4 + 3);
  return addr ^ ((addr & yyy) >> 3);
}

struct Mode {
  std::vector<int> shape, stride;
  int at(int x) const {
    int off = 0;
    for (size_t i = 0; i < shape.size(); ++i) {
      off += (x % shape[i]) * stride[i];
      x /= shape[i];
    }
    return off;
  }
};

static bool desc_case(const char* name, bool mn_major, int eb, int mode, Mode rows, Mode cols, int lbo, int sbo,
                      int n_mn, int n_k) {
  const uint32_t base = 4096;
  const uint64_t desc = make_desc(base, lbo, sbo, mode);
  const hemu::DescFields f = hemu::decode_desc(desc);
  bool ok = f.start == base && f.lbo == uint32_t(lbo) && f.sbo == uint32_t(sbo) && f.mode == mode && f.base_offset == 0;
  int bad = 0;
  for (int mn = 0; mn < n_mn; ++mn)
    for (int k = 0; k < n_k; ++k) {
      const uint32_t want = cute_swizzle(mode, base + uint32_t((rows.at(mn) + cols.at(k)) * eb));
      if (hemu::operand_addr(f, mn_major, mn, k, eb) != want) ++bad;
    }
  return report(ok && bad == 0, std::string("desc ") + name,
                bad ? std::to_string(bad) + " elements misplaced" : "");
}

static bool test_desc() {
  bool ok = true;
  // The five examples of the PTX ISA section "Canonical Layouts" (tf32: 4-byte, bf16: 2-byte),
  // restricted to one instruction's K (32 bytes of K per row).
  ok = desc_case("K-major none tf32 ((8,2),(4,4)):((4,32),(1,64)) LBO=256 SBO=128", false, 4, kSwizzleNone,
                 {{8, 2}, {4, 32}}, {{4, 4}, {1, 64}}, 64 * 4, 32 * 4, 16, 8) && ok;
  ok = desc_case("K-major 32B tf32 ((8,2),(4,4)):((8,64),(1,4)) SBO=256", false, 4, kSwizzle32, {{8, 2}, {8, 64}},
                 {{4, 4}, {1, 4}}, 16, 64 * 4, 16, 8) && ok;
  ok = desc_case("MN-major none bf16 ((8,1,2),(8,2)):((1,8,64),(8,128)) LBO=256 SBO=128", true, 2, kSwizzleNone,
                 {{8, 1, 2}, {1, 8, 64}}, {{8, 2}, {8, 128}}, 128 * 2, 64 * 2, 16, 16) && ok;
  ok = desc_case("MN-major 32B bf16 ((8,2,2),(8,2)):((1,8,128),(16,256)) LBO=256 SBO=512", true, 2, kSwizzle32,
                 {{8, 2, 2}, {1, 8, 128}}, {{8, 2}, {16, 256}}, 128 * 2, 256 * 2, 32, 16) && ok;
  ok = desc_case("MN-major 64B bf16 ((8,4,2),(8,2)):((1,8,256),(32,512)) LBO=512 SBO=1024", true, 2, kSwizzle64,
                 {{8, 4, 2}, {1, 8, 256}}, {{8, 2}, {32, 512}}, 256 * 2, 512 * 2, 64, 16) && ok;
  // 128 B by the ISA's table: K-major ((8,m),(T,2)):((8T,SBO),(1,T)), MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)).
  ok = desc_case("K-major 128B bf16 ((8,2),(8,2)):((64,512),(1,8)) SBO=1024", false, 2, kSwizzle128,
                 {{8, 2}, {64, 512}}, {{8, 2}, {1, 8}}, 16, 1024, 16, 16) && ok;
  ok = desc_case("MN-major 128B bf16 ((8,8,2),(8,2)):((1,8,1024),(64,4096)) LBO=2048 SBO=8192", true, 2, kSwizzle128,
                 {{8, 8, 2}, {1, 8, 1024}}, {{8, 2}, {64, 4096}}, 2048, 8192, 128, 16) && ok;
  // A wrong field must move elements (what the planted-bug tests rely on).
  {
    const hemu::DescFields f = hemu::decode_desc(make_desc(4096, 16, 1024, kSwizzle128));
    hemu::DescFields g = f;
    g.mode = kSwizzle64;
    int moved = 0;
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 16; ++k) moved += hemu::operand_addr(f, false, r, k, 2) != hemu::operand_addr(g, false, r, k, 2);
    ok = report(moved > 0, "desc: 64B instead of 128B swizzle moves elements", std::to_string(moved)) && ok;
  }
  return ok;
}

// ----------------------------------------------------------------------------------- tma
static bool test_tma() {
  bool ok = true;
  alignas(64) CUtensorMap map;
  std::vector<uint16_t> g(40 * 200);
  for (size_t i = 0; i < g.size(); ++i) g[i] = uint16_t(i * 7 + 1);
  const cuuint32_t es[2] = {1, 1};
  for (int mode : {kSwizzle128, kSwizzle64, kSwizzle32, kSwizzleNone}) {
    const int span = mode == kSwizzleNone ? 64 : swizzle_bytes(mode);
    const int inner = span / 2, rows = 24;
    const cuuint64_t dims[2] = {200, 40}, strides[1] = {400};
    const cuuint32_t box[2] = {cuuint32_t(inner), cuuint32_t(rows)};
    const CUtensorMapSwizzle sw = mode == kSwizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                  : mode == kSwizzle64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                  : mode == kSwizzle32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                       : CU_TENSOR_MAP_SWIZZLE_NONE;
    CUresult r = hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g.data(), dims, strides, box, es,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    const int c0 = 200 - inner / 2, c1 = -3;  // crosses the inner end and starts above row 0
    std::vector<uint16_t> got(inner * rows);
    const bool run = hemu::launch(dim3(1), 32, 8192, [&] {
      unsigned char* s = dynamic_smem();
      unsigned char* tile = s + ((1024 - (smem_u32(s) & 1023)) & 1023) + 1024;
      uint64_t* bar = reinterpret_cast<uint64_t*>(tile - 64);
      if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        mbar_arrive_expect_tx(bar, inner * rows * 2);
        tma_load_2d(tile, &map, c0, c1, bar);
        mbar_wait(bar, 0);
        std::memcpy(got.data(), tile, got.size() * 2);
      }
    });
    int bad = 0;
    for (int rr = 0; rr < rows; ++rr)
      for (int i = 0; i < inner; ++i) {
        const int chunk = i / 8, in = i % 8, cpr = span / 16;
        int phys = chunk;
        if (mode == kSwizzle128) phys = chunk ^ (rr % 8);
        if (mode == kSwizzle64) phys = chunk ^ ((rr / 2) % 4);
        if (mode == kSwizzle32) phys = chunk ^ ((rr / 4) % 2);
        const int gr = c1 + rr, gc = c0 + i;
        const uint16_t want = (gr < 0 || gr >= 40 || gc >= 200) ? 0 : g[gr * 200 + gc];
        if (got[rr * inner + phys * 8 + in] != want) ++bad;
        (void)cpr;
      }
    ok = report(r == CUDA_SUCCESS && run && bad == 0, "tma 2d box " + std::to_string(span) + "B rows, swizzle mode " +
                                                          std::to_string(mode) + " with OOB fill",
                bad ? std::to_string(bad) + " elements wrong" : "") && ok;
  }
  // The encoder refuses what the driver refuses (misaligned base, stride not a multiple of 16,
  // box > 256, inner box wider than the swizzle).
  {
    const cuuint64_t dims[2] = {200, 40};
    const cuuint64_t good_s[1] = {400}, bad_s[1] = {402};
    const cuuint32_t box[2] = {64, 24}, big[2] = {64, 300}, wide[2] = {128, 8};
    auto enc = [&](void* base, const cuuint64_t* s, const cuuint32_t* b, CUtensorMapSwizzle sw) {
      return hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, dims, s, b, es,
                                CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    };
    const bool refused = enc(g.data() + 1, good_s, box, CU_TENSOR_MAP_SWIZZLE_128B) != CUDA_SUCCESS &&
                         enc(g.data(), bad_s, box, CU_TENSOR_MAP_SWIZZLE_128B) != CUDA_SUCCESS &&
                         enc(g.data(), good_s, big, CU_TENSOR_MAP_SWIZZLE_128B) != CUDA_SUCCESS &&
                         enc(g.data(), good_s, wide, CU_TENSOR_MAP_SWIZZLE_128B) != CUDA_SUCCESS &&
                         enc(g.data(), good_s, box, CU_TENSOR_MAP_SWIZZLE_128B) == CUDA_SUCCESS;
    ok = report(refused, "tma encoder refuses misaligned base / stride, box > 256, inner box > swizzle") && ok;
  }
  // A misaligned swizzled destination is an emulator error.
  {
    const cuuint64_t dims[2] = {200, 40}, s[1] = {400};
    const cuuint32_t box[2] = {64, 8};
    hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g.data(), dims, s, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    std::printf("     (one EMU-ERROR expected next)\n");
    const bool run = hemu::launch(dim3(1), 32, 8192, [&] {
      unsigned char* s = dynamic_smem();
      unsigned char* tile = s + ((1024 - (smem_u32(s) & 1023)) & 1023) + 1024 + 512;
      uint64_t* bar = reinterpret_cast<uint64_t*>(tile - 64);
      if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        mbar_arrive_expect_tx(bar, 64 * 8 * 2);
        tma_load_2d(tile, &map, 0, 0, bar);
        mbar_wait(bar, 0);
      }
    });
    ok = report(!run, "tma: 128B-swizzled box to a 512-byte aligned destination is an error") && ok;
  }
  return ok;
}

// ----------------------------------------------------------------------------------- wgmma
// The ISA's m64nNk16 fragments (CuTe's CLayout_64xN = ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512))
// and ALayout_64x16 = ((4,8,4),(2,2,2)):((128,1,16),(64,8,512)), column-major (m + 64 n)).
static void c_coord(int t, int i, int& row, int& col) {
  const int idx = (t % 4) * 128 + ((t / 4) % 8) * 1 + (t / 32) * 16 + (i % 2) * 64 + ((i / 2) % 2) * 8 + (i / 4) * 512;
  row = idx % 64;
  col = idx / 64;
}
static void a_coord(int t, int v, int& row, int& k) { c_coord(t, v, row, k); }  // same layout for 16 columns

// Writes a [rows][cols] matrix (row-major, `rows` = the M/N extent when mn_major is false) into
// shared memory in the layout `desc` describes. Swizzled K-major tiles and MN-major tiles go
// through TMA boxes (an independent path); unswizzled ones through the ISA's example formula.
struct Operand {
  int mode;
  bool mn_major;
  int ext;         // M or N extent
  bool lbo_major;  // MN-major: blocks along MN are the outer (LBO > SBO) arrangement
  uint32_t lbo, sbo;
  uint32_t bytes;
};

static Operand plan(int mode, bool mn_major, int ext, bool lbo_major) {
  Operand o{mode, mn_major, ext, lbo_major, 0, 0, 0};
  const int W = swizzle_bytes(mode);
  if (!mn_major) {
    if (mode == kSwizzleNone) {  // core matrices: 8 rows x 16 B; k chunks at LBO, row groups at SBO
      o.lbo = 128;
      o.sbo = 256;
      o.bytes = (ext / 8) * 256;
    } else {
      o.sbo = 8 * W;
      o.lbo = 16;
      o.bytes = ext * W;
    }
  } else {
    const int nb = mode == kSwizzleNone ? ext / 8 : std::max(1, ext / (W / 2));  // blocks along MN
    const uint32_t atom = mode == kSwizzleNone ? 128 : 8 * W;       // one block x 8 k
    if (lbo_major) {
      o.sbo = atom;
      o.lbo = 2 * atom;
    } else {
      o.lbo = atom;
      o.sbo = nb * atom;
    }
    if (mode == kSwizzleNone) std::swap(o.lbo, o.sbo);  // none: SBO steps along MN, LBO along k
    o.bytes = nb * 2 * atom;
  }
  return o;
}

struct Keep {  // tensor maps and transposed sources: the copies land later, at the wait
  std::vector<std::unique_ptr<CUtensorMap>> maps;
  std::vector<std::vector<uint16_t>> bufs;
};

template <typename T>
static void place(const Operand& o, unsigned char* tile, const std::vector<T>& m, int kcols, uint64_t* bar,
                  Keep& keep) {
  auto& maps = keep.maps;
  // m: [ext][kcols] row-major (element (mn, k)).
  const int W = swizzle_bytes(o.mode);
  const cuuint32_t es[2] = {1, 1};
  const CUtensorMapSwizzle sw = o.mode == kSwizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                : o.mode == kSwizzle64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                       : CU_TENSOR_MAP_SWIZZLE_32B;
  if (o.mode == kSwizzleNone) {
    const uint32_t base = smem_u32(tile);
    const hemu::DescFields f = hemu::decode_desc(make_desc(base, o.lbo, o.sbo, o.mode));
    std::vector<uint32_t> chunks;
    for (int mn = 0; mn < o.ext; ++mn)
      for (int k = 0; k < 16; ++k) {
        const uint32_t a = hemu::operand_addr(f, o.mn_major, mn, k, 2);
        std::memcpy(hemu::window() + a, &m[mn * kcols + k], 2);
        chunks.push_back(a / 16);
      }
    std::sort(chunks.begin(), chunks.end());
    chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
    for (uint32_t ch : chunks) {  // as ordinary 16-byte stores of what is there
      uint4 v;
      std::memcpy(&v, hemu::window() + 16 * ch, 16);
      st_shared16(hemu::window() + 16 * ch, v);
    }
    fence_proxy_async();
    return;
  }
  if (!o.mn_major) {
    maps.emplace_back(new CUtensorMap);
    const cuuint64_t dims[2] = {cuuint64_t(kcols), cuuint64_t(o.ext)}, strides[1] = {cuuint64_t(kcols) * 2};
    const cuuint32_t box[2] = {cuuint32_t(W / 2), cuuint32_t(o.ext)};
    hemu::encode_tiled(maps.back().get(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<T*>(m.data()), dims, strides,
                       box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    mbar_arrive_expect_tx(bar, o.ext * W);
    tma_load_2d(tile, maps.back().get(), 0, 0, bar);
  } else {
    keep.bufs.emplace_back(16 * o.ext);
    std::vector<uint16_t>& tr = keep.bufs.back();  // [16 k][ext]
    for (int mn = 0; mn < o.ext; ++mn)
      for (int k = 0; k < 16; ++k) tr[k * o.ext + mn] = bits(m[mn * kcols + k]);
    maps.emplace_back(new CUtensorMap);
    const cuuint64_t dims[2] = {cuuint64_t(o.ext), 16}, strides[1] = {cuuint64_t(o.ext) * 2};
    const cuuint32_t box[2] = {cuuint32_t(W / 2), 8};
    hemu::encode_tiled(maps.back().get(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, tr.data(), dims, strides, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    const int nb = std::max(1, o.ext / (W / 2));
    mbar_arrive_expect_tx(bar, nb * 2 * 8 * W);
    for (int b = 0; b < nb; ++b)
      for (int q = 0; q < 2; ++q) tma_load_2d(tile + b * o.lbo + q * o.sbo, maps.back().get(), b * (W / 2), q * 8, bar);
  }
}

template <typename T, int N>
static bool wgmma_case(int mode_a, bool a_mn, int mode_b, bool b_mn, bool lbo_major, bool rs, bool accumulate,
                       int kstep, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int W = swizzle_bytes(mode_b);
  const int kcols_a = (!a_mn && mode_a != kSwizzleNone) ? swizzle_bytes(mode_a) / 2 : 16;
  const int kcols_b = (!b_mn && mode_b != kSwizzleNone) ? W / 2 : 16;
  std::vector<T> A(64 * kcols_a), B(N * kcols_b);
  for (auto& x : A) x = to_t<T>(nd(rng));
  for (auto& x : B) x = to_t<T>(nd(rng));
  std::vector<float> C(64 * N);
  for (auto& x : C) x = nd(rng);
  // k step j of a K-major swizzled tile reads columns 16j .. 16j + 15 (start address + 32 j).
  const int ja = (!a_mn && mode_a != kSwizzleNone) ? kstep % (kcols_a / 16) : 0;
  const int jb = (!b_mn && mode_b != kSwizzleNone) ? kstep % (kcols_b / 16) : 0;
  const Operand oa = plan(mode_a, a_mn, 64, lbo_major), ob = plan(mode_b, b_mn, N, lbo_major);
  std::vector<float> D(64 * N, NAN);
  Keep keep;
  const bool run = hemu::launch(dim3(1), 128, 200 * 1024, [&] {
    unsigned char* s = dynamic_smem();
    unsigned char* base = s + ((1024 - (smem_u32(s) & 1023)) & 1023);
    uint64_t* bar = reinterpret_cast<uint64_t*>(base);
    unsigned char* ta = base + 1024;
    unsigned char* tb = ta + ((oa.bytes + 1023) / 1024) * 1024;
    const int t = threadIdx.x;
    if (t == 0) {
      const int n_tma = (!rs && oa.mode != kSwizzleNone) + (ob.mode != kSwizzleNone);
      mbar_init(bar, std::max(n_tma, 1));
      if (!rs) place<T>(oa, ta, A, kcols_a, bar, keep);
      place<T>(ob, tb, B, kcols_b, bar, keep);
      if (n_tma == 0) mbar_arrive(bar);
    }
    __syncthreads();
    mbar_wait(bar, 0);
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) {
      int r, c;
      c_coord(t, i, r, c);
      d[i] = C[r * N + c];
    }
    uint32_t af[4];
    for (int v = 0; v < 4; ++v) {
      int r0, k0, r1, k1;
      a_coord(t, 2 * v, r0, k0);
      a_coord(t, 2 * v + 1, r1, k1);
      af[v] = uint32_t(bits(A[r0 * kcols_a + k0 + 16 * ja])) | (uint32_t(bits(A[r1 * kcols_a + k1 + 16 * ja])) << 16);
    }
    const uint64_t da = make_desc(smem_u32(ta) + 32 * ja, oa.lbo, oa.sbo, oa.mode);
    const uint64_t db = make_desc(smem_u32(tb) + 32 * jb, ob.lbo, ob.sbo, ob.mode);
    wgmma_fence();
    if (rs) {
      if (b_mn) wgmma_rs<T, N, 1>(d, af, db, accumulate);
      else wgmma_rs<T, N, 0>(d, af, db, accumulate);
    } else if (a_mn) {
      if (b_mn) wgmma_ss<T, N, 1, 1>(d, da, db, accumulate);
      else wgmma_ss<T, N, 1, 0>(d, da, db, accumulate);
    } else {
      if (b_mn) wgmma_ss<T, N, 0, 1>(d, da, db, accumulate);
      else wgmma_ss<T, N, 0, 0>(d, da, db, accumulate);
    }
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) {
      int r, c;
      c_coord(t, i, r, c);
      D[r * N + c] = d[i];
    }
  });
  double max_err = 0;
  bool finite = true;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c) {
      double ref = accumulate ? C[r * N + c] : 0.0;
      for (int k = 0; k < 16; ++k)
        ref += double(to_f(A[r * kcols_a + k + 16 * ja])) * double(to_f(B[c * kcols_b + k + 16 * jb]));
      finite = finite && std::isfinite(D[r * N + c]);
      max_err = std::max(max_err, std::fabs(D[r * N + c] - ref) / (1.0 + std::fabs(ref)));
    }
  char what[200];
  std::snprintf(what, sizeof(what), "wgmma %s m64n%dk16 A %s%s B %s/%s%s%s%s kstep %d", tname<T>(), N,
                rs ? "regs" : (a_mn ? "MN/" : "K/"), rs ? "" : std::to_string(swizzle_bytes(mode_a)).c_str(),
                b_mn ? "MN" : "K", std::to_string(swizzle_bytes(mode_b)).c_str(), mode_b == kSwizzleNone ? "(none)" : "B",
                lbo_major ? " lbo-outer" : "", accumulate ? " +C" : "", kstep);
  char detail[64];
  std::snprintf(detail, sizeof(detail), "max rel err %.2e", max_err);
  return report(run && finite && max_err < 1e-5, what, detail);
}

template <typename T>
static bool wgmma_all(std::mt19937& rng) {
  bool ok = true;
  const int modes[] = {kSwizzle128, kSwizzle64, kSwizzle32, kSwizzleNone};
  int ks = 0;
  for (int ma : modes)
    for (int mb : modes)
      for (int am = 0; am < 2; ++am)
        for (int bm = 0; bm < 2; ++bm) {
          if (ma != mb && (am || bm)) continue;  // mixed modes: K-major pairs only (keeps the run short)
          ++ks;
          ok = wgmma_case<T, 64>(ma, am, mb, bm, ks % 2, false, ks % 3 == 0, ks, rng) && ok;
        }
  for (int mb : modes)
    for (int bm = 0; bm < 2; ++bm) {
      ok = wgmma_case<T, 128>(kSwizzle128, false, mb, bm, bm, true, true, ++ks, rng) && ok;
      ok = wgmma_case<T, 16>(mb, bm, mb, bm, !bm, false, false, ++ks, rng) && ok;
    }
  ok = wgmma_case<T, 256>(kSwizzle128, false, kSwizzle128, true, true, false, true, 1, rng) && ok;
  ok = wgmma_case<T, 256>(kSwizzle64, true, kSwizzle128, false, false, false, false, 3, rng) && ok;
  ok = wgmma_case<T, 80>(kSwizzle128, false, kSwizzle32, true, false, true, true, 0, rng) && ok;
  ok = wgmma_case<T, 96>(kSwizzle128, false, kSwizzle32, false, false, false, true, 1, rng) && ok;
  ok = wgmma_case<T, 8>(kSwizzleNone, false, kSwizzleNone, false, false, false, true, 0, rng) && ok;
  return ok;
}

// ----------------------------------------------------------------------------------- mbar
static bool test_mbar() {
  bool ok = true;
  bool seen[8] = {};
  const bool run = hemu::launch(dim3(1), 32, 4096, [&] {
    uint64_t* bar = reinterpret_cast<uint64_t*>(dynamic_smem() + 48);
    if (threadIdx.x != 0) return;
    mbar_init(bar, 2);
    seen[0] = mbar_try_wait(bar, 1) && !mbar_try_wait(bar, 0);  // the "previous" phase counts as done
    mbar_arrive(bar);
    seen[1] = !mbar_try_wait(bar, 0);                            // one of two arrivals
    mbar_arrive_expect_tx(bar, 64);
    seen[2] = !mbar_try_wait(bar, 0);                            // arrivals done, 64 bytes pending
    {
      std::lock_guard<std::mutex> lk(hemu::t_blk->m);
      hemu::Mbar& b = hemu::t_blk->bars[smem_u32(bar)];
      b.tx -= 64;
      hemu::check_phase(b);
    }
    seen[3] = mbar_try_wait(bar, 0) && !mbar_try_wait(bar, 1);   // phase 0 complete, phase 1 open
    mbar_arrive(bar);
    mbar_arrive(bar);
    seen[4] = mbar_try_wait(bar, 1) && !mbar_try_wait(bar, 0);   // phase 1 complete
  });
  for (int i = 0; i < 5; ++i) ok = report(run && seen[i], "mbar step " + std::to_string(i)) && ok;
  std::printf("     (one EMU-ERROR expected next)\n");
  const bool over = hemu::launch(dim3(1), 32, 4096, [&] {
    uint64_t* bar = reinterpret_cast<uint64_t*>(dynamic_smem() + 48);
    if (threadIdx.x == 0) mbar_init(bar, 1);
    __syncthreads();
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(bar, 64);  // count 1: the phase now waits for 64 bytes only
      mbar_arrive(bar);                // a second arrival in the same phase
    }
  });
  ok = report(!over, "mbar: an arrival beyond the count while bytes are pending is an error") && ok;
  std::printf("     (one EMU-ERROR expected next)\n");
  const bool uninit = hemu::launch(dim3(1), 32, 4096, [&] {
    if (threadIdx.x == 0) mbar_arrive(reinterpret_cast<uint64_t*>(dynamic_smem() + 48));
  });
  ok = report(!uninit, "mbar: arriving on an uninitialised barrier is an error") && ok;
  return ok;
}

// ----------------------------------------------------------------------------------- proxy
template <typename T>
static bool proxy_case(bool fenced) {
  std::vector<float> D(64 * 64, NAN);
  const bool run = hemu::launch(dim3(1), 128, 64 * 1024, [&] {
    unsigned char* s = dynamic_smem();
    unsigned char* base = s + ((1024 - (smem_u32(s) & 1023)) & 1023);
    unsigned char* ta = base;
    unsigned char* tb = base + 16384;
    const int t = threadIdx.x;
    // A and B: 64 rows x 64 elements, K-major 128B swizzle, value 1 (ordinary 16-byte stores).
    const uint16_t one = bits(to_t<T>(1.f));
    uint4 v;
    uint16_t e[8];
    for (auto& x : e) x = one;
    std::memcpy(&v, e, 16);
    for (int i = t; i < 2 * 64 * 8; i += 128) st_shared16((i < 512 ? ta : tb) + (i % 512) * 16, v);
    if (fenced) fence_proxy_async();
    __syncthreads();
    float d[32] = {};
    wgmma_fence();
    wgmma_ss<T, 64, 0, 0>(d, make_desc(smem_u32(ta), 16, 1024, kSwizzle128), make_desc(smem_u32(tb), 16, 1024, kSwizzle128), 0);
    wgmma_commit();
    wgmma_wait<0>();
    for (int i = 0; i < 32; ++i) {
      int r, c;
      c_coord(t, i, r, c);
      D[r * 64 + c] = d[i];
    }
  });
  bool right = true;
  for (float x : D) right = right && x == 16.f;
  return fenced ? report(run && right, std::string("proxy: ordinary stores + fence.proxy.async + wgmma ") + tname<T>())
                : report(!run, std::string("proxy: ordinary stores without fence.proxy.async before wgmma is an error ") +
                                   tname<T>());
}

// ----------------------------------------------------------------------------------- cp.async ring
// 1 consumer warpgroup (threads 0..127) + 1 producer warp (128..159): the producer gathers the
// rows perm[j] of a [rows][64] bf16 matrix into a 2-stage ring (K-major 128B swizzle, 64-row
// tiles) with cp.async, each lane arriving (noinc) on the stage's full barrier (count 32); the
// consumer multiplies each tile by a fixed B and accumulates, and releases a stage only when the
// producer will refill it. `skip_wait` plants the bug: the last tile is read without waiting, so
// its copies have not landed and the consumer multiplies the stage's previous tile. (Planted on
// the first tile instead, the consumer's early release of stage 0 could complete the empty phase
// before a slow producer lane's first wait on it, which then waited on the wrong parity for
// ever: a hang of the test, not a finding. After the last tile nobody waits on anything.)
// `slow_lane` >= 0: that producer lane sleeps 200 ms before its first empty-barrier wait, the
// schedule that stranded it when the bug was planted on the first tile.
static bool cpasync_case(bool skip_wait, int slow_lane = -1) {
  const int rows = 64 * 5;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<__nv_bfloat16> X(rows * 64), Bm(16 * 64);
  for (auto& x : X) x = to_t<__nv_bfloat16>(nd(rng));
  for (auto& x : Bm) x = to_t<__nv_bfloat16>(nd(rng));
  std::vector<int> perm(rows);
  for (int i = 0; i < rows; ++i) perm[i] = (i * 37 + 11) % rows;
  std::vector<float> D(64 * 16, NAN);
  const bool run = hemu::launch(dim3(1), 160, 64 * 1024, [&] {
    unsigned char* s = dynamic_smem();
    unsigned char* base = s + ((1024 - (smem_u32(s) & 1023)) & 1023);
    uint64_t* full = reinterpret_cast<uint64_t*>(base);
    uint64_t* empty = full + 2;
    unsigned char* stage[2] = {base + 1024, base + 1024 + 8192};
    unsigned char* sb = base + 1024 + 16384;  // B: 16 rows (n) x 64 k, K-major 128B
    const int t = threadIdx.x;
    if (t == 0) {
      for (int i = 0; i < 2; ++i) {
        mbar_init(full + i, 32);
        mbar_init(empty + i, 1);
      }
      for (int n = 0; n < 16; ++n)
        for (int c = 0; c < 8; ++c) {
          uint4 v;
          std::memcpy(&v, &Bm[n * 64 + c * 8], 16);
          st_shared16(sb + n * 128 + ((c ^ (n % 8)) * 16), v);
        }
      fence_proxy_async();
    }
    __syncthreads();
    const int tiles = rows / 64;
    if (t >= 128) {  // producer warp
      const int lane = t - 128;
      for (int it = 0; it < tiles; ++it) {
        const int st = it % 2;
        if (lane == slow_lane && it == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
        mbar_wait(empty + st, ((it / 2) & 1) ^ 1);
        for (int q = lane; q < 64 * 8; q += 32) {
          const int r = q / 8, c = q % 8;
          cp_async16(stage[st] + r * 128 + ((c ^ (r % 8)) * 16), &X[perm[it * 64 + r] * 64 + c * 8], 16);
        }
        cp_async_mbar_arrive(full + st);
      }
      return;
    }
    float d[8] = {};
    for (int it = 0; it < tiles; ++it) {
      const int st = it % 2;
      if (!(skip_wait && it == tiles - 1)) mbar_wait(full + st, (it / 2) & 1);
      fence_proxy_async();
      wgmma_fence();
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss<__nv_bfloat16, 16, 0, 0>(d, make_desc(smem_u32(stage[st]) + 32 * kk, 16, 1024, kSwizzle128),
                                          make_desc(smem_u32(sb) + 32 * kk, 16, 1024, kSwizzle128), 1);
      wgmma_commit();
      wgmma_wait<0>();
      if (t == 0 && it + 2 < tiles) mbar_arrive(empty + st);  // the producer refills this stage
    }
    for (int i = 0; i < 8; ++i) {
      int r, c;
      c_coord(t, i, r, c);
      D[r * 16 + c] = d[i];
    }
  });
  double max_err = 0;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 16; ++c) {
      double ref = 0;
      for (int it = 0; it < rows / 64; ++it)
        for (int k = 0; k < 64; ++k) ref += double(to_f(X[perm[it * 64 + r] * 64 + k])) * to_f(Bm[c * 64 + k]);
      const double e = std::fabs(D[r * 16 + c] - ref) / (1 + std::fabs(ref));
      max_err = std::isfinite(e) ? std::max(max_err, e) : 1e30;
    }
  char detail[64];
  std::snprintf(detail, sizeof(detail), "max rel err %.2e", max_err);
  const std::string slow = slow_lane >= 0 ? ", producer lane " + std::to_string(slow_lane) + " slow" : "";
  if (skip_wait)
    return report(!(run && max_err < 1e-4), "cpasync ring: consumer skipping the full-barrier wait is caught" + slow,
                  detail);
  return report(run && max_err < 1e-4, "cpasync ring (gathered rows, noinc arrivals, 2 stages, 5 tiles)" + slow, detail);
}

// ----------------------------------------------------------------------------------- helpers
// Runs `fn` in a child process (for cases that must end the process: the SIGFPE of a read of an
// in-flight register, a watchdog deadlock report); returns its exit status.
// Its output is shown indented ("     > "), so that its FAIL lines are not the test's.
static int in_child(const std::function<void()>& fn, const char* env_name = nullptr, const char* env_value = nullptr) {
  std::fflush(stdout);
  char path[] = "/tmp/hopper_selftest_child_XXXXXX";
  const int fd = mkstemp(path);
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fd, 1);
    if (env_name) setenv(env_name, env_value, 1);
    fn();
    std::fflush(stdout);
    _exit(0);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  if (FILE* f = std::fopen(path, "r")) {
    char line[400];
    while (std::fgets(line, sizeof(line), f)) std::printf("     > %s", line);
    std::fclose(f);
  }
  close(fd);
  unlink(path);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

// 64 x 64 (A) and 16 x 64 (B) bf16 tiles of ones, K-major 128B swizzle: unit q (16 bytes) of a
// tile goes to row q / 8, chunk (q % 8) ^ (row % 8).
constexpr int kUnitsA = 64 * 8, kUnitsB = 16 * 8;
static uint32_t unit_offset(int q) { return uint32_t((q / 8) * 128 + (((q % 8) ^ ((q / 8) % 8)) * 16)); }
static std::vector<__nv_bfloat16>& ones() {
  static std::vector<__nv_bfloat16> v(64 * 64, to_t<__nv_bfloat16>(1.f));
  return v;
}
static void store_units(unsigned char* a, unsigned char* b, int lane, int lanes) {
  uint4 v;
  std::memcpy(&v, ones().data(), 16);
  for (int q = lane; q < kUnitsA + kUnitsB; q += lanes)
    st_shared16(q < kUnitsA ? a + unit_offset(q) : b + unit_offset(q - kUnitsA), v);
}
// C (64 x 16) = A B^T over 64 k: four wgmma.m64n16k16 (every element 64).
static void mma_ones(float (&d)[8], unsigned char* a, unsigned char* b, int scale_d = 1) {
  for (int kk = 0; kk < 4; ++kk)
    wgmma_ss<__nv_bfloat16, 16, 0, 0>(d, make_desc(smem_u32(a) + 32 * kk, 16, 1024, kSwizzle128),
                                      make_desc(smem_u32(b) + 32 * kk, 16, 1024, kSwizzle128), kk > 0 || scale_d);
}
static unsigned char* aligned_base() {
  unsigned char* s = dynamic_smem();
  return s + ((1024 - (smem_u32(s) & 1023)) & 1023);
}

// ----------------------------------------------------------------------------------- regs
// One warpgroup on ones tiles; `body` issues and waits (the register rules under test).
static bool regs_launch(const std::function<void(unsigned char*, unsigned char*)>& body) {
  return hemu::launch(dim3(1), 128, 32 * 1024, [&] {
    unsigned char* a = aligned_base();
    unsigned char* b = a + 8192;
    store_units(a, b, threadIdx.x, 128);
    fence_proxy_async();
    __syncthreads();
    body(a, b);
  });
}
static volatile float g_sink;

static bool test_regs() {
  bool ok = true;
  auto clean = [](unsigned char* a, unsigned char* b) {
    float d[8] = {};
    wgmma_fence();
    mma_ones(d, a, b);
    wgmma_commit();
    wgmma_wait<0>();
    g_sink = d[0];
  };
  ok = report(regs_launch(clean), "regs: fence, issue, wait, read is clean") && ok;
  // Accumulators: a store between issue and retirement is an error (found at the wait) ...
  std::printf("     (EMU-ERRORs expected in the next cases)\n");
  ok = report(!regs_launch([](unsigned char* a, unsigned char* b) {
                float d[8] = {};
                wgmma_fence();
                mma_ones(d, a, b);
                wgmma_commit();
                d[0] = 1000.f;
                wgmma_wait<0>();
              }),
              "regs: an accumulator stored between wgmma issue and its wait_group is an error") && ok;
  // ... and so is a chained wgmma on accumulators written in flight (found at that issue).
  ok = report(!regs_launch([](unsigned char* a, unsigned char* b) {
                float d[8] = {};
                wgmma_fence();
                mma_ones(d, a, b);
                d[1] = 5.f;
                mma_ones(d, a, b);
                wgmma_commit();
                wgmma_wait<0>();
              }),
              "regs: a chained wgmma on accumulators written in flight is an error") && ok;
  // A read in flight traps (the probe: d[0] += 1000), in a child process.
  ok = report(in_child([] {
                regs_launch([](unsigned char* a, unsigned char* b) {
                  float d[8] = {};
                  wgmma_fence();
                  mma_ones(d, a, b);
                  wgmma_commit();
                  d[0] += 1000.f;
                  wgmma_wait<0>();
                });
              }) == 4,
              "regs: d[0] += 1000 between wgmma issue and its wait_group traps (SIGFPE)") && ok;
  // wait_group 1 retires the older group only: reading the newer one's accumulators traps.
  auto two_groups = [](bool read_newer) {
    return [read_newer](unsigned char* a, unsigned char* b) {
      float d1[8] = {}, d2[8] = {};
      wgmma_fence();
      mma_ones(d1, a, b);
      wgmma_commit();
      mma_ones(d2, a, b);
      wgmma_commit();
      wgmma_wait<1>();
      g_sink = read_newer ? d2[2] * 2.f : d1[2] * 2.f;
      wgmma_wait<0>();
    };
  };
  ok = report(regs_launch(two_groups(false)), "regs: after wait_group 1 the older group's accumulators are readable") && ok;
  ok = report(in_child([&] { regs_launch(two_groups(true)); }) == 4,
              "regs: after wait_group 1 reading the newer group's accumulators traps (SIGFPE)") && ok;
  // Register-A fragments: written between issue and retirement is an error.
  auto rs = [](bool write_in_flight, bool write_after_fence) {
    return [=](unsigned char*, unsigned char* b) {
      float d[8] = {};
      uint32_t af[4];
      for (auto& x : af) x = 0x3f803f80u;  // bf16 (1, 1)
      wgmma_fence();
      if (write_after_fence) af[1] = 0x3f803f80u ^ 0x00010000u;
      wgmma_rs<__nv_bfloat16, 16, 0>(d, af, make_desc(smem_u32(b), 16, 1024, kSwizzle128), 0);
      wgmma_commit();
      if (write_in_flight) af[0] = 0;
      wgmma_wait<0>();
      g_sink = d[0];
    };
  };
  ok = report(regs_launch(rs(false, false)), "regs: register-A fragment, fence, issue, wait is clean") && ok;
  ok = report(!regs_launch(rs(true, false)), "regs: a register-A fragment stored in flight is an error") && ok;
  // wgmma.fence: registers written after it and before the wgmma that uses them.
  ok = report(!regs_launch(rs(false, true)),
              "regs: a register-A fragment written after wgmma.fence, before the wgmma, is an error") && ok;
  ok = report(!regs_launch([](unsigned char* a, unsigned char* b) {
                float d[8] = {};
                wgmma_fence();
                d[3] = 2.f;  // e.g. rescaling O after the fence
                mma_ones(d, a, b);
                wgmma_commit();
                wgmma_wait<0>();
              }),
              "regs: an accumulator written after wgmma.fence, before a wgmma adding to it, is an error") && ok;
  ok = report(!regs_launch([](unsigned char* a, unsigned char* b) {
                float d[8] = {};
                mma_ones(d, a, b);
                wgmma_commit();
                wgmma_wait<0>();
              }),
              "regs: a wgmma with no wgmma.fence before it is an error") && ok;
  ok = report(regs_launch([](unsigned char* a, unsigned char* b) {
                float d[8] = {};
                wgmma_fence();
                mma_ones(d, a, b);
                wgmma_commit();
                wgmma_wait<0>();
                for (float& x : d) x *= 0.5f;  // rescale, then fence again before adding to it
                wgmma_fence();
                mma_ones(d, a, b);
                wgmma_commit();
                wgmma_wait<0>();
                if (threadIdx.x == 0 && d[0] != 96.f) hemu::fail("got %f, want 96", d[0]);
              }),
              "regs: write, wgmma.fence, wgmma (the accumulator chain across a rescale) is clean") && ok;
  return ok;
}

// ----------------------------------------------------------------------------------- stage
// A consumer warpgroup (threads 0..127) and a producer warp (128..159) share one stage (A and B
// tiles of ones): the producer fills it (ordinary stores, cp.async or TMA), the consumer waits,
// multiplies and releases it on the empty barrier, the producer waits for the release and fills
// it again; the consumer waits for that fill. `early`: the consumer releases before its
// wgmma.wait_group (the stage is rewritten while the wgmma may still read it).
enum Fill { kFillStore, kFillCp, kFillTma };
static const char* fill_name(Fill f) { return f == kFillStore ? "st.shared" : f == kFillCp ? "cp.async" : "TMA"; }

struct StageCase {
  Fill fill = kFillStore, refill = kFillStore;
  bool early = false;          // release before the wgmma retired
  int store_lanes = 32;        // producer lanes that store / copy (kFillStore, kFillCp)
  int writer_fence_lane = -2;  // -2: every storing lane fences after its stores; -1: none; else that lane only
  bool reader_fence = false;   // the consumer fences after its full-barrier wait
};

static bool stage_run(const StageCase& c) {
  alignas(64) static CUtensorMap map_a, map_b;
  const cuuint32_t es[2] = {1, 1};
  const cuuint64_t dims_a[2] = {64, 64}, dims_b[2] = {64, 16}, strides[1] = {128};
  const cuuint32_t box_a[2] = {64, 64}, box_b[2] = {64, 16};
  hemu::encode_tiled(&map_a, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ones().data(), dims_a, strides, box_a, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  hemu::encode_tiled(&map_b, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ones().data(), dims_b, strides, box_b, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  std::vector<float> D(64 * 16, NAN);
  const bool run = hemu::launch(dim3(1), 160, 32 * 1024, [&] {
    unsigned char* base = aligned_base();
    uint64_t* full = reinterpret_cast<uint64_t*>(base);  // [0]: the fill, [1]: the refill
    uint64_t* empty = full + 2;
    unsigned char* a = base + 1024;
    unsigned char* b = a + 8192;
    const int t = threadIdx.x;
    if (t == 0) {
      mbar_init(full, c.fill == kFillTma ? 1 : 32);
      mbar_init(full + 1, c.refill == kFillTma ? 1 : 32);
      mbar_init(empty, 4);
    }
    __syncthreads();
    if (t >= 128) {
      const int lane = t - 128;
      auto fill = [&](Fill f, uint64_t* full) {
        if (f == kFillTma) {
          if (lane == 0) {
            mbar_arrive_expect_tx(full, 8192 + 2048);
            tma_load_2d(a, &map_a, 0, 0, full);
            tma_load_2d(b, &map_b, 0, 0, full);
          }
          return;
        }
        if (lane < c.store_lanes) {
          if (f == kFillStore) {
            store_units(a, b, lane, c.store_lanes);
          } else {
            for (int q = lane; q < kUnitsA + kUnitsB; q += c.store_lanes)
              cp_async16(q < kUnitsA ? a + unit_offset(q) : b + unit_offset(q - kUnitsA), ones().data(), 16);
          }
        }
        if (f == kFillStore && (c.writer_fence_lane == -2 ? lane < c.store_lanes : lane == c.writer_fence_lane))
          fence_proxy_async();
        if (f == kFillCp) cp_async_mbar_arrive(full);
        else mbar_arrive(full);
      };
      fill(c.fill, full);
      mbar_wait(empty, 0);
      fill(c.refill, full + 1);
      return;
    }
    float d[8] = {};
    mbar_wait(full, 0);
    if (c.reader_fence) fence_proxy_async();
    wgmma_fence();
    mma_ones(d, a, b, 0);
    wgmma_commit();
    if (c.early && t % 32 == 0) mbar_arrive(empty);
    wgmma_wait<0>();
    if (!c.early && t % 32 == 0) mbar_arrive(empty);
    mbar_wait(full + 1, 0);  // the refill has landed
    for (int i = 0; i < 8; ++i) {
      int r, col;
      c_coord(t, i, r, col);
      D[r * 16 + col] = d[i];
    }
  });
  bool right = true;
  for (float x : D) right = right && x == 64.f;
  return run && right;
}

static bool test_stage() {
  bool ok = true;
  for (Fill f : {kFillStore, kFillCp, kFillTma}) {
    StageCase c;
    c.fill = kFillTma;
    c.refill = f;
    ok = report(stage_run(c), std::string("stage: released after wgmma.wait_group, refilled by ") + fill_name(f)) && ok;
    c.early = true;
    std::printf("     (EMU-ERRORs expected next)\n");
    ok = report(!stage_run(c), std::string("stage: released before the wgmma reading it retired, refilled by ") +
                                  fill_name(f) + ", is an error") && ok;
  }
  return ok;
}

// ----------------------------------------------------------------------------------- proxy fences
static bool test_proxy_threads() {
  bool ok = true;
  StageCase c;
  c.fill = kFillStore;
  c.refill = kFillTma;
  ok = report(stage_run(c), "proxy: every storing lane fences before it arrives (writer side)") && ok;
  c.writer_fence_lane = -1;
  c.reader_fence = true;
  ok = report(stage_run(c), "proxy: the consumer fences after the full-barrier wait (reader side)") && ok;
  std::printf("     (EMU-ERRORs expected next)\n");
  c.reader_fence = false;
  ok = report(!stage_run(c), "proxy: no fence on either side is an error") && ok;
  c.store_lanes = 16;
  c.writer_fence_lane = 31;  // a lane that stored nothing and observed nothing fences
  ok = report(!stage_run(c), "proxy: a fence by another thread (not ordered after the stores) does not count") && ok;
  StageCase cp;
  cp.fill = kFillCp;
  cp.refill = kFillTma;
  cp.reader_fence = true;
  ok = report(stage_run(cp), "proxy: cp.async, then a fence after the full-barrier wait") && ok;
  cp.reader_fence = false;
  ok = report(!stage_run(cp), "proxy: cp.async read by wgmma without a fence after the wait is an error") && ok;
  // An ordinary store, then a TMA (async proxy) into the same bytes: a fence between them.
  for (bool fenced : {true, false}) {
    alignas(64) static CUtensorMap map;
    const cuuint32_t es[2] = {1, 1};
    const cuuint64_t dims[2] = {64, 16}, strides[1] = {128};
    const cuuint32_t box[2] = {64, 16};
    hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, ones().data(), dims, strides, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    const bool run = hemu::launch(dim3(1), 32, 16 * 1024, [&] {
      unsigned char* base = aligned_base();
      uint64_t* bar = reinterpret_cast<uint64_t*>(base);
      unsigned char* tile = base + 1024;
      if (threadIdx.x != 0) return;
      mbar_init(bar, 1);
      uint4 zero{};
      for (int q = 0; q < kUnitsB; ++q) st_shared16(tile + 16 * q, zero);
      if (fenced) fence_proxy_async();
      mbar_arrive_expect_tx(bar, 2048);
      tma_load_2d(tile, &map, 0, 0, bar);
      mbar_wait(bar, 0);
    });
    ok = report(fenced ? run : !run, fenced ? "proxy: st.shared, fence.proxy.async, TMA into the same bytes"
                                            : "proxy: st.shared then a TMA into the same bytes without a fence is an error") && ok;
  }
  return ok;
}

// ----------------------------------------------------------------------------------- setmaxnreg
template <int Producer, int Consumer>
static bool nreg_launch(int skip_warp = -1) {
  return hemu::launch(dim3(1), 384, 1024, [&] {
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32;
    if (wg == 0) {
      if (warp != skip_warp) setmaxnreg_dec<Producer>();
    } else {
      setmaxnreg_inc<Consumer>();
    }
  });
}

static bool test_setmaxnreg() {
  bool ok = true;
  ok = report(nreg_launch<40, 232>(), "setmaxnreg: 40 / 232 / 232 (128 x 40 + 256 x 232 = 384 x 168)") && ok;
  ok = report(nreg_launch<24, 240>(), "setmaxnreg: 24 / 240 / 240 (FlashAttention-3's split)") && ok;
  std::printf("     (EMU-ERRORs expected next)\n");
  ok = report(!nreg_launch<40, 240>(), "setmaxnreg: 40 / 240 / 240 asks for more registers than the CTA holds") && ok;
  ok = report(!nreg_launch<40, 236>(), "setmaxnreg: a count that is not a multiple of 8 is an error") && ok;
  ok = report(!nreg_launch<40, 160>(), "setmaxnreg.inc below the warp's count at entry is an error") && ok;
  ok = report(!nreg_launch<40, 224>(2), "setmaxnreg: one warp of the warpgroup skipping it is an error") && ok;
  return ok;
}

// ----------------------------------------------------------------------------------- ctas
// A persistent grid of 2 CTAs (32 threads), items i = blockIdx.x + k * 2 < 4: each writes
// out[i] = i + 1, then one CTA sums them. `planted`: the last CTA sums after its own items as
// if the others were done (CTAs in order, which nothing guarantees); fixed: the last CTA to
// finish (an atomic counter after a fence) sums.
static bool cta_sum(bool planted) {
  std::vector<float> out(4, NAN);
  float total = NAN;
  int done = 0;
  const bool run = hemu::launch(dim3(2), 32, 1024, [&] {
    if (threadIdx.x != 0) return;
    for (int i = blockIdx.x; i < 4; i += gridDim.x) out[i] = float(i + 1);
    bool last = blockIdx.x == gridDim.x - 1;
    if (!planted) {
      __threadfence();
      last = atomicAdd(&done, 1) == int(gridDim.x) - 1;
      __threadfence();
    }
    if (last) total = out[0] + out[1] + out[2] + out[3];
  });
  return run && total == 10.f;
}
// Two CTAs that each wait for the other's flag: they must run at the same time.
static bool cta_handshake() {
  int flags[2] = {0, 0};
  return hemu::launch(dim3(2), 32, 1024, [&] {
    if (threadIdx.x != 0) return;
    atomicExch(&flags[blockIdx.x], 1);
    while (atomicAdd(&flags[1 - blockIdx.x], 0) == 0) std::this_thread::yield();
  });
}

static bool test_ctas() {
  bool ok = true;
  ok = report(cta_handshake(), "ctas: two CTAs of a grid run at the same time (a handshake between them completes)") && ok;
  ok = report(in_child([] {
                setenv("DJEPA_EMU_DEADLOCK_S", "1", 1);
                std::_Exit(cta_handshake() ? 0 : 1);
              }, "DJEPA_EMU_CTAS", "1") == 3,
              "ctas: one CTA at a time (the old emulator) the handshake hangs (watchdog)") && ok;
  ok = report(cta_sum(false), "ctas: the last CTA to finish (atomic counter) sums the grid's results") && ok;
  ok = report(!cta_sum(true), "ctas: a CTA summing the others' results without waiting for them is caught") && ok;
  ok = report(in_child([] { std::_Exit(cta_sum(true) ? 0 : 1); }, "DJEPA_EMU_CTAS", "1") == 0,
              "ctas: one CTA at a time (the old emulator) that bug passes") && ok;
  return ok;
}

// ----------------------------------------------------------------------------------- tmastore
// A 64-row x 64-column bf16 box staged by 32 threads with 4-byte stores at their 128B-swizzled
// places, stored by TMA into a [rows][72] tensor at (col0, row0). How it goes wrong: `no_fence`
// (no fence.proxy.async after the stores), `no_bar` (the issuer stores without a barrier after
// the others' writes), `early_write` (the box is rewritten before cp.async.bulk.wait_group.read),
// `unordered_write` (another thread rewrites it after the issuer's wait_group.read, with no
// barrier in between), `no_wait` (the issuer exits without waiting for the store).
struct StoreCase {
  bool no_fence = false, no_bar = false, early_write = false, unordered_write = false, no_wait = false;
  int rows = 100, col0 = 16, row0 = 50;
};
static bool store_run(const StoreCase& sc, std::vector<uint16_t>& g) {
  const int cols = 72;
  g.assign(size_t(sc.rows) * cols, 0xBEEF);
  alignas(64) CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(sc.rows)}, strides[1] = {cols * 2};
  const cuuint32_t box[2] = {64, 64}, es[2] = {1, 1};
  if (hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g.data(), dims, strides, box, es,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return false;
  return hemu::launch(dim3(1), 32, 16384, [&] {
    unsigned char* tile = aligned_base();
    const int t = threadIdx.x;
    // element (r, c) of the box = r * 64 + c; lane t writes rows t and t + 32, word pairs
    for (int r = t; r < 64; r += 32)
      for (int c = 0; c < 64; c += 2) {
        const uint32_t v = uint32_t(r * 64 + c) | (uint32_t(r * 64 + c + 1) << 16);
        st_shared4(tile + swizzle_offset(kSwizzle128, uint32_t(r * 128 + c * 2)), v);
      }
    if (!sc.no_fence) fence_proxy_async();
    if (!sc.no_bar) __syncthreads();
    if (t == 0) {
      tma_store_2d(&map, tile, sc.col0, sc.row0);
      bulk_commit();
    }
    if (sc.early_write) {
      __syncthreads();  // the store is issued and not waited for: a write now races with its read
      if (t == 1) st_shared4(tile + 4 * 32 * 1, 0u);
      __syncthreads();
    }
    if (t == 0 && !sc.no_wait) bulk_wait_read<0>();
    if (!sc.unordered_write) __syncthreads();
    if (sc.unordered_write && t == 2) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // after the issuer's wait
      st_shared4(tile + 128 * 2, 0u);
    }
    if (t == 0 && !sc.no_wait) bulk_wait<0>();
  });
}
static bool store_landed(const StoreCase& sc, const std::vector<uint16_t>& g) {
  const int cols = 72;
  for (int r = 0; r < sc.rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const int br = r - sc.row0, bc = c - sc.col0;
      const bool in = br >= 0 && br < 64 && bc >= 0 && bc < 64;
      if (g[size_t(r) * cols + c] != (in ? uint16_t(br * 64 + bc) : uint16_t(0xBEEF))) return false;
    }
  return true;
}

static bool test_tmastore() {
  bool ok = true;
  std::vector<uint16_t> g;
  {
    StoreCase sc;  // the box crosses the tensor's last column (col 72) and last row (100): clipped
    ok = report(store_run(sc, g) && store_landed(sc, g),
                "tmastore: a staged 128B-swizzled box lands in global memory, clipped at the tensor's end") && ok;
  }
  // split-K partials: a 3-d map [depth][rows][cols] keeps a box that runs past `rows` in its slice
  {
    std::vector<float> part(2 * 10 * 32, -1.f);
    alignas(64) CUtensorMap map;
    const cuuint64_t dims[3] = {32, 10, 2}, strides[2] = {128, 1280};
    const cuuint32_t box[3] = {32, 64, 1}, es[3] = {1, 1, 1};
    hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, part.data(), dims, strides, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    const bool run = hemu::launch(dim3(1), 32, 16384, [&] {
      unsigned char* tile = aligned_base();
      for (int r = threadIdx.x; r < 64; r += 32)
        for (int c = 0; c < 32; c += 2)
          st_shared8(tile + swizzle_offset(kSwizzle128, uint32_t(r * 128 + c * 4)), make_float2(float(r), float(c)));
      fence_proxy_async();
      __syncthreads();
      if (threadIdx.x == 0) {
        tma_store_3d(&map, tile, 0, 0, 1);
        bulk_commit();
        bulk_wait<0>();
      }
    });
    bool land = true;  // slice 1 rows 0..9: (r, c) = (r, c - 1) for odd c; slice 0 untouched
    for (int z = 0; z < 2; ++z)
      for (int r = 0; r < 10; ++r)
        for (int c = 0; c < 32; ++c)
          land = land && part[size_t(z) * 320 + r * 32 + c] == (z == 0 ? -1.f : c % 2 ? float(c - 1) : float(r));
    ok = report(run && land, "tmastore: a 3-d box (fp32, 8-byte stores) stays in its slice of [depth][rows][cols]") &&
         ok;
  }
  const char* bad[] = {"with no fence.proxy.async after the stores", "by a thread not ordered after the others' stores",
                       "rewritten before cp.async.bulk.wait_group.read",
                       "rewritten after the issuer's wait_group.read with no barrier", "never waited for"};
  for (int k = 0; k < 5; ++k) {
    StoreCase sc;
    sc.no_fence = k == 0;
    sc.no_bar = k == 1;
    sc.early_write = k == 2;
    sc.unordered_write = k == 3;
    sc.no_wait = k == 4;
    std::printf("     (EMU-ERRORs expected next)\n");
    ok = report(!store_run(sc, g), std::string("tmastore: a TMA store of a box ") + bad[k] + " is an error") && ok;
  }
  return ok;
}

// ----------------------------------------------------------------------------------- cluster
// Clusters of 2 CTAs (32 threads): a TMA multicast of a 64 x 64 bf16 box lands in both CTAs and
// completes bytes on each one's barrier; each CTA's barrier also counts the peer's remote arrive.
// `no_sync`: no barrier.cluster between the inits and the peer's first multicast / arrive;
// `late`: CTA 0 arrives on CTA 1's barrier after all of CTA 1's threads have exited.
static bool cluster_run(bool no_sync, bool late, std::vector<int>& bad) {
  std::vector<uint16_t> g(64 * 64);
  for (size_t i = 0; i < g.size(); ++i) g[i] = uint16_t(i * 3 + 1);
  alignas(64) CUtensorMap map;
  const cuuint64_t dims[2] = {64, 64}, strides[1] = {128};
  const cuuint32_t box[2] = {64, 32}, es[2] = {1, 1};
  hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, g.data(), dims, strides, box, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  bad.assign(4, -1);
  std::atomic<int> exited[2] = {0, 0};  // per cluster
  return hemu::launch(dim3(4), 32, 16384, [&] {
    unsigned char* tile = aligned_base();
    uint64_t* full = reinterpret_cast<uint64_t*>(tile + 8192);
    uint64_t* peer = full + 1;
    const uint32_t rank = cluster_ctarank();
    if (threadIdx.x == 0) {
      mbar_init(full, 1);
      mbar_init(peer, late ? 1 : 2);
      mbar_init_fence();
    }
    if (no_sync) __syncthreads();
    else cluster_sync();
    if (late) {
      if (rank == 1) {
        if (threadIdx.x == 0) exited[blockIdx.x / 2]++;
        return;
      }
      if (threadIdx.x == 0) {
        while (exited[blockIdx.x / 2].load() == 0) std::this_thread::yield();
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        mbar_arrive_remote(peer, 1);
      }
      return;
    }
    if (threadIdx.x == 0) {
      // each CTA loads its half of the rows and multicasts it to both
      mbar_arrive_expect_tx(full, 64 * 64 * 2);
      tma_load_2d_multicast(tile + rank * 4096, &map, 0, int(rank) * 32, full, 0x3);
      mbar_arrive(peer);
      mbar_arrive_remote(peer, rank ^ 1u);
    }
    mbar_wait(full, 0);
    mbar_wait(peer, 0);
    if (threadIdx.x == 0) {
      int wrong = 0;
      for (int r = 0; r < 64; ++r)
        for (int c = 0; c < 64; ++c) {
          uint16_t v;
          std::memcpy(&v, tile + swizzle_offset(kSwizzle128, uint32_t(r * 128 + c * 2)), 2);
          wrong += v != g[r * 64 + c];
        }
      bad[blockIdx.x] = wrong;
    }
    cluster_sync();  // no CTA exits while its peer may still multicast to it or arrive on it
  }, 2);
}

static bool test_cluster() {
  bool ok = true;
  std::vector<int> bad;
  const bool run = cluster_run(false, false, bad);
  ok = report(run && bad == std::vector<int>{0, 0, 0, 0},
              "cluster: TMA multicast lands in both CTAs of each cluster, remote arrives complete the peer's phase") &&
       ok;
  // (the lost phase then hangs: the child ends on the errors or on the watchdog)
  ok = report(in_child([] {
                std::vector<int> b;
                std::_Exit(cluster_run(true, false, b) ? 0 : 1);
              }, "DJEPA_EMU_DEADLOCK_S", "2") != 0,
              "cluster: a multicast / remote arrive not ordered after the peer's mbarrier.init (no barrier.cluster) "
              "is an error") && ok;
  std::printf("     (EMU-ERRORs expected next)\n");
  ok = report(!cluster_run(false, true, bad),
              "cluster: an arrive on a peer CTA's barrier after all its threads exited is an error") && ok;
  return ok;
}

// One warpgroup stages a [64 rows][64 cols] bf16 tile (128-byte rows, 128-byte swizzle) with
// stmatrix from registers in the m64nN accumulator layout (value (row + col) % 64), fences, and
// thread 0 stores it by TMA into a tensor of 50 rows (rows 50..63 lie past its end).
enum StoreBug { kStoreClean, kStoreNoFence, kStoreEarlyWrite, kStoreNoWait };
static bool tma_store_case(StoreBug bug) {
  alignas(64) static CUtensorMap map;
  std::vector<__nv_bfloat16> out(64 * 64, to_t<__nv_bfloat16>(-1.f));
  const cuuint32_t es[4] = {1, 1, 1, 1}, box[4] = {64, 64, 1, 1};
  const cuuint64_t dims[4] = {64, 50, 1, 1}, strides[3] = {128, 128 * 50, 128 * 50};
  hemu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, out.data(), dims, strides, box, es,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  const auto value = [](int row, int col) { return float((row + col) % 64); };
  const bool clean = hemu::launch(dim3(1), 128, 16 * 1024, [&] {
    unsigned char* tile = aligned_base();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto stage = [&](float add) {
      for (int k = 0; k < 4; ++k) {  // units 2k, 2k + 1 of the warp's 16 rows
        uint32_t r[4];
        for (int m = 0; m < 4; ++m) {
          const int row = 16 * warp + 8 * (m & 1) + lane / 4, col = 8 * (2 * k + (m >> 1)) + 2 * (lane % 4);
          r[m] = pack2<__nv_bfloat16>(value(row, col) + add, value(row, col + 1) + add);
        }
        const int row = 16 * warp + (lane & 7) + 8 * ((lane >> 3) & 1), unit = 2 * k + (lane >> 4);
        stmatrix_x4(tile + swizzle_offset(kSwizzle128, uint32_t(row * 128 + unit * 16)), r);
      }
    };
    stage(0.f);
    if (bug != kStoreNoFence) fence_proxy_async();
    named_bar_sync(1, 128);
    if (threadIdx.x == 0) {
      tma_store_4d(&map, tile, 0, 0, 0, 0);
      bulk_commit();
    }
    if (bug == kStoreEarlyWrite) {
      named_bar_sync(1, 128);
      stage(1.f);  // the tile again, before the store has read it
    }
    if (threadIdx.x == 0 && bug != kStoreNoWait) bulk_wait_read<0>();
  });
  bool right = true;
  for (int row = 0; row < 64; ++row)
    for (int col = 0; col < 64; ++col)
      right = right && to_f(out[row * 64 + col]) == (row < 50 ? value(row, col) : -1.f);
  return clean && right;
}

static bool test_tmastore_stmatrix() {
  bool ok = report(tma_store_case(kStoreClean), "tmastore: stmatrix + fence + TMA store write the tensor's 50 rows, "
                                                "none past its end");
  std::printf("     (EMU-ERRORs expected next)\n");
  ok = report(!tma_store_case(kStoreNoFence), "tmastore: a TMA store of st.shared / stmatrix data without "
                                              "fence.proxy.async is an error") && ok;
  ok = report(!tma_store_case(kStoreEarlyWrite), "tmastore: the tile written again before wait_group.read is an error") &&
       ok;
  ok = report(!tma_store_case(kStoreNoWait), "tmastore: a thread exiting with its TMA store not retired is an error") &&
       ok;
  bool shfl = true;
  hemu::launch(dim3(1), 64, 1024, [&] {
    const int lane = threadIdx.x % 32;
    if (shfl_idx(lane * 3 + int(threadIdx.x / 32), (lane + 5) % 32) != (lane + 5) % 32 * 3 + int(threadIdx.x / 32))
      shfl = false;
  });
  return report(shfl, "tmastore: shfl.idx returns the source lane's value in each warp") && ok;
}

// ----------------------------------------------------------------------------------- deadlock
static void deadlock() {
  hemu::launch(dim3(1), 32, 4096, [&] {
    uint64_t* bar = reinterpret_cast<uint64_t*>(dynamic_smem() + 48);
    if (threadIdx.x == 0) mbar_init(bar, 2);
    __syncthreads();
    mbar_wait(bar, 0);  // nobody arrives
  });
}

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  if (only == "deadlock") {
    deadlock();
    std::printf("no deadlock detected\n");
    return 0;
  }
  auto run = [&](const char* s) { return only.empty() || only == s; };
  std::mt19937 rng(1234);
  bool all = true;
  if (run("desc")) all = test_desc() && all;
  if (run("tma")) all = test_tma() && all;
  if (run("wgmma")) {
    all = wgmma_all<__half>(rng) && all;
    all = wgmma_all<__nv_bfloat16>(rng) && all;
  }
  if (run("mbar")) all = test_mbar() && all;
  if (run("proxy")) {
    all = proxy_case<__nv_bfloat16>(true) && all;
    all = proxy_case<__half>(false) && all;
  }
  if (run("cpasync")) {
    all = cpasync_case(false) && all;
    all = cpasync_case(true) && all;
    all = cpasync_case(true, 5) && all;  // finishes (a stranded lane would trip the watchdog)
  }
  if (run("regs")) all = test_regs() && all;
  if (run("stage")) all = test_stage() && all;
  if (run("proxy")) all = test_proxy_threads() && all;
  if (run("setmaxnreg")) all = test_setmaxnreg() && all;
  if (run("ctas")) all = test_ctas() && all;
  if (run("tmastore")) all = test_tmastore() && all;
  if (run("tmastore")) all = test_tmastore_stmatrix() && all;
  if (run("cluster")) all = test_cluster() && all;
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
