// djepa._C.gemm_sm90: the denoise GEMM for Hopper (wgmma + TMA + mbarriers, warp-specialised,
// persistent, split-K for weight gradients). Same arguments and results as djepa._C.gemm
// (contract in djepa/ops/denoise.py); device code and design in csrc/hopper/gemm_*.cuh.
//
// Two designs serve it (`kernel`: 0 = chosen by shape, 1 = 128x128, 2 = 128x256; Python's
// DJEPA_SM90_GEMM): the 128x128 kernel (gemm_kernel.cuh: register epilogue, ordinary loads for
// operands TMA cannot load) and the 128x256 one (gemm_wide_kernel.cuh: 2-CTA clusters
// multicasting B, TMA-store epilogue), which needs A and B loadable by TMA (16-byte aligned base
// and row pitch) and K > 0; a call it cannot serve runs the 128x128 kernel. The shape rule
// (choose_design, gemm_wide_config.cuh) compares their wave-quantised time estimates.
//
// It runs only on sm_90 devices from a build that has sm_90a code (DJEPA_CUDA_ARCHS with "90a", not
// a plain "90": checked first, from the build's own arch list); anywhere else it raises
// RuntimeError before launching. `splits` (default 0 = automatic) forces the K split of each output
// tile (1 = none), for tests and tuning. With more than one split the fp32 partials go to
// `workspace` (splits * M * N floats, 16-byte aligned, `workspace_numel` the floats it holds:
// fewer raise ValueError; gemm_sm90_splits says how many splits a call runs, for either design),
// or, when it is 0, to a stream-ordered allocation of the call. Argument checks: csrc/checks.h.
// Host state is cached: the device check and SM count, the kernels' shared-memory attribute, the
// resident cluster count, and the tensor maps (csrc/hopper/host.cuh).
#include <climits>
#include <string>

#include "checks.h"
#include "common.h"
#include "hopper/gemm_kernel.cuh"
#include "hopper/gemm_wide_kernel.cuh"
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

// The GPU as the plans see it: its SMs, and how many 2-CTA clusters of the 128x256 kernel it runs
// at once (0: none; that kernel then runs without clusters). Cached per device. `launching`: the
// device must be able to run the kernels (require_sm90); else (planning only) another GPU is
// planned for as if it had sms / 2 clusters.
struct Gpu {
  int sms, clusters;
};
Gpu gpu_of(const char* what, bool launching) {
  const auto probe = wide::gemm_sm90_wide_kernel<__nv_bfloat16, true, true>;
  if (launching) {
    const int sms = hopper::require_sm90(what, gemm_sm90_kernel<__nv_bfloat16, true, true>);
    return Gpu{sms, hopper::resident_clusters_once(what, probe, wide::kThreads, wide::kSmemBytes, wide::kClusterMax)};
  }
  const hopper::DeviceFacts f = hopper::current_device(what);
  if (f.major == 9 && f.minor == 0 && build_has_arch(DJEPA_CUDA_ARCHS, "90a")) {
    return Gpu{f.sms, hopper::resident_clusters_once(what, probe, wide::kThreads, wide::kSmemBytes, wide::kClusterMax)};
  }
  return Gpu{f.sms, f.sms / 2};
}

template <typename T, bool A_K, bool B_K>
void launch_128(const Params& p, cudaStream_t stream, int sms, const CUtensorMap& ma, const CUtensorMap& mb) {
  auto kernel = gemm_sm90_kernel<T, A_K, B_K>;
  hopper::set_smem_once("gemm_sm90 (shared memory size)", kernel, kSmemBytes);
  kernel<<<std::min(units_of(p), sms), kThreads, kSmemBytes, stream>>>(p, ma, mb);
  check_launch("gemm_sm90 (gemm_sm90_kernel)");
}

template <typename T, bool A_K, bool B_K>
void launch_256(const Params& p, cudaStream_t stream, int slots, const CUtensorMap& ma, const CUtensorMap& mb,
                const wide::OutMaps& out) {
  auto kernel = wide::gemm_sm90_wide_kernel<T, A_K, B_K>;
  hopper::set_smem_once("gemm_sm90 (shared memory size)", kernel, wide::kSmemBytes);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(std::min(wide::cluster_units(p), slots) * p.cluster), 1, 1);
  cfg.blockDim = dim3(wide::kThreads, 1, 1);
  cfg.dynamicSmemBytes = wide::kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(p.cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = p.cluster > 1 ? 1 : 0;  // a cluster of one CTA is a plain launch
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, p, ma, mb, out), "gemm_sm90 (gemm_sm90_wide_kernel)");
  check_launch("gemm_sm90 (gemm_sm90_wide_kernel)");
}

template <typename T, bool A_K, bool B_K>
void launch(Params& p, int design, const CUtensorMap& ma, const CUtensorMap& mb, cudaStream_t stream, const Gpu& gpu,
            std::uintptr_t workspace, int64_t workspace_numel) {
  check_planned_workspace(p, workspace, workspace_numel);  // automatic splits: known only now
  float* ws = nullptr;  // allocated here (workspace == 0), freed after the reduction
  if (p.splits > 1 && workspace != 0) {
    p.partial = reinterpret_cast<float*>(workspace);
  } else if (p.splits > 1) {
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&ws),
                               size_t(p.splits) * size_t(p.M) * size_t(p.N) * sizeof(float), stream),
               "gemm_sm90 (split-K workspace)");
    p.partial = ws;
  }
  if (design == kDesign256) {
    wide::OutMaps out{};
    wide::make_out_maps(hopper::cached_tensor_map_encoder<EncodeFn>(), p, std::is_same_v<T, __nv_bfloat16>, &out);
    launch_256<T, A_K, B_K>(p, stream, p.cluster > 1 ? gpu.clusters : gpu.sms, ma, mb, out);
  } else {
    launch_128<T, A_K, B_K>(p, stream, gpu.sms, ma, mb);
  }
  if (p.splits > 1) {
    const int64_t pairs = int64_t(p.M) * ((p.N + 1) / 2);
    const int blocks = int(std::min<int64_t>((pairs + 255) / 256, int64_t(gpu.sms) * 8));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p);
    check_launch("gemm_sm90 (splitk_reduce_kernel)");
    if (ws) check_cuda(cudaFreeAsync(ws, stream), "gemm_sm90 (split-K workspace)");
  }
}

template <typename T>
void dispatch(Params& p, int design, const CUtensorMap& ma, const CUtensorMap& mb, bool a_trans, bool b_trans,
              cudaStream_t s, const Gpu& gpu, std::uintptr_t ws, int64_t ws_numel) {
  if (!a_trans && b_trans) return launch<T, true, true>(p, design, ma, mb, s, gpu, ws, ws_numel);
  if (!a_trans && !b_trans) return launch<T, true, false>(p, design, ma, mb, s, gpu, ws, ws_numel);
  if (a_trans && !b_trans) return launch<T, false, false>(p, design, ma, mb, s, gpu, ws, ws_numel);
  return launch<T, false, true>(p, design, ma, mb, s, gpu, ws, ws_numel);
}

void require_kernel(const char* what, int kernel) {
  require_size(what, "kernel (0 = by shape, 1 = 128x128, 2 = 128x256)", kernel, 0, 2);
}

// The K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) and `kernel`
// on the current GPU, or on one with `sms` multiprocessors (and sms / 2 resident clusters):
// its workspace holds that many M x N fp32 partials.
int gemm_sm90_splits(int64_t M, int64_t N, int64_t K, int splits, int sms, int kernel) {
  const char* what = "gemm_sm90_splits";
  require_size(what, "M", M, 0, INT32_MAX);
  require_size(what, "N", N, 0, INT32_MAX);
  require_size(what, "K", K, 0, INT32_MAX);
  require_size(what, "splits (0 = automatic)", splits, 0, 64);
  require_kernel(what, kernel);
  Gpu gpu{sms, sms / 2};
  if (sms <= 0) {
    require_device(what);
    gpu = gpu_of(what, false);
  }
  if (M == 0 || N == 0) return 1;
  Params p{};
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.cluster = 1;
  choose_design(p, kernel, gpu.sms, gpu.clusters, splits);
  return p.splits;
}

void gemm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t bias, int64_t M, int64_t N,
               int64_t K, int a_trans, int b_trans, int epilogue, std::uintptr_t aux1, std::uintptr_t aux2,
               std::uintptr_t aux_out, int dtype, std::uintptr_t stream, int64_t aux2_ld, std::uintptr_t workspace,
               int splits, int64_t workspace_numel, int kernel) {
  const char* what = "gemm_sm90";
  require_arch_in_build(what, "90a");
  GemmArgs g{a, b, c, bias, M, N, K, a_trans, b_trans, epilogue, aux1, aux2, aux_out, dtype, aux2_ld};
  const bool empty = check_gemm(what, g);
  require_size(what, "splits (0 = automatic)", splits, 0, 64);
  require_kernel(what, kernel);
  if (empty) return;
  require_aligned(what, "workspace", workspace, 16);
  Params p{};
  p.M = int(M);
  p.N = int(N);
  p.K = int(K);
  p.cluster = 1;
  if (splits > 0) {  // the split count does not depend on the GPU: the workspace is checked here
    plan_units(p, 1, splits);
    check_planned_workspace(p, workspace, workspace_numel);
  }
  require_device(what);
  OnDevice on(pointers_device(what, {{"a", g.a}, {"b", g.b}, {"c", g.c}, {"bias", g.bias}, {"aux1", g.aux1},
                                     {"aux2", g.aux2}, {"aux_out", g.aux_out}, {"workspace", workspace}}),
              stream, what);
  const Gpu gpu = gpu_of(what, true);

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
  const bool bf16 = dtype == kBFloat16;
  CUtensorMap ma{}, mb{};
  const EncodeFn enc = hopper::cached_tensor_map_encoder<EncodeFn>();
  p.a_tma = p.K > 0 && make_operand_map(enc, &ma, p.a, bf16, !a_trans, p.M, p.K);
  p.b_tma = p.K > 0 && make_operand_map(enc, &mb, p.b, bf16, b_trans, p.N, p.K);
  const int design = plan_call(p, kernel, gpu.sms, gpu.clusters, splits);
  cudaStream_t s = as_stream(stream);
  if (bf16) dispatch<__nv_bfloat16>(p, design, ma, mb, a_trans, b_trans, s, gpu, workspace, workspace_numel);
  else dispatch<__half>(p, design, ma, mb, a_trans, b_trans, s, gpu, workspace, workspace_numel);
}

void register_denoise_sm90(py::module_& m) {
  using py::arg;
  m.def("gemm_sm90", &gemm_sm90,
        "gemm for sm_90 (wgmma, TMA, persistent, split-K): the arguments and results of gemm (aux2_ld, "
        "workspace, splits), but splits = 0 (the default) chooses the split itself, any epilogue may split, and "
        "the workspace holds all splits * M * N fp32 partials (gemm_sm90_splits; workspace_numel: the floats it "
        "holds; workspace 0: allocated per call); kernel: 0 = the design chosen by shape, 1 = the 128x128 kernel, "
        "2 = the 128x256 one (2-CTA clusters, TMA multicast and TMA-store epilogue; operands TMA cannot load run "
        "the 128x128 kernel); RuntimeError on other GPUs or builds without sm_90a",
        arg("a"), arg("b"), arg("c"), arg("bias"), arg("M"), arg("N"), arg("K"), arg("a_trans"), arg("b_trans"),
        arg("epilogue"), arg("aux1"), arg("aux2"), arg("aux_out"), arg("dtype"), arg("stream"), arg("aux2_ld") = 0,
        arg("workspace") = 0, arg("splits") = 0, arg("workspace_numel") = 0, arg("kernel") = 0);
  m.def("gemm_sm90_splits", &gemm_sm90_splits,
        "How many K splits gemm_sm90 runs for (M, N, K) with `splits` requested (0 = automatic) and `kernel` on "
        "the current GPU, or on one with `sms` multiprocessors; above 1 its workspace needs splits * M * N float32",
        arg("M"), arg("N"), arg("K"), arg("splits") = 0, arg("sms") = 0, arg("kernel") = 0);
}

}  // namespace

DJEPA_REGISTER(register_denoise_sm90);

}  // namespace djepa
