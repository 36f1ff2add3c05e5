// Masked attention whose cost follows the visible keys: flash-attention-2 style forward and a
// deterministic backward (no floating-point atomics), fp16/bf16 with fp32 accumulation on
// tensor cores (mma.sync m16n8k16), head dims 32/64/80/96/128.
//
// Key masking works on a compacted key list made by the Python side: kv_index[b] is a
// permutation of 0..Nk-1 whose first kv_count[b] entries are the visible keys (ascending).
// Kernels walk only those entries and gather K/V rows through them. kv_index == nullptr means
// dense (all Nk keys, identity order). A sample with no visible key gets o = 0, lse = 0 and
// zero gradients.
//
// Work split (each warp owns whole rows of the tile it computes, so no cross-warp reductions):
//   fwd      : one block per 128 query rows, 32 per warp (two m16 tiles, so every K/V fragment
//              loaded with ldmatrix feeds four mma: FlashAttention-2's shared-memory traffic per
//              FLOP); loop over key tiles; online softmax in registers, base 2, the scale folded
//              into one FFMA before ex2.approx.ftz.
//   bwd delta: delta = rowsum(dO * O), one warp per row.
//   bwd dk/dv: one block per 64 compacted keys, 16 per warp; loop over all query tiles, the next
//              Q/dO tile (and its lse/delta) loading while the current one is computed.
//   bwd dq   : one block per 64 query rows, 16 per warp; loop over the visible key tiles, the
//              next K/V tile loading while the current one is computed.
// Gathered K/V tiles: the tile's token positions are read from kv_index once, one tile ahead
// (a register, then shared memory), so each 16-byte cp.async issues without a dependent load.
//
// Dropout (philox != 0; the keep rule is documented in djepa/ops/attention.py): separate kernel
// instantiations (kDropout), so the kernels without dropout are unchanged. The forward zeroes the
// dropped probabilities after the row sums (l and lse stay those of the undropped softmax) and
// scales O by 1 / (1 - p); dq and dk/dv regenerate the same bits from the seed and offset the
// kernels read from the device (philox), zero the dropped dP (dS = P * (Z dP - delta)), and dk/dv
// feeds only the kept P to dV (scaled at the end). One Philox-4x32-10 call gives the 8 bits a lane
// needs in the row layout; in the transposed dk/dv layout two neighbouring lanes swap half of
// theirs (two shuffles). The debug variant of the forward (keep_out) also stores its bits.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, c = lane % 4), used throughout:
//   A 16x16: a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B 16x8 : b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C 16x8 : c0,c1 = C[g][2c..2c+1], c2,c3 = C[g+8][2c..2c+1]
// so two neighbouring C tiles (16x8 each) are exactly one A fragment (16x16): this is how the
// probabilities P stay in registers between the two matmuls.
#include "checks.h"
#include "common.h"
#include "attention_kernels.cuh"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

namespace djepa {
namespace attention {

// ---------------------------------------------------------------------------------------------
// Host side

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, dim3 block, int smem, cudaStream_t stream, const Params& p,
            const char* name) {
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               name);
  }
  kernel<<<grid, block, smem, stream>>>(p);
  check_launch(name);
}

template <typename T, int D, int kDrop>
void run_fwd_variant(const Params& p, cudaStream_t stream) {
  using Cfg = FwdCfg<D>;
  dim3 grid((p.Nq + Cfg::kBM - 1) / Cfg::kBM, p.H, p.B);
  launch(fwd_kernel<T, D, kDrop>, grid, dim3(kThreads), Cfg::kSmem, stream, p,
         "masked_attention_fwd (fwd_kernel)");
}

template <typename T, int D>
void run_fwd(const Params& p, cudaStream_t stream) {
  if (!p.philox) run_fwd_variant<T, D, kNoDropout>(p, stream);
  else if (!p.keep_out) run_fwd_variant<T, D, kDropout>(p, stream);
  else run_fwd_variant<T, D, kDropoutRecord>(p, stream);
}

template <typename T, int D, bool kDropout>
void run_bwd_kernels(const Params& p, cudaStream_t stream) {
  if (p.Nk > 0) {  // with no key there is no dk/dv row to write
    using Cfg = DkdvCfg<D>;
    dim3 grid((p.Nk + Cfg::kBN - 1) / Cfg::kBN, p.H, p.B);
    launch(dkdv_kernel<T, D, kDropout>, grid, dim3(kThreads), Cfg::kSmem, stream, p,
           "masked_attention_bwd (dkdv_kernel)");
  }
  {
    using Cfg = DqCfg<D>;
    dim3 grid((p.Nq + Cfg::kBM - 1) / Cfg::kBM, p.H, p.B);
    launch(dq_kernel<T, D, kDropout>, grid, dim3(kThreads), Cfg::kSmem, stream, p,
           "masked_attention_bwd (dq_kernel)");
  }
}

template <typename T, int D>
void run_bwd(const Params& p, cudaStream_t stream) {
  const long long rows = static_cast<long long>(p.B) * p.H * p.Nq;
  delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
      static_cast<const T*>(p.o), static_cast<const T*>(p.dout), p.delta, rows, D);
  check_launch("masked_attention_bwd (delta_kernel)");
  if (p.philox) run_bwd_kernels<T, D, true>(p, stream);
  else run_bwd_kernels<T, D, false>(p, stream);
}

template <typename T, bool kBackward>
void dispatch_head_dim(const Params& p, int D, cudaStream_t stream) {
  switch (D) {
#define DJEPA_ATTN_CASE(d)                         \
  case d:                                          \
    if constexpr (kBackward) run_bwd<T, d>(p, stream); \
    else run_fwd<T, d>(p, stream);                 \
    break;
    DJEPA_ATTN_CASE(32)
    DJEPA_ATTN_CASE(64)
    DJEPA_ATTN_CASE(80)
    DJEPA_ATTN_CASE(96)
    DJEPA_ATTN_CASE(128)
#undef DJEPA_ATTN_CASE
    default:
      break;  // rejected by make_params
  }
}

template <bool kBackward>
void dispatch(const Params& p, int D, int dtype, cudaStream_t stream) {
  if (dtype == kFloat16) {
    dispatch_head_dim<__half, kBackward>(p, D, stream);
  } else {
    dispatch_head_dim<__nv_bfloat16, kBackward>(p, D, stream);
  }
}

[[noreturn]] void bad_arg(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string("djepa._C.") + fn + ": " + what);
}

bool aligned(std::uintptr_t ptr, std::uintptr_t bytes) { return ptr % bytes == 0; }

std::string str(long long x) { return std::to_string(x); }

// Everything the kernels assume of their arguments, checked on the host before any CUDA call
// (so it runs, and raises ValueError, on a machine without a GPU too): dtype, head dim, sizes
// within the grid and index limits, strides (3 each, >= 0), non-null and aligned pointers, the
// mask given whole or not at all, and dropout's arguments. Fills the shared part of Params. The
// entry points then check the device (csrc/checks.h: every buffer GPU memory of one GPU, which
// becomes current, and the stream its own) and that the build has code for it.
Params make_params(const char* fn, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                   std::uintptr_t kv_index, std::uintptr_t kv_count, int64_t B, int64_t H,
                   int64_t Nq, int64_t Nk, int64_t D, const std::vector<int64_t>& q_strides,
                   const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                   double scale, int dtype, std::uintptr_t philox, double dropout_p) {
  if (dtype != kFloat16 && dtype != kBFloat16) {
    bad_arg(fn, std::string("unsupported dtype ") + dtype_name(dtype) +
                    " (the CUDA kernels take float16 or bfloat16)");
  }
  if (D != 32 && D != 64 && D != 80 && D != 96 && D != 128) {
    bad_arg(fn, "unsupported head dim " + str(D) + " (supported: 32, 64, 80, 96, 128)");
  }
  if (B < 1 || H < 1 || Nq < 1 || Nk < 0) {
    bad_arg(fn, "sizes must be >= 1 (Nk >= 0), got B=" + str(B) + " H=" + str(H) + " Nq=" + str(Nq) +
                    " Nk=" + str(Nk));
  }
  if (Nk == 0) kv_index = kv_count = 0;  // no key: every row gets zeros (empty k, v may be null)
  if (B > 65535 || H > 65535) bad_arg(fn, "B and H must be <= 65535 (grid limits)");
  if (Nq > INT_MAX / 2 || Nk > INT_MAX / 2) bad_arg(fn, "sequence length too large");
  if (q_strides.size() != 3 || k_strides.size() != 3 || v_strides.size() != 3) {
    bad_arg(fn, "q_strides, k_strides and v_strides must each hold 3 ints (batch, head, token)");
  }
  for (int i = 0; i < 3; ++i) {
    if (q_strides[i] < 0 || k_strides[i] < 0 || v_strides[i] < 0) {
      bad_arg(fn, "strides must be >= 0 (element strides of batch, head and token)");
    }
  }
  if (!std::isfinite(scale)) bad_arg(fn, "scale must be finite, got " + std::to_string(scale));
  if (!q || (Nk > 0 && (!k || !v))) bad_arg(fn, "q, k and v must be non-null device pointers");
  if ((kv_index == 0) != (kv_count == 0)) {
    bad_arg(fn, "kv_index and kv_count must both be given (masked) or both be 0 (dense)");
  }
  if (!aligned(kv_index, 4) || !aligned(kv_count, 4)) {
    bad_arg(fn, "kv_index and kv_count must be 4-byte aligned int32 arrays");
  }
  const std::uintptr_t elt = 2;
  if (!aligned(q, elt) || !aligned(k, elt) || !aligned(v, elt)) {
    bad_arg(fn, "q, k and v must be aligned to their element size");
  }
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) {
    bad_arg(fn, "dropout_p must lie in [0, 1), got " + std::to_string(dropout_p));
  }
  if ((dropout_p > 0.0) != (philox != 0)) {
    bad_arg(fn, "dropout takes both dropout_p > 0 and philox (the device int64 [2] seed and offset); "
                "without dropout give neither");
  }
  if (!aligned(philox, 8)) bad_arg(fn, "philox must be an 8-byte aligned int64 array");

  Params p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.kv_index = as_ptr<const int>(kv_index);
  p.kv_count = as_ptr<const int>(kv_count);
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Nq = static_cast<int>(Nq);
  p.Nk = static_cast<int>(Nk);
  // A stride matters for alignment only where its dim has more than one element (torch gives
  // size-1 dims arbitrary strides).
  const int64_t q_sizes[3] = {B, H, Nq}, kv_sizes[3] = {B, H, Nk};
  bool vec_ok = aligned(q, 16) && aligned(k, 16) && aligned(v, 16);
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q_strides[i];
    p.ks[i] = k_strides[i];
    p.vs[i] = v_strides[i];
    vec_ok = vec_ok && (q_sizes[i] == 1 || q_strides[i] % 8 == 0) &&
             (kv_sizes[i] == 1 || (k_strides[i] % 8 == 0 && v_strides[i] % 8 == 0));
  }
  p.vec_ok = vec_ok;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.philox = as_ptr<const long long>(philox);
  p.drop_threshold = static_cast<unsigned>(std::min(std::lround(dropout_p * 65536.0), 65535L));
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  return p;
}

// The GPU must be one this build has code for (SASS of its arch, or PTX to JIT): a RuntimeError
// naming the build's archs instead of a failed launch.
template <typename Kernel>
void require_code_for_device(const char* fn, Kernel kernel) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) {
    cudaGetLastError();
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    throw std::runtime_error(std::string("djepa._C.") + fn + ": this build (archs " + DJEPA_CUDA_ARCHS +
                             ") has no code for device " + std::to_string(dev) + " (sm_" +
                             std::to_string(major) + std::to_string(minor) + "): " + cudaGetErrorString(err) +
                             "; rebuild with DJEPA_CUDA_ARCHS including it");
  }
}

void masked_attention_fwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                          std::uintptr_t lse, std::uintptr_t kv_index, std::uintptr_t kv_count,
                          int64_t B, int64_t H, int64_t Nq, int64_t Nk, int64_t D,
                          std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
                          std::vector<int64_t> v_strides, double scale, int dtype,
                          std::uintptr_t stream, std::uintptr_t philox, double dropout_p,
                          std::uintptr_t keep_out) {
  const char* fn = "masked_attention_fwd";
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides,
                         v_strides, scale, dtype, philox, dropout_p);
  if (!o || !lse) bad_arg(fn, "o and lse must be non-null device pointers");
  if (!aligned(o, 4) || !aligned(lse, 4)) bad_arg(fn, "o and lse must be 4-byte aligned");
  if (keep_out && !philox) bad_arg(fn, "keep_out (the debug keep bits) needs dropout");
  p.o = reinterpret_cast<void*>(o);
  p.lse = as_ptr<float>(lse);
  p.keep_out = as_ptr<unsigned char>(keep_out);
  require_device(fn);
  OnDevice on(pointers_device(fn, {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"lse", lse}, {"kv_index", kv_index},
                                   {"kv_count", kv_count}, {"philox", philox}, {"keep_out", keep_out}}),
              stream, fn);
  require_code_for_device(fn, fwd_kernel<__half, 64, kNoDropout>);
  dispatch<false>(p, static_cast<int>(D), dtype, as_stream(stream));
}

void masked_attention_bwd(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                          std::uintptr_t dout, std::uintptr_t lse, std::uintptr_t kv_index,
                          std::uintptr_t kv_count, std::uintptr_t dq, std::uintptr_t dk,
                          std::uintptr_t dv, std::uintptr_t delta, int64_t B, int64_t H,
                          int64_t Nq, int64_t Nk, int64_t D, std::vector<int64_t> q_strides,
                          std::vector<int64_t> k_strides, std::vector<int64_t> v_strides,
                          double scale, int dtype, std::uintptr_t stream, std::uintptr_t philox,
                          double dropout_p) {
  const char* fn = "masked_attention_bwd";
  Params p = make_params(fn, q, k, v, kv_index, kv_count, B, H, Nq, Nk, D, q_strides, k_strides,
                         v_strides, scale, dtype, philox, dropout_p);
  if (!o || !dout || !lse || !dq || !delta || (Nk > 0 && (!dk || !dv))) {
    bad_arg(fn, "o, do, lse, dq, dk, dv and delta must be non-null device pointers");
  }
  if (!aligned(o, 2) || !aligned(dout, 2) || !aligned(lse, 4) || !aligned(delta, 4)) {
    bad_arg(fn, "o, do, lse and delta must be aligned to their element size");
  }
  if (!aligned(dq, 4) || !aligned(dk, 16) || !aligned(dv, 16)) {
    bad_arg(fn, "dq must be 4-byte and dk, dv 16-byte aligned (fresh allocations are)");
  }
  p.o = reinterpret_cast<void*>(o);
  p.dout = reinterpret_cast<const void*>(dout);
  p.lse = as_ptr<float>(lse);
  p.delta = as_ptr<float>(delta);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.vec_ok = p.vec_ok && aligned(dout, 16);
  require_device(fn);
  OnDevice on(pointers_device(fn, {{"q", q}, {"k", k}, {"v", v}, {"o", o}, {"do", dout}, {"lse", lse},
                                   {"kv_index", kv_index}, {"kv_count", kv_count}, {"dq", dq}, {"dk", dk},
                                   {"dv", dv}, {"delta", delta}, {"philox", philox}}),
              stream, fn);
  require_code_for_device(fn, dq_kernel<__half, 64, false>);
  dispatch<true>(p, static_cast<int>(D), dtype, as_stream(stream));
}

void register_masked_attention(py::module_& m) {
  m.def("masked_attention_fwd", &masked_attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"), py::arg("B"),
        py::arg("H"), py::arg("Nq"), py::arg("Nk"), py::arg("D"), py::arg("q_strides"),
        py::arg("k_strides"), py::arg("v_strides"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"), py::arg("philox") = 0, py::arg("dropout_p") = 0.0, py::arg("keep_out") = 0,
        "Masked attention forward on raw device pointers: o [B,H,Nq,D] (contiguous, input "
        "dtype) and lse [B,H,Nq] float32 (natural log of the scaled scores' sum-exp; 0 for "
        "rows without visible keys). kv_index/kv_count = 0 means dense. Dropout: philox = a device "
        "int64 [2] (seed, offset), dropout_p in (0, 1); keep_out (debug) = uint8 [B,H,Nq,Nk] for "
        "the keep bits over compacted key positions. Arguments are checked (ValueError) before "
        "any CUDA call.");
  m.def("masked_attention_bwd", &masked_attention_bwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("o"), py::arg("do"), py::arg("lse"), py::arg("kv_index"), py::arg("kv_count"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("B"), py::arg("H"),
        py::arg("Nq"), py::arg("Nk"), py::arg("D"), py::arg("q_strides"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        py::arg("philox") = 0, py::arg("dropout_p") = 0.0,
        "Masked attention backward: writes dq, dk, dv (contiguous [B,H,N,D], input dtype; dk/dv "
        "rows of invisible keys are 0) deterministically; delta [B,H,Nq] float32 is workspace. "
        "Dropout: the forward's philox and dropout_p (its keep bits are regenerated).");
}

}  // namespace attention
}  // namespace djepa

namespace {
using djepa::attention::register_masked_attention;
DJEPA_REGISTER(register_masked_attention);
}  // namespace
