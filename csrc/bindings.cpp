// The pybind11 module djepa._C: collects what each csrc/<op>.cu registered.
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
