"""The CUDA kernels of csrc/ checked without a GPU: tools/<op>_emulate.cpp compiles the exact
device code as C++ with an emulation of the warp-level PTX it uses (tools/cuda_emulate.h) and
compares every launch variant with a float64 reference. Needs g++ and the CUDA headers (skipped
without them, unless DJEPA_REQUIRE_C=1, as in CI)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACROS = {"attention": "DJEPA_ATTN_EMULATE", "denoise": "DJEPA_DENOISE_EMULATE"}


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = Path(nvcc).resolve().parents[1] / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    return None


@pytest.mark.parametrize("op", sorted(MACROS))
def test_cuda_kernels_match_the_reference_on_the_cpu(op, tmp_path):
    include, gxx = _cuda_include(), shutil.which("g++")
    if include is None or gxx is None:
        reason = "the CUDA headers" if include is None else "g++"
        if os.environ.get("DJEPA_REQUIRE_C") == "1":
            pytest.fail(f"DJEPA_REQUIRE_C=1 but {reason} cannot be found")
        pytest.skip(f"needs g++ and the CUDA headers: {reason} not found")
    exe = tmp_path / f"{op}_emulate"
    build = subprocess.run([gxx, "-std=c++17", "-O1", "-pthread", f"-D{MACROS[op]}", f"-I{include}",
                            f"-I{ROOT / 'csrc'}", str(ROOT / "tools" / f"{op}_emulate.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), "\n".join(failed[:20]) or run.stdout[-2000:]
