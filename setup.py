"""Build djepa; compile the CUDA extension djepa._C with CMake when it can be used.

Whether `_C` is built (first rule that applies):
  DJEPA_SKIP_CUDA=1         never: the pure-Python package (Triton + eager)
  DJEPA_PREBUILT_C=PATH     no compiling: install that already built _C*.so (same Python), and
                            keep its +cuXYZ version (e.g. one built on a CPU machine for a GPU one)
  DJEPA_BUILD_CUDA=1        always, when nvcc is found (CI and wheel builds set it)
  default                   when nvcc is found and the installed torch is a CUDA build (a CPU
                            torch cannot hand the kernels GPU tensors, so compiling is wasted)
Build settings:
  DJEPA_CUDA_ARCHS="80;90a" CMake CUDA architecture list (default 80;90a)
  MAX_JOBS=N                parallel compile jobs; unset: the cores, fewer if free memory is
                            short (MEM_PER_JOB_GB per job and nvcc thread)
  NVCC_THREADS=N            nvcc --threads: the archs of one .cu in parallel; unset: as many as
                            the cores allow beside one job per .cu file, at most one per arch
  DJEPA_CCACHE=0|1|PATH     ccache in front of the compilers; default: when one is on PATH
  DJEPA_DEVICE_CACHE=DIR    compile each .cu's device code once into DIR and reuse it when the
                            same sources are built for another Python (tools/build_wheel.sh)
  DJEPA_GLIBC=2.28          link _C to load on that glibc and newer (manylinux_2_28): libstdc++
                            linked in, glibc calls bound to old symbol versions
                            (tools/glibc_compat.py; tools/build_wheel.sh sets 2.28)
  CUDA_HOME                 where to look for nvcc first
Compile progress is printed per file (visible with `pip install -v`, and on the terminal).
"""
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = "0.1.0"
# Peak resident memory of one nvcc job, measured on djepa's largest .cu files (the sm_90a
# attention and GEMM kernels: about 1 GB each, 80;90a, CUDA 13.0), with headroom.
MEM_PER_JOB_GB = 1.5


def say(msg, tty=True):
    """To stderr (pip shows it with -v) and to the terminal, if any (pip hides the build output)."""
    line = f"djepa: {msg}"
    print(line, file=sys.stderr, flush=True)
    if not tty:
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


def env_flag(name):
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"djepa: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def find_nvcc():
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


def installed_torch_cuda():
    """torch.version.cuda of the torch in the environment being installed into ("" if none, or
    None if torch is not installed). pip's isolated build hides it, so ask a clean interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import torch; print(torch.version.cuda or '')"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def prebuilt_extension():
    """(path, cuda_version) of DJEPA_PREBUILT_C, checked; None when unset."""
    raw = os.environ.get("DJEPA_PREBUILT_C", "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"djepa: DJEPA_PREBUILT_C={raw}: no such file")
    probe = ("import importlib.machinery, importlib.util, sys\n"
             "loader = importlib.machinery.ExtensionFileLoader('djepa._C', sys.argv[1])\n"
             "spec = importlib.util.spec_from_loader('djepa._C', loader)\n"
             "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
             "print(m.cuda_version)")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)
    if out.returncode != 0 or not re.fullmatch(r"\d+\.\d+(\.\d+)?", out.stdout.strip()):
        raise SystemExit(f"djepa: DJEPA_PREBUILT_C={raw} does not load as djepa._C in this Python "
                         f"({importlib.machinery.EXTENSION_SUFFIXES[0]}): "
                         f"{(out.stderr.strip().splitlines() or ['no cuda_version'])[-1]}")
    return path, out.stdout.strip()


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory_gb():
    """MemAvailable of /proc/meminfo in GB (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def positive_int(name):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"djepa: {name} must be a positive integer, got {raw!r}")
    return int(raw)


def parallelism(n_cu, n_archs, cores=None, mem_gb=None):
    """(jobs, nvcc threads, why): MAX_JOBS and NVCC_THREADS when set, else chosen from the cores
    and the free memory (a job and each of its nvcc threads take up to MEM_PER_JOB_GB)."""
    cores = available_cores() if cores is None else cores
    threads = positive_int("NVCC_THREADS")
    if threads is None:  # spare cores beyond one job per .cu go to compiling its archs in parallel
        threads = max(1, min(n_archs, cores // max(1, n_cu)))
    jobs = positive_int("MAX_JOBS")
    if jobs is not None:
        return jobs, threads, "MAX_JOBS"
    jobs = max(1, cores // threads)
    why = f"{cores} cores"
    mem_gb = available_memory_gb() if mem_gb is None else mem_gb
    if mem_gb is not None:
        by_memory = max(1, int(mem_gb / (MEM_PER_JOB_GB * threads)))
        why += f", {mem_gb:.0f} GB free"
        jobs = min(jobs, by_memory)
    return jobs, threads, why


def ccache_executable():
    raw = os.environ.get("DJEPA_CCACHE", "").strip()
    if raw == "0":
        return None
    if raw in ("", "1"):
        found = shutil.which("ccache")
        if raw == "1" and found is None:
            raise SystemExit("djepa: DJEPA_CCACHE=1 but no ccache on PATH")
        return found
    if not (os.path.isfile(raw) and os.access(raw, os.X_OK)):
        raise SystemExit(f"djepa: DJEPA_CCACHE={raw}: not an executable (0, 1 or a path)")
    return raw


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class PrebuiltCopy(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        say(f"installing the prebuilt {PREBUILT[0]} (CUDA {PREBUILT[1]}) as {target.name}, no compiling")
        shutil.copyfile(PREBUILT[0], target)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        nvcc = NVCC
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DJEPA_CUDA_ARCHS", "80;90a")
        n_cu = len(list((ROOT / "csrc").glob("*.cu")))
        n_src = n_cu + len(list((ROOT / "csrc").glob("*.cpp")))
        jobs, threads, why_jobs = parallelism(n_cu, len([a for a in re.split(r"[;,]", archs) if a.strip()]))
        ccache = ccache_executable()
        device_cache = os.environ.get("DJEPA_DEVICE_CACHE", "").strip()
        if device_cache:
            device_cache = str(Path(device_cache).expanduser().resolve())
        glibc = os.environ.get("DJEPA_GLIBC", "").strip()
        if glibc and not re.fullmatch(r"2\.\d+", glibc):
            raise SystemExit(f"djepa: DJEPA_GLIBC must be a glibc version such as 2.28, got {glibc!r}")
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
            f"-DDJEPA_NVCC_THREADS={threads if threads > 1 else ''}",
            f"-DDJEPA_CCACHE={ccache or ''}",
            f"-DDJEPA_DEVICE_CACHE={device_cache}",
            f"-DDJEPA_GLIBC={glibc}",
        ]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as _ninja  # the PyPI wheel, when present

                ninja = str(Path(_ninja.BIN_DIR) / "ninja")
            except ImportError:
                ninja = None
        cached = (build_dir / "CMakeCache.txt").is_file()
        if ninja and not cached:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        extras = [f"nvcc --threads {threads}"] if threads > 1 else []
        extras += [f"ccache {ccache}"] if ccache else []
        extras += [f"device code cached in {device_cache}"] if device_cache else []
        extras += [f"linked for glibc {glibc}"] if glibc else []
        say(f"compiling djepa._C: {n_src} sources for CUDA archs {archs} with {jobs} jobs ({why_jobs})"
            + "".join(f", {e}" for e in extras) + " (minutes per arch; DJEPA_SKIP_CUDA=1 skips it)")
        t0 = time.monotonic()
        subprocess.run(configure, cwd=build_dir, check=True, stdout=subprocess.DEVNULL)
        say(f"  configured ({time.monotonic() - t0:.0f} s)")
        build = subprocess.Popen([cmake, "--build", ".", "--config", cfg, "-j", str(jobs)], cwd=build_dir,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in build.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            m = re.search(r"Building (?:CUDA|CXX) object .*?/([\w.]+)\.o", line)
            if m:
                step = re.match(r"\s*\[\s*([\d/%]+)\s*\]", line)
                say(f"  [{step.group(1) if step else '..'}] compiling {m.group(1)} (+{time.monotonic() - t0:.0f} s)")
            elif line.startswith("djepa-nvcc: "):  # tools/nvcc_split.py
                say("  " + line[len("djepa-nvcc: "):].rstrip())
            elif line.startswith("glibc_compat.py: "):
                say("  " + line.rstrip())
            elif "Linking" in line:
                say(f"  linking djepa._C (+{time.monotonic() - t0:.0f} s)")
        if build.wait() != 0:
            raise RuntimeError("building djepa._C failed:\n" + "\n".join(tail))
        say(f"  djepa._C built in {time.monotonic() - t0:.0f} s")


def cuda_decision():
    """(build kind, nvcc, why) with kind in {"skip", "prebuilt", "build"}."""
    if env_flag("DJEPA_SKIP_CUDA"):
        return "skip", None, "DJEPA_SKIP_CUDA=1"
    if os.environ.get("DJEPA_PREBUILT_C", "").strip():
        return "prebuilt", None, "DJEPA_PREBUILT_C"
    nvcc = find_nvcc()
    if nvcc is None:
        return "skip", None, "no nvcc found (CUDA_HOME, PATH, /usr/local/cuda)"
    if env_flag("DJEPA_BUILD_CUDA"):
        return "build", nvcc, "DJEPA_BUILD_CUDA=1"
    torch_cuda = installed_torch_cuda()
    if torch_cuda is None:
        return "skip", None, "torch is not installed yet (install it first, or set DJEPA_BUILD_CUDA=1)"
    if torch_cuda == "":
        return "skip", None, "the installed torch is a CPU build (DJEPA_BUILD_CUDA=1 builds _C anyway)"
    return "build", nvcc, f"torch is built with CUDA {torch_cuda}"


KIND, NVCC, WHY = cuda_decision()
PREBUILT = prebuilt_extension() if KIND == "prebuilt" else None
version = BASE_VERSION
ext_modules = []
cmdclass = {}
if KIND == "build":
    major, minor = nvcc_version(NVCC)
    version = f"{BASE_VERSION}+cu{major}{minor}"
    ext_modules = [CMakeExtension("djepa._C")]
    cmdclass = {"build_ext": CMakeBuild}
    say(f"building djepa._C with {NVCC} (CUDA {major}.{minor}): {WHY}", tty=False)
elif KIND == "prebuilt":
    major, minor = PREBUILT[1].split(".")[:2]
    version = f"{BASE_VERSION}+cu{major}{minor}"
    ext_modules = [CMakeExtension("djepa._C")]
    cmdclass = {"build_ext": PrebuiltCopy}
else:
    say(f"not building djepa._C: {WHY}; installing the pure-Python package (Triton + eager)", tty=False)

setup(
    version=version,
    packages=find_packages(include=["djepa", "djepa.*"]) + ["djepa.kernels"],
    package_dir={"djepa": "djepa", "djepa.kernels": "kernels"},
    # djepa/tune.py reads the shipped tuning tables from here (tools/check_wheel.py checks they are in)
    package_data={"djepa": ["tune_tables/*.json", "tune_tables/README.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
