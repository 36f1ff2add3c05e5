import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The flag must be set
# before triton is first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from djepa import backends  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available()
# Where Triton kernels run in this session: the GPU, or the CPU interpreter.
TRITON_DEVICE = torch.device("cpu") if INTERPRETER else torch.device("cuda")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible here (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device():
    if backends.triton_unavailable_reason("ema_update_", TRITON_DEVICE) is not None:
        pytest.skip(backends.triton_unavailable_reason("ema_update_", TRITON_DEVICE))
    return TRITON_DEVICE
