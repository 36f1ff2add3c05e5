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

#include "checks.h"
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

// The row extent of an [M, W] LayerNorm call in int64 bytes, with `ld` the row stride of mod.
void check_ln_sizes(const char* what, int64_t M, int64_t W, int64_t ld, int dtype) {
  require_size(what, "M", M, 0, INT32_MAX);
  require_size(what, "W", W, 1, INT32_MAX);
  checked_bytes(what, "mod's extent", checked_mul(what, "mod's extent", M, ld), dtype_bytes(dtype));
}

void adaln_modulate_fwd(std::uintptr_t x, std::uintptr_t mod, std::uintptr_t ln_w,
                        std::uintptr_t ln_b, std::uintptr_t h, std::uintptr_t stats, int64_t M,
                        int64_t W, double eps, int dtype, std::uintptr_t stream, int64_t mod_ld) {
  const char* what = "adaln_modulate_fwd";
  require_dtype(what, dtype, {kFloat16, kBFloat16, kFloat32});
  require_size(what, "W", W, 1, INT32_MAX);
  if (mod_ld == 0) mod_ld = 3 * W;
  if (mod_ld < 2 * W) {
    invalid(what, "mod_ld=" + std::to_string(mod_ld) + " < 2*W=" + std::to_string(2 * W) +
                      " (a row of mod holds shift and scale, W each)");
  }
  check_ln_sizes(what, M, W, mod_ld, dtype);
  if (M == 0) return;
  require_ptr(what, "x", x);
  require_ptr(what, "mod", mod);
  require_ptr(what, "h", h);
  const int es = dtype_bytes(dtype);
  for (Arg p : {Arg{"x", x}, Arg{"mod", mod}, Arg{"ln_w", ln_w}, Arg{"ln_b", ln_b}, Arg{"h", h}}) {
    require_aligned(what, p.name, p.ptr, es);
  }
  require_aligned(what, "stats", stats, 4);
  require_device(what);
  OnDevice on(pointers_device(what, {{"x", x}, {"mod", mod}, {"ln_w", ln_w}, {"ln_b", ln_b}, {"h", h},
                                     {"stats", stats}}),
              stream, what);
  LnArgs a{x, mod, ln_w, ln_b, h, stats, 0, 0, 0, 0, 0, int(M), int(W), mod_ld, float(eps),
           as_stream(stream)};
  auto vec_ok = [&](int V) {
    return aligned16(x) && aligned16(mod) && aligned16(h) && aligned16(ln_w) && aligned16(ln_b) &&
           mod_ld % V == 0;
  };
  switch (dtype) {
    case kFloat16: return dispatch_ln<__half>(false, a, vec_ok(vec_width<__half>()));
    case kBFloat16: return dispatch_ln<__nv_bfloat16>(false, a, vec_ok(vec_width<__nv_bfloat16>()));
    default: return dispatch_ln<float>(false, a, vec_ok(vec_width<float>()));
  }
}

int adaln_rows_per_block() { return kLnBwdRows; }

void adaln_modulate_bwd(std::uintptr_t x, std::uintptr_t mod, std::uintptr_t ln_w,
                        std::uintptr_t ln_b, std::uintptr_t stats, std::uintptr_t dh,
                        std::uintptr_t dx, std::uintptr_t dmod, std::uintptr_t dln_w_partial,
                        std::uintptr_t dln_b_partial, int64_t M, int64_t W, int dtype,
                        std::uintptr_t stream) {
  const char* what = "adaln_modulate_bwd";
  require_dtype(what, dtype, {kFloat16, kBFloat16, kFloat32});
  require_size(what, "W", W, 1, INT32_MAX);
  check_ln_sizes(what, M, W, 3 * W, dtype);
  if (M == 0) return;
  for (Arg p : {Arg{"x", x}, Arg{"mod", mod}, Arg{"stats", stats}, Arg{"dh", dh}, Arg{"dx", dx}, Arg{"dmod", dmod}}) {
    require_ptr(what, p.name, p.ptr);
  }
  // Partials are only meaningful with an affine LayerNorm; without ln_w they are skipped.
  const std::uintptr_t dw = ln_w ? dln_w_partial : 0;
  const std::uintptr_t db = ln_w ? dln_b_partial : 0;
  if (ln_w) require_ptr(what, "dln_w_partial", dw, "with ln_w");
  const int es = dtype_bytes(dtype);
  for (Arg p : {Arg{"x", x}, Arg{"mod", mod}, Arg{"ln_w", ln_w}, Arg{"ln_b", ln_b}, Arg{"dh", dh}, Arg{"dx", dx},
                Arg{"dmod", dmod}}) {
    require_aligned(what, p.name, p.ptr, es);
  }
  for (Arg p : {Arg{"stats", stats}, Arg{"dln_w_partial", dw}, Arg{"dln_b_partial", db}}) {
    require_aligned(what, p.name, p.ptr, 4);
  }
  require_device(what);
  OnDevice on(pointers_device(what, {{"x", x}, {"mod", mod}, {"ln_w", ln_w}, {"ln_b", ln_b}, {"stats", stats},
                                     {"dh", dh}, {"dx", dx}, {"dmod", dmod}, {"dln_w_partial", dw},
                                     {"dln_b_partial", db}}),
              stream, what);
  LnArgs a{x, mod, ln_w, ln_b, 0, stats, dh, dx, dmod, dw, db, int(M), int(W), 3 * W, 0.f,
           as_stream(stream)};
  auto vec_ok = [&](int) {
    return aligned16(x) && aligned16(mod) && aligned16(ln_w) && aligned16(ln_b) &&
           aligned16(dh) && aligned16(dx) && aligned16(dmod);
  };
  switch (dtype) {
    case kFloat16: return dispatch_ln<__half>(true, a, vec_ok(0));
    case kBFloat16: return dispatch_ln<__nv_bfloat16>(true, a, vec_ok(0));
    default: return dispatch_ln<float>(true, a, vec_ok(0));
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
  const char* what = "gemm_splits";
  require_size(what, "M", M, 0, INT32_MAX);
  require_size(what, "N", N, 0, INT32_MAX);
  require_size(what, "K", K, 0, INT32_MAX);
  if ((epilogue & ~(15 | kEpF32)) != 0 || (epilogue & 15) > kEpSiluBwd) {
    invalid(what, "unknown epilogue " + std::to_string(epilogue) + " (0..3, plus 16 for a float32 output)");
  }
  if (sms <= 0) {
    require_device(what);
    sms = current_sms(what);
  }
  return split_k_for(M, N, K, epilogue, has_bias, sms);
}

void gemm(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t bias, int64_t M,
          int64_t N, int64_t K, int a_trans, int b_trans, int epilogue, std::uintptr_t aux1,
          std::uintptr_t aux2, std::uintptr_t aux_out, int dtype, std::uintptr_t stream,
          int64_t aux2_ld, std::uintptr_t workspace, int splits, int64_t workspace_numel) {
  const char* what = "gemm";
  GemmArgs g{a, b, c, bias, M, N, K, a_trans, b_trans, epilogue, aux1, aux2, aux_out, dtype, aux2_ld};
  const bool empty = check_gemm(what, g);
  if ((M + kBM - 1) / kBM > 65535) invalid(what, "M=" + std::to_string(M) + " exceeds 65535 row tiles");
  require_size(what, "splits", splits, 1, 65535);
  if (empty) return;
  const int64_t ktiles = (K + kBK - 1) / kBK;
  int per = 0;
  if (splits > 1) {
    if (epilogue != kEpF32 || bias) {
      invalid(what, "split-K needs a float32 output with no epilogue and no bias (epilogue=16, bias=0)");
    }
    require_ptr(what, "workspace", workspace, "when splits > 1");
    require_aligned(what, "workspace", workspace, 4);
    require_workspace(what, splits - 1, M, N, workspace_numel, "(splits - 1) * M * N");
    per = int((ktiles + splits - 1) / splits);
    if (int64_t(per) * (splits - 1) >= ktiles) {
      invalid(what, "splits=" + std::to_string(splits) + " leaves a split without k-tiles for K=" +
                        std::to_string(K) + " (use gemm_splits)");
    }
  }
  require_device(what);
  OnDevice on(pointers_device(what, {{"a", g.a}, {"b", g.b}, {"c", g.c}, {"bias", g.bias}, {"aux1", g.aux1},
                                     {"aux2", g.aux2}, {"aux_out", g.aux_out},
                                     {"workspace", splits > 1 ? workspace : 0}}),
              stream, what);

  const int out_bytes = (epilogue & kEpF32) ? 4 : 2;
  GemmParams p{};
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.c = reinterpret_cast<void*>(c);
  p.bias = reinterpret_cast<const void*>(bias);
  p.aux1 = reinterpret_cast<const void*>(aux1);
  p.aux2 = reinterpret_cast<const void*>(aux2);
  p.aux_out = reinterpret_cast<void*>(g.aux_out);
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
  p.pair_ok = N % 2 == 0 && c % (2 * out_bytes) == 0 && g.aux_out % (2 * out_bytes) == 0 &&
              aux1 % 4 == 0 && bias % 4 == 0;
  p.splits = splits;
  p.ktiles_per_split = per;
  p.workspace = as_ptr<float>(workspace);
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
  require_dtype(what, dtype, {kFloat16, kBFloat16, kFloat32});
  require_size(what, "B", B, 0, INT64_MAX / 2);
  require_size(what, "C", C, 1, INT32_MAX);
  require_flag(what, "cfg", cfg);
  if (out_ld < 2 * C) {
    invalid(what, "out_ld=" + std::to_string(out_ld) + " < 2*C=" + std::to_string(2 * C) +
                      " (a row of model_out holds C eps and C variance values)");
  }
  const int64_t rows = cfg ? 2 * B : B;  // model_out (and xin_out): [cond; uncond] with CFG
  const int es = dtype_bytes(dtype);
  checked_bytes(what, "model_out's extent", checked_mul(what, "model_out's extent", rows, out_ld), es);
  checked_bytes(what, "B * C", checked_mul(what, "B * C", rows, C), 4);
  if (B == 0) return;
  require_ptr(what, "x", x);
  require_ptr(what, "model_out", model_out);
  require_ptr(what, "out", out);
  if (noise_scale != 0.0) require_ptr(what, "noise", noise, "when noise_scale != 0");
  if (cfg) require_ptr(what, "cfg_scale", cfg_scale, "(a device pointer to one float32) when cfg != 0");
  const std::uintptr_t noise_used = noise_scale != 0.0 ? noise : 0;
  const std::uintptr_t scale_used = cfg ? cfg_scale : 0;
  for (Arg p : {Arg{"x", x}, Arg{"noise", noise_used}, Arg{"out", out}, Arg{"cfg_scale", scale_used}}) {
    require_aligned(what, p.name, p.ptr, 4);
  }
  require_aligned(what, "model_out", model_out, es);
  require_aligned(what, "xin_out", xin_out, es);
  require_device(what);
  OnDevice on(pointers_device(what, {{"x", x}, {"model_out", model_out}, {"noise", noise_used}, {"out", out},
                                     {"xin_out", xin_out}, {"cfg_scale", scale_used}}),
              stream, what);
  UpdateParams p{};
  p.x = as_ptr<const float>(x);
  p.model_out = reinterpret_cast<const void*>(model_out);
  p.noise = as_ptr<const float>(noise_used);
  p.out = as_ptr<float>(out);
  p.xin_out = reinterpret_cast<void*>(xin_out);
  p.B = B;
  p.ld = out_ld;
  p.C = int(C);
  p.cfg = cfg;
  p.cfg_scale = as_ptr<const float>(scale_used);
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
    default:
      denoise_update_kernel<float><<<int(blocks), threads, 0, s>>>(p);
      break;
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
        arg("stream"), arg("aux2_ld") = 0, arg("workspace") = 0, arg("splits") = 1, arg("workspace_numel") = 0);
  m.def("gemm_splits", &gemm_splits,
        "How many K splits gemm should run for this call (1 = none) on the current GPU, or on a "
        "GPU with `sms` multiprocessors; splits > 1 needs a float32 workspace of (splits - 1) * M * N "
        "(workspace_numel says how many it holds)",
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