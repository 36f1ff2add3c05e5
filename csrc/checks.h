// Argument checks at the djepa._C boundary (ema.cu, denoise.cu, denoise_sm90.cu).
//
// An entry point takes raw pointers and sizes, so nothing but these checks stands between a
// wrong call (from djepa.ops or from another library) and a kernel reading or writing out of
// bounds. Each raises before anything launches, naming the function and the reason:
// std::invalid_argument (Python ValueError) for a wrong argument, std::runtime_error
// (RuntimeError) for what the machine or the build lacks. Order in every entry point:
//  1. the checks that need no GPU (dtypes, sizes and their int64 products, strides, flags,
//     pointers present and aligned, workspace sizes, the build's archs): tests call each entry
//     point with each wrong argument on a machine without one;
//  2. require_device, then where the pointers live (pointers_device: GPU memory of one GPU,
//     which becomes current for the launch), then the device's own limits.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "archs.h"
#include "common.h"

namespace djepa {

[[noreturn]] inline void invalid(const char* what, const std::string& why) {
  throw std::invalid_argument(std::string("djepa._C.") + what + ": " + why);
}

// A pointer argument and its parameter name, for messages.
struct Arg {
  const char* name;
  std::uintptr_t ptr;
};

inline int dtype_bytes(int code) {
  switch (code) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default: return 0;
  }
}

inline std::string hex(std::uintptr_t p) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  do {
    s.insert(s.begin(), digits[p & 15]);
    p >>= 4;
  } while (p);
  return "0x" + s;
}

inline void require_dtype(const char* what, int code, std::initializer_list<int> allowed) {
  for (int a : allowed) {
    if (a == code) return;
  }
  std::string names;
  for (int a : allowed) names += std::string(names.empty() ? "" : ", ") + dtype_name(a);
  invalid(what, "unsupported dtype code " + std::to_string(code) + " (" + dtype_name(code) + "); takes " + names);
}

inline void require_size(const char* what, const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    invalid(what, std::string(name) + "=" + std::to_string(v) + " is outside [" + std::to_string(lo) + ", " +
                      std::to_string(hi) + "]");
  }
}

inline void require_flag(const char* what, const char* name, int v) {
  if (v != 0 && v != 1) invalid(what, std::string(name) + " must be 0 or 1, got " + std::to_string(v));
}

inline void require_ptr(const char* what, const char* name, std::uintptr_t p, const char* when = nullptr) {
  if (p == 0) invalid(what, std::string(name) + " is required" + (when ? std::string(" ") + when : "") + " (got 0)");
}

inline void require_aligned(const char* what, const char* name, std::uintptr_t p, int bytes) {
  if (bytes > 0 && p % std::uintptr_t(bytes) != 0) {
    invalid(what, std::string(name) + "=" + hex(p) + " is not aligned to " + std::to_string(bytes) +
                      " bytes (its element size)");
  }
}

// a * b, or ValueError when it leaves int64 (all factors >= 0).
inline int64_t checked_mul(const char* what, const char* of, int64_t a, int64_t b) {
  if (a != 0 && b > INT64_MAX / a) invalid(what, std::string(of) + " overflows int64");
  return a * b;
}

// Byte extent of `elems` elements of `bytes` each, or ValueError when it leaves int64.
inline int64_t checked_bytes(const char* what, const char* of, int64_t elems, int bytes) {
  return checked_mul(what, of, elems, bytes);
}

// The float32 elements a split-K workspace needs: parts * M * N (ValueError on overflow), and a
// ValueError when `have` is fewer.
inline void require_workspace(const char* what, int64_t parts, int64_t M, int64_t N, int64_t have,
                              const char* formula) {
  const int64_t need = checked_mul(what, "the split-K workspace size", checked_mul(what, "M * N", M, N), parts);
  checked_bytes(what, "the split-K workspace size in bytes", need, 4);
  if (have < need) {
    invalid(what, "workspace_numel=" + std::to_string(have) + " float32 is too small for " + formula + " = " +
                      std::to_string(need));
  }
}

// RuntimeError unless this build holds code for `arch` (DJEPA_CUDA_ARCHS): the sm_90a entry
// points refuse a build with a plain "90", whose sm_90 pass holds their kernels as empty bodies.
inline void require_arch_in_build(const char* what, const char* arch) {
  if (!build_has_arch(DJEPA_CUDA_ARCHS, arch)) {
    throw std::runtime_error(std::string("djepa._C.") + what + ": this build has no sm_" + arch +
                             " code (DJEPA_CUDA_ARCHS=" + DJEPA_CUDA_ARCHS + "; a plain 90 compiles the Hopper " +
                             "kernels as empty bodies): rebuild with DJEPA_CUDA_ARCHS containing " + arch);
  }
}

// The GPU that every non-null pointer of `args` lives on (device or managed memory of one
// device), or -1 when all are null. ValueError naming the first pointer that is host memory, not
// known to CUDA, or on another GPU than the others. Call after require_device.
inline int pointers_device(const char* what, const std::vector<Arg>& args) {
  int device = -1;
  const char* first = nullptr;
  for (const Arg& a : args) {
    if (a.ptr == 0) continue;
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(a.ptr));
    if (err != cudaSuccess) {
      cudaGetLastError();
      invalid(what, std::string(a.name) + "=" + hex(a.ptr) + " is not memory CUDA knows (" +
                        cudaGetErrorString(err) + ")");
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      invalid(what, std::string(a.name) + "=" + hex(a.ptr) + " is host memory, not GPU memory");
    }
    if (device < 0) {
      device = attr.device;
      first = a.name;
    } else if (attr.device != device) {
      invalid(what, std::string(a.name) + " is on GPU " + std::to_string(attr.device) + " but " + first +
                        " on GPU " + std::to_string(device) + ": every buffer of a call must be on one GPU");
    }
  }
  return device;
}

// Makes `device` current while it lives (when >= 0 and not current already) and checks that
// `stream` (0: that device's default stream) belongs to it, where the runtime can say.
class OnDevice {
 public:
  OnDevice(int device, std::uintptr_t stream, const char* what) {
    if (device < 0) return;
    check_cuda(cudaGetDevice(&previous_), what);
    if (device != previous_) {
      check_cuda(cudaSetDevice(device), what);
      switched_ = true;
    }
#if CUDART_VERSION >= 12080
    const cudaStream_t s = as_stream(stream);
    if (s != nullptr && s != cudaStreamLegacy && s != cudaStreamPerThread) {
      int stream_device = -1;
      if (cudaStreamGetDevice(s, &stream_device) != cudaSuccess) {
        cudaGetLastError();
        restore();
        invalid(what, "stream=" + hex(stream) + " is not a CUDA stream");
      }
      if (stream_device != device) {
        restore();
        invalid(what, "stream belongs to GPU " + std::to_string(stream_device) + ", the buffers to GPU " +
                          std::to_string(device));
      }
    }
#else
    (void)stream;
#endif
  }
  ~OnDevice() { restore(); }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  void restore() {
    if (switched_) cudaSetDevice(previous_);
    switched_ = false;
  }
  int previous_ = 0;
  bool switched_ = false;
};

// The gemm contract that gemm (mma.sync) and gemm_sm90 (wgmma) share (djepa/ops/denoise.py):
// fp16/bf16 operands, epilogue & 15 in 0..3 plus the float32-output flag 16, the pointers each
// epilogue reads, aux2's row stride, every pointer aligned to its element size. Returns whether
// the call is empty (M == 0 or N == 0: nothing to launch). Zeroes aux_out where the epilogue
// saves nothing.
struct GemmArgs {
  std::uintptr_t a, b, c, bias;
  int64_t M, N, K;
  int a_trans, b_trans, epilogue;
  std::uintptr_t aux1, aux2, aux_out;
  int dtype;
  int64_t aux2_ld;
};

inline bool check_gemm(const char* what, GemmArgs& g) {
  require_dtype(what, g.dtype, {kFloat16, kBFloat16});
  require_size(what, "M", g.M, 0, INT32_MAX);
  require_size(what, "N", g.N, 0, INT32_MAX);
  require_size(what, "K", g.K, 0, INT32_MAX);
  require_flag(what, "a_trans", g.a_trans);
  require_flag(what, "b_trans", g.b_trans);
  const int ep = g.epilogue & 15;
  if ((g.epilogue & ~(15 | 16)) != 0 || ep > 3) {
    invalid(what, "unknown epilogue " + std::to_string(g.epilogue) + " (0..3, plus 16 for a float32 output)");
  }
  if (ep == 2) {
    require_size(what, "aux2_ld (epilogue 2: the gate's row stride, >= N)", g.aux2_ld, g.N, INT64_MAX / 2);
    checked_bytes(what, "aux2's extent", checked_mul(what, "aux2's extent", g.M, g.aux2_ld), 2);
  }
  if (g.M == 0 || g.N == 0) return true;
  require_ptr(what, "c", g.c);
  if (g.K > 0) {
    require_ptr(what, "a", g.a, "when K > 0");
    require_ptr(what, "b", g.b, "when K > 0");
  }
  if (ep == 2) {
    require_ptr(what, "aux1", g.aux1, "by epilogue 2 (the residual)");
    require_ptr(what, "aux2", g.aux2, "by epilogue 2 (the gate)");
  }
  if (ep == 3) require_ptr(what, "aux1", g.aux1, "by epilogue 3 (the pre-activation)");
  if (ep == 0 || ep == 3) g.aux_out = 0;  // nothing to save for these epilogues
  const int out_bytes = (g.epilogue & 16) ? 4 : 2;
  for (Arg p : {Arg{"a", g.a}, Arg{"b", g.b}, Arg{"bias", g.bias}, Arg{"aux1", g.aux1}, Arg{"aux2", g.aux2}}) {
    require_aligned(what, p.name, p.ptr, 2);
  }
  require_aligned(what, "c", g.c, out_bytes);
  require_aligned(what, "aux_out", g.aux_out, out_bytes);
  checked_bytes(what, "M * N", checked_mul(what, "M * N", g.M, g.N), 4);
  return false;
}

}  // namespace djepa
