#!/usr/bin/env bash
# The GPU checks of djepa as one command for a lent GPU machine (the H200 one: Python 3.12,
# torch 2.11, triton 3.6, nvcc 13.0, compute-sanitizer, pytest-benchmark; no package index;
# 10 minutes per command, ~15 in all, at most 8 files back from $OUT, two folder levels).
#
#   tools/gpu_run.sh [--dry-run] [--budget S] [STAGE ...]   run the plan (default: the stages
#                                                            that fit the budget, in priority order)
#   tools/gpu_run.sh --plan [STAGE ...]                      print the plan and exit
#   tools/gpu_run.sh --check-prebuilt PATH                   is PATH a _C the GPU machine can load?
#   tools/gpu_run.sh --render DIR [--results R]              on the CPU machine, afterwards: copy
#                                                            the JSON that came back (DIR, or the
#                                                            results.tar.gz in it) into R (default
#                                                            benchmarks/results/) and render each
#                                                            as Markdown + PNG (djepa bench --render)
#
# Stages, most valuable first (estimates are guesses until a GPU run has measured them):
#   env              nvidia-smi, versions, the GPU's arch
#   install          djepa, with the _C given as DJEPA_PREBUILT_C=PATH (no compiling: built on the
#                    CPU machine by tools/prepare_gpu_run.sh); without it _C is built here for this
#                    GPU's arch; if that fails djepa is installed without _C (Triton needs none)
#                    and the run goes on; then `djepa info`
#   tests-gpu        pytest -m gpu tests: CUDA and Triton kernels against the references, bf16 too;
#                    on sm_90 the sm_90a wgmma kernels and the mma.sync ones (tests/test_dispatch_sm90.py)
#   sanitize         compute-sanitizer memcheck and racecheck on one small case of every CUDA
#                    kernel, the sm_90a ones included (tools/sanitize_cases.py)
#   bench-ema, bench-attention, bench-denoise, bench-model
#                    the benchmark suites at the preset shapes, each its own pytest session, its
#                    JSON in $OUT as soon as it ends (and rewritten after every case, so a suite cut
#                    by its time limit keeps what it measured); sizes: the DJEPA_BENCH_* knobs
#                    below, defaults chosen to fit
#   tests-triton     (not in the default plan) the Triton tests that run on the triton_device
#                    fixture (fp32/fp16 kernels, CPU-interpreter tests elsewhere) on the GPU
#   tune             (not in the default plan) `djepa tune`, where the CLI has it
# The default plan is every stage that fits --budget (default 540 s, $DJEPA_GPU_RUN_BUDGET); the
# rest is printed as the second command. Each stage runs under `timeout` (its limit, and never
# past the run's deadline); a stage that cannot start in time is left out and said so.
#
# Output, all in $OUT (default ./gpu-out): gpu_run.log (everything, appended as it happens),
# summary.json (the plan and each stage's status, rewritten after every stage), one JSON per
# benchmark suite (<date>_<gpu>_<suite>.json, pytest-benchmark's) and one JUnit XML per test
# stage. More than 8 files: all but the log and the summary go into results.tar.gz.
#
# Exit status: 0 when every stage passed, else the sum of: 1 env/install failed, 2 tests failed,
# 4 compute-sanitizer found errors (or could not run), 8 a benchmark suite failed, 16 a stage was
# cut by its time limit or left out for lack of time, 32 tune failed, 64 the output would break
# the limits (files, names, folders). The log's last lines and summary.json say which stage.
#
# --dry-run (CPU machine; CI runs it through tests/test_gpu_run.py): prints the plan, then checks
# every command it would run with a GPU faked (tools/fake_gpu): bash syntax, the imports, the
# stage's Python snippets, the prebuilt _C's file, pytest collection of each test stage and each
# benchmark suite with the run's knobs and options, the sanitizer cases, the renderer; it writes
# the files the run would write (same names, placeholders) into $OUT and checks the limits.
#
# Knobs (defaults for this run; export to change): DJEPA_BENCH_EMA_PRESETS=B,L;
# DJEPA_BENCH_ATTN_SHAPES=djepa-B,djepa-H, DJEPA_BENCH_ATTN_FRACTIONS=dense,random0.25;
# DJEPA_BENCH_DENOISE_HEADS=B, DJEPA_BENCH_DENOISE_M=2048, DJEPA_BENCH_DENOISE_TRAIN_M=8192,
# DJEPA_BENCH_DENOISE_COMPILE_MODE=reduce-overhead; DJEPA_BENCH_PRESETS=B,
# DJEPA_BENCH_SAMPLE_BATCH=32. PYTHON (default python3).
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-out}
BUDGET=${DJEPA_GPU_RUN_BUDGET:-540}
MIN_STAGE=${DJEPA_GPU_RUN_MIN_STAGE:-20}  # a stage needs this many seconds left to start
MAX_FILES=8
GPU_PYTHON_TAG=${DJEPA_GPU_PYTHON_TAG:-cpython-312}  # the GPU machine's python3 (3.12)
export PYTHONUNBUFFERED=1

# name | estimate s | limit s | exit bit | what          (priority order)
STAGE_TABLE="
env|10|30|1|nvidia-smi, versions, the GPU's arch
install|30|90|1|djepa + the prebuilt _C (DJEPA_PREBUILT_C), then djepa info
tests-gpu|140|200|2|pytest -m gpu tests: CUDA (sm_90a + mma.sync) + Triton kernels vs the references, bf16
sanitize|60|120|4|compute-sanitizer memcheck + racecheck, one small case per CUDA kernel (sm_90a too)
bench-ema|30|60|8|EMA suite: B, L parameter lists
bench-attention|80|120|8|attention suite: djepa-B, djepa-H; dense, 25% random; fwd, fwd+bwd
bench-denoise|120|160|8|denoise suite: B head, M=2048: step, 100-step loop, training
bench-model|70|120|8|model suite: B preset training step and model.sample
tests-triton|90|150|2|pytest -m 'triton and not gpu' tests: the Triton tests on the GPU
tune|60|120|32|djepa tune (when the CLI has it)
"
DEFAULT_STAGES="env install tests-gpu sanitize bench-ema bench-attention bench-denoise bench-model"

stage_field() {  # name field-number
  printf '%s\n' "$STAGE_TABLE" | awk -F'|' -v n="$1" -v f="$2" '$1 == n {print $f}'
}
all_stages() { printf '%s\n' "$STAGE_TABLE" | awk -F'|' 'NF > 1 {print $1}'; }
estimate_of() {  # compiling _C on the GPU machine instead of bringing it costs minutes
  if [ "$1" = install ] && [ -z "${DJEPA_PREBUILT_C:-}" ]; then echo 150; else stage_field "$1" 2; fi
}
limit_of() {
  if [ "$1" = install ] && [ -z "${DJEPA_PREBUILT_C:-}" ]; then echo 240; else stage_field "$1" 3; fi
}

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'; }

# ------------------------------------------------------------------------------ arguments
DRY=0; PLAN_ONLY=0; RENDER=""; CHECK_PREBUILT=""; RESULTS="$ROOT/benchmarks/results"; IN_STAGE=""; REQUESTED=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --render) RENDER=${2:?--render needs a folder}; shift ;;
    --results) RESULTS=${2:?--results needs a folder}; shift ;;
    --check-prebuilt) CHECK_PREBUILT=${2:?--check-prebuilt needs a path}; shift ;;
    --in-stage) IN_STAGE=${2:?}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$(stage_field "$1" 1)" ]; then
         echo "gpu_run.sh: unknown stage $1; stages: $(all_stages | tr '\n' ' ')" >&2; exit 2
       fi
       REQUESTED+=("$1") ;;
  esac
  shift
done
case $BUDGET in ''|*[!0-9]*) echo "gpu_run.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac

# ------------------------------------------------------------------------------ knobs
export DJEPA_BENCH_EMA_PRESETS=${DJEPA_BENCH_EMA_PRESETS:-B,L}
export DJEPA_BENCH_ATTN_SHAPES=${DJEPA_BENCH_ATTN_SHAPES:-djepa-B,djepa-H}
export DJEPA_BENCH_ATTN_FRACTIONS=${DJEPA_BENCH_ATTN_FRACTIONS:-dense,random0.25}
export DJEPA_BENCH_DENOISE_HEADS=${DJEPA_BENCH_DENOISE_HEADS:-B}
export DJEPA_BENCH_DENOISE_M=${DJEPA_BENCH_DENOISE_M:-2048}
export DJEPA_BENCH_DENOISE_TRAIN_M=${DJEPA_BENCH_DENOISE_TRAIN_M:-8192}
export DJEPA_BENCH_DENOISE_COMPILE_MODE=${DJEPA_BENCH_DENOISE_COMPILE_MODE:-reduce-overhead}
export DJEPA_BENCH_PRESETS=${DJEPA_BENCH_PRESETS:-B}
export DJEPA_BENCH_SAMPLE_BATCH=${DJEPA_BENCH_SAMPLE_BATCH:-32}

FAKE_ENV=(env "PYTHONPATH=$ROOT/tools/fake_gpu${PYTHONPATH:+:$PYTHONPATH}" DJEPA_FAKE_GPU=1)

gpu_python() {  # prints "<name> <arch>": the GPU's name for the files (h200) and its CUDA arch (90a)
  "$PY" -c "import re, torch; M, m = torch.cuda.get_device_capability()
name = re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name().replace('NVIDIA', '')).strip('-').lower()
print(name or 'gpu', f'{M}{m}' + ('a' if M == 9 else ''))"
}

stage_marker() { if [ "$1" = tests-gpu ]; then echo "gpu"; else echo "triton and not gpu"; fi; }

pytest_tests_args() {  # stage [marker expression] -> ARGS, the pytest arguments of the test stage
  local junit="$OUT/${DATE}_${GPU}_$1.xml"
  ARGS=(-m pytest tests -q -p no:cacheprovider)
  [ -n "${2-x}" ] && ARGS+=(-m "${2-$(stage_marker "$1")}")
  ARGS+=(--maxfail=25 -rfEs "--junitxml=$junit")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then ARGS+=(--timeout=150); fi
}

pytest_bench_args() {  # suite -> pytest arguments of its benchmark session
  local json="$OUT/${DATE}_${GPU}_$1.json"
  ARGS=(-m pytest "benchmarks/test_bench_$1.py" -q -s -p no:cacheprovider --benchmark-only
        "--benchmark-json=$json" -rs --maxfail=50)
}

check_prebuilt() {  # path: is it a _C for the GPU machine (x86-64, its Python's ABI tag)? says why not
  local f=$1 msg
  local elf='import sys; b = open(sys.argv[1], "rb").read()
assert b[:4] == b"\x7fELF" and b[4] == 2 and int.from_bytes(b[18:20], "little") == 62, "not an x86-64 ELF file"
assert b"PyInit__C" in b, "no PyInit__C: not the djepa._C extension"'
  if [ ! -f "$f" ]; then echo "DJEPA_PREBUILT_C=$f: no such file"; return 1; fi
  case $(basename "$f") in
    "_C.$GPU_PYTHON_TAG"-*.so) ;;
    *) echo "$(basename "$f") is not built for the GPU machine's Python ($GPU_PYTHON_TAG): it would not load there"
       return 1 ;;
  esac
  if ! msg=$("$PY" -c "$elf" "$f" 2>&1); then echo "$f: $(printf '%s' "$msg" | tail -n 1)"; return 1; fi
  echo "$f ($(du -h "$f" | cut -f1), $GPU_PYTHON_TAG, x86-64)"
}

# ------------------------------------------------------------------------------ stage bodies
stage_env() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import platform, torch, triton; print('python', platform.python_version(), '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  echo "name and arch: $(gpu_python) | cores $(nproc) | $(uname -srm)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'"
}

PIP_INSTALL=(-m pip install --no-build-isolation --no-deps --no-index -e .)

install_without_c() {  # djepa without _C: Triton and eager run, the CUDA checks skip saying why
  echo "installing djepa without _C (Triton needs none; the CUDA kernels' tests and benchmarks skip)"
  DJEPA_SKIP_CUDA=1 "$PY" "${PIP_INSTALL[@]}"
}

stage_install() {
  if [ -n "${DJEPA_PREBUILT_C:-}" ]; then
    echo "installing djepa with the prebuilt _C $DJEPA_PREBUILT_C (no compiling)"
    DJEPA_PREBUILT_C="$(cd "$(dirname "$DJEPA_PREBUILT_C")" && pwd)/$(basename "$DJEPA_PREBUILT_C")" \
      "$PY" "${PIP_INSTALL[@]}" || { echo "THE PREBUILT _C DID NOT INSTALL"; install_without_c; "$PY" -m djepa info; return 1; }
  else
    echo "no DJEPA_PREBUILT_C: building _C here for this GPU (minutes; tools/prepare_gpu_run.sh builds it beforehand)"
    DJEPA_BUILD_CUDA=1 DJEPA_CUDA_ARCHS="$(gpu_python | cut -d' ' -f2)" MAX_JOBS="$(nproc)" "$PY" "${PIP_INSTALL[@]}" \
      || { echo "THE _C BUILD FAILED"; install_without_c; "$PY" -m djepa info; return 1; }
  fi
  "$PY" -m djepa info
  "$PY" -c "import re, djepa, djepa._C; assert re.search(r'[+]cu[0-9]+$', djepa.__version__), djepa.__version__"
}

stage_tests() {
  pytest_tests_args "$1"
  "$PY" "${ARGS[@]}"
}

stage_sanitize() {
  local cs rc=0 half=$(( ${STAGE_LIMIT:-90} / 2 ))
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) \
    || { echo "compute-sanitizer not found"; return 1; }
  "$PY" -c "import djepa._C" || { echo "djepa._C does not import: no CUDA kernel to check"; return 1; }
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (limit ${half}s)"
    timeout --signal=INT --kill-after=5 "$half" "$cs" --tool "$tool" --error-exitcode 99 \
      "$PY" tools/sanitize_cases.py
    local r=$?
    echo "== $tool: exit $r$([ $r = 99 ] && echo ' (errors found)')$([ $r = 124 ] && echo ' (cut by its limit)')"
    [ $r -ne 0 ] && rc=$r
  done
  return $rc
}

stage_bench() {
  pytest_bench_args "$1"
  DJEPA_BENCH_PARTIAL_JSON="$OUT/${DATE}_${GPU}_$1.json" "$PY" "${ARGS[@]}"
}

stage_tune() {
  if ! "$PY" -m djepa tune --help >/dev/null 2>&1; then
    echo "djepa has no tune command here: nothing to do"; return 0
  fi
  if "$PY" -m djepa tune --help | grep -q -- "--out"; then
    "$PY" -m djepa tune --out "$OUT/${DATE}_${GPU}_tune.json"
  else
    "$PY" -m djepa tune
  fi
}

run_stage_body() {
  case $1 in
    env) stage_env ;;
    install) stage_install ;;
    tests-gpu|tests-triton) stage_tests "$1" ;;
    sanitize) stage_sanitize ;;
    bench-*) stage_bench "${1#bench-}" ;;
    tune) stage_tune ;;
  esac
}

if [ -n "$IN_STAGE" ]; then  # one stage, run by the driver under `timeout`
  DATE=${DATE:?}; GPU=${GPU:?}
  run_stage_body "$IN_STAGE"
  exit $?
fi

if [ -n "$CHECK_PREBUILT" ]; then check_prebuilt "$CHECK_PREBUILT"; exit $?; fi

# ------------------------------------------------------------------------------ render (CPU machine)
if [ -n "$RENDER" ]; then
  [ -d "$RENDER" ] || { echo "gpu_run.sh --render: no folder $RENDER" >&2; exit 2; }
  mkdir -p "$RESULTS"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  cp "$RENDER"/*.json "$work"/ 2>/dev/null
  [ -f "$RENDER/results.tar.gz" ] && tar -xzf "$RENDER/results.tar.gz" -C "$work"
  n=0; bad=0
  for f in "$work"/*.json; do
    [ -f "$f" ] || continue
    case $(basename "$f") in summary.json) continue ;; esac
    cp "$f" "$RESULTS/" && n=$((n + 1))
    "$PY" -m djepa bench --render "$RESULTS/$(basename "$f")" || bad=1
  done
  for f in "$work"/*.xml "$RENDER"/summary.json "$RENDER"/gpu_run.log; do
    [ -f "$f" ] && cp "$f" "$RESULTS/"
  done
  echo "copied $n benchmark JSON into $RESULTS (with their .md and .png), and the log, summary and test reports"
  [ $n -gt 0 ] || { echo "no benchmark JSON found in $RENDER" >&2; exit 1; }
  exit $bad
fi

# ------------------------------------------------------------------------------ plan
if [ ${#REQUESTED[@]} -gt 0 ]; then PLAN=("${REQUESTED[@]}"); LEFT=(); else
  PLAN=(); LEFT=(); total=0
  for s in $DEFAULT_STAGES; do
    e=$(estimate_of "$s")
    if [ $((total + e)) -le "$BUDGET" ]; then PLAN+=("$s"); total=$((total + e)); else LEFT+=("$s"); fi
  done
  for s in $(all_stages); do
    case " $DEFAULT_STAGES " in *" $s "*) ;; *) LEFT+=("$s") ;; esac
  done
fi

print_plan() {
  local total=0 i=0 s e
  echo "djepa GPU run plan: budget ${BUDGET}s ($( [ $DRY = 1 ] && echo 'DRY RUN: nothing runs on a GPU' || echo "OUT=$OUT"))"
  printf '  %-2s %-16s %6s %6s  %s\n' "#" stage est limit what
  for s in "${PLAN[@]}"; do
    i=$((i + 1)); e=$(estimate_of "$s"); total=$((total + e))
    printf '  %-2s %-16s %5ss %5ss  %s\n' "$i" "$s" "$e" "$(limit_of "$s")" "$(stage_field "$s" 5)"
  done
  echo "  total estimate ${total}s of ${BUDGET}s (estimates are guesses until a GPU run measures them;"
  echo "  each stage is cut at its limit or at the run's deadline, whichever comes first)"
  if [ ${#LEFT[@]} -gt 0 ]; then
    echo "  not in this plan (a second command): tools/gpu_run.sh ${LEFT[*]}"
  fi
  PLAN_TOTAL=$total
}
print_plan
if [ "$PLAN_TOTAL" -gt "$BUDGET" ]; then
  echo "WARNING: the plan's estimate (${PLAN_TOTAL}s) exceeds the budget; the last stages may be left out"
fi
[ $PLAN_ONLY = 1 ] && exit 0

# ------------------------------------------------------------------------------ output + summary
mkdir -p "$OUT" || { echo "cannot create OUT=$OUT" >&2; exit 64; }
LOG="$OUT/gpu_run.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
echo "== gpu_run.sh $( [ $DRY = 1 ] && echo --dry-run) started $(date -u +%FT%TZ) in $ROOT"
NAMES=(); STATUS=(); RCS=(); SECS=(); NOTES=(); EXIT=0

json_str() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n\r\t'; }

write_summary() {
  local i f="$OUT/summary.json"
  {
    printf '{\n "dry_run": %s,\n "budget_s": %s,\n "plan": [' "$( [ $DRY = 1 ] && echo true || echo false)" "$BUDGET"
    for i in "${!PLAN[@]}"; do printf '%s"%s"' "$( [ "$i" -gt 0 ] && echo ', ')" "${PLAN[$i]}"; done
    printf '],\n "left_out": ['
    for i in "${!LEFT[@]}"; do printf '%s"%s"' "$( [ "$i" -gt 0 ] && echo ', ')" "${LEFT[$i]}"; done
    printf '],\n "knobs": {'
    local first=1 k
    for k in $(compgen -e | grep '^DJEPA_BENCH_' | sort); do
      printf '%s"%s": "%s"' "$( [ $first = 1 ] || echo ', ')" "$k" "$(json_str "${!k}")"; first=0
    done
    printf '},\n "stages": [\n'
    for i in "${!NAMES[@]}"; do
      printf '  {"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}%s\n' \
        "${NAMES[$i]}" "${STATUS[$i]}" "${RCS[$i]}" "${SECS[$i]}" "$(json_str "${NOTES[$i]}")" \
        "$( [ "$i" -lt $((${#NAMES[@]} - 1)) ] && echo ,)"
    done
    printf ' ],\n "exit_status": %s\n}\n' "$EXIT"
  } > "$f.tmp" && mv "$f.tmp" "$f"
}

record() {  # stage status rc seconds note [exit bit]
  NAMES+=("$1"); STATUS+=("$2"); RCS+=("$3"); SECS+=("$4"); NOTES+=("$5")
  [ -n "${6:-}" ] && EXIT=$((EXIT | $6))
  printf '== %-16s %-8s rc=%-4s %4ss  %s\n' "$1" "$2" "$3" "$4" "$5"
  write_summary
}

pack_outputs() {  # at most MAX_FILES files, plain names, no folders below $OUT
  rm -f "$OUT"/*.tmp
  local files n bad=0
  mapfile -t files < <(cd "$OUT" && find . -mindepth 1 -type f | sed 's|^\./||' | sort)
  n=${#files[@]}
  if [ "$n" -gt "$MAX_FILES" ]; then
    local inner=()
    for f in "${files[@]}"; do case $f in gpu_run.log|summary.json) ;; *) inner+=("$f") ;; esac; done
    (cd "$OUT" && tar -czf results.tar.gz "${inner[@]}" && rm -f "${inner[@]}") || bad=1
    echo "== $n files: packed ${#inner[@]} of them into results.tar.gz"
    find "$OUT" -mindepth 1 -type d -empty -delete
  fi
  mapfile -t files < <(cd "$OUT" && find . -mindepth 1 -type f | sed 's|^\./||' | sort)
  for f in "${files[@]}"; do
    if ! printf '%s' "$f" | grep -Eq '^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$'; then
      echo "OUTPUT LIMIT: $f (name or depth would not come back)"; bad=1
    fi
  done
  [ ${#files[@]} -le "$MAX_FILES" ] || { echo "OUTPUT LIMIT: ${#files[@]} files > $MAX_FILES"; bad=1; }
  echo "== files in OUT (${#files[@]} of at most $MAX_FILES): ${files[*]}"
  return $bad
}

finish() {
  pack_outputs || EXIT=$((EXIT | 64))
  write_summary
  echo "== done $(date -u +%FT%TZ), exit status $EXIT (1 setup, 2 tests, 4 sanitizer, 8 benchmarks, 16 cut/left out, 32 tune, 64 output limits)"
  echo "   render on the CPU machine: tools/gpu_run.sh --render <the folder the files came back to>"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null  # for tee to write the log's last lines
  exit "$EXIT"
}

# ------------------------------------------------------------------------------ dry run
if [ $DRY = 1 ]; then
  DATE=$(date +%Y-%m-%d)
  read -r GPU ARCH < <("${FAKE_ENV[@]}" bash -c "$(declare -f gpu_python); PY='$PY'; gpu_python" 2>&1 | tail -n 1)
  check() {  # name status note
    local bit=0; [ "$2" = ok ] || bit=1
    record "check:$1" "$2" 0 0 "$3" "$( [ $bit = 1 ] && echo 1)"
  }
  bash -n "$SELF" && check syntax ok "bash -n" || check syntax FAIL "bash -n $SELF"
  for tool in timeout tee tar awk sed find; do
    command -v $tool >/dev/null || check tools FAIL "$tool is missing"
  done
  if printf '%s' "$GPU" | grep -Eq '^[a-z0-9-]+$' && [ "$ARCH" = 90a ]; then
    check gpu-snippets ok "name=$GPU arch=$ARCH (GPU faked)"
  else
    check gpu-snippets FAIL "name/arch snippets: $GPU / $ARCH"; GPU=gpu
  fi
  imports="import djepa, djepa.ops, djepa.nn, djepa.diffusion, djepa.models, djepa.benchreport, djepa.cli
import djepa.kernels.ema, djepa.kernels.attention, djepa.kernels.denoise
import pytest, pytest_benchmark, torch, triton
assert torch.cuda.is_available() and 'TRITON_INTERPRET' not in __import__('os').environ
print('torch', torch.__version__, 'triton', triton.__version__)"
  if msg=$("${FAKE_ENV[@]}" "$PY" -c "$imports" 2>&1); then check imports ok "$msg"
  else check imports FAIL "$(printf '%s' "$msg" | tail -n 1)"; fi
  if [ -n "${DJEPA_PREBUILT_C:-}" ]; then
    if msg=$(check_prebuilt "$DJEPA_PREBUILT_C"); then check prebuilt-c ok "$msg"
    else check prebuilt-c FAIL "$msg"; fi
  else
    check prebuilt-c ok "not given: the install stage would build _C on the GPU machine (estimate 150s)"
  fi
  if "$PY" -m pip --version >/dev/null 2>&1; then  # the GPU machine's image has pip and setuptools
    check install ok "pip present; the install itself is not run here: $(printf '%q ' "$PY" "${PIP_INSTALL[@]}")"
  else
    check install FAIL "$PY has no pip"
  fi
  # pytest collection of every test stage and benchmark suite, with the run's options, GPU faked:
  # one collection of tests/ (the stages' marker expressions applied to it by djepa_collect), one
  # of the benchmark suites (each suite's knobs are its own variables, so one session holds all)
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  OUT_SAVE=$OUT; OUT=$work
  pytest_tests_args tests-gpu ""  # the stage's options without its -m selection
  coll=("${ARGS[@]}" --collect-only -p djepa_collect)
  stages_spec="tests-gpu=$(stage_marker tests-gpu);tests-triton=$(stage_marker tests-triton)"
  if msg=$("${FAKE_ENV[@]}" DJEPA_COLLECT_JSON="$work/tests.json" DJEPA_COLLECT_STAGES="$stages_spec" \
           "$PY" "${coll[@]}" 2>&1); then
    for s in tests-gpu tests-triton; do
      n=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['stages'][sys.argv[2]]))" "$work/tests.json" "$s")
      if [ "${n:-0}" -gt 0 ]; then check "collect:$s" ok "$n tests"; else check "collect:$s" FAIL "no tests selected"; fi
    done
  else
    check collect:tests FAIL "$(printf '%s' "$msg" | grep -E 'Error|error' | head -n 3 | tr '\n' ' ')"
  fi
  bench_files=(); for s in "${PLAN[@]}" "${LEFT[@]}"; do case $s in bench-*) bench_files+=("benchmarks/test_bench_${s#bench-}.py") ;; esac; done
  pytest_bench_args ema
  bcoll=("${ARGS[@]:0:2}" "${bench_files[@]}" "${ARGS[@]:3}" --collect-only -p djepa_collect)
  if msg=$("${FAKE_ENV[@]}" DJEPA_COLLECT_JSON="$work/bench.json" "$PY" "${bcoll[@]}" 2>&1); then
    for f in "${bench_files[@]}"; do
      n=$("$PY" -c "import json,sys; print(sum(k.startswith(sys.argv[2] + '::') for k in json.load(open(sys.argv[1]))['items']))" "$work/bench.json" "$f")
      if [ "${n:-0}" -gt 0 ]; then check "collect:$(basename "$f" .py)" ok "$n cases with the run's knobs"
      else check "collect:$(basename "$f" .py)" FAIL "no cases collected"; fi
    done
  else
    check collect:benchmarks FAIL "$(printf '%s' "$msg" | grep -E 'Error|error' | head -n 3 | tr '\n' ' ')"
  fi
  OUT=$OUT_SAVE
  if msg=$("${FAKE_ENV[@]}" "$PY" tools/sanitize_cases.py --list 2>&1) && "$PY" -m py_compile tools/sanitize_cases.py; then
    check sanitize-cases ok "$(printf '%s' "$msg" | tr '\n' ' ')"
  else check sanitize-cases FAIL "$msg"; fi
  if "$PY" -m djepa tune --help >/dev/null 2>&1; then check tune ok "djepa tune exists"
  else check tune ok "djepa has no tune command: the tune stage would say so and pass"; fi
  printf '{"benchmarks": [{"group": "g", "name": "test_x[a]", "stats": {"median": 0.001}, "extra_info": {"ms": 1.0}}]}' > "$work/r.json"
  if msg=$("$PY" -m djepa bench --render "$work/r.json" 2>&1) && [ -f "$work/r.md" ] && [ -f "$work/r.png" ]; then
    check render ok "djepa bench --render writes .md and .png"
  else check render FAIL "$(printf '%s' "$msg" | tail -n 1)"; fi
  # the files the run would write, as placeholders with the same names
  for s in "${PLAN[@]}"; do
    case $s in
      tests-*) "$PY" -c "import json,sys; ids=json.load(open(sys.argv[1]))['stages'][sys.argv[2]]
print('<testsuites><testsuite name=\"dry-run %s\" tests=\"%d\"/></testsuites>' % (sys.argv[2], len(ids)))" \
                 "$work/tests.json" "$s" > "$OUT/${DATE}_${GPU}_$s.xml" 2>/dev/null ;;
      bench-*) f="benchmarks/test_bench_${s#bench-}.py"
               "$PY" -c "import json,sys; items=json.load(open(sys.argv[1]))['items']
json.dump({'dry_run': True, 'benchmarks': [], 'cases': [k for k in items if k.startswith(sys.argv[2] + '::')]}, sys.stdout)" \
                 "$work/bench.json" "$f" > "$OUT/${DATE}_${GPU}_${s#bench-}.json" 2>/dev/null ;;
    esac
  done
  finish
fi

# ------------------------------------------------------------------------------ the run
START=0
DEADLINE=$BUDGET  # from the command's start ($SECONDS counts from there)
DATE=$(date +%Y-%m-%d)
GPU=$(gpu_python 2>/dev/null | cut -d' ' -f1) || GPU=gpu
printf '%s' "$GPU" | grep -Eq '^[a-z0-9-]+$' || GPU=gpu
export DATE GPU
for s in "${PLAN[@]}"; do
  limit=$(limit_of "$s"); bit=$(stage_field "$s" 4)
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$MIN_STAGE" ]; then
    record "$s" no-time null 0 "left out: ${left}s left of the ${BUDGET}s budget (run it in a second command)" 16
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo; echo "== stage $s (limit ${limit}s; $((SECONDS - START))s into the run)"
  t0=$SECONDS
  STAGE_LIMIT=$limit timeout --signal=INT --kill-after=15 "$limit" bash "$SELF" --in-stage "$s"
  rc=$?
  dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then record "$s" ok 0 "$dt" ""
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$s" cut "$rc" "$dt" "cut at its ${limit}s limit" $((bit | 16))
  else record "$s" failed "$rc" "$dt" "see the log" "$bit"
  fi
  if [ "$s" = install ] && [ $rc -ne 0 ] && ! "$PY" -c "import djepa.kernels.denoise" 2>/dev/null; then
    t0=$SECONDS  # cut mid-build, or nothing installed: the later stages need djepa (Triton needs no _C)
    timeout --kill-after=10 90 bash -c "$(declare -p PY PIP_INSTALL); $(declare -f install_without_c); install_without_c"
    rc=$?
    record install-recover "$( [ $rc = 0 ] && echo ok || echo failed)" "$rc" $((SECONDS - t0)) "djepa without _C" 1
  fi
done
for s in "${LEFT[@]}"; do record "$s" left-out null 0 "not in the default plan: tools/gpu_run.sh ${LEFT[*]}"; done
finish
