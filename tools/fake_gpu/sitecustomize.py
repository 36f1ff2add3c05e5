"""A faked GPU machine for checks on a CPU machine (tools/gpu_run.sh --dry-run,
tests/test_gpu_run.py): every Python process started with this folder on PYTHONPATH and
DJEPA_FAKE_GPU=1 sees torch.cuda answer as on the H200 machine (a GPU is available, one device
unless DJEPA_FAKE_GPU_COUNT says more, compute capability 9.0, its name), and Triton's CPU
interpreter is off, as there. Nothing runs on it: making a CUDA tensor still fails ("Torch not
compiled with CUDA enabled"). It lets pytest collect the GPU tests and benchmarks as the GPU
machine will, and shows which code would touch a GPU there."""
import os

if os.environ.get("DJEPA_FAKE_GPU") == "1":
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    _count = int(os.environ.get("DJEPA_FAKE_GPU_COUNT", "1"))
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: _count
    torch.cuda.get_device_name = lambda device=None: "NVIDIA H200 (faked)"
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    # Adam and friends ask before each step; a CUDA build of torch with no driver would raise
    # (the GPU machine's torch, rehearsed on a CPU machine). Nothing is ever captured here.
    torch.cuda.is_current_stream_capturing = lambda: False
