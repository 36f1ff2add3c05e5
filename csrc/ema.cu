// Fused multi-tensor EMA update: ema = decay * ema + (1 - decay) * x, float32 math.
//
// One launch covers up to kMaxTensors tensors of one (EMA dtype, tensor dtype) pair. The tensor
// table travels in the kernel's parameter space (CUDA >= 12.1 allows 32 KiB on sm_70+), so no
// host-to-device copy precedes a launch. Each block updates kBlockElems elements of one tensor,
// found by binary search over the cumulative block starts; offsets are 64-bit.
#include <algorithm>

#include "checks.h"
#include "common.h"
#include "convert.cuh"

namespace djepa {
namespace {

constexpr int kMaxTensors = 256;
constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kIters = 4;
constexpr int64_t kBlockElems = int64_t(kThreads) * kVec * kIters;

struct EmaTable {
  void* ema[kMaxTensors];
  const void* x[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t block_start[kMaxTensors + 1];
  int count;
};

template <typename TE, typename TX>
__global__ void __launch_bounds__(kThreads)
    ema_kernel(const __grid_constant__ EmaTable table, const float* __restrict__ decay_ptr,
               float decay, float one_minus_decay) {
  const int64_t block = blockIdx.x;
  int lo = 0, hi = table.count;
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (table.block_start[mid] <= block) lo = mid; else hi = mid;
  }
  const int t = lo;
  TE* __restrict__ ema = static_cast<TE*>(table.ema[t]);
  const TX* __restrict__ x = static_cast<const TX*>(table.x[t]);
  const int64_t numel = table.numel[t];
  const int64_t begin = (block - table.block_start[t]) * kBlockElems;
  const int64_t end = begin + kBlockElems < numel ? begin + kBlockElems : numel;

  float d = decay, w = one_minus_decay;
  if (decay_ptr != nullptr) {
    d = *decay_ptr;
    w = 1.0f - d;
  }

  const bool aligned = (reinterpret_cast<uintptr_t>(ema + begin) % (sizeof(TE) * kVec) == 0) &&
                       (reinterpret_cast<uintptr_t>(x + begin) % (sizeof(TX) * kVec) == 0);
  if (aligned && end - begin == kBlockElems) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
      Pack<TE, kVec> e = *reinterpret_cast<const Pack<TE, kVec>*>(ema + i);
      const Pack<TX, kVec> v = *reinterpret_cast<const Pack<TX, kVec>*>(x + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        e.v[j] = from_f<TE>(d * to_f(e.v[j]) + w * to_f(v.v[j]));
      }
      *reinterpret_cast<Pack<TE, kVec>*>(ema + i) = e;
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      ema[i] = from_f<TE>(d * to_f(ema[i]) + w * to_f(x[i]));
    }
  }
}

template <typename TE, typename TX>
void launch(const EmaTable& table, int64_t blocks, const float* decay_ptr, float decay, float one_minus,
            cudaStream_t stream) {
  ema_kernel<TE, TX><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, decay_ptr, decay, one_minus);
  check_launch("ema_update (ema_kernel)");
}

// ValueError unless every EMA tensor's bytes are apart from every other tensor's (the kernel
// reads x and writes ema through __restrict__ pointers; sources may share memory).
void check_apart(const std::vector<std::uintptr_t>& ema_ptrs, const std::vector<std::uintptr_t>& x_ptrs,
                 const std::vector<int64_t>& numels, int ema_bytes, int x_bytes) {
  struct Span {
    std::uintptr_t lo, hi;
    bool ema;
    size_t i;
  };
  std::vector<Span> spans;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] == 0) continue;
    spans.push_back({ema_ptrs[i], ema_ptrs[i] + std::uintptr_t(numels[i]) * ema_bytes, true, i});
    spans.push_back({x_ptrs[i], x_ptrs[i] + std::uintptr_t(numels[i]) * x_bytes, false, i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  const Span* reach_any = nullptr;  // of the spans so far, the one reaching furthest; and of the EMA ones
  const Span* reach_ema = nullptr;
  for (const Span& s : spans) {
    const Span* hit = s.ema ? reach_any : reach_ema;
    if (hit && s.lo < hit->hi) {
      auto name = [](const Span* t) {
        return std::string(t->ema ? "ema_ptrs[" : "x_ptrs[") + std::to_string(t->i) + "]";
      };
      throw std::invalid_argument("djepa._C.ema_update: " + name(hit) + " and " + name(&s) +
                                  " overlap; an EMA tensor must not share memory with another tensor");
    }
    if (!reach_any || s.hi > reach_any->hi) reach_any = &s;
    if (s.ema && (!reach_ema || s.hi > reach_ema->hi)) reach_ema = &s;
  }
}

// ValueError when a launch (kMaxTensors non-empty tensors, as ema_update groups them) would need
// more than 2^31 - 1 blocks, checked before the first launch.
void check_launch_sizes(const std::vector<int64_t>& numels) {
  int64_t blocks = 0;
  int count = 0;
  for (int64_t n : numels) {
    if (n == 0) continue;
    if (count == kMaxTensors) blocks = count = 0;
    blocks += (n + kBlockElems - 1) / kBlockElems;
    ++count;
    if (blocks > 0x7fffffffLL) invalid("ema_update", "more than 2^31-1 blocks in one launch");
  }
}

void ema_update(const std::vector<std::uintptr_t>& ema_ptrs, const std::vector<std::uintptr_t>& x_ptrs,
                const std::vector<int64_t>& numels, int ema_dtype, int x_dtype, std::uintptr_t decay_ptr,
                double decay, double one_minus_decay, std::uintptr_t stream) {
  const char* what = "ema_update";
  if (ema_ptrs.size() != x_ptrs.size() || ema_ptrs.size() != numels.size()) {
    invalid(what, "pointer and size lists differ in length (ema_ptrs " + std::to_string(ema_ptrs.size()) +
                      ", x_ptrs " + std::to_string(x_ptrs.size()) + ", numels " + std::to_string(numels.size()) + ")");
  }
  const bool supported = (ema_dtype == kFloat32 && (x_dtype == kFloat32 || x_dtype == kFloat16 || x_dtype == kBFloat16)) ||
                         (ema_dtype == kFloat16 && x_dtype == kFloat16) ||
                         (ema_dtype == kBFloat16 && x_dtype == kBFloat16);
  if (!supported) {
    invalid(what, std::string("unsupported dtype pair (EMA ") + dtype_name(ema_dtype) + ", tensor " +
                      dtype_name(x_dtype) + ")");
  }
  const int eb = dtype_bytes(ema_dtype), xb = dtype_bytes(x_dtype);
  for (size_t i = 0; i < numels.size(); ++i) {
    const std::string at = "[" + std::to_string(i) + "]";
    if (numels[i] < 0) invalid(what, "numels" + at + "=" + std::to_string(numels[i]) + " < 0");
    if (numels[i] == 0) continue;
    checked_bytes(what, ("numels" + at + " in bytes").c_str(), numels[i], 4);
    require_ptr(what, ("ema_ptrs" + at).c_str(), ema_ptrs[i]);
    require_ptr(what, ("x_ptrs" + at).c_str(), x_ptrs[i]);
    require_aligned(what, ("ema_ptrs" + at).c_str(), ema_ptrs[i], eb);
    require_aligned(what, ("x_ptrs" + at).c_str(), x_ptrs[i], xb);
    if (ema_ptrs[i] > UINTPTR_MAX - std::uintptr_t(numels[i]) * eb ||
        x_ptrs[i] > UINTPTR_MAX - std::uintptr_t(numels[i]) * xb) {
      invalid(what, "tensor " + std::to_string(i) + " runs past the end of the address space");
    }
  }
  check_apart(ema_ptrs, x_ptrs, numels, eb, xb);
  check_launch_sizes(numels);
  require_aligned(what, "decay_ptr", decay_ptr, 4);
  require_device(what);
  std::vector<std::string> names;  // reserved: the Args point into these strings
  names.reserve(2 * numels.size());
  std::vector<Arg> args{{"decay_ptr", decay_ptr}};
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] == 0) continue;
    names.push_back("ema_ptrs[" + std::to_string(i) + "]");
    args.push_back({names.back().c_str(), ema_ptrs[i]});
    names.push_back("x_ptrs[" + std::to_string(i) + "]");
    args.push_back({names.back().c_str(), x_ptrs[i]});
  }
  OnDevice on(pointers_device(what, args), stream, what);
  const float* dptr = reinterpret_cast<const float*>(decay_ptr);
  const cudaStream_t s = as_stream(stream);
  size_t pos = 0;
  while (pos < ema_ptrs.size()) {
    EmaTable table;
    table.count = 0;
    table.block_start[0] = 0;
    for (; pos < ema_ptrs.size() && table.count < kMaxTensors; ++pos) {
      if (numels[pos] == 0) continue;
      const int c = table.count++;
      table.ema[c] = reinterpret_cast<void*>(ema_ptrs[pos]);
      table.x[c] = reinterpret_cast<const void*>(x_ptrs[pos]);
      table.numel[c] = numels[pos];
      table.block_start[c + 1] = table.block_start[c] + (numels[pos] + kBlockElems - 1) / kBlockElems;
    }
    if (table.count == 0) continue;
    const int64_t blocks = table.block_start[table.count];
    const float d = static_cast<float>(decay), w = static_cast<float>(one_minus_decay);
    if (ema_dtype == kFloat32 && x_dtype == kFloat32) launch<float, float>(table, blocks, dptr, d, w, s);
    else if (ema_dtype == kFloat32 && x_dtype == kFloat16) launch<float, __half>(table, blocks, dptr, d, w, s);
    else if (ema_dtype == kFloat32 && x_dtype == kBFloat16) launch<float, __nv_bfloat16>(table, blocks, dptr, d, w, s);
    else if (ema_dtype == kFloat16) launch<__half, __half>(table, blocks, dptr, d, w, s);
    else launch<__nv_bfloat16, __nv_bfloat16>(table, blocks, dptr, d, w, s);
  }
}

void register_ema(py::module_& m) {
  m.def("ema_update", &ema_update, py::arg("ema_ptrs"), py::arg("x_ptrs"), py::arg("numels"),
        py::arg("ema_dtype"), py::arg("x_dtype"), py::arg("decay_ptr"), py::arg("decay"),
        py::arg("one_minus_decay"), py::arg("stream"),
        "In place ema = decay*ema + (1-decay)*x over lists of device pointers (<= 256 tensors per launch). "
        "decay_ptr, when non-zero, points to a float32 decay on the device and overrides decay.");
}

}  // namespace

DJEPA_REGISTER(register_ema);

}  // namespace djepa
