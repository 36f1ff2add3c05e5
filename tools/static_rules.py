"""The static gate's rules: one record per compiled kernel variant, and what fails it.

    record(backend, kernel, variant, arch, ...)   a record (tools/static_check.py writes a list)
    violations(record)                            the gate's complaints about one record
    check(records)                                [(record, complaint)] over all records

The gate fails (tools/static_check.py exits 1) when
  - a hot variant spills or has a stack frame,
  - a variant needs more shared memory than one block may have (232448 B sm_90, 166912 B sm_80),
  - a matmul-bound Triton kernel (fp16/bf16) on sm_90 compiles to no wgmma,
  - a sm_90a CUDA matmul kernel (csrc/*_sm90.cu: CUDA_WGMMA_KERNELS) compiles to no wgmma,
  - ptxas reports that a kernel's wgmma instructions are serialized (any variant, hot or not:
    the warning means the asynchronous tensor-core pipeline is lost),
  - a hot memory-bound vector kernel (the EMA) issues no 16-byte global load or store,
  - a variant does not compile.
"""
from sass import ARCHS

HOT_DTYPES = ("float16", "bfloat16")
# Triton kernels whose time is their tl.dots: on sm_90 their fp16/bf16 variants must use wgmma.
MATMUL_KERNELS = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "gemm_kernel"}
# Memory-bound kernels that must move 16 bytes per access on their hot path.
VECTOR_KERNELS = {"_ema_kernel"}
# The sm_90a matmul kernels: on sm_90 each must compile to wgmma (HGMMA).
CUDA_WGMMA_KERNELS = {"attn_fwd_sm90_kernel", "attn_dkdv_sm90_kernel", "attn_dq_sm90_kernel", "gemm_sm90_kernel",
                      "gemm_sm90_wide_kernel", "attn_fwd_pipelined_sm90_kernel", "attn_dkdv_pipelined_sm90_kernel",
                      "attn_dq_pipelined_sm90_kernel"}


def record(backend, kernel, variant, arch, *, regs=0, spill_bytes=0, stack_bytes=0, smem_bytes=0,
           wgmma=0, mma_sync=0, hot=False, **extra):
    rec = {
        "backend": backend, "kernel": kernel, "variant": variant, "arch": ARCHS[arch]["name"],
        "regs": int(regs), "spill_bytes": int(spill_bytes), "stack_bytes": int(stack_bytes),
        "smem_bytes": int(smem_bytes), "smem_limit": ARCHS[arch]["smem_limit"],
        "tensor_core": {"wgmma": int(wgmma), "mma_sync": int(mma_sync)}, "hot": bool(hot),
    }
    rec.update(extra)
    return rec


def violations(rec):
    """The gate's complaints about one record (empty when it passes)."""
    out = []
    if rec.get("error"):
        return [f"does not compile: {rec['error']}"]
    if rec["hot"] and rec["spill_bytes"] > 0:
        out.append(f"hot variant spills {rec['spill_bytes']} B/thread")
    if rec["hot"] and rec["stack_bytes"] > 0:
        out.append(f"hot variant has a {rec['stack_bytes']} B stack frame")
    if rec["smem_bytes"] > rec["smem_limit"]:
        out.append(f"shared memory {rec['smem_bytes']} B > the {rec['arch']} limit {rec['smem_limit']} B")
    if (rec["backend"] == "triton" and rec["arch"] == "sm_90" and rec["kernel"] in MATMUL_KERNELS
            and rec.get("dtype") in HOT_DTYPES and rec["tensor_core"]["wgmma"] == 0):
        out.append("matmul-bound kernel without wgmma on sm_90")
    if (rec["backend"] == "cuda" and rec["arch"] == "sm_90" and rec["kernel"] in CUDA_WGMMA_KERNELS
            and rec["tensor_core"]["wgmma"] == 0):
        out.append("sm_90a CUDA matmul kernel without wgmma (HGMMA)")
    for msg in rec.get("wgmma_serialized", ()):
        out.append(f"ptxas serialized its wgmma: {msg}")
    if rec["backend"] == "triton" and rec["hot"] and rec["kernel"] in VECTOR_KERNELS:
        vec = rec.get("vector_ldst", {})
        if not vec.get("ld128") or not vec.get("st128"):
            out.append("memory-bound kernel without 16-byte global loads/stores")
    return out


def check(records):
    """[(record, complaint)] over all records."""
    return [(r, v) for r in records for v in violations(r)]
