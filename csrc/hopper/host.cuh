// Host-side checks shared by the sm_90a entry points (csrc/attention_sm90.cu, csrc/denoise_sm90.cu).
#pragma once

#include <string>

#include "../common.h"

namespace djepa {
namespace hopper {

// The SM count of the current device, after checking that it is sm_90 and that this build holds
// the sm_90a code of `kernel` (binaryVersion of the kernel the runtime would launch; not only an
// sm_80 or plain sm_90 pass). RuntimeError naming `what` otherwise, before anything launches.
template <typename Kernel>
int require_sm90(const char* what, Kernel kernel) {
  int dev = 0, major = 0, minor = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), what);
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), what);
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), what);
  if (major != 9 || minor != 0) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": needs an sm_90 (Hopper) GPU, device " +
                             std::to_string(dev) + " is sm_" + std::to_string(major) + std::to_string(minor) +
                             " (use the sm_80 kernels)");
  }
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel), what);
  if (attr.binaryVersion != 90) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": this build has no sm_90a code (built for " +
                             DJEPA_CUDA_ARCHS + "); rebuild with DJEPA_CUDA_ARCHS containing 90a");
  }
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), what);
  return sms;
}

// The driver's cuTensorMapEncodeTiled through the runtime (no libcuda link), or nullptr when the
// driver lacks it (the kernels then take their ordinary-load paths).
template <typename EncodeFn>
EncodeFn tensor_map_encoder() {
  static EncodeFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return EncodeFn(nullptr);
    }
    return reinterpret_cast<EncodeFn>(f);
  }();
  return fn;
}

}  // namespace hopper
}  // namespace djepa
