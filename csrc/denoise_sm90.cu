// djepa._C.gemm_sm90: the denoise GEMM for Hopper (wgmma + TMA + mbarriers, warp-specialised,
// persistent, split-K for weight gradients). Same arguments and results as djepa._C.gemm
// (contract in djepa/ops/denoise.py); device code and design in csrc/hopper/gemm_*.cuh.
//
// It runs only on sm_90 devices from a build that has sm_90a code (DJEPA_CUDA_ARCHS with "90a");
// anywhere else it raises RuntimeError before launching. `splits` (default 0 = automatic) forces
// the K split of each output tile (1 = none), for tests and tuning. With more than one split the
// fp32 partials go to `workspace` (splits * M * N floats, 16-byte aligned; gemm_sm90_splits says
// how many splits a call runs), or, when it is 0, to a stream-ordered allocation of the call.
#include <climits>
#include <string>

#include "common.h"
#include "hopper/gemm_kernel.cuh"
#include "hopper/host.cuh"

namespace djepa {
namespace {

using namespace hopper::gemm;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("djepa._C.gemm_sm90: " + msg); }

bool aligned_to(std::uintptr_t p, std::uintptr_t n) { return p % n == 0; }

template <typename T, bool A_K, bool B_K>
void launch(Params& p, cudaStream_t stream, int sms, int splits_arg, std::uintptr_t workspace) {
  auto kernel = gemm_sm90_kernel<T, A_K, B_K>;
  EncodeFn enc = hopper::tensor_map_encoder<EncodeFn>();
  CUtensorMap ma{}, mb{};
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  p.a_tma = p.K > 0 && make_operand_map(enc, &ma, p.a, bf16, A_K, p.M, p.K);
  p.b_tma = p.K > 0 && make_operand_map(enc, &mb, p.b, bf16, B_K, p.N, p.K);
  plan_units(p, sms, splits_arg);
  float* ws = nullptr;  // allocated here (workspace == 0), freed after the reduction
  if (p.splits > 1 && workspace != 0) {
    p.partial = reinterpret_cast<float*>(workspace);
  } else if (p.splits > 1) {
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ws),
                               size_t(p.splits) * size_t(p.M) * size_t(p.N) * sizeof(float), stream),
               "gemm_sm90 (split-K workspace)");
    p.partial = ws;
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
             "gemm_sm90 (shared memory size)");
  const int units = units_of(p);
  kernel<<<std::min(units, sms), kThreads, kSmemBytes, stream>>>(p, ma, mb);
  check_launch("gemm_sm90 (gemm_sm90_kernel)");
  if (p.splits > 1) {
    const int64_t pairs = int64_t(p.M) * ((p.N + 1) / 2);
    const int blocks = int(std::min<int64_t>((pairs + 255) / 256, int64_t(sms) * 8));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p);
    check_launch("gemm_sm90 (splitk_reduce_kernel)");
    if (ws) check_cuda(cudaFreeAsync(ws, stream), "gemm_sm90 (split-K workspace)");
  }
}

template <typename T>
void dispatch(Params& p, bool a_trans, bool b_trans, cudaStream_t s, int sms, int splits, std::uintptr_t ws) {
  if (!a_trans && b_trans) return launch<T, true, true>(p, s, sms, splits, ws);
  if (!a_trans && !b_trans) return launch<T, true, false>(p, s, sms, splits, ws);
  if (a_trans && !b_trans) return launch<T, false, false>(p, s, sms, splits, ws);
  return launch<T, false, true>(p, s, sms, splits, ws);
}

// The K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) on the current
// GPU, or on one with `sms` multiprocessors: its workspace holds that many M x N fp32 partials.
int gemm_sm90_splits(int64_t M, int64_t N, int64_t K, int splits, int sms) {
  const char* what = "gemm_sm90_splits";
  if (M < 0 || N < 0 || K < 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX || splits < 0 || splits > 64) {
    throw std::invalid_argument("djepa._C.gemm_sm90_splits: bad sizes M=" + std::to_string(M) + ", N=" +
                                std::to_string(N) + ", K=" + std::to_string(K) + " or splits=" +
                                std::to_string(splits) + " (0 = automatic .. 64)");
  }
  if (sms <= 0) {
    require_device(what);
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), what);
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), what);
  }
  if (M == 0 || N == 0) return 1;
  Params p{};
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  plan_units(p, sms, splits);
  return p.splits;
}

void gemm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t bias, int64_t M, int64_t N,
               int64_t K, int a_trans, int b_trans, int epilogue, std::uintptr_t aux1, std::uintptr_t aux2,
               std::uintptr_t aux_out, int dtype, std::uintptr_t stream, int64_t aux2_ld, std::uintptr_t workspace,
               int splits) {
  const char* what = "gemm_sm90";
  require_device(what);
  const int sms = hopper::require_sm90(what, gemm_sm90_kernel<__nv_bfloat16, true, true>);
  if (dtype != kFloat16 && dtype != kBFloat16) unsupported_dtype(what, dtype);
  if (M < 0 || N < 0 || K < 0 || M > INT_MAX || N > INT_MAX || K > INT_MAX) {
    bad("bad sizes M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K));
  }
  const int ep = epilogue & 15;
  if ((epilogue & ~(15 | kEpF32)) != 0 || ep > kEpSiluBwd) bad("unknown epilogue " + std::to_string(epilogue));
  if (splits < 0 || splits > 64) bad("splits must be 0 (automatic) .. 64, got " + std::to_string(splits));
  if (M == 0 || N == 0) return;
  if (c == 0) bad("c is required");
  if (K > 0 && (a == 0 || b == 0)) bad("a and b are required when K > 0");
  if (ep == kEpGate) {
    if (aux1 == 0 || aux2 == 0) bad("epilogue 2 needs aux1 (residual) and aux2 (gate)");
    if (aux2_ld < N) bad("aux2_ld=" + std::to_string(aux2_ld) + " < N=" + std::to_string(N));
  }
  if (ep == kEpSiluBwd && aux1 == 0) bad("epilogue 3 needs aux1 (pre-activation)");
  if (ep == kEpNone || ep == kEpSiluBwd) aux_out = 0;
  if (!aligned_to(a, 2) || !aligned_to(b, 2) || !aligned_to(aux1, 2) || !aligned_to(aux2, 2) || !aligned_to(bias, 2)) {
    bad("a, b, bias, aux1 and aux2 must be aligned to their element size");
  }
  if (!aligned_to(workspace, 16)) bad("workspace must be 16-byte aligned float32");
  const int out_bytes = (epilogue & kEpF32) ? 4 : 2;
  if (!aligned_to(c, out_bytes) || !aligned_to(aux_out, out_bytes)) bad("c and aux_out must be aligned to their element size");

  Params p{};
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
  p.pair_ok = N % 2 == 0 && c % (2 * out_bytes) == 0 && aux_out % (2 * out_bytes) == 0 && aux1 % 4 == 0 &&
              bias % 4 == 0;
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) dispatch<__half>(p, a_trans, b_trans, s, sms, splits, workspace);
  else dispatch<__nv_bfloat16>(p, a_trans, b_trans, s, sms, splits, workspace);
}

void register_denoise_sm90(py::module_& m) {
  using py::arg;
  m.def("gemm_sm90", &gemm_sm90,
        "gemm for sm_90 (wgmma, TMA, persistent, split-K): the arguments and results of gemm (aux2_ld, "
        "workspace, splits), but splits = 0 (the default) chooses the split itself, any epilogue may split, and "
        "the workspace holds all splits * M * N fp32 partials (gemm_sm90_splits; 0: allocated per call); "
        "RuntimeError on other GPUs or builds without sm_90a",
        arg("a"), arg("b"), arg("c"), arg("bias"), arg("M"), arg("N"), arg("K"), arg("a_trans"), arg("b_trans"),
        arg("epilogue"), arg("aux1"), arg("aux2"), arg("aux_out"), arg("dtype"), arg("stream"), arg("aux2_ld") = 0,
        arg("workspace") = 0, arg("splits") = 0);
  m.def("gemm_sm90_splits", &gemm_sm90_splits,
        "How many K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) on the current "
        "GPU, or on one with `sms` multiprocessors; above 1 its workspace needs splits * M * N float32",
        arg("M"), arg("N"), arg("K"), arg("splits") = 0, arg("sms") = 0);
}

}  // namespace

DJEPA_REGISTER(register_denoise_sm90);

}  // namespace djepa
