"""Build djepa; compile the CUDA extension djepa._C with CMake when nvcc is available.

Environment:
  DJEPA_SKIP_CUDA=1        install the pure-Python package (Triton + eager) only
  DJEPA_CUDA_ARCHS="80;90a" CMake CUDA architecture list (default 80;90a)
  MAX_JOBS=N               parallel compile jobs
  CUDA_HOME                where to look for nvcc first
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"


def find_nvcc():
    if os.environ.get("DJEPA_SKIP_CUDA", "0") == "1":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve()
    return None


def nvcc_version(nvcc):
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(m.group(1)), int(m.group(2))


def cmake_executable():
    try:
        import cmake  # the PyPI wheel, from the build requirements

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.is_file():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("building djepa._C needs CMake >= 3.27 (pip install cmake)")
    return exe


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        nvcc = NVCC
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DJEPA_CUDA_ARCHS", "80;90a")
        cmake = cmake_executable()
        cfg = "Release"
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCUDAToolkit_ROOT={nvcc.parent.parent}",
            f"-DDJEPA_CUDA_ARCHS={archs}",
            f"-DDJEPA_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        jobs = os.environ.get("MAX_JOBS") or str(max(1, os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


NVCC = find_nvcc()
version = BASE_VERSION
ext_modules = []
cmdclass = {}
if NVCC is not None:
    major, minor = nvcc_version(NVCC)
    version = f"{BASE_VERSION}+cu{major}{minor}"
    ext_modules = [CMakeExtension("djepa._C")]
    cmdclass = {"build_ext": CMakeBuild}
    print(f"djepa: building djepa._C with {NVCC} (CUDA {major}.{minor})", file=sys.stderr)
else:
    print("djepa: no nvcc found (or DJEPA_SKIP_CUDA=1): installing the pure-Python package", file=sys.stderr)

setup(
    version=version,
    packages=find_packages(include=["djepa", "djepa.*"]) + ["djepa.kernels"],
    package_dir={"djepa": "djepa", "djepa.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
