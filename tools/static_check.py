#!/usr/bin/env python
"""Static speed gate: compile every kernel for sm_90 (or sm_80) without a GPU and check it.

    python tools/static_check.py [--arch 90|80] [--full] [--json OUT] [--jobs N] [--only [BACKEND][:OP]]

Triton (tools/static_triton.py): every kernel variant the ops can launch is captured from the
ops' own launch code over the preset shapes (tiny/B/L/H), the benchmark shapes, and (with --full)
a coverage sweep of dtypes, head dims and widths; every autotune config of an autotuned kernel is
a variant of its own; each is compiled by Triton for GPUTarget("cuda", ARCH, 32) behind a
stand-in driver: no GPU is needed.
CUDA (tools/static_cuda.py): every csrc/*.cu is compiled with nvcc for sm_90a (sm_80) with
`-Xptxas -v`; the SASS of the cubin (cuobjdump --dump-sass, tools/sass.py) gives the tensor-core
instruction counts per kernel.

One JSON record per variant (a list), and a Markdown table beside it (OUT with .md,
tools/static_report.py):
    {"backend", "kernel", "variant", "arch", "regs", "spill_bytes", "stack_bytes", "smem_bytes",
     "smem_limit", "tensor_core": {"wgmma", "mma_sync"}, "hot", "wgmma_serialized", ...}
`hot` = launched by a preset or benchmark shape in fp16/bf16. The gate (tools/static_rules.py)
fails (exit 1) when
  - a hot variant spills or has a stack frame,
  - a variant needs more shared memory than one block may have (232448 B sm_90, 166912 B sm_80),
  - a matmul-bound Triton kernel (fp16/bf16) on sm_90 compiles to no wgmma,
  - a sm_90a CUDA matmul kernel (csrc/*_sm90.cu: CUDA_WGMMA_KERNELS) compiles to no wgmma,
  - ptxas reports "wgmma.mma_async instructions are serialized" for a kernel,
  - a hot memory-bound vector kernel (the EMA) issues no 16-byte global load or store,
  - a variant does not compile.
Without --full a small subset runs (the one the test suite runs); --full writes
benchmarks/results/static/sm_<arch>.json/.md unless --json says otherwise.

--only narrows a run to one backend (triton, cuda), one op (attention, denoise, ema: the Triton
kernels of djepa.kernels.<op> and csrc/<op>.cu, csrc/<op>_sm90.cu) or both (triton:attention);
with --merge only the records of that part are replaced in the committed table, e.g.
    python tools/static_check.py --arch 90 --full --only attention --merge
refreshes every attention record (Triton and CUDA) and keeps the rest.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass import ARCHS, ROOT, find_tool  # noqa: E402
from static_cuda import compile_cuda_file, cuda_records, cuda_sources  # noqa: E402
from static_report import HOT_SCOPE, markdown, merge  # noqa: E402
from static_rules import check  # noqa: E402
from static_triton import compile_triton, triton_kernel_ops, triton_variants  # noqa: E402

# The gate's public names, for callers that load this file (tests/test_build_sm90.py, tools):
from sass import parse_ptxas, parse_sass, parse_wgmma_serialized, split_template  # noqa: E402,F401
from static_cuda import (CUDA_ATTENTION_KERNELS, CUDA_DROPOUT_KERNELS, CUDA_DYNAMIC_SMEM,  # noqa: E402,F401
                         CUDA_LN_KERNELS, cuda_dropout, cuda_hot)
from static_rules import (CUDA_WGMMA_KERNELS, HOT_DTYPES, MATMUL_KERNELS, VECTOR_KERNELS, record,  # noqa: E402,F401
                          violations)

__all__ = ["main", "run_gate", "parse_only", "OPS", "check", "record", "violations", "merge", "markdown",
           "parse_ptxas", "parse_sass", "parse_wgmma_serialized", "split_template", "cuda_hot", "cuda_dropout",
           "CUDA_ATTENTION_KERNELS", "CUDA_DROPOUT_KERNELS", "CUDA_DYNAMIC_SMEM", "CUDA_LN_KERNELS",
           "CUDA_WGMMA_KERNELS", "HOT_DTYPES", "MATMUL_KERNELS", "VECTOR_KERNELS", "ARCHS"]

sys.path.insert(0, str(ROOT))

BACKENDS = ("triton", "cuda")
# The ops: one Triton module kernels/<op>.py and csrc/<op>.cu (+ csrc/<op>_sm90.cu) each.
OPS = tuple(sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_")))

_WORK = {}


def parse_only(value):
    """--only's value -> (backends, op): "triton" / "cuda" (one backend, every op), "attention"
    (one op, both backends), "triton:attention" (both narrowed); None -> every part."""
    if value is None:
        return set(BACKENDS), None
    backend, _, op = value.partition(":")
    if backend in OPS and not op:
        backend, op = "", backend
    if backend and backend not in BACKENDS:
        raise ValueError(f"--only {value}: unknown backend {backend!r}; choose from {BACKENDS}")
    if op and op not in OPS:
        raise ValueError(f"--only {value}: unknown op {op!r}; choose from {OPS}")
    if not backend and not op:
        raise ValueError(f"--only {value}: give a backend {BACKENDS}, an op {OPS}, or BACKEND:OP")
    return ({backend} if backend else set(BACKENDS)), (op or None)


def _run_job(job):
    kind, arch, item = job
    if kind == "triton":
        return kind, compile_triton(_WORK["variants"][item], arch)
    path = item
    try:
        return kind, (path, compile_cuda_file(path, arch))
    except Exception as exc:
        return kind, (path, str(exc))


def run_gate(arch=90, full=False, jobs=None, only=None, kernel_filter=None, verbose=True, hot_only=False,
             scenario_filter=None):
    """All records of one gate run, each stamped with its toolchain and the day it was compiled.
    only: --only's value (parse_only); scenario_filter: a regex on the Triton scenarios' names."""
    t0 = time.time()
    backends, op = parse_only(only)
    jobs_list = []
    if "cuda" in backends:
        if find_tool("nvcc") is None:
            raise SystemExit("static_check: nvcc not found (CUDA_HOME, PATH, /usr/local/cuda); use --only triton")
        jobs_list += [("cuda", arch, str(p)) for p in cuda_sources(full, op)]
    if "triton" in backends:
        variants = triton_variants(full, arch, op, scenario_filter)
        if kernel_filter:
            variants = [v for v in variants if re.search(kernel_filter, v.kernel)]
        if hot_only:
            variants = [v for v in variants if v.hot]
        _WORK["variants"] = variants
        jobs_list += [("triton", arch, i) for i in range(len(variants))]
        if verbose:
            print(f"static_check: {len(variants)} Triton variants, {len(jobs_list) - len(variants)} CUDA files, "
                  f"sm_{arch}, {jobs} jobs", file=sys.stderr)
    triton_recs, cuda_results = [], []
    # The CUDA files are the longest jobs: submitted first.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs_list]
        for n, fut in enumerate(as_completed(futures), 1):
            kind, res = fut.result()
            (triton_recs if kind == "triton" else cuda_results).append(res)
            if verbose and n % 50 == 0:
                print(f"static_check: {n}/{len(jobs_list)} compiled ({time.time() - t0:.0f} s)", file=sys.stderr)
    records = cuda_records(cuda_results, arch) if cuda_results else []
    records += sorted(triton_recs, key=lambda r: (r["kernel"], r["variant"]))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for r in records:
        r["toolchain"], r["date"] = _toolchain(r["backend"]), day
    return records, time.time() - t0


def _toolchain(backend):
    if backend == "triton":
        import triton

        return f"triton {triton.__version__}"
    nvcc = find_tool("nvcc")
    nv = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    m = re.search(r"release ([\d.]+)", nv)
    return f"nvcc {m.group(1) if m else 'absent'}"


def _prepare_environment():
    """Compile for the GPU, never the interpreter (the test suite sets TRITON_INTERPRET=1), into
    a fresh cache (a cached kernel comes back without its ptxas report). Before triton imports."""
    if "triton" in sys.modules:
        raise RuntimeError("static_check must run in its own process (triton is already imported)")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="djepa-static-triton-")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90)
    ap.add_argument("--full", action="store_true", help="every variant (default: the test suite's subset)")
    ap.add_argument("--json", metavar="OUT", help="write the records here (and a Markdown table at OUT.md); "
                    "default with --full: benchmarks/results/static/sm_<arch>.json")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    ap.add_argument("--only", metavar="[BACKEND][:OP]",
                    help=f"one part: a backend {'|'.join(BACKENDS)}, an op {'|'.join(OPS)} (its Triton kernels and "
                    "csrc/<op>*.cu), or both (triton:attention)")
    ap.add_argument("--kernel", metavar="REGEX", help="only Triton kernels whose name matches")
    ap.add_argument("--scenario", metavar="REGEX", help="only the Triton launch scenarios whose name matches "
                    "(e.g. 'dropout'; see --list); not with --merge (the table would lose the other scenarios' "
                    "variants)")
    ap.add_argument("--hot", action="store_true", help="only the hot Triton variants")
    ap.add_argument("--merge", action="store_true", help="keep the records of OUT that this run does not "
                    "replace (the other backend or op, see --only; with --kernel, the other Triton kernels) and "
                    "write both")
    ap.add_argument("--list", action="store_true", help="list the Triton variants (no compiling)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    try:
        parse_only(args.only)
    except ValueError as exc:
        ap.error(str(exc))
    if args.merge and args.scenario:
        ap.error("--scenario cannot go with --merge: the records of the scenarios left out would be dropped")
    _prepare_environment()
    try:
        return _main(args)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)


def _main(args):
    if args.list:
        backends, op = parse_only(args.only)
        if "triton" not in backends:
            print("static_check: --list lists Triton variants (the CUDA ones are the csrc/ instantiations)",
                  file=sys.stderr)
            return 0
        for v in triton_variants(args.full, args.arch, op, args.scenario):
            if not args.kernel or re.search(args.kernel, v.kernel):
                print(f"{'hot ' if v.hot else '    '}{v.kernel} {v.label}  <- {v.sources[0]}"
                      f"{f' (+{len(v.sources) - 1})' if len(v.sources) > 1 else ''}")
        return 0
    default_out = ROOT / "benchmarks" / "results" / "static" / f"sm_{args.arch}.json"
    out = args.json
    if out is None and (args.merge or (args.full and args.only is None and args.kernel is None and not args.hot)):
        out = default_out
    records, elapsed = run_gate(args.arch, args.full, args.jobs, args.only, args.kernel, hot_only=args.hot,
                                scenario_filter=args.scenario)
    if args.merge and Path(out).is_file():
        backends, op = parse_only(args.only)
        records = merge(json.loads(Path(out).read_text()), records, backends, args.kernel, op,
                        triton_kernel_ops() if op else None)
    md = markdown(records, args.arch, elapsed, args.full, HOT_SCOPE if args.hot else None)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"static_check: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    bad = check(records)
    for r, v in bad:
        print(f"static_check: FAIL {r['backend']} {r['kernel']} [{r['variant']}]: {v}", file=sys.stderr)
    print(f"static_check: {len(records)} variants, {len(bad)} violations, {elapsed:.0f} s", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
