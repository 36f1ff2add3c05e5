// djepa._C.masked_attention_fwd_sm90 (and _bwd_sm90): masked attention for Hopper (wgmma, TMA for
// dense streams, cp.async gathers for masked keys, warp-specialised and persistent). Same
// arguments and results as masked_attention_fwd / _bwd (contract in djepa/ops/attention.py);
// head dims 64, 80, 96, 128; fp16 / bf16. Device code and design: csrc/hopper/attn_*.cuh.
//
// Two designs, chosen per call by the trailing `design` argument (djepa: DJEPA_SM90_ATTENTION):
//   0 (pipelined, the default): attn_pipelined_fwd.cuh / attn_pipelined_bwd.cuh, FlashAttention-3's
//     schedule (softmax under the GEMMs, ping-pong consumers, 64-row backward streams); scale <= 0
//     runs the baseline (the pipelined softmax scales the row maximum, which needs scale > 0);
//   1 (baseline): attn_fwd_kernel.cuh / attn_bwd_kernel.cuh, the first sm_90a kernels, kept so one
//     GPU run measures both.
//
// Runs only on sm_90 devices from a build that holds sm_90a code; anywhere else RuntimeError
// before anything is launched. Unlike the sm_80 entry points Nk = 0 is accepted (o = 0, lse = 0).
// The arguments are checked on the host first (ValueError, before any CUDA call, so also on a
// machine without a GPU), then the build's archs, then the device (csrc/checks.h); no dropout
// here (djepa.ops sends dropout to the mma.sync kernels). Host-side state (device facts, kernel
// attributes, tensor maps) is cached (hopper/host.cuh).
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "common.h"
#include "hopper/attn_bwd_kernel.cuh"
#include "hopper/attn_fwd_kernel.cuh"
#include "hopper/attn_pipelined_bwd.cuh"
#include "hopper/attn_pipelined_fwd.cuh"
#include "hopper/host.cuh"

namespace djepa {
namespace {

using namespace hopper::attn;

[[noreturn]] void bad_arg(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string("djepa._C.") + fn + ": " + what);
}

bool aligned(std::uintptr_t ptr, std::uintptr_t bytes) { return ptr % bytes == 0; }

// Validates the arguments shared by forward and backward; fills p (everything but the plan).
Params make_params(const char* fn, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t kv_index,
                   std::uintptr_t kv_count, int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D,
                   const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                   const std::vector<int64_t>& v_strides, double scale, int dtype, int design, bool& vec_ok) {
  if (dtype != kFloat16 && dtype != kBFloat16) {
    bad_arg(fn, std::string("unsupported dtype ") + dtype_name(dtype) + " (float16 or bfloat16)");
  }
  if (D != 64 && D != 80 && D != 96 && D != 128) {
    bad_arg(fn, "unsupported head dim " + std::to_string(D) + " (supported: 64, 80, 96, 128)");
  }
  if (B < 1 || H < 1 || Nq < 1 || Nk < 0) {
    bad_arg(fn, "sizes must be B, H, Nq >= 1 and Nk >= 0, got B=" + std::to_string(B) + " H=" + std::to_string(H) +
                    " Nq=" + std::to_string(Nq) + " Nk=" + std::to_string(Nk));
  }
  if (B > INT_MAX / 2 || H > 65535 || Nq > INT_MAX / 2 || Nk > INT_MAX / 2 ||
      B * H * ((Nq + kBM - 1) / kBM) > INT_MAX || B * H * ((Nk + kFixedRows - 1) / kFixedRows) > INT_MAX) {
    bad_arg(fn, "sizes too large");
  }
  if (q_strides.size() != 3 || k_strides.size() != 3 || v_strides.size() != 3) {
    bad_arg(fn, "q_strides, k_strides and v_strides must each hold 3 ints (batch, head, token)");
  }
  for (int i = 0; i < 3; ++i) {
    if (q_strides[i] < 0 || k_strides[i] < 0 || v_strides[i] < 0) {
      bad_arg(fn, "strides must be >= 0 (element strides of batch, head and token)");
    }
  }
  if (!std::isfinite(scale)) bad_arg(fn, "scale must be finite, got " + std::to_string(scale));
  if (design != kDesignPipelined && design != kDesignBaseline) {
    bad_arg(fn, "design=" + std::to_string(design) + " is neither 0 (pipelined) nor 1 (baseline)");
  }
  if (!q || !k || !v) bad_arg(fn, "q, k and v must be non-null device pointers");
  if ((kv_index == 0) != (kv_count == 0)) {
    bad_arg(fn, "kv_index and kv_count must both be given (masked) or both be 0 (dense)");
  }
  if (!aligned(kv_index, 4) || !aligned(kv_count, 4)) bad_arg(fn, "kv_index and kv_count must be 4-byte aligned");
  if (!aligned(q, 2) || !aligned(k, 2) || !aligned(v, 2)) bad_arg(fn, "q, k and v must be aligned to their element size");
  Params p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.kv_index = reinterpret_cast<const int*>(kv_index);
  p.kv_count = reinterpret_cast<const int*>(kv_count);
  p.B = int(B);
  p.H = int(H);
  p.Nq = int(Nq);
  p.Nk = int(Nk);
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q_strides[i];
    p.ks[i] = k_strides[i];
    p.vs[i] = v_strides[i];
  }
  normalize_strides(p.qs, p.B, p.H, p.Nq, int(D));
  normalize_strides(p.ks, p.B, p.H, p.Nk, int(D));
  normalize_strides(p.vs, p.B, p.H, p.Nk, int(D));
  vec_ok = aligned(q, 16) && aligned(k, 16) && aligned(v, 16);
  for (int i = 0; i < 3; ++i) vec_ok = vec_ok && p.qs[i] % 8 == 0 && p.ks[i] % 8 == 0 && p.vs[i] % 8 == 0;
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  return p;
}

// The design that runs: the pipelined kernels need scale > 0 (see the header).
int effective_design(int design, const Params& p) {
  return design == kDesignPipelined && p.scale > 0.f ? kDesignPipelined : kDesignBaseline;
}

// Launches kernel<<<min(items, SMs), 384, smem>>> after its one-time set-up on this device.
template <typename Kernel, typename... Args>
void launch(const char* fn, const char* name, Kernel kernel, int items, int smem, cudaStream_t stream, int device,
            int sms, const Args&... args) {
  hopper::prepare_kernel(fn, kernel, device, smem);
  kernel<<<std::max(1, std::min(items, sms)), kThreads, smem, stream>>>(args...);
  check_launch((std::string(fn) + " (" + name + ")").c_str());
}

template <typename T, int D>
void run_fwd(Params& p, bool vec_ok, int design, cudaStream_t stream, int device, int sms) {
  const char* fn = "masked_attention_fwd_sm90";
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const EncodeFn enc = hopper::cached_tensor_map_encoder<EncodeFn>();
  if (effective_design(design, p) == kDesignPipelined) {
    pipe::Maps maps{};
    pipe::plan_fwd<D>(p, maps, enc, bf16, vec_ok, p.o_path);
    launch(fn, "attn_fwd_pipelined_sm90_kernel", attn_fwd_pipelined_sm90_kernel<T, D>, p.items,
           pipe::FwdPlan<D>::kSmemBytes, stream, device, sms, p, maps);
  } else {
    Maps maps{};
    plan<D>(p, maps, enc, bf16, vec_ok);
    launch(fn, "attn_fwd_sm90_kernel", attn_fwd_sm90_kernel<T, D>, p.items, Chunks<D>::kSmemBytes, stream, device,
           sms, p, maps);
  }
}

template <typename T>
void fwd_head_dim(Params& p, int D, bool vec_ok, int design, cudaStream_t s, int device, int sms) {
  switch (D) {
    case 64: return run_fwd<T, 64>(p, vec_ok, design, s, device, sms);
    case 80: return run_fwd<T, 80>(p, vec_ok, design, s, device, sms);
    case 96: return run_fwd<T, 96>(p, vec_ok, design, s, device, sms);
    default: return run_fwd<T, 128>(p, vec_ok, design, s, device, sms);
  }
}

void masked_attention_fwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                               std::uintptr_t lse, std::uintptr_t kv_index, std::uintptr_t kv_count, int64_t B,
                               int64_t H, int64_t Nq, int64_t Nk, int64_t D, std::vector<int64_t> q_strides,
                               std::vector<int64_t> k_strides, std::vector<int64_t> v_strides, double scale, int dtype,
                               std::uintptr_t stream, int design) {
  const char* fn = "masked_attention_fwd_sm90";
  bool vec_ok = false;
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides, v_strides, scale,
                         dtype, design, vec_ok);
  if (!o || !lse) bad_arg(fn, "o and lse must be non-null device pointers");
  if (!aligned(o, 4) || !aligned(lse, 4)) bad_arg(fn, "o and lse must be 4-byte aligned");
  p.o = reinterpret_cast<void*>(o);
  p.lse = reinterpret_cast<float*>(lse);
  require_arch_in_build(fn, "90a");
  require_device(fn);
  OnDevice on(pointers_device(fn, {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"kv_index", kv_index},
                                   {"kv_count", kv_count}}),
              stream, fn);
  int device = 0;
  const int sms = hopper::require_sm90(fn, attn_fwd_pipelined_sm90_kernel<__nv_bfloat16, 64>);
  check_cuda(cudaGetDevice(&device), fn);
  if (dtype == kFloat16) fwd_head_dim<__half>(p, int(D), vec_ok, design, as_stream(stream), device, sms);
  else fwd_head_dim<__nv_bfloat16>(p, int(D), vec_ok, design, as_stream(stream), device, sms);
}

template <typename T, int D>
void run_bwd(Params& p, bool vec_ok, int design, cudaStream_t stream, int device, int sms) {
  const char* fn = "masked_attention_bwd_sm90";
  const long long rows = static_cast<long long>(p.B) * p.H * p.Nq;
  delta_sm90_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const T*>(p.o), static_cast<const T*>(p.dout), p.delta, rows, D);
  check_launch("masked_attention_bwd_sm90 (delta_sm90_kernel)");
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const EncodeFn enc = hopper::cached_tensor_map_encoder<EncodeFn>();
  Params pk = p, pq = p;
  if (effective_design(design, p) == kDesignPipelined) {
    constexpr int smem = pipe::BwdPlan<D>::kSmemBytes;
    pipe::Maps mk{}, mq{};
    pipe::plan_bwd<D>(pk, mk, enc, bf16, vec_ok, true);
    pipe::plan_bwd<D>(pq, mq, enc, bf16, vec_ok, false);
    launch(fn, "attn_dkdv_pipelined_sm90_kernel", attn_dkdv_pipelined_sm90_kernel<T, D>, pk.items, smem, stream,
           device, sms, pk, mk);
    launch(fn, "attn_dq_pipelined_sm90_kernel", attn_dq_pipelined_sm90_kernel<T, D>, pq.items, smem, stream, device,
           sms, pq, mq);
  } else {
    constexpr int smem = BwdShape<D>::kSmemBytes;
    Maps mk{}, mq{};
    plan_bwd<D>(pk, mk, enc, bf16, vec_ok, true);
    plan_bwd<D>(pq, mq, enc, bf16, vec_ok, false);
    launch(fn, "attn_dkdv_sm90_kernel", attn_dkdv_sm90_kernel<T, D>, pk.items, smem, stream, device, sms, pk, mk);
    launch(fn, "attn_dq_sm90_kernel", attn_dq_sm90_kernel<T, D>, pq.items, smem, stream, device, sms, pq, mq);
  }
}

template <typename T>
void bwd_head_dim(Params& p, int D, bool vec_ok, int design, cudaStream_t s, int device, int sms) {
  switch (D) {
    case 64: return run_bwd<T, 64>(p, vec_ok, design, s, device, sms);
    case 80: return run_bwd<T, 80>(p, vec_ok, design, s, device, sms);
    case 96: return run_bwd<T, 96>(p, vec_ok, design, s, device, sms);
    default: return run_bwd<T, 128>(p, vec_ok, design, s, device, sms);
  }
}

void masked_attention_bwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                               std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t kv_index,
                               std::uintptr_t kv_count, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                               std::uintptr_t delta, int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D,
                               std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                               std::vector<int64_t> v_strides, double scale, int dtype, std::uintptr_t stream,
                               int design) {
  const char* fn = "masked_attention_bwd_sm90";
  bool vec_ok = false;
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides, v_strides, scale,
                         dtype, design, vec_ok);
  if (!o || !dout || !lse || !dq || !delta || (Nk > 0 && (!dk || !dv))) {
    bad_arg(fn, "o, do, lse, dq, dk, dv and delta must be non-null device pointers");
  }
  if (!aligned(o, 2) || !aligned(dout, 2) || !aligned(lse, 4) || !aligned(delta, 4) || !aligned(dq, 4) ||
      !aligned(dk, 4) || !aligned(dv, 4)) {
    bad_arg(fn, "o and do must be 2-byte, lse, delta, dq, dk and dv 4-byte aligned (fresh allocations are)");
  }
  p.o = reinterpret_cast<void*>(o);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = reinterpret_cast<float*>(lse);
  p.delta = reinterpret_cast<float*>(delta);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  require_arch_in_build(fn, "90a");
  require_device(fn);
  OnDevice on(pointers_device(fn, {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"do", dout}, {"lse", lse},
                                   {"kv_index", kv_index}, {"kv_count", kv_count}, {"dq", dq}, {"dk", dk},
                                   {"dv", dv}, {"delta", delta}}),
              stream, fn);
  int device = 0;
  const int sms = hopper::require_sm90(fn, attn_dkdv_pipelined_sm90_kernel<__nv_bfloat16, 64>);
  check_cuda(cudaGetDevice(&device), fn);
  if (dtype == kFloat16) bwd_head_dim<__half>(p, int(D), vec_ok, design, as_stream(stream), device, sms);
  else bwd_head_dim<__nv_bfloat16>(p, int(D), vec_ok, design, as_stream(stream), device, sms);
}

void register_masked_attention_sm90(py::module_& m) {
  m.def("masked_attention_fwd_sm90", &masked_attention_fwd_sm90, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"), py::arg("B"), py::arg("H"),
        py::arg("Nq"), py::arg("Nk"), py::arg("D"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("design") = 0,
        "masked_attention_fwd for sm_90 (wgmma, TMA / cp.async gathers, persistent): same arguments and results, "
        "and `design`: 0 = pipelined (FlashAttention-3's schedule; the default), 1 = baseline (the first sm_90a "
        "kernels); head dims 64, 80, 96, 128; RuntimeError on other GPUs or builds without sm_90a");
  m.def("masked_attention_bwd_sm90", &masked_attention_bwd_sm90, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("do"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("B"), py::arg("H"), py::arg("Nq"), py::arg("Nk"),
        py::arg("D"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("scale"),
        py::arg("dtype"), py::arg("stream"), py::arg("design") = 0,
        "masked_attention_bwd for sm_90 (delta, then deterministic dk/dv and dq wgmma kernels): same arguments and "
        "results (dq, dk, dv contiguous [B, H, N, D]; dk/dv rows of invisible keys are 0), and `design` (0 = "
        "pipelined, 1 = baseline, as the forward); RuntimeError on other GPUs or builds without sm_90a");
}

}  // namespace

DJEPA_REGISTER(register_masked_attention_sm90);

}  // namespace djepa
