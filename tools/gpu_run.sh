#!/usr/bin/env bash
# The GPU checks owed by CPU-only sessions, as one command for a lent GPU machine (whose image
# already has torch, triton, pybind11, cmake, pytest, pytest-benchmark, hypothesis, sklearn):
#
#   tools/gpu_run.sh [build] [tests] [bench]      (default: all three, in that order)
#
#   build  djepa._C for this GPU's arch, in place (pip install -e, no build isolation, no deps)
#   tests  the GPU-marked tests (CUDA and bf16 kernels against the references), then the rest
#   bench  the benchmark suites, each sized by the DJEPA_BENCH_* knobs below, JSON + Markdown +
#          PNG per suite into $OUT/benchmarks (commit them under benchmarks/results/)
#
# Logs go to $OUT (default ./gpu-out); a short summary table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/benchmarks"
STAGES=${*:-build tests bench}
PY=${PYTHON:-python3}
summary=()
run() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
ARCH=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")
DATE=$(date +%Y-%m-%d)
GPU=$($PY -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name().replace('NVIDIA', '')).strip('-').lower())")

for stage in $STAGES; do
  case $stage in
    build)
      run build env DJEPA_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
        $PY -m pip install --no-build-isolation --no-deps -e . || { printf '%s\n' "${summary[@]}"; exit 1; }
      run info $PY -m djepa info ;;
    tests)
      run tests-gpu $PY -m pytest -q -m gpu -p no:cacheprovider -x --timeout=600 tests
      run tests-rest $PY -m pytest -q -m "not gpu" -p no:cacheprovider tests ;;
    bench)
      export DJEPA_BENCH_EMA_PRESETS=${DJEPA_BENCH_EMA_PRESETS:-B,L}
      export DJEPA_BENCH_ATTN_SHAPES=${DJEPA_BENCH_ATTN_SHAPES:-djepa-B,djepa-H,N4096-D64}
      export DJEPA_BENCH_PRESETS=${DJEPA_BENCH_PRESETS:-B}
      for suite in ema attention denoise model; do
        json="$OUT/benchmarks/${DATE}_${GPU}_${suite}.json"
        run "bench-$suite" $PY -m pytest -q -p no:cacheprovider "benchmarks/test_bench_$suite.py" \
          --benchmark-only --benchmark-json="$json" -s
        [ -f "$json" ] && $PY -m djepa bench --render "$json" >> "$OUT/bench-$suite.log" 2>&1
      done ;;
    *) echo "unknown stage $stage (build, tests, bench)" >&2; exit 2 ;;
  esac
done
echo
cat "$OUT/gpu.txt"
printf '%s\n' "${summary[@]}"
