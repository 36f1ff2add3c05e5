"""The two physical ceilings the suites report against, measured once per session on the GPU
(design.md: bytes over measured copy bandwidth, FLOPs over measured bf16 matmul rate)."""
import pytest
import torch


@pytest.fixture(scope="session")
def matmul_tflops():
    """bf16 torch.matmul rate of this GPU in TFLOP/s (8192^3 on random data, median of do_bench)."""
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device copy bandwidth in GB/s (read + write bytes of a 1 GiB float32 copy_, median)."""
    import triton

    n = 1 << 28
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3) / 1e9
