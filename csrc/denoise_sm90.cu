// djepa._C.gemm_sm90: the denoise GEMM for Hopper (wgmma + TMA + mbarriers, warp-specialised,
// persistent, split-K for weight gradients). Same arguments and results as djepa._C.gemm
// (contract in djepa/ops/denoise.py); device code and design in csrc/hopper/gemm_*.cuh.
//
// It runs only on sm_90 devices from a build that has sm_90a code (DJEPA_CUDA_ARCHS with "90a", not
// a plain "90": checked first, from the build's own arch list); anywhere else it raises
// RuntimeError before launching. `splits` (default 0 = automatic) forces the K split of each output
// tile (1 = none), for tests and tuning. With more than one split the fp32 partials go to
// `workspace` (splits * M * N floats, 16-byte aligned, `workspace_numel` the floats it holds:
// fewer raise ValueError; gemm_sm90_splits says how many splits a call runs), or, when it is 0, to
// a stream-ordered allocation of the call. Argument checks: csrc/checks.h.
#include <climits>
#include <string>

#include "checks.h"
#include "common.h"
#include "hopper/gemm_kernel.cuh"
#include "hopper/host.cuh"

namespace djepa {
namespace {

using namespace hopper::gemm;

// ValueError unless `workspace` (when given) holds the fp32 partials of p.splits (as planned) K
// splits: p.splits * M * N floats.
void check_planned_workspace(const Params& p, std::uintptr_t workspace, int64_t workspace_numel) {
  if (p.splits > 1 && workspace != 0) {
    require_workspace("gemm_sm90", p.splits, p.M, p.N, workspace_numel, "splits * M * N");
  }
}

template <typename T, bool A_K, bool B_K>
void launch(Params& p, cudaStream_t stream, int sms, int splits_arg, std::uintptr_t workspace,
            int64_t workspace_numel) {
  auto kernel = gemm_sm90_kernel<T, A_K, B_K>;
  plan_units(p, sms, splits_arg);
  check_planned_workspace(p, workspace, workspace_numel);  // automatic splits: known only now
  EncodeFn enc = hopper::tensor_map_encoder<EncodeFn>();
  CUtensorMap ma{}, mb{};
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  p.a_tma = p.K > 0 && make_operand_map(enc, &ma, p.a, bf16, A_K, p.M, p.K);
  p.b_tma = p.K > 0 && make_operand_map(enc, &mb, p.b, bf16, B_K, p.N, p.K);
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
void dispatch(Params& p, bool a_trans, bool b_trans, cudaStream_t s, int sms, int splits, std::uintptr_t ws,
              int64_t ws_numel) {
  if (!a_trans && b_trans) return launch<T, true, true>(p, s, sms, splits, ws, ws_numel);
  if (!a_trans && !b_trans) return launch<T, true, false>(p, s, sms, splits, ws, ws_numel);
  if (a_trans && !b_trans) return launch<T, false, false>(p, s, sms, splits, ws, ws_numel);
  return launch<T, false, true>(p, s, sms, splits, ws, ws_numel);
}

// The K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) on the current
// GPU, or on one with `sms` multiprocessors: its workspace holds that many M x N fp32 partials.
int gemm_sm90_splits(int64_t M, int64_t N, int64_t K, int splits, int sms) {
  const char* what = "gemm_sm90_splits";
  require_size(what, "M", M, 0, INT32_MAX);
  require_size(what, "N", N, 0, INT32_MAX);
  require_size(what, "K", K, 0, INT32_MAX);
  require_size(what, "splits (0 = automatic)", splits, 0, 64);
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
               int splits, int64_t workspace_numel) {
  const char* what = "gemm_sm90";
  require_arch_in_build(what, "90a");
  GemmArgs g{a, b, c, bias, M, N, K, a_trans, b_trans, epilogue, aux1, aux2, aux_out, dtype, aux2_ld};
  const bool empty = check_gemm(what, g);
  require_size(what, "splits (0 = automatic)", splits, 0, 64);
  if (empty) return;
  require_aligned(what, "workspace", workspace, 16);
  Params p{};
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  if (splits > 0) {  // the split count does not depend on the GPU: the workspace is checked here
    plan_units(p, 1, splits);
    check_planned_workspace(p, workspace, workspace_numel);
  }
  require_device(what);
  OnDevice on(pointers_device(what, {{"a", g.a}, {"b", g.b}, {"c", g.c}, {"bias", g.bias}, {"aux1", g.aux1},
                                     {"aux2", g.aux2}, {"aux_out", g.aux_out}, {"workspace", workspace}}),
              stream, what);
  const int sms = hopper::require_sm90(what, gemm_sm90_kernel<__nv_bfloat16, true, true>);

  const int out_bytes = (epilogue & kEpF32) ? 4 : 2;
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.c = reinterpret_cast<void*>(c);
  p.bias = reinterpret_cast<const void*>(bias);
  p.aux1 = reinterpret_cast<const void*>(aux1);
  p.aux2 = reinterpret_cast<const void*>(aux2);
  p.aux_out = reinterpret_cast<void*>(g.aux_out);
  p.aux2_ld = aux2_ld;
  p.epilogue = epilogue;
  p.pair_ok = N % 2 == 0 && c % (2 * out_bytes) == 0 && g.aux_out % (2 * out_bytes) == 0 && aux1 % 4 == 0 &&
              bias % 4 == 0;
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) dispatch<__half>(p, a_trans, b_trans, s, sms, splits, workspace, workspace_numel);
  else dispatch<__nv_bfloat16>(p, a_trans, b_trans, s, sms, splits, workspace, workspace_numel);
}

void register_denoise_sm90(py::module_& m) {
  using py::arg;
  m.def("gemm_sm90", &gemm_sm90,
        "gemm for sm_90 (wgmma, TMA, persistent, split-K): the arguments and results of gemm (aux2_ld, "
        "workspace, splits), but splits = 0 (the default) chooses the split itself, any epilogue may split, and "
        "the workspace holds all splits * M * N fp32 partials (gemm_sm90_splits; workspace_numel: the floats it "
        "holds; workspace 0: allocated per call); "
        "RuntimeError on other GPUs or builds without sm_90a",
        arg("a"), arg("b"), arg("c"), arg("bias"), arg("M"), arg("N"), arg("K"), arg("a_trans"), arg("b_trans"),
        arg("epilogue"), arg("aux1"), arg("aux2"), arg("aux_out"), arg("dtype"), arg("stream"), arg("aux2_ld") = 0,
        arg("workspace") = 0, arg("splits") = 0, arg("workspace_numel") = 0);
  m.def("gemm_sm90_splits", &gemm_sm90_splits,
        "How many K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) on the current "
        "GPU, or on one with `sms` multiprocessors; above 1 its workspace needs splits * M * N float32",
        arg("M"), arg("N"), arg("K"), arg("splits") = 0, arg("sms") = 0);
}

}  // namespace

DJEPA_REGISTER(register_denoise_sm90);

}  // namespace djepa
