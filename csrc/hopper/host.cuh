// Host-side state shared by the sm_90a entry points (csrc/attention_sm90.cu, csrc/denoise_sm90.cu),
// cached so that a call at D-JEPA's shapes (kernels of a few microseconds) pays no per-call driver
// queries: the device's arch and SM count once per device, cudaFuncGetAttributes /
// cudaFuncSetAttribute once per (device, kernel), resident cluster counts once per (device, kernel,
// cluster size), and tensor maps once per (pointer, shape, strides, box) (a map holds nothing but
// those, so a cached one is exactly what encoding again would give).
#pragma once

#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <string>
#include <unordered_map>
#include <utility>

#include "../common.h"

namespace djepa {
namespace hopper {

constexpr int kMaxDevices = 64;

struct DeviceFacts {
  int major = 0, minor = 0, sms = 0;
};

// The current device's compute capability and SM count (queried once per device).
inline DeviceFacts current_device(const char* what, int* device = nullptr) {
  static std::mutex m;
  static std::array<DeviceFacts, kMaxDevices> facts{};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), what);
  if (device) *device = dev;
  std::lock_guard<std::mutex> lk(m);
  if (dev >= 0 && dev < kMaxDevices && facts[dev].sms > 0) return facts[dev];
  DeviceFacts f;
  check_cuda(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev), what);
  check_cuda(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, dev), what);
  check_cuda(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev), what);
  if (dev >= 0 && dev < kMaxDevices) facts[dev] = f;
  return f;
}

// Once per (device, kernel): that the runtime would launch sm_90a code for `kernel` (binaryVersion
// 90: not an sm_80 or a plain sm_90 pass, whose bodies are empty) and, with smem_bytes > 0, the
// kernel's dynamic shared memory limit. RuntimeError naming `what` otherwise.
template <typename Kernel>
void prepare_kernel(const char* what, Kernel kernel, int device, int smem_bytes = 0) {
  static std::mutex m;
  static std::set<std::pair<int, const void*>> done;
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  std::lock_guard<std::mutex> lk(m);
  if (done.count(key)) return;
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel), what);
  if (attr.binaryVersion != 90) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": this build has no sm_90a code (built for " +
                             DJEPA_CUDA_ARCHS + "); rebuild with DJEPA_CUDA_ARCHS containing 90a");
  }
  if (smem_bytes > 0) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes), what);
  }
  done.insert(key);
}

// The SM count of the current device, after checking that it is sm_90 and that this build holds
// the sm_90a code of `kernel`. RuntimeError naming `what` otherwise, before anything launches.
template <typename Kernel>
int require_sm90(const char* what, Kernel kernel) {
  int dev = 0;
  const DeviceFacts f = current_device(what, &dev);
  if (f.major != 9 || f.minor != 0) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": needs an sm_90 (Hopper) GPU, device " +
                             std::to_string(dev) + " is sm_" + std::to_string(f.major) + std::to_string(f.minor) +
                             " (use the sm_80 kernels)");
  }
  prepare_kernel(what, kernel, dev);
  return f.sms;
}

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes), once per (kernel, device, bytes).
template <typename Kernel>
void set_smem_once(const char* what, Kernel kernel, int bytes) {
  static std::mutex m;
  static std::map<std::pair<const void*, int>, int> done;
  int dev = 0;
  current_device(what, &dev);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> lk(m);
  auto it = done.find(key);
  if (it != done.end() && it->second == bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
  done[key] = bytes;
}

// How many clusters of `cluster` CTAs (threads x smem bytes each, one CTA per SM) the current
// device runs at once (cudaOccupancyMaxActiveClusters), once per (kernel, device, cluster); 0
// when it cannot run them (sets the kernel's shared-memory size first).
template <typename Kernel>
int resident_clusters_once(const char* what, Kernel kernel, int threads, int smem_bytes, int cluster) {
  static std::mutex m;
  static std::map<std::tuple<const void*, int, int>, int> found;
  int dev = 0;
  const int sms = current_device(what, &dev).sms;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, cluster);
  {
    std::lock_guard<std::mutex> lk(m);
    auto it = found.find(key);
    if (it != found.end()) return it->second;
  }
  set_smem_once(what, kernel, smem_bytes);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(sms - sms % cluster), 1, 1);
  cfg.blockDim = dim3(unsigned(threads), 1, 1);
  cfg.dynamicSmemBytes = size_t(smem_bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  std::lock_guard<std::mutex> lk(m);
  found[key] = n;
  return n;
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

// cuTensorMapEncodeTiled with a cache: the arguments (pointer, dtype, dims, strides, box, swizzle, ...)
// are the key, the 128-byte map and the result the value. Bounded: cleared when it holds 4096 maps.
template <typename EncodeFn>
CUresult encode_tiled_cached(CUtensorMap* map, CUtensorMapDataType dtype, cuuint32_t rank, void* addr,
                             const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                             const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob) {
  static std::mutex m;
  static std::unordered_map<std::string, std::pair<CUresult, CUtensorMap>> cache;
  if (rank < 1 || rank > 5) return CUDA_ERROR_INVALID_VALUE;
  std::string key;
  const auto put = [&key](const void* p, size_t n) { key.append(static_cast<const char*>(p), n); };
  const int header[6] = {int(dtype), int(rank), int(interleave), int(swizzle), int(l2), int(oob)};
  put(header, sizeof(header));
  put(&addr, sizeof(addr));
  put(dims, rank * sizeof(cuuint64_t));
  put(strides, (rank - 1) * sizeof(cuuint64_t));
  put(box, rank * sizeof(cuuint32_t));
  put(elem_strides, rank * sizeof(cuuint32_t));
  std::lock_guard<std::mutex> lk(m);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= 4096) cache.clear();
    CUtensorMap fresh{};
    const CUresult r = tensor_map_encoder<EncodeFn>()(&fresh, dtype, rank, addr, dims, strides, box, elem_strides,
                                                       interleave, swizzle, l2, oob);
    it = cache.emplace(std::move(key), std::make_pair(r, fresh)).first;
  }
  if (it->second.first == CUDA_SUCCESS) std::memcpy(map, &it->second.second, sizeof(CUtensorMap));
  return it->second.first;
}

// The cached encoder, or nullptr when the driver has none.
template <typename EncodeFn>
EncodeFn cached_tensor_map_encoder() {
  return tensor_map_encoder<EncodeFn>() ? &encode_tiled_cached<EncodeFn> : EncodeFn(nullptr);
}

}  // namespace hopper
}  // namespace djepa
