// The pybind11 module djepa._C: collects what each csrc/<op>.cu registered.
#include "archs.h"
#include "common.h"

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
  if (djepa::build_has_arch(DJEPA_CUDA_ARCHS, "90a")) {
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
  m.def("build_has_arch", &djepa::build_has_arch, pybind11::arg("archs"), pybind11::arg("arch"),
        "Whether the arch list `archs` (\"80,90a\", as cuda_archs) holds `arch` exactly: the rule by which "
        "the sm_90a entry points refuse a build whose list has a plain 90 (empty kernel bodies) and no 90a.");
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
