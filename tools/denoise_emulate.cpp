// CPU check of the CUDA denoising-MLP kernels (csrc/denoise_kernels.cuh) without a GPU.
//
// The exact kernel code runs through tools/cuda_emulate.h (one std::thread per CUDA thread;
// mma.sync, ldmatrix, cp.async with zero fill, shuffles and barriers emulated). Every template
// variant the launcher can pick is run: LayerNorm-modulate forward/backward for each vector
// width and register-chunk bound that fits the width, the GEMM for the four transpose layouts x
// five epilogues, on the cp.async path and on the scalar path, and the step update with and
// without CFG, noise and the low-precision copy. Outputs are poisoned (NaN) and compared with a
// float64 reference computed from the same rounded inputs.
//
//   g++ -std=c++17 -O1 -pthread -DDJEPA_DENOISE_EMULATE -I/usr/local/cuda/include -I csrc \
//       tools/denoise_emulate.cpp -o /tmp/denoise_emulate && /tmp/denoise_emulate [seed [ln|update|gemm|pipeline]]
//
// Prints one "ok"/"FAIL" line per check and ALL OK (exit 0) or SOME FAILED (exit 1); tests/
// test_emulators.py runs it. cp.async copies land only when their group is waited for (see
// tools/cuda_emulate.h), so the stage ring's wait_group accounting is checked. Not covered here
// (GPU only): the host code of csrc/denoise.cu (argument checks, variant choice,
// cudaFuncSetAttribute; split_k_for is shared with the emulator), hardware accumulation order in
// mma, __expf/rsqrtf approximations, and performance.
#include "cuda_emulate.h"

#include <cmath>
#include <string>

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

namespace djepa {
namespace denoise {

extern unsigned char smem_raw[];
extern float red[];

using emu::cp_async16;
using emu::cp_async_commit;
using emu::cp_async_wait;
template <bool TRANS>
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  if constexpr (TRANS) emu::ldmatrix_x4_trans(r, p);
  else emu::ldmatrix_x4(r, p);
}
template <typename T>
inline void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  emu::mma16816<T>(d, a, b0, b1);
}

}  // namespace denoise
}  // namespace djepa

#include "denoise_kernels.cuh"

namespace djepa {
namespace denoise {
alignas(128) unsigned char smem_raw[kGemmSmem];
alignas(16) float red[2 * 32 * 8 * kLnMaxChunks];
}  // namespace denoise
}  // namespace djepa

using namespace djepa;
using namespace djepa::denoise;

template <typename T>
const char* name() {
  if constexpr (std::is_same_v<T, __half>) return "fp16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  else return "fp32";
}
template <typename T>
double rel_tol() {  // rounding of one output element
  if constexpr (std::is_same_v<T, __half>) return 2e-3;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 1.6e-2;
  else return 2e-5;
}
template <typename T>
T cast(double v) { return from_f<T>(static_cast<float>(v)); }
template <typename T>
double val(T v) { return to_f(v); }

template <typename T>
std::vector<T> random_vec(size_t n, std::mt19937& rng, double scale = 1.0, double shift = 0.0) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = cast<T>(shift + scale * normal(rng));
  return v;
}

struct Err {
  double max_err = 0, max_ref = 0;
  bool finite = true;
  void add(double got, double ref) {
    finite = finite && std::isfinite(got);
    max_err = std::max(max_err, std::fabs(got - ref));
    max_ref = std::max(max_ref, std::fabs(ref));
  }
  bool ok(double rel, double abs_tol = 1e-6) const { return finite && max_err <= rel * max_ref + abs_tol; }
};

bool report(bool ok, const std::string& what, const Err& e) {
  std::printf("%s %-58s max err %.3e (max |ref| %.3e)%s\n", ok ? "ok  " : "FAIL", what.c_str(), e.max_err,
              e.max_ref, e.finite ? "" : " NON-FINITE");
  return ok;
}

// ------------------------------------------------------------------------ LayerNorm + modulate
template <typename T, int VEC, int NC>
bool ln_case(int M, int W, bool affine, std::mt19937& rng) {
  const int nch = (W + 32 * VEC - 1) / (32 * VEC);
  if (W % VEC || (NC > 0 && nch > NC)) return true;  // the launcher never picks this variant
  const float eps = 1e-6f;
  auto x = random_vec<T>(size_t(M) * W, rng, 1.5, 0.3);
  auto mod = random_vec<T>(size_t(M) * 3 * W, rng, 0.5);
  auto lw = random_vec<T>(W, rng, 0.2, 1.0), lb = random_vec<T>(W, rng, 0.2);
  auto dh = random_vec<T>(size_t(M) * W, rng);
  const T* w = affine ? lw.data() : nullptr;
  const T* b = affine ? lb.data() : nullptr;
  std::vector<T> h(size_t(M) * W, cast<T>(NAN)), dx(h), dmod(size_t(M) * 3 * W, cast<T>(NAN));
  std::vector<float> stats(2 * size_t(M), NAN);
  const int blocks_b = (M + kLnBwdRows - 1) / kLnBwdRows;
  std::vector<float> dwp(size_t(blocks_b) * W, NAN), dbp(dwp);

  run_grid(dim3((M + kLnWarps - 1) / kLnWarps), kLnWarps * 32, red, sizeof(red), [&] {
    adaln_fwd_kernel<T, VEC, NC>(x.data(), mod.data(), w, b, h.data(), stats.data(), M, W, 3 * int64_t(W), eps);
  });
  run_grid(dim3(blocks_b), kLnWarps * 32, red, sizeof(red), [&] {
    adaln_bwd_kernel<T, VEC, NC>(x.data(), mod.data(), w, b, stats.data(), dh.data(), dx.data(), dmod.data(),
                                 affine ? dwp.data() : nullptr, affine ? dbp.data() : nullptr, M, W);
  });

  Err eh, ex, ed, ew;
  std::vector<double> dw_ref(size_t(blocks_b) * W, 0.0), db_ref(dw_ref);
  for (int r = 0; r < M; ++r) {
    double mean = 0, var = 0;
    for (int c = 0; c < W; ++c) mean += val(x[size_t(r) * W + c]);
    mean /= W;
    for (int c = 0; c < W; ++c) var += std::pow(val(x[size_t(r) * W + c]) - mean, 2);
    const double rstd = 1.0 / std::sqrt(var / W + eps);
    double m1 = 0, m2 = 0;
    std::vector<double> xh(W), dxh(W);
    for (int c = 0; c < W; ++c) {
      const size_t i = size_t(r) * W + c, im = size_t(r) * 3 * W + c;
      const double wc = affine ? val(lw[c]) : 1.0, bc = affine ? val(lb[c]) : 0.0;
      const double sh = val(mod[im]), sc = val(mod[im + W]), g = val(dh[i]);
      xh[c] = (val(x[i]) - mean) * rstd;
      eh.add(val(h[i]), (xh[c] * wc + bc) * (1 + sc) + sh);
      ed.add(val(dmod[im]), g);
      ed.add(val(dmod[im + W]), g * (xh[c] * wc + bc));
      const double dn = g * (1 + sc);
      dw_ref[size_t(r / kLnBwdRows) * W + c] += dn * xh[c];
      db_ref[size_t(r / kLnBwdRows) * W + c] += dn;
      dxh[c] = dn * wc;
      m1 += dxh[c];
      m2 += dxh[c] * xh[c];
    }
    m1 /= W;
    m2 /= W;
    for (int c = 0; c < W; ++c) ex.add(val(dx[size_t(r) * W + c]), rstd * (dxh[c] - m1 - xh[c] * m2));
    for (int c = 0; c < W; ++c) {  // the gate third of dmod is not this kernel's: left untouched
      const double untouched = val(dmod[size_t(r) * 3 * W + 2 * W + c]);
      if (!std::isnan(untouched)) ed.finite = false;
    }
  }
  if (affine)
    for (size_t i = 0; i < dw_ref.size(); ++i) {
      ew.add(dwp[i], dw_ref[i]);
      ew.add(dbp[i], db_ref[i]);
    }
  char what[160];
  std::snprintf(what, sizeof(what), "%s VEC=%d NC=%d M=%d W=%d affine=%d", name<T>(), VEC, NC, M, W, affine);
  const double tol = rel_tol<T>() * 2;
  bool ok = report(eh.ok(tol), std::string("ln fwd  ") + what, eh);
  ok = report(ex.ok(tol * 4, 1e-4), std::string("ln bwd dx ") + what, ex) && ok;
  ok = report(ed.ok(tol), std::string("ln bwd dmod ") + what, ed) && ok;
  if (affine) ok = report(ew.ok(1e-5, 1e-4), std::string("ln bwd dw/db ") + what, ew) && ok;
  return ok;
}

template <typename T>
bool ln_all(std::mt19937& rng) {
  constexpr int V = vec_width<T>();
  bool ok = true;
  // 1024, 1280, 1536: the B/L/H widths (the launcher picks NC = 4, 6, 6 for 16-bit types, i.e.
  // every register-chunk bound it has: 1, 2, 4, 6, kLnMaxChunks, 0 all run below where they fit).
  for (int W : {48, 64, 1000, 37, 320, 1024, 1280, 1536}) {
    for (bool affine : {true, false}) {
      if (W >= 1024 && !affine) continue;  // the model widths: affine only (no-affine runs above)
      const int M = (W == 1000) ? 70 : 67;  // two backward blocks, the second partial
      ok = ln_case<T, V, 1>(M, W, affine, rng) && ok;
      ok = ln_case<T, V, 2>(M, W, affine, rng) && ok;
      ok = ln_case<T, V, 4>(M, W, affine, rng) && ok;
      ok = ln_case<T, V, 6>(M, W, affine, rng) && ok;
      ok = ln_case<T, V, kLnMaxChunks>(M, W, affine, rng) && ok;
      ok = ln_case<T, V, 0>(M, W, affine, rng) && ok;
      ok = ln_case<T, 1, kLnMaxChunks>(M, W, affine, rng) && ok;
      ok = ln_case<T, 1, 0>(M, W, affine, rng) && ok;
    }
  }
  return ok;
}

// ------------------------------------------------------------------------------------- GEMM
// sms > 0: split K as csrc/denoise.cu would on a GPU with that many SMs (split_k_for).
template <typename T>
bool gemm_case(int M, int N, int K, bool a_trans, bool b_trans, int epilogue, bool with_bias, std::mt19937& rng,
               int sms = 0) {
  const int ep = epilogue & 15;
  const bool f32 = (epilogue & kEpF32) != 0;
  // A is [M, K] (or [K, M] when a_trans), B is [N, K] when b_trans (nn.Linear weight), else [K, N].
  auto A = random_vec<T>(size_t(M) * K, rng, 0.5), B = random_vec<T>(size_t(N) * K, rng, 0.5);
  auto bias = random_vec<T>(N, rng, 0.3);
  const int64_t aux2_ld = 3 * int64_t(N) + 1;
  auto aux1 = random_vec<T>(size_t(M) * N, rng), aux2 = random_vec<T>(size_t(M) * aux2_ld, rng);
  const size_t nout = size_t(M) * N;
  std::vector<T> c_t(nout, cast<T>(NAN)), aux_t(nout, cast<T>(NAN));
  std::vector<float> c_f(nout, NAN), aux_f(nout, NAN);
  GemmParams p{};
  p.a = A.data();
  p.b = B.data();
  p.c = f32 ? static_cast<void*>(c_f.data()) : static_cast<void*>(c_t.data());
  p.bias = with_bias ? bias.data() : nullptr;
  p.aux1 = (ep == kEpGate || ep == kEpSiluBwd) ? aux1.data() : nullptr;
  p.aux2 = ep == kEpGate ? aux2.data() : nullptr;
  const bool save = ep == kEpSilu || ep == kEpGate;
  p.aux_out = save ? (f32 ? static_cast<void*>(aux_f.data()) : static_cast<void*>(aux_t.data())) : nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.aux2_ld = aux2_ld;
  p.epilogue = epilogue;
  // As the host launcher decides (csrc/denoise.cu gemm()).
  const int out_bytes = f32 ? 4 : 2;
  auto addr = [](const void* q) { return reinterpret_cast<std::uintptr_t>(q); };
  p.a_fast = aligned16(addr(p.a)) && (a_trans ? M : K) % 8 == 0;
  p.b_fast = aligned16(addr(p.b)) && (b_trans ? K : N) % 8 == 0;
  p.pair_ok = N % 2 == 0 && addr(p.c) % (2 * out_bytes) == 0 && addr(p.aux_out) % (2 * out_bytes) == 0 &&
              addr(p.aux1) % 4 == 0 && addr(p.bias) % 4 == 0;
  p.splits = sms > 0 ? split_k_for(M, N, K, epilogue, with_bias, sms) : 1;
  const int ktiles = (K + kBK - 1) / kBK;
  p.ktiles_per_split = p.splits > 1 ? (ktiles + p.splits - 1) / p.splits : 0;
  std::vector<float> ws(size_t(std::max(p.splits - 1, 0)) * nout, NAN);
  p.workspace = ws.data();
  if (sms > 0 && p.splits < 2) {
    std::printf("FAIL gemm M=%d N=%d K=%d sms=%d: split_k_for chose no split\n", M, N, K, sms);
    return false;
  }
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM, p.splits);
  auto body = [&] {
    if (!a_trans && b_trans) gemm_kernel<T, true, true>(p);
    else if (!a_trans && !b_trans) gemm_kernel<T, true, false>(p);
    else if (a_trans && !b_trans) gemm_kernel<T, false, false>(p);
    else gemm_kernel<T, false, true>(p);
  };
  run_grid(grid, kGemmThreads, smem_raw, sizeof(smem_raw), body);
  if (p.splits > 1) {  // as launch_gemm: the in-order reduction of the partial products
    const int64_t n = int64_t(M) * N;
    const bool vec = n % 4 == 0;
    run_grid(dim3(3), 256, red, sizeof(red),
             [&] { splitk_reduce_kernel(c_f.data(), ws.data(), n, p.splits - 1, vec); });
  }

  Err ec, ea;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      double y = with_bias ? val(bias[j]) : 0.0;
      for (int k = 0; k < K; ++k) {
        const double a = val(a_trans ? A[size_t(k) * M + i] : A[size_t(i) * K + k]);
        const double b = val(b_trans ? B[size_t(j) * K + k] : B[size_t(k) * N + j]);
        y += a * b;
      }
      const size_t idx = size_t(i) * N + j;
      double o = y;
      if (ep == kEpSilu) {
        o = y / (1 + std::exp(-y));
      } else if (ep == kEpGate) {
        o = val(aux1[idx]) + val(aux2[size_t(i) * aux2_ld + j]) * y;
      } else if (ep == kEpSiluBwd) {
        const double pre = val(aux1[idx]), s = 1 / (1 + std::exp(-pre));
        o = y * s * (1 + pre * (1 - s));
      }
      ec.add(f32 ? c_f[idx] : val(c_t[idx]), o);
      if (save) ea.add(f32 ? aux_f[idx] : val(aux_t[idx]), y);
    }
  }
  char what[160];
  std::snprintf(what, sizeof(what), "gemm %s M=%d N=%d K=%d a_t=%d b_t=%d ep=%d bias=%d fast=%d%d pair=%d split=%d",
                name<T>(), M, N, K, a_trans, b_trans, epilogue, with_bias, p.a_fast, p.b_fast, p.pair_ok,
                p.splits);
  const double tol = (f32 ? 1e-5 : rel_tol<T>()) + 1e-5;
  bool ok = report(ec.ok(tol, 1e-4), what, ec);
  if (save) ok = report(ea.ok(tol, 1e-4), std::string(what) + " aux_out", ea) && ok;
  return ok;
}

template <typename T>
bool gemm_all(std::mt19937& rng) {
  bool ok = true;
  struct Size { int M, N, K; };
  // cp.async path with a K tail and partial tiles; scalar path (odd extents); K < one k-tile.
  const Size sizes[] = {{136, 144, 80}, {77, 45, 37}, {19, 130, 8}};
  for (const Size& s : sizes)
    for (int layout = 0; layout < 4; ++layout)
      for (int epilogue : {int(kEpNone), int(kEpSilu), int(kEpGate), int(kEpSiluBwd), int(kEpF32)})
        ok = gemm_case<T>(s.M, s.N, s.K, layout & 1, layout >> 1, epilogue, epilogue != kEpSiluBwd, rng) && ok;
  // K of 5 and more k-tiles: only then does the main loop refill the stage ring (kStages = 4);
  // with at most 3 k-tiles the prologue loads every tile and the refill path never runs.
  const Size deep[] = {{40, 24, 200}, {33, 20, 171}};  // cp.async path; scalar path
  for (const Size& s : deep)
    for (int layout = 0; layout < 4; ++layout)
      for (int epilogue : {int(kEpNone), int(kEpGate) | int(kEpF32)})
        ok = gemm_case<T>(s.M, s.N, s.K, layout & 1, layout >> 1, epilogue, true, rng) && ok;
  // Split-K (float32 weight gradients, dW = dY^T X: a_t=1): 4 splits of 32 k-tiles on one
  // output tile, 2 splits of 19 over two tiles (cp.async path), an odd K on the scalar path.
  ok = gemm_case<T>(72, 80, 1000, true, false, int(kEpF32), false, rng, 2) && ok;
  ok = gemm_case<T>(72, 80, 1000, false, true, int(kEpF32), false, rng, 2) && ok;
  ok = gemm_case<T>(130, 72, 600, true, false, int(kEpF32), false, rng, 16) && ok;
  ok = gemm_case<T>(66, 130, 611, true, false, int(kEpF32), false, rng, 16) && ok;
  return ok;
}

// -------------------------------------------------------------------------- denoise_update
template <typename T>
bool update_case(int B, int C, int64_t ld, bool cfg, bool noisy, bool xin_copy, std::mt19937& rng) {
  const int rows = cfg ? 2 * B : B;
  auto x = random_vec<float>(size_t(B) * C, rng);
  auto mo = random_vec<T>(size_t(rows) * ld, rng);
  for (auto& v : mo) v = cast<T>(std::tanh(val(v)));  // variance values live in [-1, 1]
  auto noise = random_vec<float>(size_t(B) * C, rng);
  std::vector<float> out(size_t(B) * C, NAN);
  std::vector<T> xin(size_t(rows) * C, cast<T>(NAN));
  UpdateParams p{};
  p.x = x.data();
  p.model_out = mo.data();
  p.noise = noisy ? noise.data() : nullptr;
  p.out = out.data();
  p.xin_out = xin_copy ? xin.data() : nullptr;
  p.B = B;
  p.ld = ld;
  p.C = C;
  p.cfg = cfg;
  const float scale = 2.5f;  // read through a pointer, as from the device
  p.cfg_scale = cfg ? &scale : nullptr;
  p.coef_x = 1.01f;
  p.coef_eps = 0.05f;
  p.min_log = -7.f;
  p.max_log = -4.f;
  p.noise_scale = noisy ? 0.9f : 0.f;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((int64_t(B) * C + threads - 1) / threads, 3));  // grid-stride loop
  run_grid(dim3(blocks), threads, red, sizeof(red), [&] { denoise_update_kernel<T>(p); });
  Err e, ex;
  for (int r = 0; r < B; ++r)
    for (int j = 0; j < C; ++j) {
      double eps = val(mo[size_t(r) * ld + j]);
      if (cfg) {
        const double u = val(mo[size_t(r + B) * ld + j]);
        eps = u + 2.5 * (eps - u);
      }
      const double frac = (val(mo[size_t(r) * ld + C + j]) + 1) / 2;
      const double logvar = frac * -4.0 + (1 - frac) * -7.0;
      const size_t i = size_t(r) * C + j;
      double o = double(1.01f) * x[i] - double(0.05f) * eps;
      if (noisy) o += std::exp(0.5 * logvar) * double(0.9f) * noise[i];
      e.add(out[i], o);
      if (xin_copy) {
        ex.add(val(xin[i]), o);
        if (cfg) ex.add(val(xin[i + size_t(B) * C]), o);
      }
    }
  char what[160];
  std::snprintf(what, sizeof(what), "update %s B=%d C=%d ld=%lld cfg=%d noise=%d xin=%d", name<T>(), B, C,
                (long long)ld, cfg, noisy, xin_copy);
  bool ok = report(e.ok(2e-5, 1e-5), what, e);
  if (xin_copy) ok = report(ex.ok(rel_tol<T>(), 1e-5), std::string(what) + " xin", ex) && ok;
  return ok;
}

template <typename T>
bool update_all(std::mt19937& rng) {
  bool ok = true;
  for (bool cfg : {false, true})
    for (bool noisy : {false, true}) ok = update_case<T>(37, 16, cfg ? 40 : 32, cfg, noisy, noisy != cfg, rng) && ok;
  return ok;
}

int main(int argc, char** argv) {
  emu::configure();
  std::mt19937 rng(argc > 1 ? std::atoi(argv[1]) : 1234);
  // optional: ln | update | gemm | pipeline (the GEMMs that cycle the stage ring and split K)
  const std::string only = argc > 2 ? argv[2] : "";
  auto run = [&](const char* section) { return only.empty() || only == section; };
  bool all = true;
  if (run("ln")) {
    all = ln_all<__half>(rng) && all;
    all = ln_all<__nv_bfloat16>(rng) && all;
    all = ln_all<float>(rng) && all;
  }
  if (run("update")) {
    all = update_all<__half>(rng) && all;
    all = update_all<__nv_bfloat16>(rng) && all;
    all = update_all<float>(rng) && all;
  }
  if (run("gemm")) {
    all = gemm_all<__half>(rng) && all;
    all = gemm_all<__nv_bfloat16>(rng) && all;
  }
  if (only == "pipeline") {
    all = gemm_case<__half>(40, 24, 200, false, true, int(kEpNone), true, rng) && all;
    all = gemm_case<__half>(72, 80, 1000, true, false, int(kEpF32), false, rng, 2) && all;
  }
  std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
