// Kernels of the denoising MLP (MAR's SimpleMLPAdaLN) and of one reverse-diffusion step.
//
//  * adaln_modulate_fwd / _bwd: LayerNorm + AdaLN modulation, one row per warp, fp32 math,
//    16-byte vector loads; the backward writes deterministic per-block partial sums of the
//    LayerNorm weight/bias gradients (fixed summation order, no atomics).
//  * gemm: tensor-core GEMM (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), 128x128x32
//    tiles, 8 warps of 64x32, a 4-stage cp.async pipeline, XOR-swizzled shared memory read with
//    ldmatrix (.trans for operands stored MN-major), fused epilogues (bias, SiLU, gate+residual,
//    SiLU backward, float32 output). Any M, N, K: tiles are masked; the cp.async fast path needs
//    an operand's contiguous extent to be a multiple of 8 and its pointer 16-byte aligned,
//    otherwise that operand is staged with scalar loads (correct, slower). Weight gradients
//    (float32 out, no epilogue) can split K over gridDim.z (gemm_splits picks the count from the
//    GPU's SMs) with a deterministic in-order reduction of the partial products.
//  * denoise_update: the elementwise tail of one reverse step (CFG mix, x0/posterior mean,
//    learned-range variance, temperature-scaled noise).
//
// The Python side (djepa/ops/denoise.py) documents the contract; all pointers are integers.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.h"
#include "denoise_kernels.cuh"

namespace djepa {
namespace {

using namespace denoise;

struct LnArgs {
  std::uintptr_t x, mod, ln_w, ln_b, h, stats, dh, dx, dmod, dw, db;
  int M, W;
  int64_t mod_ld;
  float eps;
  cudaStream_t stream;
};

template <typename T, int VEC, int NC>
void launch_ln(bool backward, const LnArgs& a) {
  if (!backward) {
    const int grid = (a.M + kLnWarps - 1) / kLnWarps;
    adaln_fwd_kernel<T, VEC, NC><<<grid, kLnWarps * 32, 0, a.stream>>>(
        as_ptr<const T>(a.x), as_ptr<const T>(a.mod), as_ptr<const T>(a.ln_w),
        as_ptr<const T>(a.ln_b), as_ptr<T>(a.h), as_ptr<float>(a.stats), a.M, a.W, a.mod_ld, a.eps);
    check_launch("adaln_modulate_fwd");
  } else {
    const int grid = (a.M + kLnBwdRows - 1) / kLnBwdRows;
    const size_t smem = (NC > 0 && a.dw) ? 2 * size_t(a.W) * sizeof(float) : 0;
    // At most 2 * 32 * 8 * 8 floats (16 KiB): below the default dynamic shared memory limit.
    adaln_bwd_kernel<T, VEC, NC><<<grid, kLnWarps * 32, smem, a.stream>>>(
        as_ptr<const T>(a.x), as_ptr<const T>(a.mod), as_ptr<const T>(a.ln_w),
        as_ptr<const T>(a.ln_b), as_ptr<const float>(a.stats), as_ptr<const T>(a.dh),
        as_ptr<T>(a.dx), as_ptr<T>(a.dmod), as_ptr<float>(a.dw), as_ptr<float>(a.db), a.M, a.W);
    check_launch("adaln_modulate_bwd");
  }
}

template <typename T>
void dispatch_ln(bool backward, const LnArgs& a, bool vec_ok) {
  constexpr int V = vec_width<T>();
  if (vec_ok && a.W % V == 0) {
    const int nch = (a.W + 32 * V - 1) / (32 * V);
    if (nch <= 1) return launch_ln<T, V, 1>(backward, a);
    if (nch <= 2) return launch_ln<T, V, 2>(backward, a);
    if (nch <= 4) return launch_ln<T, V, 4>(backward, a);
    if (nch <= 6) return launch_ln<T, V, 6>(backward, a);
    if (nch <= kLnMaxChunks) return launch_ln<T, V, kLnMaxChunks>(backward, a);
    return launch_ln<T, V, 0>(backward, a);
  }
  // Scalar path: W not a multiple of the vector width, or misaligned pointers.
  if (a.W <= 32 * kLnMaxChunks) return launch_ln<T, 1, kLnMaxChunks>(backward, a);
  return launch_ln<T, 1, 0>(backward, a);
}

void check_sizes(const char* what, int64_t M, int64_t W) {
  if (M < 0 || W <= 0 || M > INT_MAX || W > INT_MAX) {
    throw std::invalid_argument(std::string("djepa._C.") + what + ": bad sizes M=" +
                                std::to_string(M) + ", W=" + std::to_string(W));
  }
}

void require_ptr(const char* what, const char* name, std::uintptr_t p) {
  if (p == 0) {
    throw std::invalid_argument(std::string("djepa._C.") + what + ": " + name + " is required");
  }
}

void adaln_modulate_fwd(std::uintptr_t x, std::uintptr_t mod, std::uintptr_t ln_w,
                        std::uintptr_t ln_b, std::uintptr_t h, std::uintptr_t stats, int64_t M,
                        int64_t W, double eps, int dtype, std::uintptr_t stream, int64_t mod_ld) {
  const char* what = "adaln_modulate_fwd";
  const int devices = require_device(what);
  check_sizes(what, M, W);
  if (mod_ld == 0) mod_ld = 3 * W;
  if (mod_ld < 2 * W) {
    throw std::invalid_argument(std::string("djepa._C.") + what + ": mod_ld=" +
                                std::to_string(mod_ld) + " < 2*W");
  }
  if (M == 0) return;
  require_ptr(what, "x", x);
  require_ptr(what, "mod", mod);
  require_ptr(what, "h", h);
  LnArgs a{x, mod, ln_w, ln_b, h, stats, 0, 0, 0, 0, 0, int(M), int(W), mod_ld, float(eps),
           as_stream(stream)};
  DeviceGuard guard(reinterpret_cast<const void*>(x), devices, what);
  auto vec_ok = [&](int V) {
    return aligned16(x) && aligned16(mod) && aligned16(h) && aligned16(ln_w) && aligned16(ln_b) &&
           mod_ld % V == 0;
  };
  switch (dtype) {
    case kFloat16: return dispatch_ln<__half>(false, a, vec_ok(vec_width<__half>()));
    case kBFloat16: return dispatch_ln<__nv_bfloat16>(false, a, vec_ok(vec_width<__nv_bfloat16>()));
    case kFloat32: return dispatch_ln<float>(false, a, vec_ok(vec_width<float>()));
    default: unsupported_dtype(what, dtype);
  }
}

int adaln_rows_per_block() { return kLnBwdRows; }

void adaln_modulate_bwd(std::uintptr_t x, std::uintptr_t mod, std::uintptr_t ln_w,
                        std::uintptr_t ln_b, std::uintptr_t stats, std::uintptr_t dh,
                        std::uintptr_t dx, std::uintptr_t dmod, std::uintptr_t dln_w_partial,
                        std::uintptr_t dln_b_partial, int64_t M, int64_t W, int dtype,
                        std::uintptr_t stream) {
  const char* what = "adaln_modulate_bwd";
  const int devices = require_device(what);
  check_sizes(what, M, W);
  if (M == 0) return;
  for (auto [name, p] : {std::pair<const char*, std::uintptr_t>{"x", x}, {"mod", mod},
                         {"stats", stats}, {"dh", dh}, {"dx", dx}, {"dmod", dmod}}) {
    require_ptr(what, name, p);
  }
  // Partials are only meaningful with an affine LayerNorm; without ln_w they are skipped.
  const std::uintptr_t dw = ln_w ? dln_w_partial : 0;
  const std::uintptr_t db = ln_w ? dln_b_partial : 0;
  if (ln_w) require_ptr(what, "dln_w_partial", dw);
  LnArgs a{x, mod, ln_w, ln_b, 0, stats, dh, dx, dmod, dw, db, int(M), int(W), 3 * W, 0.f,
           as_stream(stream)};
  DeviceGuard guard(reinterpret_cast<const void*>(x), devices, what);
  auto vec_ok = [&](int) {
    return aligned16(x) && aligned16(mod) && aligned16(ln_w) && aligned16(ln_b) &&
           aligned16(dh) && aligned16(dx) && aligned16(dmod);
  };
  switch (dtype) {
    case kFloat16: return dispatch_ln<__half>(true, a, vec_ok(0));
    case kBFloat16: return dispatch_ln<__nv_bfloat16>(true, a, vec_ok(0));
    case kFloat32: return dispatch_ln<float>(true, a, vec_ok(0));
    default: unsupported_dtype(what, dtype);
  }
}


template <typename T>
void launch_gemm(const GemmParams& p, bool a_trans, bool b_trans, cudaStream_t stream) {
  auto pick = [&]() {
    if (!a_trans && b_trans) return gemm_kernel<T, true, true>;
    if (!a_trans && !b_trans) return gemm_kernel<T, true, false>;
    if (a_trans && !b_trans) return gemm_kernel<T, false, false>;
    return gemm_kernel<T, false, true>;
  };
  auto kernel = pick();
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kGemmSmem),
             "gemm (shared memory size)");
  dim3 grid((p.N + kBN - 1) / kBN, (p.M + kBM - 1) / kBM, p.splits);
  kernel<<<grid, kGemmThreads, kGemmSmem, stream>>>(p);
  check_launch("gemm");
  if (p.splits > 1) {
    const int64_t n = int64_t(p.M) * p.N;
    const bool vec = n % 4 == 0 && reinterpret_cast<std::uintptr_t>(p.c) % 16 == 0 &&
                     reinterpret_cast<std::uintptr_t>(p.workspace) % 16 == 0;
    const int64_t blocks = std::min<int64_t>((n / (vec ? 4 : 1) + 255) / 256, 4096);
    splitk_reduce_kernel<<<unsigned(blocks), 256, 0, stream>>>(static_cast<float*>(p.c), p.workspace, n,
                                                               p.splits - 1, vec);
    check_launch("gemm (splitk_reduce_kernel)");
  }
}

int current_sms(const char* what) {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), what);
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), what);
  return sms;
}

int gemm_splits(int64_t M, int64_t N, int64_t K, int epilogue, bool has_bias, int sms) {
  if (sms <= 0) {
    require_device("gemm_splits");
    sms = current_sms("gemm_splits");
  }
  return split_k_for(M, N, K, epilogue, has_bias, sms);
}

void gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t bias, int64_t M,
          int64_t N, int64_t K, int a_trans, int b_trans, int epilogue, std::uintptr_t aux1,
          std::uintptr_t aux2, std::uintptr_t aux_out, int dtype, std::uintptr_t stream,
          int64_t aux2_ld, std::uintptr_t workspace, int splits) {
  const char* what = "gemm";
  const int devices = require_device(what);
  auto bad = [&](const std::string& msg) {
    throw std::invalid_argument(std::string("djepa._C.gemm: ") + msg);
  };
  if (dtype != kFloat16 && dtype != kBFloat16) unsupported_dtype(what, dtype);
  if (M < 0 || N < 0 || K < 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX) {
    bad("bad sizes M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" +
        std::to_string(K));
  }
  if ((M + kBM - 1) / kBM > 65535) bad("M=" + std::to_string(M) + " exceeds 65535 row tiles");
  const int ep = epilogue & 15;
  if ((epilogue & ~(15 | kEpF32)) != 0 || ep > kEpSiluBwd) {
    bad("unknown epilogue " + std::to_string(epilogue));
  }
  if (M == 0 || N == 0) return;
  require_ptr(what, "c", c);
  if (K > 0) {
    require_ptr(what, "a", a);
    require_ptr(what, "b", b);
  }
  if (ep == kEpGate) {
    require_ptr(what, "aux1 (residual)", aux1);
    require_ptr(what, "aux2 (gate)", aux2);
    if (aux2_ld < N) bad("aux2_ld=" + std::to_string(aux2_ld) + " < N=" + std::to_string(N));
  }
  if (ep == kEpSiluBwd) require_ptr(what, "aux1 (pre-activation)", aux1);
  if (ep == kEpNone || ep == kEpSiluBwd) aux_out = 0;  // nothing to save for these epilogues
  if (splits < 1 || splits > 65535) bad("splits=" + std::to_string(splits) + " must be in [1, 65535]");
  const int64_t ktiles = (K + kBK - 1) / kBK;
  int per = 0;
  if (splits > 1) {
    if (epilogue != kEpF32 || bias) {
      bad("split-K needs a float32 output with no epilogue and no bias (epilogue=16, bias=0)");
    }
    require_ptr(what, "workspace (splits > 1)", workspace);
    if (workspace % 4) bad("workspace must be 4-byte aligned float32");
    per = int((ktiles + splits - 1) / splits);
    if (int64_t(per) * (splits - 1) >= ktiles) {
      bad("splits=" + std::to_string(splits) + " leaves a split without k-tiles for K=" +
          std::to_string(K) + " (use gemm_splits)");
    }
  }

  const int out_bytes = (epilogue & kEpF32) ? 4 : 2;
  GemmParams p{};
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.c = reinterpret_cast<void*>(c);
  p.bias = reinterpret_cast<const void*>(bias);
  p.aux1 = reinterpret_cast<const void*>(aux1);
  p.aux2 = reinterpret_cast<const void*>(aux2);
  p.aux_out = reinterpret_cast<void*>(aux_out);
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.aux2_ld = aux2_ld;
  p.epilogue = epilogue;
  // An operand's contiguous extent: K when stored K-major, else M (for A) or N (for B).
  const int64_t a_cont = a_trans ? M : K;
  const int64_t b_cont = b_trans ? K : N;
  p.a_fast = aligned16(a) && a_cont % 8 == 0;
  p.b_fast = aligned16(b) && b_cont % 8 == 0;
  p.pair_ok = N % 2 == 0 && c % (2 * out_bytes) == 0 && aux_out % (2 * out_bytes) == 0 &&
              aux1 % 4 == 0 && bias % 4 == 0;
  p.splits = splits;
  p.ktiles_per_split = per;
  p.workspace = as_ptr<float>(workspace);
  DeviceGuard guard(p.c, devices, what);
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    launch_gemm<__half>(p, a_trans, b_trans, s);
  } else {
    launch_gemm<__nv_bfloat16>(p, a_trans, b_trans, s);
  }
}


void denoise_update(std::uintptr_t x, std::uintptr_t model_out, std::uintptr_t noise,
                    std::uintptr_t out, std::uintptr_t xin_out, int64_t B, int64_t C,
                    int64_t out_ld, int cfg, std::uintptr_t cfg_scale, double coef_x, double coef_eps,
                    double min_log, double max_log, double noise_scale, int dtype,
                    std::uintptr_t stream) {
  const char* what = "denoise_update";
  require_device(what);
  auto bad = [&](const std::string& msg) {
    throw std::invalid_argument(std::string("djepa._C.denoise_update: ") + msg);
  };
  if (B < 0 || C <= 0 || C > INT_MAX) {
    bad("bad sizes B=" + std::to_string(B) + ", C=" + std::to_string(C));
  }
  if (out_ld < 2 * C) bad("out_ld=" + std::to_string(out_ld) + " < 2*C (eps | variance values)");
  if (B == 0) return;
  require_ptr(what, "x", x);
  require_ptr(what, "model_out", model_out);
  require_ptr(what, "out", out);
  if (noise_scale != 0.0 && noise == 0) bad("noise is required when noise_scale != 0");
  if (cfg && cfg_scale == 0) bad("cfg_scale (a device pointer to one float32) is required when cfg != 0");
  UpdateParams p{};
  p.x = as_ptr<const float>(x);
  p.model_out = reinterpret_cast<const void*>(model_out);
  p.noise = as_ptr<const float>(noise);
  p.out = as_ptr<float>(out);
  p.xin_out = reinterpret_cast<void*>(xin_out);
  p.B = B;
  p.ld = out_ld;
  p.C = int(C);
  p.cfg = cfg;
  p.cfg_scale = as_ptr<const float>(cfg_scale);
  p.coef_x = float(coef_x);
  p.coef_eps = float(coef_eps);
  p.min_log = float(min_log);
  p.max_log = float(max_log);
  p.noise_scale = float(noise_scale);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((B * C + threads - 1) / threads, 65535);
  cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kFloat16:
      denoise_update_kernel<__half><<<int(blocks), threads, 0, s>>>(p);
      break;
    case kBFloat16:
      denoise_update_kernel<__nv_bfloat16><<<int(blocks), threads, 0, s>>>(p);
      break;
    case kFloat32:
      denoise_update_kernel<float><<<int(blocks), threads, 0, s>>>(p);
      break;
    default: unsupported_dtype(what, dtype);
  }
  check_launch(what);
}

void register_denoise(py::module_& m) {
  using py::arg;
  m.def("adaln_modulate_fwd", &adaln_modulate_fwd,
        "h = LayerNorm(x) * (1 + scale) + shift; stats = (mean, rstd) float32 [M, 2]",
        arg("x"), arg("mod"), arg("ln_w"), arg("ln_b"), arg("h"), arg("stats"), arg("M"), arg("W"),
        arg("eps"), arg("dtype"), arg("stream"), arg("mod_ld") = 0);
  m.def("adaln_modulate_bwd", &adaln_modulate_bwd,
        "Backward of adaln_modulate_fwd: dx, dmod shift/scale chunks, LayerNorm weight/bias "
        "gradient partials [ceil(M / adaln_rows_per_block()), W] float32",
        arg("x"), arg("mod"), arg("ln_w"), arg("ln_b"), arg("stats"), arg("dh"), arg("dx"),
        arg("dmod"), arg("dln_w_partial"), arg("dln_b_partial"), arg("M"), arg("W"), arg("dtype"),
        arg("stream"));
  m.def("adaln_rows_per_block", &adaln_rows_per_block,
        "Rows summed into one row of adaln_modulate_bwd's partial LayerNorm gradients");
  m.def("gemm", &gemm,
        "c = epilogue(op(a) @ op(b) + bias), tensor cores, fp16/bf16 in, fp32 accumulate",
        arg("a"), arg("b"), arg("c"), arg("bias"), arg("M"), arg("N"), arg("K"), arg("a_trans"),
        arg("b_trans"), arg("epilogue"), arg("aux1"), arg("aux2"), arg("aux_out"), arg("dtype"),
        arg("stream"), arg("aux2_ld") = 0, arg("workspace") = 0, arg("splits") = 1);
  m.def("gemm_splits", &gemm_splits,
        "How many K splits gemm should run for this call (1 = none) on the current GPU, or on a "
        "GPU with `sms` multiprocessors; splits > 1 needs a float32 workspace of (splits - 1) * M * N",
        arg("M"), arg("N"), arg("K"), arg("epilogue"), arg("has_bias") = false, arg("sms") = 0);
  m.def("denoise_update", &denoise_update,
        "Elementwise tail of one reverse-diffusion step (CFG, posterior mean, learned variance, "
        "noise); cfg_scale points to one float32 on the device",
        arg("x"), arg("model_out"), arg("noise"), arg("out"), arg("xin_out"), arg("B"), arg("C"),
        arg("out_ld"), arg("cfg"), arg("cfg_scale"), arg("coef_x"), arg("coef_eps"),
        arg("min_log"), arg("max_log"), arg("noise_scale"), arg("dtype"), arg("stream"));
}

}  // namespace

DJEPA_REGISTER(register_denoise);

}  // namespace djepa