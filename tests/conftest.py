import inspect
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The flag must be set
# before triton is first imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

# The same examples on every machine and run (a failure prints its reproducing blob); set
# HYPOTHESIS_PROFILE=explore to draw fresh examples instead.
_hypothesis_settings.register_profile("djepa", derandomize=True, print_blob=True, database=None)
_hypothesis_settings.register_profile("explore", print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "djepa"))

from djepa import backends  # noqa: E402

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_GPU = torch.cuda.is_available()
# DJEPA_AUDIT_DEVICE=meta: the GPU-machine audit (tests/test_gpu_run.py). The tests that run
# Triton kernels get the meta device where a GPU machine gives them "cuda", and djepa's dispatch
# answers as there (Triton refuses CPU tensors); launches on meta tensors do nothing. A test that
# builds CPU tensors where it asked for the device then fails as it would on the GPU machine.
AUDIT = os.environ.get("DJEPA_AUDIT_DEVICE") == "meta"
# Where Triton kernels run in this session: the GPU, or the CPU interpreter.
TRITON_DEVICE = torch.device("meta") if AUDIT else torch.device("cpu") if INTERPRETER else torch.device("cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels on the triton_device fixture "
                                       "(the GPU, or the CPU interpreter); set by conftest")


def _runs_triton(item):
    if "triton_device" in getattr(item, "fixturenames", ()):
        return True
    try:
        return 'backend="triton"' in inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "triton_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.triton)
    if AUDIT:  # only the tests that can reach a Triton kernel
        keep = [item for item in items if _runs_triton(item) and "gpu" not in item.keywords]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none is visible here (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=AUDIT)
def _gpu_machine_dispatch(monkeypatch):
    """In the audit: djepa's view of Triton as on a GPU machine (see AUDIT above)."""
    import triton.runtime.interpreter as interpreter

    real_reason = backends.triton_unavailable_reason

    def reason(op, device):
        if torch.device(device).type == "meta":
            return None
        if torch.device(device).type == "cpu":
            return "the tensors are on the CPU; Triton needs a GPU, or TRITON_INTERPRET=1 for its CPU interpreter"
        return real_reason(op, device)

    run = interpreter.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        values = list(args) + list(kwargs.values())
        if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in values):
            return None
        return run(self, *args, **kwargs)

    monkeypatch.setattr(backends, "triton_unavailable_reason", reason)
    monkeypatch.setattr(backends, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", launch)


@pytest.fixture(scope="session")
def ext():
    """The built djepa._C (tests/test_build*.py); skips where it was not built, and fails instead
    under DJEPA_REQUIRE_C=1 (CI, which builds it)."""
    module = backends.cuda_extension()
    if module is None:
        if os.environ.get("DJEPA_REQUIRE_C") == "1":
            pytest.fail(f"DJEPA_REQUIRE_C=1 but {backends.cuda_extension_error()}")
        pytest.skip(f"djepa._C is not built here: {backends.cuda_extension_error()}")
    return module


@pytest.fixture
def triton_device():
    if backends.triton_unavailable_reason("ema_update_", TRITON_DEVICE) is not None:
        pytest.skip(backends.triton_unavailable_reason("ema_update_", TRITON_DEVICE))
    return TRITON_DEVICE


def _cuda_include_dir():
    """The CUDA toolkit's include folder (the emulators compile the kernels' headers with g++)."""
    import shutil
    from pathlib import Path

    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda.h").is_file():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[1] / "include"
        if (inc / "cuda.h").is_file():
            return inc
    return None


@pytest.fixture(scope="session")
def emulator_compiler():
    """(g++, CUDA include folder) for the CPU emulators of the CUDA kernels; skips where either is
    missing, and fails instead under DJEPA_REQUIRE_C=1 (CI)."""
    import shutil

    include, gxx = _cuda_include_dir(), shutil.which("g++")
    if include is None or gxx is None:
        reason = "the CUDA headers" if include is None else "g++"
        if os.environ.get("DJEPA_REQUIRE_C") == "1":
            pytest.fail(f"DJEPA_REQUIRE_C=1 but {reason} cannot be found")
        pytest.skip(f"needs g++ and the CUDA headers: {reason} not found")
    return gxx, include
