// Runs CUDA kernels on the CPU for checking without a GPU (tools/*_emulate.cpp).
//
// Every CUDA thread of a block runs as a std::thread. __syncthreads, __shfl_xor_sync,
// mma.sync m16n8k16, ldmatrix .x4 (.trans), ex2.approx.ftz and cp.async are emulated from their
// PTX ISA definitions. cp.async is asynchronous as the ISA allows at its latest: a copy reads its
// source when issued but lands in shared memory only when its thread's cp.async.wait_group lets
// its group complete, so a kernel that reads a tile before waiting for it (or waits for too
// little) reads the poison instead. Shared memory is poisoned (0xFF) per block.
//
// Planted-bug knobs (environment, read by emu::configure() at start-up), which tests use to show
// that the checks catch a broken pipeline:
//   DJEPA_EMU_WAIT_SLACK=n  every cp.async.wait_group N behaves as wait_group N + n
//   DJEPA_EMU_SYNC_COPIES=1 cp.async copies land at once (the pre-async model)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
template <typename T>
inline T __ldg(const T* p) { return *p; }

class Barrier {
 public:
  explicit Barrier(int n = 0) : n_(n) {}
  void reset(int n) { n_ = n; waiting_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_ = 0, waiting_ = 0;
  long gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  uint32_t a[32][4], b[32][2];
  const void* ptr[32];
  float f[32];
};

inline Barrier g_block_bar;
inline Warp g_warps[8];

inline void __syncthreads() { g_block_bar.wait(); }
inline Warp& my_warp() { return g_warps[threadIdx.x / 32]; }
inline int my_lane() { return threadIdx.x % 32; }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  Warp& w = my_warp();
  w.f[my_lane()] = v;
  w.bar.wait();
  const float r = w.f[my_lane() ^ off];
  w.bar.wait();
  return r;
}


namespace emu {

struct PendingCopy {
  void* dst;
  unsigned char data[16];
};
thread_local std::vector<PendingCopy> t_open;                 // issued, not yet committed
thread_local std::vector<std::vector<PendingCopy>> t_groups;  // committed groups, oldest first
inline int g_wait_slack = 0;
inline bool g_sync_copies = false;

inline void configure() {
  if (const char* v = std::getenv("DJEPA_EMU_WAIT_SLACK")) g_wait_slack = std::atoi(v);
  if (const char* v = std::getenv("DJEPA_EMU_SYNC_COPIES")) g_sync_copies = std::atoi(v) != 0;
  if (g_wait_slack || g_sync_copies)
    std::printf("planted: wait_group slack %d, synchronous copies %d\n", g_wait_slack, int(g_sync_copies));
}

// cp.async.cg ... 16, src_bytes: copies src_bytes and zero-fills the rest of the 16 bytes.
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  PendingCopy c{dst, {}};
  std::memset(c.data, 0, 16);
  if (src_bytes > 0) std::memcpy(c.data, src, src_bytes);
  if (g_sync_copies) {
    std::memcpy(dst, c.data, 16);
    return;
  }
  t_open.push_back(c);
}
inline void cp_async16(void* dst, const void* src) { cp_async16(dst, src, 16); }

inline void cp_async_commit() {
  t_groups.push_back(std::move(t_open));
  t_open.clear();
}

// cp.async.wait_group N: every committed group but the N most recent has landed.
inline void cp_async_wait_group(int n) {
  n += g_wait_slack;
  while (static_cast<int>(t_groups.size()) > n) {
    for (const PendingCopy& c : t_groups.front()) std::memcpy(c.dst, c.data, 16);
    t_groups.erase(t_groups.begin());
  }
}
template <int N>
inline void cp_async_wait() {
  cp_async_wait_group(N);
}

// ex2.approx.ftz.f32: 2^x, subnormal results flushed to zero.
inline float exp2_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// ldmatrix .x4: lane l gives the address of row (l & 7) of matrix (l >> 3); register i of
// lane (g = l / 4, c = l % 4) receives M_i[g][2c] (low half) and M_i[g][2c + 1].
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  Warp& w = my_warp();
  const int lane = my_lane(), g = lane >> 2, c = lane & 3;
  w.ptr[lane] = p;
  w.bar.wait();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* row = static_cast<const uint16_t*>(w.ptr[8 * i + g]);
    r[i] = static_cast<uint32_t>(row[2 * c]) | (static_cast<uint32_t>(row[2 * c + 1]) << 16);
  }
  w.bar.wait();
}

// ldmatrix .x4 .trans: lane l gives the address of row (l & 7) of matrix (l >> 3); register i
// of lane (g = l / 4, c = l % 4) receives M_i[2c][g] (low half) and M_i[2c + 1][g].
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  Warp& w = my_warp();
  const int lane = my_lane(), g = lane >> 2, c = lane & 3;
  w.ptr[lane] = p;
  w.bar.wait();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* r0 = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * c]);
    const uint16_t* r1 = static_cast<const uint16_t*>(w.ptr[8 * i + 2 * c + 1]);
    r[i] = static_cast<uint32_t>(r0[g]) | (static_cast<uint32_t>(r1[g]) << 16);
  }
  w.bar.wait();
}

template <typename T>
float half_bits_to_float(uint16_t bits) {
  T x;
  std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

// D = A (16x16, row) * B (16x8, col) + C with the PTX fragment layouts for m16n8k16.
template <typename T>
void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = my_warp();
  const int lane = my_lane();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.wait();
  float A[16][16], B[16][8];
  auto lo = [](uint32_t r) { return half_bits_to_float<T>(static_cast<uint16_t>(r & 0xffffu)); };
  auto hi = [](uint32_t r) { return half_bits_to_float<T>(static_cast<uint16_t>(r >> 16)); };
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, k = 2 * (l & 3);
    A[g][k] = lo(w.a[l][0]);
    A[g][k + 1] = hi(w.a[l][0]);
    A[g + 8][k] = lo(w.a[l][1]);
    A[g + 8][k + 1] = hi(w.a[l][1]);
    A[g][k + 8] = lo(w.a[l][2]);
    A[g][k + 9] = hi(w.a[l][2]);
    A[g + 8][k + 8] = lo(w.a[l][3]);
    A[g + 8][k + 9] = hi(w.a[l][3]);
    B[k][g] = lo(w.b[l][0]);
    B[k + 1][g] = hi(w.b[l][0]);
    B[k + 8][g] = lo(w.b[l][1]);
    B[k + 9][g] = hi(w.b[l][1]);
  }
  const int g = lane >> 2, col = 2 * (lane & 3);
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), cc = col + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][cc];
    c[e] += acc;
  }
  w.bar.wait();
}


}  // namespace emu

// Runs `body` as `threads` threads of every block of `grid`, one block at a time.
inline void run_grid(dim3 grid, int threads, void* smem, size_t smem_bytes, const std::function<void()>& body) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, smem_bytes);
        g_block_bar.reset(threads);
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            blockDim = dim3(threads, 1, 1);
            gridDim = grid;
            body();
          });
        }
        for (auto& t : ts) t.join();
      }
}
