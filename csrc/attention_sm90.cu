// djepa._C.masked_attention_fwd_sm90 (and _bwd_sm90): masked attention for Hopper (wgmma, TMA for
// dense streams, cp.async gathers for masked keys, warp-specialised and persistent). Same
// arguments and results as masked_attention_fwd / _bwd (contract in djepa/ops/attention.py);
// head dims 64, 80, 96, 128; fp16 / bf16. Device code and design: csrc/hopper/attn_*.cuh.
//
// Runs only on sm_90 devices from a build that holds sm_90a code; anywhere else RuntimeError
// before anything is launched. Unlike the sm_80 entry points Nk = 0 is accepted (o = 0, lse = 0).
// The arguments are checked on the host first (ValueError, before any CUDA call, so also on a
// machine without a GPU), then the build's archs, then the device (csrc/checks.h); no dropout
// here (djepa.ops sends dropout to the mma.sync kernels).
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "common.h"
#include "hopper/attn_bwd_kernel.cuh"
#include "hopper/attn_fwd_kernel.cuh"
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
                   const std::vector<int64_t>& v_strides, double scale, int dtype, bool& vec_ok) {
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
      B * H * ((Nq + kBM - 1) / kBM) > INT_MAX) {
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

template <typename T, int D>
void run_fwd(Params& p, bool vec_ok, cudaStream_t stream, int sms) {
  auto kernel = attn_fwd_sm90_kernel<T, D>;
  Maps maps{};
  plan<D>(p, maps, hopper::tensor_map_encoder<EncodeFn>(), std::is_same_v<T, __nv_bfloat16>, vec_ok);
  constexpr int smem = Chunks<D>::kSmemBytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "masked_attention_fwd_sm90 (shared memory size)");
  kernel<<<std::min(p.items, sms), kThreads, smem, stream>>>(p, maps);
  check_launch("masked_attention_fwd_sm90 (attn_fwd_sm90_kernel)");
}

template <typename T>
void fwd_head_dim(Params& p, int D, bool vec_ok, cudaStream_t s, int sms) {
  switch (D) {
    case 64: return run_fwd<T, 64>(p, vec_ok, s, sms);
    case 80: return run_fwd<T, 80>(p, vec_ok, s, sms);
    case 96: return run_fwd<T, 96>(p, vec_ok, s, sms);
    default: return run_fwd<T, 128>(p, vec_ok, s, sms);
  }
}

void masked_attention_fwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                               std::uintptr_t lse, std::uintptr_t kv_index, std::uintptr_t kv_count, int64_t B,
                               int64_t H, int64_t Nq, int64_t Nk, int64_t D, std::vector<int64_t> q_strides,
                               std::vector<int64_t> k_strides, std::vector<int64_t> v_strides, double scale, int dtype,
                               std::uintptr_t stream) {
  const char* fn = "masked_attention_fwd_sm90";
  bool vec_ok = false;
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides, v_strides, scale,
                         dtype, vec_ok);
  if (!o || !lse) bad_arg(fn, "o and lse must be non-null device pointers");
  if (!aligned(o, 4) || !aligned(lse, 4)) bad_arg(fn, "o and lse must be 4-byte aligned");
  p.o = reinterpret_cast<void*>(o);
  p.lse = reinterpret_cast<float*>(lse);
  require_arch_in_build(fn, "90a");
  require_device(fn);
  OnDevice on(pointers_device(fn, {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"kv_index", kv_index},
                                   {"kv_count", kv_count}}),
              stream, fn);
  const int sms = hopper::require_sm90(fn, attn_fwd_sm90_kernel<__nv_bfloat16, 64>);
  if (dtype == kFloat16) fwd_head_dim<__half>(p, int(D), vec_ok, as_stream(stream), sms);
  else fwd_head_dim<__nv_bfloat16>(p, int(D), vec_ok, as_stream(stream), sms);
}

template <typename T, int D>
void run_bwd(Params& p, bool vec_ok, cudaStream_t stream, int sms) {
  const long long rows = static_cast<long long>(p.B) * p.H * p.Nq;
  delta_sm90_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const T*>(p.o), static_cast<const T*>(p.dout), p.delta, rows, D);
  check_launch("masked_attention_bwd_sm90 (delta_sm90_kernel)");
  constexpr int smem = BwdShape<D>::kSmemBytes;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  {
    auto kernel = attn_dkdv_sm90_kernel<T, D>;
    Params pk = p;
    Maps maps{};
    plan_bwd<D>(pk, maps, hopper::tensor_map_encoder<EncodeFn>(), bf16, vec_ok, true);
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "masked_attention_bwd_sm90 (shared memory size)");
    kernel<<<std::max(1, std::min(pk.items, sms)), kThreads, smem, stream>>>(pk, maps);
    check_launch("masked_attention_bwd_sm90 (attn_dkdv_sm90_kernel)");
  }
  {
    auto kernel = attn_dq_sm90_kernel<T, D>;
    Params pq = p;
    Maps maps{};
    plan_bwd<D>(pq, maps, hopper::tensor_map_encoder<EncodeFn>(), bf16, vec_ok, false);
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "masked_attention_bwd_sm90 (shared memory size)");
    kernel<<<std::max(1, std::min(pq.items, sms)), kThreads, smem, stream>>>(pq, maps);
    check_launch("masked_attention_bwd_sm90 (attn_dq_sm90_kernel)");
  }
}

template <typename T>
void bwd_head_dim(Params& p, int D, bool vec_ok, cudaStream_t s, int sms) {
  switch (D) {
    case 64: return run_bwd<T, 64>(p, vec_ok, s, sms);
    case 80: return run_bwd<T, 80>(p, vec_ok, s, sms);
    case 96: return run_bwd<T, 96>(p, vec_ok, s, sms);
    default: return run_bwd<T, 128>(p, vec_ok, s, sms);
  }
}

void masked_attention_bwd_sm90(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                               std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t kv_index,
                               std::uintptr_t kv_count, std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv,
                               std::uintptr_t delta, int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D,
                               std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                               std::vector<int64_t> v_strides, double scale, int dtype, std::uintptr_t stream) {
  const char* fn = "masked_attention_bwd_sm90";
  bool vec_ok = false;
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides, v_strides, scale,
                         dtype, vec_ok);
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
  const int sms = hopper::require_sm90(fn, attn_dkdv_sm90_kernel<__nv_bfloat16, 64>);
  if (dtype == kFloat16) bwd_head_dim<__half>(p, int(D), vec_ok, as_stream(stream), sms);
  else bwd_head_dim<__nv_bfloat16>(p, int(D), vec_ok, as_stream(stream), sms);
}

void register_masked_attention_sm90(py::module_& m) {
  m.def("masked_attention_fwd_sm90", &masked_attention_fwd_sm90, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"), py::arg("B"), py::arg("H"),
        py::arg("Nq"), py::arg("Nk"), py::arg("D"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "masked_attention_fwd for sm_90 (wgmma, TMA / cp.async gathers, persistent): same arguments and results; "
        "head dims 64, 80, 96, 128; RuntimeError on other GPUs or builds without sm_90a");
  m.def("masked_attention_bwd_sm90", &masked_attention_bwd_sm90, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("do"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("B"), py::arg("H"), py::arg("Nq"), py::arg("Nk"),
        py::arg("D"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("scale"),
        py::arg("dtype"), py::arg("stream"),
        "masked_attention_bwd for sm_90 (delta, then deterministic dk/dv and dq wgmma kernels): same arguments and "
        "results (dq, dk, dv contiguous [B, H, N, D]; dk/dv rows of invisible keys are 0); RuntimeError on other "
        "GPUs or builds without sm_90a");
}

}  // namespace

DJEPA_REGISTER(register_masked_attention_sm90);

}  // namespace djepa
