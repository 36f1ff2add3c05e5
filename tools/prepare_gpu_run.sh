#!/usr/bin/env bash
# Before a GPU run, on the CPU machine: build djepa._C for the GPU machine (sm_90a, its Python 3.12,
# the same nvcc 13.0) into .gpu-carry/ (git-ignored) with its build record beside it, download the
# wheels of the pure-Python test tools (installed there only where an import fails), check it all,
# dry-run tools/gpu_run.sh with it, and print the device tool's `run` call that carries it there.
# No GPU time goes to compiling or to missing packages.
#
#   tools/prepare_gpu_run.sh              build (a few minutes on 2 cores), wheels, check, dry-run, print the call
#   tools/prepare_gpu_run.sh --no-build   the same with the _C already in .gpu-carry/ (refused if its build
#                                         record does not match this tree: csrc/, CMakeLists.txt, setup.py)
#   tools/prepare_gpu_run.sh --no-dry     skip the dry run
#
# .gpu-carry/ then holds: _C.cpython-312-x86_64-linux-gnu.so (~16 MB), its build record
# (.so.build.json: commit, dirty flag, hash of the build inputs, nvcc, archs) and wheels/
# (pytest-benchmark, py-cpuinfo, hypothesis, sortedcontainers, attrs, pytest-timeout; ~1.5 MB), well
# under the device tool's 64 MiB for all that travels (checked below, with the tree).
#
# Settings: PYTHON312 (a Python 3.12; default: pyenv's newest 3.12, else python3.12 on PATH),
# CUDA_HOME (default /usr/local/cuda-13.0, else /usr/local/cuda), DJEPA_CUDA_ARCHS (default 90a),
# MAX_JOBS (default: the cores here), PYTHON (the dry run's Python with the project installed;
# default .venv/bin/python, else python3), GPU_RUN_BUDGET (printed into the call; default 540: lower
# it when the session's device time left, less ~4 minutes for the machine's start, is shorter).
# Needs the package index once, for pybind11, cmake, ninja and setuptools in a throwaway Python 3.12
# virtual environment (build/prepare-py312, git-ignored) and for the test tools' wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=.gpu-carry
DRY=1; BUILD_C=1
for arg in "$@"; do
  case $arg in
    --no-dry) DRY=0 ;;
    --no-build) BUILD_C=0 ;;
    *) echo "prepare_gpu_run.sh: unknown argument $arg (--no-build, --no-dry)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
say() { printf '\n== %s\n' "$*"; }

find_py312() {
  if [ -n "${PYTHON312:-}" ]; then echo "$PYTHON312"; return; fi
  local p
  for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12* 2>/dev/null | sort -V -r); do
    [ -x "$p/bin/python3.12" ] && { echo "$p/bin/python3.12"; return; }
  done
  command -v python3.12 || { echo "no Python 3.12 found: set PYTHON312" >&2; return 1; }
}
PY312=$(find_py312)
"$PY312" -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version" \
  || { echo "$PY312 is not a Python 3.12" >&2; exit 1; }
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda-13.0; else CUDA_HOME=/usr/local/cuda; fi
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | grep -q "release 13.0" \
  || echo "WARNING: $CUDA_HOME/bin/nvcc is not CUDA 13.0, the GPU machine's (its driver must accept this build)"

say "Python 3.12 build environment (build/prepare-py312) from $PY312"
VENV=$ROOT/build/prepare-py312
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "pybind11>=2.12" "cmake>=3.27" ninja "setuptools>=64" wheel

ARCHS=${DJEPA_CUDA_ARCHS:-90a}
if [ $BUILD_C = 1 ]; then
  say "building djepa._C for $ARCHS with $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')"
  BUILD=$ROOT/build/prepare-py312-ext
  rm -rf "$BUILD"
  t0=$SECONDS
  DJEPA_BUILD_CUDA=1 DJEPA_CUDA_ARCHS=$ARCHS MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
  SO=$(ls "$BUILD"/lib/djepa/_C.cpython-312-*.so)
  mkdir -p "$CARRY"
  cp "$SO" "$CARRY/"
  SO=$CARRY/$(basename "$SO")
  echo "built $SO ($(du -h "$SO" | cut -f1)) in $((SECONDS - t0))s"
  "$PYTHON" tools/gpu_run_lib/build_record.py write "$SO" --archs "$ARCHS" --nvcc "$CUDA_HOME/bin/nvcc"
else
  SO=$(ls "$CARRY"/_C.cpython-312-*.so 2>/dev/null | head -n 1) \
    || { echo "--no-build: no $CARRY/_C.cpython-312-*.so yet (run without --no-build)" >&2; exit 1; }
  echo "using $SO, built $(date -r "$SO" '+%F %T')"
fi

say "wheels of the pure-Python test tools ($CARRY/wheels; the GPU machine installs one only where its import fails)"
mkdir -p "$CARRY/wheels"
for pkg in pytest-benchmark py-cpuinfo hypothesis sortedcontainers attrs pytest-timeout; do
  if ls "$CARRY/wheels/$(printf '%s' "$pkg" | tr '-' '_')"-*.whl >/dev/null 2>&1; then continue; fi
  "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$pkg" \
    || { echo "could not download the $pkg wheel" >&2; exit 1; }
done
ls "$CARRY/wheels" | sed 's/^/  /'

say "checks"
tools/gpu_run.sh --check-prebuilt "$SO" || exit 1  # x86-64, Python 3.12, and built from this tree
glibc=$(objdump -T "$SO" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -V | tail -n 1 || true)
echo "highest glibc symbol version it needs: ${glibc:-unknown} (the GPU machine's Ubuntu 24.04 image has 2.39)"
version=$(DJEPA_PREBUILT_C="$SO" "$VENV/bin/python" setup.py -q --version 2>/dev/null | tail -n 1)
case $version in
  *+cu130) echo "setup.py with DJEPA_PREBUILT_C loads it in Python 3.12 and installs djepa $version" ;;
  *) echo "setup.py with DJEPA_PREBUILT_C=$SO gives version '$version', not +cu130" >&2; exit 1 ;;
esac
git check-ignore -q "$CARRY/$(basename "$SO")" \
  || { echo "$CARRY is not git-ignored: it would travel (and could be committed) as an untracked file" >&2; exit 1; }
carry=$(du -sb "$CARRY" | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "what travels: the carry $((carry / 1048576)) MiB + the working tree $((tree / 1048576)) MiB of the device tool's 64 MiB"
[ $((carry + tree)) -lt $((48 * 1048576)) ] || { echo "too close to the 64 MiB the device tool carries" >&2; exit 1; }

if [ $DRY = 1 ]; then
  say "dry run of tools/gpu_run.sh with it (GPU faked)"
  dry=$(mktemp -d)
  OUT=$dry DJEPA_PREBUILT_C="$SO" DJEPA_GPU_RUN_WHEELS="$ROOT/$CARRY/wheels" tools/gpu_run.sh --dry-run \
    | grep -E '^(  |== check|== [a-z0-9-]+ +(ok|failed|cut|skipped|no-time|left-out) |== files|== done|WARNING)'
  rm -rf "$dry"
fi

say "the GPU session's call (the device tool's run; one command, <= ${GPU_RUN_BUDGET:-540} s of work)"
cat <<EOF
run(command="GPU_RUN_BUDGET=${GPU_RUN_BUDGET:-540} DJEPA_PREBUILT_C=$SO tools/gpu_run.sh",
    carry=["$CARRY"],
    timeout_s=600)
Set GPU_RUN_BUDGET lower when status's budget_left_s is under ~780 (budget_left_s - 240: the machine's
start and the transfers count too). Afterwards, on this machine: tools/gpu_run.sh --render <files_at of
that reply> (benchmark JSON, .md, .png into benchmarks/results/; the tuning table into djepa/tune_tables/).
What did not fit: the same call with the stages named, e.g. "... tools/gpu_run.sh tests-triton".
EOF
