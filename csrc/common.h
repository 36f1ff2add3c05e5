// Shared helpers for djepa._C: registration, dtype codes, device and launch checks.
//
// Conventions for every kernel file csrc/<op>.cu:
//  * functions take raw device pointers as integers (uintptr_t), sizes and strides as int64,
//    a dtype code (DType below), and the CUDA stream handle as an integer;
//  * call djepa::require_device(name) before touching the GPU and djepa::check_launch(name)
//    after every launch, so errors become Python RuntimeErrors naming the kernel;
//  * register the file's pybind11 functions with DJEPA_REGISTER(fn).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace djepa {

namespace py = pybind11;

// Must match djepa/ops/_dispatch.py DTYPE_CODES.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kFloat64: return "float64";
    default: return "unknown";
  }
}

using RegisterFn = void (*)(py::module_&);

inline std::vector<std::pair<const char*, RegisterFn>>& registry() {
  static std::vector<std::pair<const char*, RegisterFn>> fns;
  return fns;
}

struct Registrar {
  Registrar(const char* name, RegisterFn fn) { registry().emplace_back(name, fn); }
};

#define DJEPA_REGISTER(fn) static ::djepa::Registrar djepa_registrar_##fn(#fn, fn)

// Raises RuntimeError (never aborts) when no usable GPU is visible; returns the device count.
inline int require_device(const char* what) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("djepa._C.") + what +
                             ": no usable CUDA device (cudaGetDeviceCount: " +
                             cudaGetErrorString(err) + ")");
  }
  if (count == 0) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": no CUDA device is visible");
  }
  return count;
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("djepa._C.") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes the GPU that owns device pointer `ptr` current while it lives and restores the previous
// device after, so launches (on the stream the caller passed, which belongs to that GPU) and
// cudaFuncSetAttribute apply to the tensors' GPU whatever device was current. With one visible
// GPU (or a null / host pointer) it does nothing. djepa.ops also enters the tensors' device
// before calling in; this covers direct callers of djepa._C.
class DeviceGuard {
 public:
  DeviceGuard(const void* ptr, int device_count, const char* what) {
    if (device_count < 2 || ptr == nullptr) return;
    cudaPointerAttributes attr{};
    check_cuda(cudaPointerGetAttributes(&attr, ptr), what);
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return;
    check_cuda(cudaGetDevice(&previous_), what);
    if (attr.device != previous_) {
      check_cuda(cudaSetDevice(attr.device), what);
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Call right after a launch: turns a launch error into an exception naming the kernel.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline void unsupported_dtype(const char* what, int code) {
  throw std::invalid_argument(std::string("djepa._C.") + what + ": unsupported dtype " +
                              dtype_name(code));
}

}  // namespace djepa
