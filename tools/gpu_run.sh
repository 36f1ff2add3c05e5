#!/usr/bin/env bash
# The GPU checks of djepa as one command for a lent GPU machine (the H200 one: Python 3.12,
# torch 2.11, triton 3.6, nvcc 13.0, compute-sanitizer; no package index; 10 minutes per
# command, ~15 in all with the start, at most 8 files back from $OUT, two folder levels).
#
#   tools/gpu_run.sh [--budget S] [STAGE ...]        run the plan (default: the stages that fit the
#                                                    budget, in priority order)
#   tools/gpu_run.sh --dry-run [--fake-hang CASE]    on the CPU, GPU faked: check every command and
#                                                    run the plan's driver (see below)
#   tools/gpu_run.sh --plan [STAGE ...]              print the plan and exit
#   tools/gpu_run.sh --check-prebuilt PATH           is PATH a _C the GPU machine can load, built
#                                                    from this tree (its build record)?
#   tools/gpu_run.sh --render DIR [--results R] [--tables T]
#                                                    on the CPU machine, afterwards: what came back
#                                                    (DIR, or the results.tar.gz in it) into R
#                                                    (default benchmarks/results/), each benchmark
#                                                    JSON rendered (.md + .png); tuning tables into
#                                                    T (default djepa/tune_tables/), rendered (.md)
#
# Stages, most valuable first (estimates are guesses until a GPU run has measured them):
#   env          nvidia-smi, versions, the GPU's arch (the device query under a 60 s timeout)
#   install      djepa with the _C given as DJEPA_PREBUILT_C=PATH (built on the CPU machine by
#                tools/prepare_gpu_run.sh, with a build record beside it that must match this
#                tree's csrc/ and build files: a mismatch is refused in one line and djepa goes in
#                without _C); without it _C is built here. Then the pure-Python test tools
#                (pytest-benchmark, py-cpuinfo, hypothesis, sortedcontainers, attrs, pytest-timeout)
#                from the carried wheels (.gpu-carry/wheels), only those whose import fails; djepa info
#   smoke        each case of tools/sanitize_cases.py once, in its own process, 20 s each: an
#                sm_90a case that hangs or fails turns the sm_90a kernels off (DJEPA_SM90_KERNELS=0)
#                for every later stage, and summary.json says so and why
#   tests-gpu    pytest -m gpu, all but the sm_90a cases, with the sm_90a kernels off: the mma.sync
#                CUDA kernels and the Triton ones against the references, bf16 too
#   tests-sm90   pytest -m gpu, the sm_90a (wgmma) cases alone, in a session of their own, after
#                the rest (skipped once the sm_90a kernels are off)
#   sanitize     compute-sanitizer memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so accesses past a
#                tensor inside torch's cached blocks are seen) and racecheck, one small case per
#                CUDA kernel (tools/sanitize_cases.py; masked_attention with and without dropout)
#   bench-ema, bench-attention, bench-denoise, bench-model
#                the benchmark suites at the preset shapes, each its own pytest session, its JSON in
#                $OUT (rewritten after every case, so a suite cut short keeps what it measured)
#   tune         djepa tune --quick --budget (its limit - 20 s): the table is rewritten after every
#                case and written partial on interrupt
#   tests-triton (not in the default plan) the Triton tests of the triton_device fixture on the GPU
# A stage that ends killed (cut at its limit, or a test session killed by a hang) also turns the
# sm_90a kernels off for the later stages. Each stage runs under `timeout` (SIGINT at its limit,
# SIGKILL 15 s later, never past the run's deadline); one that cannot start in time is left out.
# The default plan is every stage that fits the budget: --budget S, else $GPU_RUN_BUDGET, else
# 540 s (set it below 540 when the device time left is short: the machine's start counts too).
#
# Test and benchmark sessions: -v, pytest-timeout (thread method: it ends a hung test's process,
# which signals cannot), faulthandler_timeout (stacks of a slow test), --durations; each test's
# result is appended to <stamp>_<gpu>_results.jsonl as it happens (tools/gpu_run_lib), so a kill
# keeps what ran and names the test it was in; after a sticky CUDA error or a hang the rest of the
# stage reruns in a fresh process (twice at most). The benchmark suites synchronize after each
# djepa case; a CUDA error ends the suite, charged to djepa, its JSON kept (benchmarks/conftest.py).
#
# Output, all in $OUT (default ./gpu-out), named <stamp> = UTC date and time, <gpu> = h200:
# <stamp>_gpu_run.log (everything, appended as it happens), <stamp>_summary.json (the plan, each
# stage's status, time and sm_90a state, the fallback and why; rewritten after every stage),
# <stamp>_<gpu>_results.jsonl (smoke, test and benchmark cases, as they end), one JSON per benchmark
# suite (<stamp>_<gpu>_<suite>.json, pytest-benchmark's, with the machine info) and the tuning
# table (<stamp>_<gpu>_tune.json): 8 files. More than 8: all but the log and the summary go into
# results.tar.gz.
#
# Exit status: 0 when every stage passed, else the sum of: 1 env/install failed, 2 smoke or tests
# failed, 4 compute-sanitizer found errors (or could not run), 8 a benchmark suite failed, 16 a stage
# was cut by its time limit or left out for lack of time, 32 tune failed, 64 the output would break
# the limits (files, names, folders). The log's last lines and the summary say which stage.
#
# --dry-run (CPU machine; CI runs it through tests/test_gpu_run.py): prints the plan, checks what
# it can without a GPU (bash syntax, the imports, the GPU query, the prebuilt _C and its build
# record, pytest collection of each test stage and benchmark suite with the run's knobs and
# options, the sanitizer cases, the renderer), then runs the plan's driver with the GPU faked
# (tools/fake_gpu): every stage under its limit, the smoke cases each in its own process, the
# fallback, the summary; stages that need a GPU write what their command would (the same names,
# placeholders). --fake-hang CASE: that smoke case's process hangs ignoring SIGINT, as one stuck
# in a kernel does, to show the fallback end to end.
#
# Knobs (defaults for this run; export to change): DJEPA_BENCH_EMA_PRESETS=L (the list of the EMA
# target); DJEPA_BENCH_ATTN_SHAPES=djepa-B,djepa-H, DJEPA_BENCH_ATTN_FRACTIONS=dense,random0.25,
# DJEPA_BENCH_ATTN_MODES=fwd,fwdbwd,fwdbwd-dropout, DJEPA_BENCH_ATTN_DROPOUT_SHAPES=djepa-B (the
# dropout mode, fwd+bwd with dropout_p 0.1, at the B shape only: 12 cases, not 24),
# DJEPA_BENCH_ATTN_IMPLS=sdpa-efficient,sdpa-cudnn,sdpa-flash-dense,flex,djepa-triton,djepa-cuda (no
# eager and no SDPA math backend: the attention targets are against SDPA and Flex, trimmed for
# time; no flash-attn varlen: not on the machine); DJEPA_BENCH_DENOISE_HEADS=B,
# DJEPA_BENCH_DENOISE_M=2048, DJEPA_BENCH_DENOISE_TRAIN_M=8192,
# DJEPA_BENCH_DENOISE_COMPILE_MODE=reduce-overhead; DJEPA_BENCH_PRESETS=B, DJEPA_BENCH_SAMPLE_BATCH=32.
# DJEPA_GPU_RUN_SMOKE_LIMIT (20; dry run 3), DJEPA_GPU_RUN_TEST_TIMEOUT (120 s per test),
# DJEPA_GPU_RUN_WHEELS (.gpu-carry/wheels), DJEPA_GPU_RUN_TESTS (tests), PYTHON (default python3).
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."
ROOT=$PWD
LIB=$ROOT/tools/gpu_run_lib
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-out}
BUDGET=${GPU_RUN_BUDGET:-${DJEPA_GPU_RUN_BUDGET:-540}}
MIN_STAGE=${DJEPA_GPU_RUN_MIN_STAGE:-20}  # a stage needs this many seconds left to start
MAX_FILES=8
GPU_PYTHON_TAG=${DJEPA_GPU_PYTHON_TAG:-cpython-312}  # the GPU machine's python3 (3.12)
TEST_TIMEOUT=${DJEPA_GPU_RUN_TEST_TIMEOUT:-120}
WHEELS=${DJEPA_GPU_RUN_WHEELS:-$ROOT/.gpu-carry/wheels}
TESTS=${DJEPA_GPU_RUN_TESTS:-tests}  # the test folder (tests/test_gpu_run.py points it at planted hangs)
export PYTHONUNBUFFERED=1

# name | estimate s | limit s | exit bit | what          (priority order)
STAGE_TABLE="
env|10|60|1|nvidia-smi, versions, the GPU's arch (device query: 60 s timeout)
install|20|90|1|djepa + the prebuilt _C (its build record must match), missing test tools from the carry
smoke|30|100|2|each sanitize case once, own process, 20 s: an sm_90a hang/failure turns sm_90a off
tests-gpu|110|170|2|pytest -m gpu but the sm_90a cases (sm_90a off): mma.sync + Triton vs references
tests-sm90|45|90|2|pytest -m gpu, the sm_90a (wgmma) cases alone, after the rest
sanitize|55|100|4|compute-sanitizer memcheck + racecheck, one small case per CUDA kernel, dropout too
bench-ema|15|50|8|EMA suite: the L parameter list
bench-attention|70|110|8|attention: djepa-B/H, dense + 25% random, fwd + fwd+bwd, B with dropout 0.1; SDPA eff/cuDNN/flash, Flex
bench-denoise|90|130|8|denoise suite: B head, M=2048: step, 100-step loop, training
tune|45|75|32|djepa tune --quick --budget: a partial table on interrupt
bench-model|50|100|8|model suite: B preset training step and model.sample
tests-triton|90|150|2|pytest -m 'triton and not gpu' tests: the Triton tests on the GPU
"
DEFAULT_STAGES="env install smoke tests-gpu tests-sm90 sanitize bench-ema bench-attention bench-denoise tune bench-model"

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
DRY=${GPU_RUN_DRY:-0}; PLAN_ONLY=0; RENDER=""; CHECK_PREBUILT=""; RESULTS="$ROOT/benchmarks/results"
TABLES="$ROOT/djepa/tune_tables"; IN_STAGE=""; FAKE_HANG=${GPU_RUN_FAKE_HANG:-}; REQUESTED=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --fake-hang) FAKE_HANG=${2:?--fake-hang needs a smoke case (tools/sanitize_cases.py --list)}; shift ;;
    --plan) PLAN_ONLY=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --render) RENDER=${2:?--render needs a folder}; shift ;;
    --results) RESULTS=${2:?--results needs a folder}; shift ;;
    --tables) TABLES=${2:?--tables needs a folder}; shift ;;
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
if [ -n "$FAKE_HANG" ] && [ "$DRY" != 1 ]; then
  echo "gpu_run.sh: --fake-hang goes with --dry-run (it fakes a hang on the fake GPU)" >&2; exit 2
fi
if [ -n "$FAKE_HANG" ] && [ -z "$IN_STAGE" ] \
   && ! "$PY" tools/sanitize_cases.py --list 2>/dev/null | awk '{print $1}' | grep -qx -- "$FAKE_HANG"; then
  echo "gpu_run.sh: --fake-hang $FAKE_HANG: not a smoke case; cases: $("$PY" tools/sanitize_cases.py --list | awk '{print $1}' | tr '\n' ' ')" >&2
  exit 2
fi
export GPU_RUN_DRY=$DRY GPU_RUN_FAKE_HANG=$FAKE_HANG  # for the stages, run as `gpu_run.sh --in-stage S`

# ------------------------------------------------------------------------------ knobs
export DJEPA_BENCH_EMA_PRESETS=${DJEPA_BENCH_EMA_PRESETS:-L}
export DJEPA_BENCH_ATTN_SHAPES=${DJEPA_BENCH_ATTN_SHAPES:-djepa-B,djepa-H}
export DJEPA_BENCH_ATTN_FRACTIONS=${DJEPA_BENCH_ATTN_FRACTIONS:-dense,random0.25}
export DJEPA_BENCH_ATTN_IMPLS=${DJEPA_BENCH_ATTN_IMPLS:-sdpa-efficient,sdpa-cudnn,sdpa-flash-dense,flex,djepa-triton,djepa-cuda}
export DJEPA_BENCH_ATTN_MODES=${DJEPA_BENCH_ATTN_MODES:-fwd,fwdbwd,fwdbwd-dropout}
export DJEPA_BENCH_ATTN_DROPOUT_SHAPES=${DJEPA_BENCH_ATTN_DROPOUT_SHAPES:-djepa-B}
export DJEPA_BENCH_DENOISE_HEADS=${DJEPA_BENCH_DENOISE_HEADS:-B}
export DJEPA_BENCH_DENOISE_M=${DJEPA_BENCH_DENOISE_M:-2048}
export DJEPA_BENCH_DENOISE_TRAIN_M=${DJEPA_BENCH_DENOISE_TRAIN_M:-8192}
export DJEPA_BENCH_DENOISE_COMPILE_MODE=${DJEPA_BENCH_DENOISE_COMPILE_MODE:-reduce-overhead}
export DJEPA_BENCH_PRESETS=${DJEPA_BENCH_PRESETS:-B}
export DJEPA_BENCH_SAMPLE_BATCH=${DJEPA_BENCH_SAMPLE_BATCH:-32}

FAKE_ENV=(env "PYTHONPATH=$ROOT/tools/fake_gpu${PYTHONPATH:+:$PYTHONPATH}" DJEPA_FAKE_GPU=1)
if [ "$DRY" = 1 ]; then  # what runs under the fake GPU in a dry run (the smoke cases need no torch there)
  RUNPY=("${FAKE_ENV[@]}" "$PY"); SMOKEPY=(env DJEPA_FAKE_GPU=1 "$PY")
  SMOKE_LIMIT=${DJEPA_GPU_RUN_SMOKE_LIMIT:-3}; SMOKE_KILL=2
else
  RUNPY=("$PY"); SMOKEPY=("$PY"); SMOKE_LIMIT=${DJEPA_GPU_RUN_SMOKE_LIMIT:-20}; SMOKE_KILL=5
fi

gpu_query() {  # prints "<name> <arch>": the GPU's name for the files (h200) and its CUDA arch (90a)
  timeout --foreground --kill-after=5 60 "${RUNPY[@]}" -c "import re, torch; M, m = torch.cuda.get_device_capability()
name = re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name().replace('NVIDIA', '')).strip('-').lower()
print(name or 'gpu', f'{M}{m}' + ('a' if M == 9 else ''))"
}

stage_marker() { case $1 in tests-triton) echo "triton and not gpu" ;; *) echo "gpu" ;; esac; }

has_pytest_timeout() { "$PY" -c "import pytest_timeout" 2>/dev/null; }

pytest_tests_args() {  # stage [marker expression] -> ARGS, the pytest arguments of the test stage
  ARGS=(-m pytest)
  if [ "$1" = tests-sm90 ]; then
    ARGS+=("$TESTS/test_dispatch_sm90.py")
    if [ -f "$TESTS/test_attention_sm90_designs.py" ]; then ARGS+=("$TESTS/test_attention_sm90_designs.py"); fi
  else ARGS+=("$TESTS"); fi
  ARGS+=(-v -p no:cacheprovider -p djepa_gpu_run -rfEs --durations=15 --durations-min=1
         -o faulthandler_timeout=60)
  [ -n "${2-x}" ] && ARGS+=(-m "${2-$(stage_marker "$1")}")
  if has_pytest_timeout; then ARGS+=("--timeout=$TEST_TIMEOUT" --timeout-method=thread); fi
}

pytest_bench_args() {  # suite json -> ARGS, the pytest arguments of its benchmark session
  ARGS=(-m pytest "benchmarks/test_bench_$1.py" -v -s -p no:cacheprovider -p djepa_gpu_run --benchmark-only
        "--benchmark-json=$2" -rs --durations=10 -o faulthandler_timeout=60)
  if has_pytest_timeout; then ARGS+=("--timeout=$TEST_TIMEOUT" --timeout-method=thread); fi
}

check_prebuilt() {  # path: a _C for the GPU machine (x86-64, its Python's ABI tag), built from this tree?
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
  msg=$("$PY" "$LIB/build_record.py" check "$f" 2>&1) || { printf '%s\n' "$msg" | tail -n 1; return 1; }
  echo "$f ($(du -h "$f" | cut -f1), $GPU_PYTHON_TAG, x86-64): $msg"
}

json_str() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n\r\t'; }

emit_result() {  # stage nodeid outcome seconds message: one line of the results file
  printf '{"stage": "%s", "event": "result", "nodeid": "%s", "when": "call", "outcome": "%s", "seconds": %s, "message": "%s"}\n' \
    "$1" "$(json_str "$2")" "$3" "$4" "$(json_str "$5")" >> "$RESULTS_FILE"
}

# ------------------------------------------------------------------------------ stage bodies
stage_env() {
  timeout --foreground 30 nvidia-smi || echo "nvidia-smi failed"
  timeout --foreground 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  echo "cores $(nproc) | $(uname -srm)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1
  timeout --foreground --kill-after=5 60 "${RUNPY[@]}" -c "import platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| triton', triton.__version__)
assert torch.cuda.is_available(), 'torch sees no GPU'
print('gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
}

PIP_INSTALL=(-m pip install --no-build-isolation --no-deps --no-index -e .)

install_without_c() {  # djepa without _C: Triton and eager run, the CUDA checks skip saying why
  echo "installing djepa without _C (Triton needs none; the CUDA kernels' tests and benchmarks skip)"
  DJEPA_SKIP_CUDA=1 "$PY" "${PIP_INSTALL[@]}"
}

# module to import | the carried wheel's file name starts with
TEST_TOOLS="pytest_benchmark|pytest_benchmark cpuinfo|py_cpuinfo hypothesis|hypothesis attr|attrs
sortedcontainers|sortedcontainers pytest_timeout|pytest_timeout"

ensure_test_tools() {  # installs from $WHEELS the test tools whose import fails; their folder -> $STATE/pythonpath
  local missing want=() w mod prefix site="$STATE/site"
  missing=$("$PY" -c "import importlib.util as u, sys
print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" $(printf '%s\n' $TEST_TOOLS | cut -d'|' -f1))
  if [ -z "$missing" ]; then echo "test tools: all import (nothing taken from the carry)"; return 0; fi
  for pair in $TEST_TOOLS; do
    mod=${pair%%|*}; prefix=${pair##*|}
    case " $missing " in *" $mod "*) ;; *) continue ;; esac
    w=$(ls "$WHEELS/$prefix"-*.whl 2>/dev/null | head -n 1)
    if [ -n "$w" ]; then want+=("$w"); else echo "test tools: $mod does not import and no $prefix wheel is carried ($WHEELS)"; fi
  done
  if [ ${#want[@]} -eq 0 ]; then
    [ "$DRY" = 1 ] && { echo "test tools: (dry run) this machine is not the GPU machine: not a failure here"; return 0; }
    return 1
  fi
  echo "test tools: $missing do not import: installing ${want[*]##*/} from the carry into $site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${want[@]}"; then
    echo "$site" > "$STATE/pythonpath"
  else
    echo "test tools: pip could not install the carried wheels"; return 1
  fi
}

stage_install() {
  local line rc=0
  if [ -n "${DJEPA_PREBUILT_C:-}" ]; then
    if ! line=$(check_prebuilt "$DJEPA_PREBUILT_C"); then
      echo "$line"
      if [ "$DRY" = 1 ]; then echo "(dry run: the install would go on without _C)"; return 1; fi
      install_without_c; "$PY" -m djepa info; ensure_test_tools; return 1
    fi
    echo "$line"
    if [ "$DRY" = 1 ]; then
      echo "(dry run) would run: DJEPA_PREBUILT_C=... $PY ${PIP_INSTALL[*]}"
    else
      echo "installing djepa with the prebuilt _C $DJEPA_PREBUILT_C (no compiling)"
      DJEPA_PREBUILT_C="$(cd "$(dirname "$DJEPA_PREBUILT_C")" && pwd)/$(basename "$DJEPA_PREBUILT_C")" \
        "$PY" "${PIP_INSTALL[@]}" || { echo "THE PREBUILT _C DID NOT INSTALL"; install_without_c; rc=1; }
    fi
  elif [ "$DRY" = 1 ]; then
    echo "(dry run) no DJEPA_PREBUILT_C: the install would build _C on the GPU machine (estimate 150 s)"
  else
    echo "no DJEPA_PREBUILT_C: building _C here for this GPU (minutes; tools/prepare_gpu_run.sh builds it beforehand)"
    DJEPA_BUILD_CUDA=1 DJEPA_CUDA_ARCHS="$(gpu_query | cut -d' ' -f2)" MAX_JOBS="$(nproc)" "$PY" "${PIP_INSTALL[@]}" \
      || { echo "THE _C BUILD FAILED"; install_without_c; rc=1; }
  fi
  ensure_test_tools || rc=1
  [ "$DRY" = 1 ] && return $rc
  "$PY" -m djepa info
  [ $rc = 0 ] && "$PY" -c "import re, djepa, djepa._C; assert re.search(r'[+]cu[0-9]+$', djepa.__version__), djepa.__version__"
}

stage_smoke() {  # each sanitize case in its own process; sm_90a ones that hang or fail -> $STATE/sm90_off
  local rc=0 name kind r t0 dt outcome note
  while read -r name kind; do
    echo "-- smoke $name ($kind kernels; limit ${SMOKE_LIMIT}s)"
    t0=$SECONDS
    DJEPA_FAKE_HANG=$FAKE_HANG timeout --foreground --signal=INT --kill-after=$SMOKE_KILL "$SMOKE_LIMIT" \
      "${SMOKEPY[@]}" tools/sanitize_cases.py --only "$name"
    r=$?; dt=$((SECONDS - t0))
    case $r in
      0) outcome=passed; note="" ;;
      124) outcome=hung; note="stopped by SIGINT at its ${SMOKE_LIMIT}s limit" ;;
      137) outcome=hung; note="ignored SIGINT at its ${SMOKE_LIMIT}s limit, killed ${SMOKE_KILL}s later (a stuck kernel)" ;;
      *) outcome=failed; note="exit $r" ;;
    esac
    emit_result smoke "smoke::$name" "$outcome" "$dt" "$kind kernels${note:+: $note}"
    echo "== smoke $name ($kind): $outcome in ${dt}s${note:+ ($note)}"
    if [ $r -ne 0 ]; then
      rc=1
      echo "smoke case $name ($kind) $outcome" >> "$STATE/notes"
      [ "$kind" = sm_90a ] && echo "$name $outcome ($note)" >> "$STATE/sm90_off"
    fi
  done < <("$PY" tools/sanitize_cases.py --list)
  return $rc
}

dry_placeholders() {  # stage kind(tests|bench) [file]: what the stage would write, from the dry run's collection
  "$PY" - "$DRY_WORK" "$1" "$2" "${3:-}" "$RESULTS_FILE" <<'EOF'
import json, os, sys
work, stage, kind, out, results = sys.argv[1:6]
if not os.path.exists(f"{work}/tests.json"):  # DJEPA_GPU_RUN_DRY_CHECKS=0: nothing was collected
    if kind == "bench":
        json.dump({"dry_run": True, "benchmarks": [], "cases": "not collected (checks skipped)"}, open(out, "w"))
    print(f"{stage}: not collected (DJEPA_GPU_RUN_DRY_CHECKS=0)")
    sys.exit(0)
if kind == "tests":
    ids = json.load(open(f"{work}/tests.json"))["stages"].get(stage, [])
    with open(results, "a") as f:
        f.write(json.dumps({"stage": stage, "event": "session-start", "dry_run": True, "selected": len(ids)}) + "\n")
        for i in ids:
            f.write(json.dumps({"stage": stage, "event": "result", "nodeid": i, "outcome": "collected (dry run)"}) + "\n")
        f.write(json.dumps({"stage": stage, "event": "session-finish", "dry_run": True, "stopped": None}) + "\n")
    print(f"{stage}: {len(ids)} tests would run")
else:
    f = f"benchmarks/test_bench_{stage.split('-', 1)[1]}.py"
    items = json.load(open(f"{work}/bench.json"))["items"]
    partial = json.load(open(f"{work}/bench_partial.json"))
    cases = [k for k in items if k.startswith(f + "::")]
    machine = dict(partial["machine_info"], sm90_kernels=os.environ.get("DJEPA_SM90_KERNELS", "1") != "0")
    json.dump({"dry_run": True, "machine_info": machine, "benchmarks": [], "cases": cases}, open(out, "w"), indent=1)
    print(f"{stage}: {len(cases)} cases would run:")
    for c in cases:
        print("   ", c.split("::", 1)[1])
EOF
}

rest_of_stage() { echo $(( ${STAGE_END:-0} - $(date +%s) )); }

stage_pytest() {  # stage kind(tests|bench) ARGS...: the session; what a kill or a sticky CUDA error means
  # tests-gpu, tests-triton: the rest again in a fresh process (twice at most, time permitting), the
  # hung test skipped; a kill that ends the stage turns the sm_90a kernels off for the later stages.
  # tests-sm90: a kill (a hung wgmma test) turns them off at once, no retry. Benchmarks: no retry
  # (a second session would rewrite the suite's JSON); a kill ends the stage (and the sm_90a kernels).
  local stage=$1 kind=$2 rc worst=0 tries=0 st; shift 2
  if [ "$DRY" = 1 ]; then
    echo "(dry run) would run: DJEPA_SM90_KERNELS=${DJEPA_SM90_KERNELS:-(unset: on)}${DJEPA_GPU_RUN_SELECT:+ DJEPA_GPU_RUN_SELECT=$DJEPA_GPU_RUN_SELECT} $PY $*"
    return 0
  fi
  export DJEPA_GPU_RUN_RESULTS=$RESULTS_FILE DJEPA_GPU_RUN_STAGE=$stage PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
  while :; do
    "$PY" "$@"; rc=$?
    st=$("$PY" "$LIB/djepa_gpu_run.py" status "$RESULTS_FILE" "$stage" --record-kill)
    printf "\n== %s: pytest exit %s; session: %s\n" "$stage" "$rc" "$st"
    if [ $tries -gt 0 ] && [ $rc -eq 5 ]; then rc=0; fi  # a rerun with nothing left to run
    [ $rc -ne 0 ] && worst=$rc
    case $st in
      killed*)
        local what; what=$(printf '%s' "$st" | awk '{print $2}')
        if [ "$stage" = tests-sm90 ]; then echo "tests-sm90: $what hung (its session was killed)" >> "$STATE/sm90_off"; break; fi
        if [ "$kind" = bench ]; then echo "$stage: its session was killed in $what" >> "$STATE/killed"; break; fi
        echo "$stage: a session was killed in $what (the rest ran again)" >> "$STATE/notes" ;;
      stopped*) [ "$kind" = bench ] && break ;;
      *) break ;;
    esac
    if [ $tries -lt 2 ] && [ "$(rest_of_stage)" -gt 30 ]; then
      tries=$((tries + 1)); export DJEPA_GPU_RUN_SKIP_DONE=1
      echo "== $stage: the rest again, in a fresh process ($(rest_of_stage)s left of the stage)"; continue
    fi
    case $st in killed*) echo "$stage: its last session was killed, no time to go on" >> "$STATE/killed" ;; esac
    break
  done
  return $worst
}

stage_tests() {
  case $1 in
    tests-gpu) export DJEPA_GPU_RUN_SELECT=rest DJEPA_SM90_KERNELS=0 ;;
    tests-sm90) export DJEPA_GPU_RUN_SELECT=sm90 ;;
  esac
  pytest_tests_args "$1"
  [ "$DRY" = 1 ] && dry_placeholders "$1" tests
  stage_pytest "$1" tests "${ARGS[@]}"
}

stage_sanitize() {
  local cs rc=0 half=$(( ${STAGE_LIMIT:-90} / 2 )) r tool
  if [ "$DRY" = 1 ]; then
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) \
      || cs="(no compute-sanitizer here)"
    echo "(dry run) would run: PYTORCH_NO_CUDA_MEMORY_CACHING=1 $cs --tool memcheck --error-exitcode 99 $PY tools/sanitize_cases.py"
    echo "(dry run) would run: $cs --tool racecheck --error-exitcode 99 $PY tools/sanitize_cases.py"
    echo "(dry run) cases (DJEPA_SM90_KERNELS=${DJEPA_SM90_KERNELS:-unset}):"; "$PY" tools/sanitize_cases.py --list
    return 0
  fi
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) \
    || { echo "compute-sanitizer not found"; return 1; }
  "$PY" -c "import djepa._C" || { echo "djepa._C does not import: no CUDA kernel to check"; return 1; }
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (limit ${half}s)"
    if [ $tool = memcheck ]; then export PYTORCH_NO_CUDA_MEMORY_CACHING=1; else unset PYTORCH_NO_CUDA_MEMORY_CACHING; fi
    timeout --foreground --signal=INT --kill-after=5 "$half" "$cs" --tool "$tool" --error-exitcode 99 \
      "$PY" tools/sanitize_cases.py
    r=$?
    echo "== $tool: exit $r$([ $r = 99 ] && echo ' (errors found)')$([ $r = 124 ] && echo ' (cut by its limit)')"
    [ $r = 124 ] || [ $r = 137 ] && echo "sanitize: $tool cut at its ${half}s limit" >> "$STATE/killed"
    [ $r -ne 0 ] && rc=$r
  done
  return $rc
}

stage_bench() {
  local json="$OUT/${STAMP}_${GPU}_$1.json"
  pytest_bench_args "$1" "$json"
  [ "$DRY" = 1 ] && dry_placeholders "bench-$1" bench "$json"
  export DJEPA_BENCH_PARTIAL_JSON=$json
  stage_pytest "bench-$1" bench "${ARGS[@]}"
}

stage_tune() {
  local budget=$(( ${STAGE_LIMIT:-75} - 20 )) out="$OUT/${STAMP}_${GPU}_tune.json"
  [ $budget -lt 10 ] && budget=10
  local args=(-m djepa tune --quick --budget "$budget" --out "$out")
  if [ "$DRY" = 1 ]; then
    "${RUNPY[@]}" "${args[@]}" --dry-run || return 1
    printf '{"format": 1, "dry_run": true, "complete": false, "partial": "dry run: nothing timed", "entries": []}\n' > "$out"
    return 0
  fi
  "$PY" "${args[@]}"
}

run_stage_body() {
  case $1 in
    env) stage_env ;;
    install) stage_install ;;
    smoke) stage_smoke ;;
    tests-*) stage_tests "$1" ;;
    sanitize) stage_sanitize ;;
    bench-*) stage_bench "${1#bench-}" ;;
    tune) stage_tune ;;
  esac
}

if [ -n "$IN_STAGE" ]; then  # one stage, run by the driver under `timeout`
  STAMP=${STAMP:?}; GPU=${GPU:?}; STATE=${STATE:?}; RESULTS_FILE=${RESULTS_FILE:?}
  run_stage_body "$IN_STAGE"
  exit $?
fi

if [ -n "$CHECK_PREBUILT" ]; then check_prebuilt "$CHECK_PREBUILT"; exit $?; fi

# ------------------------------------------------------------------------------ render (CPU machine)
if [ -n "$RENDER" ]; then
  [ -d "$RENDER" ] || { echo "gpu_run.sh --render: no folder $RENDER" >&2; exit 2; }
  mkdir -p "$RESULTS" "$TABLES"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  cp "$RENDER"/*.json "$RENDER"/*.jsonl "$RENDER"/*.log "$work"/ 2>/dev/null
  [ -f "$RENDER/results.tar.gz" ] && tar -xzf "$RENDER/results.tar.gz" -C "$work"
  n=0; t=0; bad=0
  for f in "$work"/*.json; do
    [ -f "$f" ] || continue
    case $(basename "$f") in *summary.json) cp "$f" "$RESULTS/"; continue ;; esac
    kind=$("$PY" -c "import json, sys; d = json.load(open(sys.argv[1]))
print('dry' if isinstance(d, dict) and d.get('dry_run') else 'table' if isinstance(d, dict) and 'entries' in d else 'bench')" "$f")
    case $kind in
      dry) echo "skipped $(basename "$f"): a dry run's placeholder" ;;
      table) "$PY" -m djepa bench --render "$f" && cp "${f%.json}.md" "$RESULTS/" || bad=1
             cp "$f" "$TABLES/" && t=$((t + 1)) ;;
      bench) cp "$f" "$RESULTS/" && n=$((n + 1))
             "$PY" -m djepa bench --render "$RESULTS/$(basename "$f")" || bad=1 ;;
    esac
  done
  for f in "$work"/*.xml "$work"/*.jsonl "$work"/*.log; do
    [ -f "$f" ] && cp "$f" "$RESULTS/"
  done
  echo "copied $n benchmark JSON into $RESULTS (with their .md and .png), $t tuning table(s) into $TABLES" \
       "(their .md into $RESULTS), and the log, summary and per-test results"
  [ $((n + t)) -gt 0 ] || { echo "no benchmark JSON or tuning table found in $RENDER" >&2; exit 1; }
  exit $bad
fi

# ------------------------------------------------------------------------------ plan
if [ ${#REQUESTED[@]} -gt 0 ]; then PLAN=("${REQUESTED[@]}"); LEFT=(); NOFIT=(); else
  PLAN=(); LEFT=(); NOFIT=(); total=0
  for s in $DEFAULT_STAGES; do
    e=$(estimate_of "$s")
    if [ $((total + e)) -le "$BUDGET" ]; then PLAN+=("$s"); total=$((total + e)); else LEFT+=("$s"); NOFIT+=("$s"); fi
  done
  for s in $(all_stages); do
    case " $DEFAULT_STAGES " in *" $s "*) ;; *) LEFT+=("$s") ;; esac
  done
fi

print_plan() {
  local total=0 i=0 s e
  echo "djepa GPU run plan: budget ${BUDGET}s ($( [ "$DRY" = 1 ] && echo "DRY RUN: nothing runs on a GPU${FAKE_HANG:+; smoke case $FAKE_HANG fakes a hang}" || echo "OUT=$OUT"))"
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
STAMP=$(date -u +%Y-%m-%d-%H%M)
mkdir -p "$OUT" || { echo "cannot create OUT=$OUT" >&2; exit 64; }
LOG="$OUT/${STAMP}_gpu_run.log"; SUMMARY="$OUT/${STAMP}_summary.json"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
echo "== gpu_run.sh $( [ "$DRY" = 1 ] && echo "--dry-run${FAKE_HANG:+ --fake-hang $FAKE_HANG}") started $(date -u +%FT%TZ) in $ROOT"
STATE=$(mktemp -d); DRY_WORK=$STATE/dry
trap 'rm -rf "$STATE"' EXIT
export STAMP STATE DRY_WORK
NAMES=(); STATUS=(); RCS=(); SECS=(); NOTES=(); SM90S=(); EXIT=0
SM90_ON=1; SM90_SINCE=""; SM90_WHY=""
[ "${DJEPA_SM90_KERNELS:-1}" = 0 ] && { SM90_ON=0; SM90_SINCE=start; SM90_WHY="DJEPA_SM90_KERNELS=0 was given"; }
GPU=gpu

write_summary() {
  local i f="$SUMMARY"
  {
    printf '{\n "dry_run": %s,\n "fake_hang": %s,\n "stamp": "%s",\n "gpu": "%s",\n "budget_s": %s,\n "plan": [' \
      "$( [ "$DRY" = 1 ] && echo true || echo false)" "$( [ -n "$FAKE_HANG" ] && echo "\"$FAKE_HANG\"" || echo null)" \
      "$STAMP" "$GPU" "$BUDGET"
    for i in "${!PLAN[@]}"; do printf '%s"%s"' "$( [ "$i" -gt 0 ] && echo ', ')" "${PLAN[$i]}"; done
    printf '],\n "left_out": ['
    for i in "${!LEFT[@]}"; do printf '%s"%s"' "$( [ "$i" -gt 0 ] && echo ', ')" "${LEFT[$i]}"; done
    printf '],\n "sm90_kernels": {"on": %s, "off_since": %s, "why": %s},\n' \
      "$( [ $SM90_ON = 1 ] && echo true || echo false)" \
      "$( [ -n "$SM90_SINCE" ] && echo "\"$SM90_SINCE\"" || echo null)" \
      "$( [ -n "$SM90_WHY" ] && echo "\"$(json_str "$SM90_WHY")\"" || echo null)"
    printf ' "files": {"log": "%s", "results": "%s"},\n' "$(basename "$LOG")" "$(basename "${RESULTS_FILE:-}")"
    printf ' "knobs": {'
    local first=1 k
    for k in $(compgen -e | grep '^DJEPA_BENCH_' | sort); do
      printf '%s"%s": "%s"' "$( [ $first = 1 ] || echo ', ')" "$k" "$(json_str "${!k}")"; first=0
    done
    printf '},\n "stages": [\n'
    for i in "${!NAMES[@]}"; do
      printf '  {"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "sm90_kernels": "%s", "note": "%s"}%s\n' \
        "${NAMES[$i]}" "${STATUS[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${SM90S[$i]}" "$(json_str "${NOTES[$i]}")" \
        "$( [ "$i" -lt $((${#NAMES[@]} - 1)) ] && echo ,)"
    done
    printf ' ],\n "exit_status": %s\n}\n' "$EXIT"
  } > "$f.tmp" && mv "$f.tmp" "$f"
}

record() {  # stage status rc seconds note [exit bit]
  NAMES+=("$1"); STATUS+=("$2"); RCS+=("$3"); SECS+=("$4"); NOTES+=("$5")
  SM90S+=("$( [ $SM90_ON = 1 ] && echo on || echo "off (DJEPA_SM90_KERNELS=0)")")
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
    for f in "${files[@]}"; do case $f in *_gpu_run.log|*_summary.json) ;; *) inner+=("$f") ;; esac; done
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
  echo "== done $(date -u +%FT%TZ), exit status $EXIT (1 setup, 2 smoke/tests, 4 sanitizer, 8 benchmarks, 16 cut/left out, 32 tune, 64 output limits)"
  echo "   sm_90a kernels: $( [ $SM90_ON = 1 ] && echo on || echo "OFF since $SM90_SINCE: $SM90_WHY")"
  echo "   render on the CPU machine: tools/gpu_run.sh --render <the folder the files came back to>"
  exec >&- 2>&-
  (sleep 10; kill "$TEE_PID" 2>/dev/null) &  # should anything still hold the log's pipe open
  wait "$TEE_PID" 2>/dev/null  # for tee to write the log's last lines
  exit "$EXIT"
}

sm90_off() {  # why
  [ $SM90_ON = 1 ] || return 0
  SM90_ON=0; SM90_SINCE=$s; SM90_WHY=$1
  export DJEPA_SM90_KERNELS=0
  echo "== the sm_90a kernels are OFF for every later stage (DJEPA_SM90_KERNELS=0): $1"
  write_summary
}

run_plan() {  # every stage of PLAN under its limit and the deadline; the fallback; the summary
  local s limit bit left t0 rc dt note killed tpid
  for s in "${PLAN[@]}"; do
    limit=$(limit_of "$s"); bit=$(stage_field "$s" 4)
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$MIN_STAGE" ]; then
      record "$s" no-time null 0 "left out: ${left}s left of the ${BUDGET}s budget (run it in a second command)" 16
      continue
    fi
    if [ "$s" = tests-sm90 ] && [ $SM90_ON = 0 ]; then
      record "$s" skipped null 0 "the sm_90a kernels are off since $SM90_SINCE: $SM90_WHY"
      continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo; echo "== stage $s (limit ${limit}s; $((SECONDS - START))s into the run; sm_90a kernels $( [ $SM90_ON = 1 ] && echo on || echo off))"
    t0=$SECONDS
    rm -f "$STATE/sm90_off" "$STATE/killed" "$STATE/notes"
    # the stage in a process group of its own (timeout's), which is killed whole once it ends:
    # nothing it started outlives it (inner timeouts are --foreground, so they stay in the group)
    STAGE_LIMIT=$limit STAGE_END=$(( $(date +%s) + limit )) \
      timeout --signal=INT --kill-after=15 "$limit" bash "$SELF" --in-stage "$s" &
    tpid=$!
    wait "$tpid"; rc=$?
    kill -KILL -- "-$tpid" 2>/dev/null && echo "== $s: killed what the stage left running"
    dt=$((SECONDS - t0))
    killed=$( [ -s "$STATE/killed" ] && tr '\n' ';' < "$STATE/killed" | sed 's/;$//; s/;/; /g')
    note=$( [ -s "$STATE/notes" ] && tr '\n' ';' < "$STATE/notes" | sed 's/;$//; s/;/; /g')
    note=$note${killed:+${note:+; }killed: $killed}
    if [ $rc -eq 0 ]; then record "$s" ok 0 "$dt" "$note"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$s" cut "$rc" "$dt" "cut at its ${limit}s limit${note:+; $note}" $((bit | 16))
    else record "$s" failed "$rc" "$dt" "${note:-see the log}" "$bit"
    fi
    if [ -s "$STATE/pythonpath" ]; then
      export PYTHONPATH="$(cat "$STATE/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"
      echo "== later stages import the carried test tools from $(cat "$STATE/pythonpath")"
      rm -f "$STATE/pythonpath"
    fi
    if [ -s "$STATE/sm90_off" ]; then sm90_off "$(tr '\n' ';' < "$STATE/sm90_off" | sed 's/;$//; s/;/; /g')"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then sm90_off "the $s stage ended killed (cut at its ${limit}s limit)"
    elif [ -n "$killed" ]; then sm90_off "the $s stage ended killed ($killed)"
    fi
    if [ "$DRY" != 1 ] && [ "$s" = install ] && [ $rc -ne 0 ] && ! "$PY" -c "import djepa.kernels.denoise" 2>/dev/null; then
      t0=$SECONDS  # cut mid-build, or nothing installed: the later stages need djepa (Triton needs no _C)
      timeout --kill-after=10 90 bash -c "$(declare -p PY PIP_INSTALL); $(declare -f install_without_c); install_without_c"
      rc=$?
      record install-recover "$( [ $rc = 0 ] && echo ok || echo failed)" "$rc" $((SECONDS - t0)) "djepa without _C" 1
    fi
  done
  for s in "${LEFT[@]}"; do
    case " ${NOFIT[*]} " in
      *" $s "*) record "$s" left-out null 0 "did not fit the ${BUDGET}s budget: tools/gpu_run.sh ${LEFT[*]}" ;;
      *) record "$s" left-out null 0 "not in the default plan: tools/gpu_run.sh ${LEFT[*]}" ;;
    esac
  done
}

if [ -n "${DJEPA_PREBUILT_C:-}" ] && [ -f "${DJEPA_PREBUILT_C%.so}.so.build.json" ]; then
  eval "export $("$PY" "$LIB/build_record.py" env "$DJEPA_PREBUILT_C")"  # the commit, where there is no git
fi

# ------------------------------------------------------------------------------ dry run: the checks
if [ "$DRY" = 1 ]; then
  mkdir -p "$DRY_WORK"
  read -r GPU ARCH < <(gpu_query 2>&1 | tail -n 1)
  RESULTS_FILE="$OUT/${STAMP}_${GPU:-gpu}_results.jsonl"; export RESULTS_FILE
  CHECK_T=$SECONDS
  check() {  # name status note (seconds: since the last check)
    local bit=0; [ "$2" = ok ] || bit=1
    record "check:$1" "$2" 0 $((SECONDS - CHECK_T)) "$3" "$( [ $bit = 1 ] && echo 1)"
    CHECK_T=$SECONDS
  }
  bash -n "$SELF" && check syntax ok "bash -n" || check syntax FAIL "bash -n $SELF"
  for tool in timeout tee tar awk sed find; do
    command -v $tool >/dev/null || check tools FAIL "$tool is missing"
  done
  if printf '%s' "$GPU" | grep -Eq '^[a-z0-9-]+$' && [ "$ARCH" = 90a ]; then
    check gpu-snippets ok "name=$GPU arch=$ARCH (GPU faked)"
  else
    check gpu-snippets FAIL "name/arch snippets: $GPU / ${ARCH:-}"; GPU=gpu
  fi
  export GPU
  imports="import djepa, djepa.ops, djepa.nn, djepa.diffusion, djepa.models, djepa.benchreport, djepa.cli, djepa.tune
import djepa.kernels.ema, djepa.kernels.attention, djepa.kernels.denoise
import pytest, pytest_benchmark, torch, triton
assert torch.cuda.is_available() and 'TRITON_INTERPRET' not in __import__('os').environ
print('torch', torch.__version__, 'triton', triton.__version__)"
  if msg=$("${RUNPY[@]}" -c "$imports" 2>&1); then check imports ok "$msg"
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
  if [ "${DJEPA_GPU_RUN_DRY_CHECKS:-1}" = 0 ]; then  # (tests/test_gpu_run.py's fake-hang run: the driver only)
    check collect ok "skipped (DJEPA_GPU_RUN_DRY_CHECKS=0): the stages write no placeholders of what they would run"
  else
  # pytest collection of every test stage and benchmark suite, with the run's options, GPU faked:
  # one collection of tests/ (each stage's marker expression and sm_90a selection applied to it by
  # djepa_collect), one of the benchmark suites (each suite's knobs are its own variables)
  pytest_tests_args tests-gpu ""  # the stage's options without its -m selection
  coll=("${ARGS[@]}" --collect-only -q -p djepa_collect)
  stages_spec="tests-gpu=$(stage_marker tests-gpu)@rest;tests-sm90=$(stage_marker tests-sm90)@sm90;tests-triton=$(stage_marker tests-triton)"
  if msg=$("${FAKE_ENV[@]}" "PYTHONPATH=$ROOT/tools/fake_gpu:$LIB${PYTHONPATH:+:$PYTHONPATH}" \
           DJEPA_COLLECT_JSON="$DRY_WORK/tests.json" DJEPA_COLLECT_STAGES="$stages_spec" "$PY" "${coll[@]}" 2>&1); then
    for s in tests-gpu tests-sm90 tests-triton; do
      n=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['stages'][sys.argv[2]]))" "$DRY_WORK/tests.json" "$s")
      if [ "${n:-0}" -gt 0 ]; then check "collect:$s" ok "$n tests"; else check "collect:$s" FAIL "no tests selected"; fi
    done
  else
    check collect:tests FAIL "$(printf '%s' "$msg" | grep -E 'Error|error' | head -n 3 | tr '\n' ' ')"
  fi
  bench_files=(); for s in "${PLAN[@]}" "${LEFT[@]}"; do case $s in bench-*) bench_files+=("benchmarks/test_bench_${s#bench-}.py") ;; esac; done
  pytest_bench_args ema "$DRY_WORK/bench_full.json"
  bcoll=("${ARGS[@]:0:2}" "${bench_files[@]}" "${ARGS[@]:3}" --collect-only -q -p djepa_collect)
  if msg=$("${FAKE_ENV[@]}" "PYTHONPATH=$ROOT/tools/fake_gpu:$LIB${PYTHONPATH:+:$PYTHONPATH}" \
           DJEPA_COLLECT_JSON="$DRY_WORK/bench.json" DJEPA_BENCH_PARTIAL_JSON="$DRY_WORK/bench_partial.json" \
           "$PY" "${bcoll[@]}" 2>&1); then
    for f in "${bench_files[@]}"; do
      n=$("$PY" -c "import json,sys; print(sum(k.startswith(sys.argv[2] + '::') for k in json.load(open(sys.argv[1]))['items']))" "$DRY_WORK/bench.json" "$f")
      if [ "${n:-0}" -gt 0 ]; then check "collect:$(basename "$f" .py)" ok "$n cases with the run's knobs"
      else check "collect:$(basename "$f" .py)" FAIL "no cases collected"; fi
    done
    if "$PY" -c "import json,sys; m = json.load(open(sys.argv[1]))['machine_info']
assert m['gpu'] and m['torch'] and 'djepa_C' in m and 'git' in m" "$DRY_WORK/bench_partial.json" 2>/dev/null; then
      check machine-info ok "the benchmark JSON records the GPU, versions, _C build and commit"
    else check machine-info FAIL "no machine_info in the benchmark JSON"; fi
  else
    check collect:benchmarks FAIL "$(printf '%s' "$msg" | grep -E 'Error|error' | head -n 3 | tr '\n' ' ')"
  fi
  if msg=$("$PY" tools/sanitize_cases.py --list 2>&1) && "$PY" -m py_compile tools/sanitize_cases.py; then
    check sanitize-cases ok "$(printf '%s' "$msg" | tr '\n' ' ')"
  else check sanitize-cases FAIL "$msg"; fi
  printf '{"benchmarks": [{"group": "g", "name": "test_x[a]", "stats": {"median": 0.001}, "extra_info": {"ms": 1.0}}]}' > "$DRY_WORK/r.json"
  printf '{"format": 1, "gpu": "g", "entries": [{"op": "ema_update_", "dtype": "bfloat16", "bucket": {"numel": 8}, "backend": "cuda", "ms": {"cuda": 1.0}}]}' > "$DRY_WORK/t.json"
  if msg=$("$PY" -c "import sys; from djepa import cli; sys.exit(cli.main(['bench', '--render', sys.argv[1]])
                      or cli.main(['bench', '--render', sys.argv[2]]))" "$DRY_WORK/r.json" "$DRY_WORK/t.json" 2>&1) \
     && [ -f "$DRY_WORK/r.md" ] && [ -f "$DRY_WORK/r.png" ] && [ -f "$DRY_WORK/t.md" ]; then
    check render ok "djepa bench --render writes .md and .png (a tuning table: .md)"
  else check render FAIL "$(printf '%s' "$msg" | tail -n 1)"; fi
  fi
fi

# ------------------------------------------------------------------------------ the run (dry: GPU faked)
START=0
DEADLINE=$BUDGET  # from the command's start ($SECONDS counts from there)
if [ "$DRY" != 1 ]; then
  GPU=$(gpu_query 2>/dev/null | cut -d' ' -f1) || GPU=gpu
  printf '%s' "$GPU" | grep -Eq '^[a-z0-9-]+$' || GPU=gpu
  RESULTS_FILE="$OUT/${STAMP}_${GPU}_results.jsonl"
fi
export GPU RESULTS_FILE
: > "$RESULTS_FILE"
[ "$DRY" = 1 ] && echo && echo "== the plan's driver, GPU faked (tools/fake_gpu)${FAKE_HANG:+; smoke case $FAKE_HANG hangs}"
run_plan
finish
