// CPU check of the CUDA masked-attention kernels (csrc/attention_kernels.cuh) without a GPU.
//
// The kernels are compiled as plain C++ and every CUDA thread of a block runs as a std::thread;
// __syncthreads, __shfl_xor_sync, mma.sync m16n8k16, ldmatrix.x4(.trans), ex2.approx.ftz and
// cp.async are emulated from their PTX ISA definitions (cp.async lands only when its group is
// waited for, so the pipelines' wait_group accounting is checked: see tools/cuda_emulate.h).
// Outputs are poisoned with NaN, shared memory with 0xFF, and compared with a float64 reference
// computed from the same rounded fp16/bf16 inputs (tools/attention_reference.h).
//
// Dropout cases run the kDropout kernels: the forward's debug variant records the keep bits it
// used, which must equal the keep rule (attention_reference.h), and the reference applies those
// bits, forward and backward, so the backward must regenerate exactly the forward's bits.
// Planted bug: DJEPA_EMU_BWD_OFFSET=n hands the backward the Philox offset + n (the run must fail).
//
//   g++ -std=c++17 -O1 -pthread -DDJEPA_ATTN_EMULATE -I/usr/local/cuda/include -I csrc \
//       tools/attention_emulate.cpp -o /tmp/attention_emulate && /tmp/attention_emulate [seed [cases]]
#include "cuda_emulate.h"

#include <cctype>

#include "attention_reference.h"

namespace djepa {
namespace attention {

extern unsigned char smem_raw[];

using emu::cp_async16;
using emu::cp_async_commit;
using emu::cp_async_wait;
using emu::exp2_ftz;
using emu::ldmatrix_x4;
using emu::ldmatrix_x4_trans;
using emu::mma16816;

// shfl.bfly of 32 bits (the kernels' shfl_xor_u32), through the warp's exchange slots.
inline uint32_t shfl_xor_u32(uint32_t v, int lane_mask) {
  Warp& w = my_warp();
  w.a[my_lane()][0] = v;
  w.bar.wait();
  const uint32_t r = w.a[my_lane() ^ lane_mask][0];
  w.bar.wait();
  return r;
}

}  // namespace attention
}  // namespace djepa

int g_bwd_offset_slack = 0;  // planted bug: the backward's Philox offset is off by this

#include "attention_kernels.cuh"

namespace djepa {
namespace attention {
alignas(16) unsigned char smem_raw[200 * 1024];
}
}  // namespace djepa

using namespace djepa::attention;

void run_grid(dim3 grid, int threads, const std::function<void()>& body) {
  ::run_grid(grid, threads, smem_raw, sizeof(smem_raw), body);
}

template <typename T>
T to_t(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
template <typename T>
double to_d(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

struct Case {
  int B, H, Nq, Nk, D;
  double density;  // < 0: dense (no kv_index)
  bool fused_qkv;  // q/k/v are views of one [B, N, 3, H, D] buffer
  bool odd_stride; // token stride not a multiple of 8 elements (no cp.async path)
  bool empty_sample;  // sample 0 has no visible key
  double scale_mul = 1.0;  // scale = scale_mul / sqrt(D) (negative: the min-based softmax path)
  double dropout = 0.0;    // dropout_p (> 0: the dropout kernels)
};

template <typename T, int D>
bool run_case(const Case& cs, std::mt19937& rng) {
  const int B = cs.B, H = cs.H, Nq = cs.Nq, Nk = cs.Nk;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const float scale = static_cast<float>(cs.scale_mul) / std::sqrt(static_cast<float>(D));

  // Inputs with (batch, head, token) strides.
  auto make_input = [&](int N, int which, std::vector<T>& buf, long long (&st)[3]) -> const T* {
    long long tok = cs.fused_qkv ? 3LL * H * D : (long long)H * D;
    if (cs.odd_stride) tok += 3;
    st[0] = tok * N;
    st[1] = D;
    st[2] = tok;
    buf.assign(static_cast<size_t>(st[0]) * B + 3 * H * D + 8, to_t<T>(NAN));
    const long long off = cs.fused_qkv ? (long long)which * H * D : 0;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int n = 0; n < N; ++n)
          for (int d = 0; d < D; ++d) buf[off + b * st[0] + h * st[1] + n * st[2] + d] = to_t<T>(normal(rng));
    return buf.data() + off;
  };
  std::vector<T> qbuf, kbuf, vbuf;
  long long qs[3], ks[3], vs[3];
  const T* q = make_input(Nq, 0, qbuf, qs);
  const T* k = make_input(Nk, 1, kbuf, ks);
  const T* v = make_input(Nk, 2, vbuf, vs);
  auto at = [&](const T* base, const long long (&st)[3], int b, int h, int n, int d) {
    return to_d(base[b * st[0] + h * st[1] + n * st[2] + d]);
  };

  // Mask, compacted as the Python side does: visible keys first, ascending.
  std::vector<char> mask(static_cast<size_t>(B) * Nk, 1);
  std::vector<int> kv_index(static_cast<size_t>(B) * Nk), kv_count(B);
  for (int b = 0; b < B; ++b) {
    for (int n = 0; n < Nk; ++n) {
      mask[b * Nk + n] = cs.density < 0 ? 1 : (unif(rng) < cs.density);
      if (cs.empty_sample && b == 0) mask[b * Nk + n] = 0;
    }
    int pos = 0;
    for (int n = 0; n < Nk; ++n) if (mask[b * Nk + n]) kv_index[b * Nk + pos++] = n;
    kv_count[b] = pos;
    for (int n = 0; n < Nk; ++n) if (!mask[b * Nk + n]) kv_index[b * Nk + pos++] = n;
  }

  const size_t nq = static_cast<size_t>(B) * H * Nq, nk = static_cast<size_t>(B) * H * Nk;
  std::vector<T> o(nq * D, to_t<T>(NAN)), dout(nq * D), dq(nq * D, to_t<T>(NAN)),
      dk(nk * D, to_t<T>(NAN)), dv(nk * D, to_t<T>(NAN));
  std::vector<float> lse(nq, NAN), delta(nq, NAN);
  for (auto& x : dout) x = to_t<T>(normal(rng));

  Params p{};
  p.q = q; p.k = k; p.v = v;
  p.o = o.data(); p.dout = dout.data(); p.lse = lse.data(); p.delta = delta.data();
  p.dq = dq.data(); p.dk = dk.data(); p.dv = dv.data();
  // As csrc/attention.cu make_params: no key at all is run as dense (nothing to gather).
  p.kv_index = cs.density < 0 || Nk == 0 ? nullptr : kv_index.data();
  p.kv_count = cs.density < 0 || Nk == 0 ? nullptr : kv_count.data();
  p.B = B; p.H = H; p.Nq = Nq; p.Nk = Nk;
  bool vec_ok = reinterpret_cast<uintptr_t>(q) % 16 == 0 && reinterpret_cast<uintptr_t>(k) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(v) % 16 == 0;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = qs[i]; p.ks[i] = ks[i]; p.vs[i] = vs[i];
    vec_ok = vec_ok && qs[i] % 8 == 0 && ks[i] % 8 == 0 && vs[i] % 8 == 0;
  }
  p.vec_ok = vec_ok;
  p.scale = scale;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  // Dropout as csrc/attention.cu make_params sets it up; the seed uses all 64 bits of the key.
  const bool dropout = cs.dropout > 0.0;
  const long long philox[2] = {static_cast<long long>(0x9E3779B97F4A7C15ull ^ rng()), static_cast<long long>(rng())};
  const long long philox_bwd[2] = {philox[0], philox[1] + g_bwd_offset_slack};
  std::vector<unsigned char> keep(nq * std::max(Nk, 1), 0xEE);  // poisoned: every visible pair is written
  if (dropout) {
    p.drop_threshold = static_cast<unsigned>(std::min(std::lround(cs.dropout * 65536.0), 65535L));
    p.keep_scale = static_cast<float>(1.0 / (1.0 - cs.dropout));
  }

  // Same grids and variants as csrc/attention.cu run_fwd / run_bwd.
  const dim3 fwd_grid((Nq + FwdCfg<D>::kBM - 1) / FwdCfg<D>::kBM, H, B);
  if (dropout) {
    p.philox = philox;
    p.keep_out = keep.data();
    run_grid(fwd_grid, kThreads, [&] { fwd_kernel<T, D, kDropoutRecord>(p); });
    p.philox = philox_bwd;
    p.keep_out = nullptr;
  } else {
    run_grid(fwd_grid, kThreads, [&] { fwd_kernel<T, D, kNoDropout>(p); });
  }
  const long long rows = static_cast<long long>(nq);
  run_grid(dim3(static_cast<unsigned>((rows + 7) / 8)), 256,
           [&] { delta_kernel<T>(static_cast<const T*>(p.o), static_cast<const T*>(p.dout), p.delta, rows, D); });
  const dim3 dkdv_grid((Nk + DkdvCfg<D>::kBN - 1) / DkdvCfg<D>::kBN, H, B), dq_grid((Nq + DqCfg<D>::kBM - 1) / DqCfg<D>::kBM, H, B);
  if (dropout) {
    if (Nk > 0) run_grid(dkdv_grid, kThreads, [&] { dkdv_kernel<T, D, true>(p); });
    run_grid(dq_grid, kThreads, [&] { dq_kernel<T, D, true>(p); });
  } else {
    if (Nk > 0) run_grid(dkdv_grid, kThreads, [&] { dkdv_kernel<T, D, false>(p); });
    run_grid(dq_grid, kThreads, [&] { dq_kernel<T, D, false>(p); });
  }

  // float64 reference on the rounded inputs, with the forward's recorded keep bits, which must
  // be the keep rule's (and 0 / 1 for every visible pair, written exactly by the forward).
  double err_o = 0, err_lse = 0, err_dq = 0, err_dk = 0, err_dv = 0;
  bool finite = true;
  long keep_wrong = 0, kept = 0, visible_pairs = 0;
  for (int b = 0; b < B; ++b) {
    int count = 0;
    for (int n = 0; n < Nk; ++n) count += mask[b * Nk + n];
    for (int h = 0; h < H; ++h) {
      const size_t qrow0 = (static_cast<size_t>(b) * H + h) * Nq, krow0 = (static_cast<size_t>(b) * H + h) * Nk;
      std::vector<int> pos(Nk, -1);  // compacted position of each visible key (dense: the identity)
      for (int jj = 0; jj < count; ++jj) pos[kv_index[b * Nk + jj]] = jj;
      auto keep_at = [&](int i, int j) { return keep[(qrow0 + i) * Nk + pos[j]]; };
      if (dropout) {
        for (int i = 0; i < Nq; ++i)
          for (int j = 0; j < Nk; ++j) {
            if (!mask[b * Nk + j]) continue;
            const unsigned char got = keep_at(i, j);
            const bool want = attn_ref::keep(static_cast<uint64_t>(philox[0]), static_cast<uint32_t>(philox[1]),
                                             static_cast<uint32_t>(b * H + h), i, pos[j], p.drop_threshold);
            keep_wrong += got != static_cast<unsigned char>(want);
            kept += got == 1;
            ++visible_pairs;
          }
      }
      const attn_ref::Head r = attn_ref::head(
          Nq, Nk, D, scale, [&](int i, int d) { return at(q, qs, b, h, i, d); },
          [&](int j, int d) { return at(k, ks, b, h, j, d); }, [&](int j, int d) { return at(v, vs, b, h, j, d); },
          [&](int i, int d) { return to_d(dout[(qrow0 + i) * D + d]); }, [&](int j) { return mask[b * Nk + j] != 0; },
          [&](int i, int j) { return !dropout ? 1.0 : keep_at(i, j) == 1 ? 1.0 / (1.0 - cs.dropout) : 0.0; });
      for (int i = 0; i < Nq; ++i) {
        for (int d = 0; d < D; ++d) {
          const double got = to_d(o[(qrow0 + i) * D + d]), gq = to_d(dq[(qrow0 + i) * D + d]);
          finite = finite && std::isfinite(got) && std::isfinite(gq);
          err_o = std::max(err_o, std::fabs(got - r.o[i * D + d]));
          err_dq = std::max(err_dq, std::fabs(gq - r.dq[i * D + d]));
        }
        finite = finite && std::isfinite(lse[qrow0 + i]);
        err_lse = std::max(err_lse, std::fabs(lse[qrow0 + i] - r.lse[i]));
      }
      for (int j = 0; j < Nk; ++j)
        for (int d = 0; d < D; ++d) {
          const double gk = to_d(dk[(krow0 + j) * D + d]), gv = to_d(dv[(krow0 + j) * D + d]);
          finite = finite && std::isfinite(gk) && std::isfinite(gv);
          err_dk = std::max(err_dk, std::fabs(gk - r.dk[j * D + d]));
          err_dv = std::max(err_dv, std::fabs(gv - r.dv[j * D + d]));
        }
    }
  }
  const bool is_half = std::is_same_v<T, __half>;
  const double tol = is_half ? 1e-2 : 6e-2;  // gradients are O(1) here
  const bool ok = finite && err_o < tol && err_lse < 1e-3 && err_dq < tol && err_dk < tol && err_dv < tol &&
                  keep_wrong == 0;
  std::printf("%s %-4s D=%3d B=%d H=%d Nq=%3d Nk=%3d dens=%5.2f fused=%d odd=%d empty=%d vec=%d scale=%+.2f "
              "drop=%.2f | o %.2e lse %.2e dq %.2e dk %.2e dv %.2e finite=%d",
              ok ? "ok  " : "FAIL", is_half ? "fp16" : "bf16", D, B, H, Nq, Nk, cs.density, cs.fused_qkv,
              cs.odd_stride, cs.empty_sample, p.vec_ok, cs.scale_mul, cs.dropout, err_o, err_lse, err_dq, err_dk,
              err_dv, finite);
  if (dropout) {
    std::printf(" kept %.3f wrong-bits %ld", visible_pairs ? double(kept) / visible_pairs : 0.0, keep_wrong);
  }
  std::printf("\n");
  return ok;
}

template <typename T>
bool run_d(const Case& c, std::mt19937& rng) {
  switch (c.D) {
    case 32: return run_case<T, 32>(c, rng);
    case 64: return run_case<T, 64>(c, rng);
    case 80: return run_case<T, 80>(c, rng);
    case 96: return run_case<T, 96>(c, rng);
    case 128: return run_case<T, 128>(c, rng);
  }
  return false;
}

int main(int argc, char** argv) {
  emu::configure();
  if (const char* s = std::getenv("DJEPA_EMU_BWD_OFFSET")) {
    g_bwd_offset_slack = std::atoi(s);
    std::printf("planted: backward Philox offset + %d\n", g_bwd_offset_slack);
  }
  if (!attn_ref::philox_known_answers()) {
    std::printf("FAIL Philox-4x32-10 reference does not give Random123's known answers\nSOME FAILED\n");
    return 1;
  }
  std::mt19937 rng(argc > 1 ? std::atoi(argv[1]) : 1234);
  const Case cases[] = {
      {1, 1, 1, 1, 64, -1.0, false, false, false},
      {2, 2, 70, 90, 64, 0.3, true, false, true},
      {1, 2, 130, 33, 32, 0.6, false, false, false},
      {2, 1, 17, 150, 80, 0.25, true, false, false},
      {1, 1, 65, 65, 96, -1.0, false, true, false},
      {2, 1, 40, 70, 128, 0.5, false, true, true},
      // cp.async at D=128 over several key tiles (fwd 3, dq 5) and query tiles (dkdv 4)
      {1, 1, 100, 200, 128, 0.7, true, false, false},
      // a negative scale (the softmax tracks the min of the raw scores), dense, 3 key tiles
      {1, 2, 33, 140, 96, -1.0, false, false, false, -1.0},
      // no key at all: zeros, lse 0, zero dq (dk/dv are empty)
      {2, 1, 9, 0, 64, 0.5, false, false, false},
      // dropout: masked, several key tiles, odd Nq/Nk, an empty sample (9); dense D=128, fused
      // views (10); D=80, cp.async off (11); a negative scale at D=32 (12)
      {2, 2, 45, 70, 64, 0.5, false, false, true, 1.0, 0.3},
      {1, 1, 40, 70, 128, -1.0, true, false, false, 1.0, 0.1},
      {1, 2, 33, 40, 80, 0.7, false, true, false, 1.0, 0.5},
      {1, 1, 20, 50, 32, -1.0, false, false, false, -1.0, 0.2},
  };
  // Optional second argument: the case numbers to run ("6" or "1,6"), default all.
  std::vector<bool> chosen(sizeof(cases) / sizeof(cases[0]), argc <= 2);
  for (const char* s = argc > 2 ? argv[2] : ""; *s; ++s)
    if (std::isdigit(static_cast<unsigned char>(*s))) {
      const int i = std::atoi(s);
      if (i >= 0 && i < static_cast<int>(chosen.size())) chosen[i] = true;
      while (std::isdigit(static_cast<unsigned char>(s[1]))) ++s;
    }
  bool all = true;
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (!chosen[i]) continue;
    const Case& c = cases[i];
    all = run_d<__half>(c, rng) && all;
    all = run_d<__nv_bfloat16>(c, rng) && all;
  }
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
