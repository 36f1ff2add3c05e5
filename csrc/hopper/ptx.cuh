// Hopper (sm_90a) primitives for the kernels in csrc/hopper/: wgmma and its shared-memory matrix
// descriptors, mbarriers with transaction counts, TMA (cp.async.bulk.tensor) loads, multicast
// loads and stores with bulk async-groups, clusters, cp.async with mbarrier completion, stmatrix,
// proxy fences, named barriers, setmaxnreg.
//
// Build: these need the sm_90a target (-gencode=arch=compute_90a,code=sm_90a; CMake's
// CUDA_ARCHITECTURES "90a" expands to exactly that). In any other device pass (sm_80, plain
// sm_90) DJEPA_SM90A is undefined and the kernels compile to an empty body; their host entry
// points refuse non-sm_90 devices before launching.
//
// DJEPA_HOPPER_EMULATE: the device half below is left out and tools/hopper_emulate.h defines the
// same functions (one std::thread per CUDA thread), so tools/*_sm90_emulate.cpp run these exact
// kernels on the CPU. Only what is plain arithmetic (descriptor encoding, swizzle offsets) is
// shared by both.
//
// Shared-memory layouts (PTX ISA, "Shared Memory Matrix Layout"; all byte offsets):
//   swizzle(a) for the 128/64/32-byte modes XORs address bits [4, 4 + b) with bits [7, 7 + b),
//   b = 3/2/1 (CuTe's Swizzle<b,4,3> on byte addresses); TMA writes with the same function of the
//   destination address and wgmma reads with it, so a tile is correct iff both agree on the mode
//   and the tile's pattern starts on a (128 << b)-byte boundary (descriptor base offset 0).
//   K-major, swizzle W bytes: row r of the M/N dimension at (r % 8) * W + (r / 8) * SBO, its
//     16-byte chunks consecutive (then swizzled); one k16 step of 16-bit data reads 32 bytes
//     per row, the next k step starts 32 bytes later (start address + 32).
//   MN-major, swizzle W bytes: W / 2 consecutive M/N elements per k row, k rows W bytes apart,
//     8 k rows form an atom; the next 8 k at SBO, the next W / 2 M/N elements at LBO.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda.h>  // CUtensorMap (a 128-byte opaque value; no driver library is linked)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DJEPA_SM90A 1
#endif

// Kernel bodies are compiled where they can run: the sm_90a pass and the CPU emulator.
#if defined(DJEPA_SM90A) || defined(DJEPA_HOPPER_EMULATE)
#define DJEPA_HOPPER_BODY 1
#endif

namespace djepa {
namespace hopper {

// Planted bugs (tests only): tools/*_sm90_emulate.cpp run with --plant=<n> to check that the
// emulator catches each class of bug.
enum Plant : int {
  kPlantNone = 0,
  kPlantSwizzle = 1,       // the wgmma descriptors name the 64-byte swizzle for 128-byte tiles
  kPlantStride = 2,        // the descriptors' stride byte offset (8-row group pitch) is half of it
  kPlantWait = 3,          // consumers read a stage without waiting for its full barrier
  kPlantFragment = 4,      // the epilogue takes accumulator column (i + 1) for column i
  kPlantFence = 5,         // no fence.proxy.async for ordinary smem stores / cp.async (either side)
  kPlantWgmmaWait = 6,     // the accumulators are read before wgmma.wait_group 0
  kPlantEarlyRelease = 7,  // a stage is released (empty barrier) before the wgmma reading it retired
  kPlantRegFence = 8,      // no wgmma.fence between writing wgmma registers and the wgmma
  kPlantPeerRelease = 9,   // cluster: a stage is released in this CTA only, not in the peer that multicasts into it
  kPlantClusterSync = 10,  // cluster: no barrier.cluster between the mbarrier inits and the peers' first use
  kPlantCount = 11,
};

// The fault-injection hook, the only way kernels refer to planted bugs:
//   DJEPA_FAULT_SKIP(bug, when) statement;        the statement, skipped when `bug` is planted
//                                                 and `when` holds;
//   DJEPA_FAULT_VALUE(bug, production, faulty)    `production`, or `faulty` when `bug` is planted.
// Outside the emulator they are the production code itself: DJEPA_FAULT_SKIP expands to nothing
// and DJEPA_FAULT_VALUE to `production`, so no trace of a fault reaches a GPU build.
#if defined(DJEPA_HOPPER_EMULATE)
inline int g_plant = kPlantNone;
#define DJEPA_FAULT_SKIP(bug, when) \
  for (bool djepa_fault_run_ = !(::djepa::hopper::g_plant == (bug) && (when)); djepa_fault_run_; djepa_fault_run_ = false)
#define DJEPA_FAULT_VALUE(bug, production, faulty) (::djepa::hopper::g_plant == (bug) ? (faulty) : (production))
#else
#define DJEPA_FAULT_SKIP(bug, when)
#define DJEPA_FAULT_VALUE(bug, production, faulty) (production)
#endif

constexpr int kWarpGroup = 128;

enum Swizzle : int { kSwizzleNone = 0, kSwizzle128 = 1, kSwizzle64 = 2, kSwizzle32 = 3 };

// Bytes per swizzled row (the swizzle span): 128 / 64 / 32; 16 for no swizzle.
__host__ __device__ constexpr int swizzle_bytes(int mode) {
  return mode == kSwizzle128 ? 128 : mode == kSwizzle64 ? 64 : mode == kSwizzle32 ? 32 : 16;
}

// The swizzled position of byte offset `off` inside a tile whose pattern starts on a
// (8 * span)-byte boundary.
__host__ __device__ constexpr uint32_t swizzle_offset(int mode, uint32_t off) {
  const uint32_t mask = mode == kSwizzle128 ? 7u : mode == kSwizzle64 ? 3u : mode == kSwizzle32 ? 1u : 0u;
  return off ^ (((off >> 7) & mask) << 4);
}

// The 64-bit wgmma matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (each encoded as (x & 0x3FFFF) >> 4 in 14 bits), base offset 0,
// swizzle mode in bits 62-63 (1 = 128 B, 2 = 64 B, 3 = 32 B).
__host__ __device__ constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo, int mode) {
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t(mode & 3) << 62);
}

// Two floats -> one register of two 16-bit values (the first in the low half).
template <typename T>
__host__ __device__ inline uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

#if !defined(DJEPA_HOPPER_EMULATE)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char djepa_hopper_dsmem[];
  return djepa_hopper_dsmem;
}

#if defined(DJEPA_SM90A)
// ---- mbarrier
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (TMA complete_tx) and other threads.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// One arrival on `bar` where `pred` holds (a predicated instruction, not a branch around it).
__device__ __forceinline__ void mbar_arrive_if(uint64_t* bar, bool pred) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
                   smem_u32(bar)),
               "r"(int(pred))
               : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return ok != 0;
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- TMA (the tensor map is a __grid_constant__ kernel parameter; pass its address)
__device__ __forceinline__ void tma_prefetch(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}

// ---- cp.async (16 bytes, zero fill beyond src_bytes) completing on an mbarrier
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
// One arrival on `bar` once every cp.async this thread issued before has landed (the barrier's
// expected count includes it: .noinc).
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// ---- ordering
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// An ordinary 16-byte shared store (the emulator tracks these for the proxy-fence rule).
__device__ __forceinline__ void st_shared16(void* dst, uint4 v) { *reinterpret_cast<uint4*>(dst) = v; }
// stmatrix.sync.aligned.m8n8.x4.shared.b16 (warp-wide; generic-proxy stores): four 8 x 8 16-bit
// matrices; lane l holds in r[i] row l / 4, columns 2 (l % 4), +1 of matrix i (the layout of an
// m64nN accumulator pair after packing) and gives the 16-byte-aligned address of row l % 8 of
// matrix l / 8.
__device__ __forceinline__ void stmatrix_x4(void* row, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_u32(row)), "r"(r[0]),
               "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// ---- clusters (sm_90): a CTA's rank in its cluster, the cluster-wide barrier, arrivals on a peer
// CTA's mbarrier (the same shared-memory offset in CTA `cta`), and TMA multicast: the box lands at
// the same offset in every CTA of `mask` and completes bytes on the mbarrier at the same offset in
// each of them.
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Release at CTA scope, as CUTLASS's ClusterBarrier::arrive(cta_id): .release.cluster would
// add a GPU-wide MEMBAR before every arrival (ptxas, sm_90a).
__device__ __forceinline__ void mbar_arrive_remote(uint64_t* bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_u32(bar)),
      "r"(cta)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                                      uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(smem_u32(bar)), "h"(mask)
      : "memory");
}

// ---- TMA stores (shared -> global, bulk groups): the box at `src` (a swizzled tile laid out as
// the tensor map says) to the coordinates; elements outside the tensor are not written. The
// generic-proxy writes of the tile must be made visible first (fence_proxy_async, then a barrier
// with the issuing thread). bulk_wait_read<N>: at most N groups may still read shared memory;
// bulk_wait<N>: at most N groups are incomplete (their global writes included).
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                             int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Ordinary 4- and 8-byte shared stores (tracked by the emulator like st_shared16).
__device__ __forceinline__ void st_shared4(void* dst, uint32_t v) { *reinterpret_cast<uint32_t*>(dst) = v; }
__device__ __forceinline__ void st_shared8(void* dst, float2 v) { *reinterpret_cast<float2*>(dst) = v; }

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// ---- wgmma
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue/wait.
template <int R>
__device__ __forceinline__ void fence_regs(float (&r)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
// Lane `src`'s v (every lane of the warp takes part).
__device__ __forceinline__ int shfl_idx(int v, int src) { return __shfl_sync(0xffffffffu, v, src); }
#else   // !DJEPA_SM90A: the host pass and the sm_80 / plain sm_90 device passes parse the kernels
        // (whose bodies are compiled out there) against these never-called stand-ins.
__device__ __forceinline__ void mbar_init(uint64_t*, int) {}
__device__ __forceinline__ void mbar_init_fence() {}
__device__ __forceinline__ void mbar_arrive(uint64_t*) {}
__device__ __forceinline__ void mbar_arrive_if(uint64_t*, bool) {}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t*, uint32_t) {}
__device__ __forceinline__ bool mbar_try_wait(uint64_t*, uint32_t) { return true; }
__device__ __forceinline__ void mbar_wait(uint64_t*, uint32_t) {}
__device__ __forceinline__ void tma_prefetch(const CUtensorMap*) {}
__device__ __forceinline__ void tma_load_2d(void*, const CUtensorMap*, int, int, uint64_t*) {}
__device__ __forceinline__ void tma_load_4d(void*, const CUtensorMap*, int, int, int, int, uint64_t*) {}
__device__ __forceinline__ void cp_async16(void*, const void*, int) {}
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t*) {}
__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void st_shared16(void* dst, uint4 v) { *reinterpret_cast<uint4*>(dst) = v; }
__device__ __forceinline__ uint32_t cluster_ctarank() { return 0; }
__device__ __forceinline__ void cluster_sync() {}
__device__ __forceinline__ void mbar_arrive_remote(uint64_t*, uint32_t) {}
__device__ __forceinline__ void tma_load_2d_multicast(void*, const CUtensorMap*, int, int, uint64_t*, uint16_t) {}
__device__ __forceinline__ void tma_store_2d(const CUtensorMap*, const void*, int, int) {}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap*, const void*, int, int, int) {}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap*, const void*, int, int, int, int) {}
__device__ __forceinline__ void bulk_commit() {}
template <int N>
__device__ __forceinline__ void bulk_wait_read() {}
template <int N>
__device__ __forceinline__ void bulk_wait() {}
__device__ __forceinline__ void st_shared4(void* dst, uint32_t v) { *reinterpret_cast<uint32_t*>(dst) = v; }
__device__ __forceinline__ void st_shared8(void* dst, float2 v) { *reinterpret_cast<float2*>(dst) = v; }
__device__ __forceinline__ void stmatrix_x4(void*, const uint32_t (&)[4]) {}
__device__ __forceinline__ void named_bar_sync(int, int) {}
__device__ __forceinline__ void named_bar_arrive(int, int) {}
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {}
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
template <int R>
__device__ __forceinline__ void fence_regs(float (&)[R]) {}
__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ float shfl_xor(float v, int) { return v; }
__device__ __forceinline__ int shfl_idx(int v, int) { return v; }
template <typename T, int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&)[N / 2], uint64_t, uint64_t, int) {}
template <typename T, int N, int TB>
__device__ __forceinline__ void wgmma_rs(float (&)[N / 2], const uint32_t (&)[4], uint64_t, int) {}
#endif  // DJEPA_SM90A
#endif  // !DJEPA_HOPPER_EMULATE

}  // namespace hopper
}  // namespace djepa

#if defined(DJEPA_SM90A) && !defined(DJEPA_HOPPER_EMULATE)
#include "hopper/wgmma.cuh"
#endif
