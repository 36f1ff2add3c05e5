// CPU check of the sm_90a masked-attention kernels (csrc/hopper/attn_*.cuh) without a GPU.
//
// The exact kernels of one design (--design=pipelined, the default: attn_pipelined_*.cuh; or
// --design=baseline: attn_fwd_kernel.cuh / attn_bwd_kernel.cuh) run through tools/hopper_emulate.h
// (wgmma from its descriptors, TMA loads and stores from emulated 4-d tensor maps, cp.async gathers
// completing on mbarriers, and its rules: registers between wgmma issue and wait, wgmma.fence, stage
// reuse and proxy fences by happens-before, setmaxnreg, two CTAs at a time; one std::thread per CUDA
// thread) with the host plan
// of csrc/attention_sm90.cu (which streams TMA serves, which are gathered, which fall back to
// ordinary loads; how O leaves). Outputs are poisoned (NaN), shared memory is 0xFF, and results are
// compared with the float64 reference of
// tools/attention_reference.h on the same rounded inputs, over head dims 64 / 80 / 96 / 128,
// fp16 / bf16, dense and masked keys (densities, a sample without visible keys, all samples empty,
// a different count per sample), odd Nq != Nk, several key tiles (forward: 128 keys, the pipelined
// kernel's last tile 64 when at most 64 keys remain; backward: 64 keys / queries per streamed tile,
// the baseline's 32 at D >= 96) (the K / V ring wraps inside and across work items of a persistent
// CTA), fused-QKV strided views, strides that are not 16-byte aligned (fallback path) and an O that
// takes no TMA store.
//
//   g++ -std=c++17 -O2 -pthread -I/usr/local/cuda/include -I csrc -I tools \
//       tools/attention_sm90_emulate.cpp -o /tmp/attention_sm90_emulate && /tmp/attention_sm90_emulate \
//       [quick] [--design=pipelined|baseline] [--plant=n]
//
// "quick": one case per load path; --plant=n turns on a planted bug (csrc/hopper/ptx.cuh) and
// the run must then fail (it stops at the first failing case). Prints ok/FAIL per case and ALL OK
// (exit 0) or SOME FAILED (exit 1).
#include "hopper_emulate.h"

#include <cmath>
#include <string>

#include "attention_reference.h"
#include "hopper/attn_bwd_kernel.cuh"
#include "hopper/attn_fwd_kernel.cuh"
#include "hopper/attn_pipelined_bwd.cuh"
#include "hopper/attn_pipelined_fwd.cuh"

using namespace djepa::hopper;
using namespace djepa::hopper::attn;

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

constexpr int kEmuSms = 2;  // persistent grid of the emulated GPU: several items per CTA
int g_design = kDesignPipelined;

struct Case {
  int B, H, Nq, Nk, D;
  double density;     // < 0: dense (no kv_index)
  bool fused_qkv;     // q / k / v are views of one [B, N, 3, H, D] buffer
  bool odd_stride;    // token stride not a multiple of 8 elements (fallback path)
  bool empty_sample;  // sample 0 has no visible key
  bool o_unaligned = false;  // o 4-byte but not 16-byte aligned (the pipelined forward's register stores)
};

template <typename T, int D>
bool run_case(const Case& cs, std::mt19937& rng) {
  const int B = cs.B, H = cs.H, Nq = cs.Nq, Nk = cs.Nk;
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));

  auto make_input = [&](int N, int which, std::vector<T>& buf, long long (&st)[3]) -> const T* {
    long long tok = cs.fused_qkv ? 3LL * H * D : (long long)H * D;
    if (cs.odd_stride) tok += 3;
    st[0] = tok * N;
    st[1] = D;
    st[2] = tok;
    buf.assign(static_cast<size_t>(st[0]) * B + 3 * H * D + 16, to_t<T>(NAN));
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
  std::vector<int> kv_index(static_cast<size_t>(B) * Nk + 1), kv_count(B);
  for (int b = 0; b < B; ++b) {
    for (int n = 0; n < Nk; ++n) {
      mask[b * Nk + n] = cs.density < 0 ? 1 : (unif(rng) < cs.density);
      if (cs.empty_sample && b == 0) mask[b * Nk + n] = 0;
    }
    int pos = 0;
    for (int n = 0; n < Nk; ++n)
      if (mask[b * Nk + n]) kv_index[b * Nk + pos++] = n;
    kv_count[b] = pos;
    for (int n = 0; n < Nk; ++n)
      if (!mask[b * Nk + n]) kv_index[b * Nk + pos++] = n;
  }

  const size_t nq = static_cast<size_t>(B) * H * Nq, nk = static_cast<size_t>(B) * H * Nk;
  std::vector<T> obuf(nq * D + 8, to_t<T>(NAN)), dout(nq * D + 8), dq(nq * D, to_t<T>(NAN)), dk(nk * D + 1, to_t<T>(NAN)),
      dv(nk * D + 1, to_t<T>(NAN));
  T* const o_ptr = obuf.data() + (cs.o_unaligned ? 2 : 0);
  struct {
    T* ptr;
    T* data() const { return ptr; }
    T& operator[](size_t i) const { return ptr[i]; }
  } o{o_ptr};
  std::vector<float> lse(nq, NAN), delta(nq, NAN);
  for (auto& x : dout) x = to_t<T>(normal(rng));

  Params p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.o = o.data();
  p.lse = lse.data();
  p.kv_index = cs.density < 0 ? nullptr : kv_index.data();
  p.kv_count = cs.density < 0 ? nullptr : kv_count.data();
  p.B = B;
  p.H = H;
  p.Nq = Nq;
  p.Nk = Nk;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = qs[i];
    p.ks[i] = ks[i];
    p.vs[i] = vs[i];
  }
  normalize_strides(p.qs, B, H, Nq, D);
  normalize_strides(p.ks, B, H, Nk, D);
  normalize_strides(p.vs, B, H, Nk, D);
  auto a16 = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  bool vec_ok = a16(q) && a16(k) && a16(v);
  for (int i = 0; i < 3; ++i) vec_ok = vec_ok && p.qs[i] % 8 == 0 && p.ks[i] % 8 == 0 && p.vs[i] % 8 == 0;
  p.scale = scale;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  hemu::g_stats.reset();
  bool clean;
  if (g_design == kDesignPipelined) {
    alignas(64) pipe::Maps maps{};
    pipe::plan_fwd<D>(p, maps, hemu::encode_tiled, bf16, vec_ok, p.o_path);
    const int grid = std::max(1, std::min(p.items, kEmuSms));
    clean = hemu::launch(dim3(grid), kThreads, pipe::FwdPlan<D>::kSmemBytes,
                         [&] { attn_fwd_pipelined_sm90_kernel<T, D>(p, maps); });
  } else {
    alignas(64) Maps maps{};
    plan<D>(p, maps, hemu::encode_tiled, bf16, vec_ok);
    const int grid = std::max(1, std::min(p.items, kEmuSms));
    clean = hemu::launch(dim3(grid), kThreads, Chunks<D>::kSmemBytes, [&] { attn_fwd_sm90_kernel<T, D>(p, maps); });
  }
  const long boxes = hemu::g_stats.tma_boxes, copies = hemu::g_stats.cp_async, stores = hemu::g_stats.st_shared;
  const long tma_stores = hemu::g_stats.tma_stores;

  // Backward, as csrc/attention_sm90.cu runs it: delta, then dk/dv and dq with their own plans.
  Params pb = p;
  pb.dout = dout.data();
  pb.delta = delta.data();
  pb.dq = dq.data();
  pb.dk = dk.data();
  pb.dv = dv.data();
  bool bclean = hemu::launch(dim3(unsigned((nq + 7) / 8)), 256, 0, [&] {
    delta_sm90_kernel<T>(o.data(), dout.data(), delta.data(), static_cast<long long>(nq), D);
  });
  Params pk = pb, pq = pb;
  if (g_design == kDesignPipelined) {
    alignas(64) pipe::Maps mk{}, mq{};
    pipe::plan_bwd<D>(pk, mk, hemu::encode_tiled, bf16, vec_ok, true);
    pipe::plan_bwd<D>(pq, mq, hemu::encode_tiled, bf16, vec_ok, false);
    bclean = hemu::launch(dim3(std::max(1, std::min(pk.items, kEmuSms))), kThreads, pipe::BwdPlan<D>::kSmemBytes,
                          [&] { attn_dkdv_pipelined_sm90_kernel<T, D>(pk, mk); }) && bclean;
    bclean = hemu::launch(dim3(std::max(1, std::min(pq.items, kEmuSms))), kThreads, pipe::BwdPlan<D>::kSmemBytes,
                          [&] { attn_dq_pipelined_sm90_kernel<T, D>(pq, mq); }) && bclean;
  } else {
    alignas(64) Maps mk{}, mq{};
    plan_bwd<D>(pk, mk, hemu::encode_tiled, bf16, vec_ok, true);
    plan_bwd<D>(pq, mq, hemu::encode_tiled, bf16, vec_ok, false);
    bclean = hemu::launch(dim3(std::max(1, std::min(pk.items, kEmuSms))), kThreads, BwdShape<D>::kSmemBytes,
                          [&] { attn_dkdv_sm90_kernel<T, D>(pk, mk); }) && bclean;
    bclean = hemu::launch(dim3(std::max(1, std::min(pq.items, kEmuSms))), kThreads, BwdShape<D>::kSmemBytes,
                          [&] { attn_dq_sm90_kernel<T, D>(pq, mq); }) && bclean;
  }

  double err_o = 0, err_lse = 0, err_dq = 0, err_dk = 0, err_dv = 0;
  bool finite = true, bfinite = true;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t qrow0 = (static_cast<size_t>(b) * H + h) * Nq, krow0 = (static_cast<size_t>(b) * H + h) * Nk;
      const attn_ref::Head r = attn_ref::head(
          Nq, Nk, D, scale, [&](int i, int d) { return at(q, qs, b, h, i, d); },
          [&](int j, int d) { return at(k, ks, b, h, j, d); }, [&](int j, int d) { return at(v, vs, b, h, j, d); },
          [&](int i, int d) { return to_d(dout[(qrow0 + i) * D + d]); }, [&](int j) { return mask[b * Nk + j] != 0; },
          [](int, int) { return 1.0; });
      for (int i = 0; i < Nq; ++i) {
        for (int d = 0; d < D; ++d) {
          const double got = to_d(o[(qrow0 + i) * D + d]), gq = to_d(dq[(qrow0 + i) * D + d]);
          finite = finite && std::isfinite(got);
          bfinite = bfinite && std::isfinite(gq);
          err_o = std::max(err_o, std::fabs(got - r.o[i * D + d]));
          err_dq = std::max(err_dq, std::fabs(gq - r.dq[i * D + d]));
        }
        finite = finite && std::isfinite(lse[qrow0 + i]);
        err_lse = std::max(err_lse, std::fabs(lse[qrow0 + i] - r.lse[i]));
      }
      for (int j = 0; j < Nk; ++j)
        for (int d = 0; d < D; ++d) {
          const double gk = to_d(dk[(krow0 + j) * D + d]), gv = to_d(dv[(krow0 + j) * D + d]);
          bfinite = bfinite && std::isfinite(gk) && std::isfinite(gv);
          err_dk = std::max(err_dk, std::fabs(gk - r.dk[j * D + d]));
          err_dv = std::max(err_dv, std::fabs(gv - r.dv[j * D + d]));
        }
    }
  // The load paths the plan chose must be the ones that ran.
  const bool any_work = *std::max_element(kv_count.begin(), kv_count.end()) > 0 || cs.density < 0;
  const bool tma_used = p.q_path == kPathTma || p.kv_path == kPathTma;
  const bool gather_used = p.q_path == kPathGather || p.kv_path == kPathGather;
  const bool manual_used = p.q_path == kPathManual || p.kv_path == kPathManual;
  // The pipelined forward also stores O through TMA (o_path), with st.shared staging.
  const bool o_tma = g_design == kDesignPipelined && p.o_path == pipe::kOTma;
  const bool paths = !any_work || ((boxes > 0) == tma_used && (copies > 0) == gather_used &&
                                   (stores > 0) == (manual_used || o_tma) && (tma_stores > 0) == o_tma);
  const bool is_half = std::is_same_v<T, __half>;
  const double tol = is_half ? 1e-2 : 6e-2;
  const bool ok = clean && paths && finite && err_o < tol && err_lse < 2e-3;
  const char* design = g_design == kDesignPipelined ? "pipelined" : "baseline";
  std::printf("%s fwd %-9s %-4s D=%3d B=%d H=%d Nq=%3d Nk=%3d dens=%5.2f fused=%d odd=%d empty=%d paths q=%d kv=%d items=%d | "
              "o %.2e lse %.2e%s%s%s\n",
              ok ? "ok  " : "FAIL", design, is_half ? "fp16" : "bf16", D, B, H, Nq, Nk, cs.density, cs.fused_qkv,
              cs.odd_stride, cs.empty_sample, p.q_path, p.kv_path, p.items, err_o, err_lse, finite ? "" : " NON-FINITE",
              clean ? "" : " EMULATOR-ERRORS", paths ? "" : " WRONG-PATH");
  const bool bok = bclean && bfinite && err_dq < tol && err_dk < tol && err_dv < tol && !std::isnan(delta[0]);
  std::printf("%s bwd %-9s %-4s D=%3d B=%d H=%d Nq=%3d Nk=%3d dens=%5.2f fused=%d odd=%d empty=%d paths q=%d kv=%d do=%d | "
              "dq %.2e dk %.2e dv %.2e%s%s\n",
              bok ? "ok  " : "FAIL", design, is_half ? "fp16" : "bf16", D, B, H, Nq, Nk, cs.density, cs.fused_qkv,
              cs.odd_stride, cs.empty_sample, pk.q_path, pk.kv_path, pk.do_path, err_dq, err_dk, err_dv,
              bfinite ? "" : " NON-FINITE", bclean ? "" : " EMULATOR-ERRORS");
  std::fflush(stdout);
  return ok && bok;
}

template <typename T>
bool run_d(const Case& c, std::mt19937& rng) {
  switch (c.D) {
    case 64: return run_case<T, 64>(c, rng);
    case 80: return run_case<T, 80>(c, rng);
    case 96: return run_case<T, 96>(c, rng);
    case 128: return run_case<T, 128>(c, rng);
  }
  return false;
}

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "quick") quick = true;
    else if (a.rfind("--plant=", 0) == 0) g_plant = std::atoi(a.c_str() + 8);
    else if (a == "--design=baseline") g_design = kDesignBaseline;
    else if (a == "--design=pipelined") g_design = kDesignPipelined;
    else {
      std::printf("unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (g_plant != kPlantNone) std::printf("planted bug %d: this run must fail\n", g_plant);
  std::mt19937 rng(1234);
  const Case quick_cases[] = {
      {1, 2, 130, 150, 64, -1.0, false, false, false},  // dense: TMA, 2 key tiles, 2 items
      {2, 1, 70, 200, 80, 0.6, true, false, true},      // masked: cp.async gather, fused QKV views
      {1, 1, 40, 90, 96, 0.5, false, true, false},      // odd token stride: ordinary loads
      {2, 1, 256, 256, 64, 0.25, false, false, false},  // D-JEPA: gathered K/V, TMA Q / dO, 2 items per CTA
  };
  // The pipelined kernels' own shapes (also run before the shared cases below).
  const Case pipelined_cases[] = {
      {1, 1, 100, 384, 128, -1.0, false, false, false},  // 3 full key tiles: the pipelined main loop
      {3, 1, 70, 450, 80, 0.7, false, false, false},     // ~315 keys per sample, each its own count
      {1, 2, 64, 192, 96, -1.0, false, false, false},    // 128 + a 64-key half tile; one warpgroup's rows
      {1, 1, 129, 65, 64, -1.0, false, false, false, true},  // a 65-key tile; O by register stores
  };
  const Case cases[] = {
      {1, 2, 130, 150, 64, -1.0, false, false, false},
      {1, 1, 200, 77, 128, -1.0, true, false, false},
      {2, 2, 70, 90, 64, 0.3, true, false, true},
      {2, 1, 17, 300, 80, 0.6, true, false, false},   // 2-3 key tiles per item, ring wraps
      {1, 2, 65, 129, 96, 0.9, false, false, false},
      {2, 1, 40, 70, 128, 0.5, false, true, true},    // fallback path
      {1, 1, 33, 45, 80, -1.0, false, true, false},   // dense, fallback path
      {2, 1, 256, 256, 64, 0.25, false, false, false},  // D-JEPA shape: 25% visible
      {2, 1, 20, 40, 64, 0.0, false, false, false},   // no sample has a visible key
      {1, 1, 1, 1, 128, -1.0, false, false, false},
  };
  // With a planted bug the first failing case settles it.
  bool all = true;
  const auto done = [&] { return g_plant != kPlantNone && !all; };
  if (quick) {
    for (const Case& c : quick_cases)
      if (!done()) all = run_d<__nv_bfloat16>(c, rng) && all;
  } else {
    if (g_design == kDesignPipelined)
      for (const Case& c : pipelined_cases) {
        if (!done()) all = run_d<__half>(c, rng) && all;
        if (!done()) all = run_d<__nv_bfloat16>(c, rng) && all;
      }
    for (const Case& c : cases) {
      if (!done()) all = run_d<__half>(c, rng) && all;
      if (!done()) all = run_d<__nv_bfloat16>(c, rng) && all;
    }
  }
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
