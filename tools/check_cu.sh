#!/usr/bin/env bash
# Compile-check one csrc/*.cu file for one architecture (no link), e.g. tools/check_cu.sh csrc/ema.cu
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${ARCH:-90a}
PYINC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PBINC=$(python3 -c 'import pybind11; print(pybind11.get_include())')
for f in "$@"; do
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_${ARCH} -Xcompiler -fPIC \
    -I csrc -I "$PYINC" -I "$PBINC" -DDJEPA_CUDA_ARCHS=\"$ARCH\" -DDJEPA_CUDA_VERSION=\"check\" \
    -c "$f" -o "/tmp/$(basename "$f").o" --resource-usage 2>&1 | grep -v "^$" || true
  test -f "/tmp/$(basename "$f").o" && echo "ok: $f"
done
