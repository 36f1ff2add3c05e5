#!/usr/bin/env bash
# Compile-check csrc/*.cu files for one architecture (no link) and print, per kernel, what ptxas
# reports: registers, spill stores/loads, stack frame and static shared memory (dynamic shared
# memory is the kernels' *Cfg::kSmem / kGemmSmem, not shown), e.g.
#
#   tools/check_cu.sh csrc/attention.cu            # ARCH=90a (default) or ARCH=80
#
# -gencode=arch=compute_X,code=sm_X compiles exactly that arch (-arch=sm_90a would add a plain
# sm_90 pass, which rejects wgmma). Exit status: non-zero if a file fails to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCH=${ARCH:-90a}
PY=${PYTHON:-python3}
PYINC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PBINC=$($PY -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null ||
        $PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
status=0
for f in "$@"; do
  log="/tmp/$(basename "$f").sm_${ARCH}.ptxas.log"
  if "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_${ARCH},code=sm_${ARCH} \
      -Xcompiler -fPIC -I csrc -I "$PYINC" -I "$PBINC" -DDJEPA_CUDA_ARCHS=\"$ARCH\" \
      -DDJEPA_CUDA_VERSION=\"check\" -Xptxas -v -c "$f" -o "/tmp/$(basename "$f").o" > "$log" 2>&1; then
    echo "ok: $f (sm_${ARCH})"
  else
    grep -v "^ptxas info" "$log" | head -40
    echo "FAILED: $f (sm_${ARCH}), full log in $log"
    status=1
    continue
  fi
  $PY - "$log" <<'EOF'
import re, subprocess, sys
rows, cur = {}, None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)'", line)
    if m:
        cur = m.group(1)
        rows[cur] = {}
    elif cur and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        rows[cur].update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
    elif cur and (m := re.search(r"Used (\d+) registers", line)):
        s = re.search(r"(\d+) bytes smem", line)
        rows[cur].update(regs=int(m.group(1)), smem=int(s.group(1)) if s else 0)
names = list(rows)
try:
    plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
except OSError:
    plain = names
print(f"  {'kernel':58s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} {'smem':>5s}")
for name, shown in sorted(zip(names, plain), key=lambda p: p[1]):
    r = rows[name]
    shown = re.sub(r"djepa::(\w+::)?|\(anonymous namespace\)::|void |\(.*\)$", "", shown)
    shown = shown.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    flag = "  <- spills" if r.get("st") or r.get("stack") else ""
    print(f"  {shown:58s} {r.get('regs', 0):4d} {r.get('st', 0):5d}/{r.get('ld', 0):<5d} {r.get('stack', 0):5d} "
          f"{r.get('smem', 0):5d}{flag}")
EOF
done
exit $status
