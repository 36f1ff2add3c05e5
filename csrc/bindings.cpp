// The pybind11 module djepa._C: collects what each csrc/<op>.cu registered.
#include <string>

#include "common.h"

namespace {

// Whether the comma-separated arch list of this build names `arch` ("90a").
bool built_for(const char* archs, const char* arch) {
  const std::string list = std::string(",") + archs + ",";
  return list.find(std::string(",") + arch + ",") != std::string::npos;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "djepa CUDA kernels (raw-pointer interface, no libtorch link)";
  m.attr("cuda_version") = DJEPA_CUDA_VERSION;
  m.attr("cuda_archs") = DJEPA_CUDA_ARCHS;
  pybind11::list ops;
  for (auto& [name, fn] : djepa::registry()) {
    fn(m);
    ops.append(name);
  }
  m.attr("registered") = ops;
  // The ops (djepa.backends.OPS names) whose matmuls have sm_90a wgmma kernels in this build:
  // the build holds sm_90a code and the Hopper entry points are registered. djepa's dispatch
  // calls them on sm_90 devices (the mma.sync kernels elsewhere).
  pybind11::list wgmma;
  if (built_for(DJEPA_CUDA_ARCHS, "90a")) {
    const bool attention = pybind11::hasattr(m, "masked_attention_fwd_sm90") &&
                           pybind11::hasattr(m, "masked_attention_bwd_sm90");
    const bool gemm = pybind11::hasattr(m, "gemm_sm90") && pybind11::hasattr(m, "gemm_sm90_splits");
    if (attention) wgmma.append("masked_attention");
    if (gemm) {
      wgmma.append("adaln_block");
      wgmma.append("denoise_step");
    }
  }
  m.attr("wgmma_ops") = pybind11::tuple(wgmma);
  m.def("device_count", []() {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  }, "Number of CUDA devices the runtime sees (0 when no driver or GPU).");
}
