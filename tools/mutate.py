#!/usr/bin/env python3
"""Plant known bugs in djepa, one at a time, and check that the tests covering each file fail.

    python tools/mutate.py                 # every mutation; writes tests/mutation_report.md
    python tools/mutate.py --list          # the curated list, nothing run
    python tools/mutate.py --only NAME ... # some of them (names or fnmatch patterns)
    python tools/mutate.py --check         # only that every mutation still applies (fast)
    python tools/mutate.py --only NAME --update-report  # rerun some, keep the report's other rows

Each mutation replaces one exact snippet of one file (it must occur exactly once: a mutation
whose snippet has moved is "stale" and fails the run, so the list cannot silently rot). The
mutated tree is a scratch copy of the checkout; the checkout itself is never written. Its
tests run with the copy first on sys.path (djepa.kernels and djepa._C linked in), `-x`, under
a time limit. A mutation is "killed" when they fail, "survived" when they pass; a survivor
counts against the run unless the list explains why it is equivalent (behaviour-preserving).
Exit status: 0 when every mutation is killed or explained, 1 otherwise. Not part of CI (it
runs the covering tests once per mutation); run it after changing a file it mutates.
"""
import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutations import MUTATIONS  # noqa: E402


@dataclass
class Result:
    name: str
    status: str  # killed | survived | equivalent | stale | timeout | error
    seconds: float
    detail: str = ""


def _copy_tree(dst: Path):
    skip = {".git", ".venv", "runs", "build", "dist", ".hypothesis", ".pytest_cache", ".benchmarks", "gpu-out"}
    for entry in ROOT.iterdir():
        if entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(entry, dst / entry.name)
    # the installed layout: djepa.kernels is kernels/ (package_dir), djepa._C sits in djepa/
    # (relative, so that a copy of the copy links to its own kernels/)
    kernels_link = dst / "djepa" / "kernels"
    if not kernels_link.exists():
        kernels_link.symlink_to(Path("..") / "kernels", target_is_directory=True)


def _apply(tree: Path, m, write: bool = True) -> str:
    """Apply `m` in `tree` (with write=False: only check that it would apply); '' on
    success, else why it is stale."""
    path = tree / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    missing = [t for t in m.tests if not t.startswith("-") and not (tree / t.split("::")[0]).exists()]
    if missing:
        return f"its tests do not exist: {' '.join(missing)}"
    text = path.read_text()
    count = text.count(m.find)
    if count != 1:
        return f"snippet found {count} times in {m.file}"
    if write:
        path.write_text(text.replace(m.find, m.replace))
    return ""


def _run_tests(tree: Path, m, timeout: float):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--no-header", "-W", "ignore"] + list(m.tests)
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    tail = [line for line in out.stdout.splitlines() if line.strip()][-1:] or [out.stderr.strip()[-200:]]
    return out.returncode, tail[0][:200]


def _probe_imports_copy(tree: Path) -> str:
    """The copy must be what the tests import, or every mutation would 'survive'."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = "import djepa, djepa.kernels.ema as k; print(djepa.__file__); print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 2 or not all(os.path.realpath(p).startswith(str(tree)) for p in paths):
        return f"the scratch copy is not what Python imports: {out.stdout.strip()} {out.stderr.strip()[-300:]}"
    return ""


def run(selected, timeout, check_only=False, keep=False):
    if check_only:  # the checkout itself, read only
        results = []
        for m in selected:
            stale = _apply(ROOT, m, write=False)
            results.append(Result(m.name, "stale" if stale else "applies", 0.0, stale))
        return results
    results = []
    with tempfile.TemporaryDirectory(prefix="djepa-mutate-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _copy_tree(base)
        for so in (ROOT / "djepa").glob("_C*.so"):
            shutil.copy2(so, base / "djepa" / so.name)
        why = _probe_imports_copy(base)
        if why:
            raise SystemExit(f"mutate: {why}")
        for i, m in enumerate(selected, 1):
            tree = Path(tmp) / "tree"
            if tree.exists():
                shutil.rmtree(tree)
            shutil.copytree(base, tree, symlinks=True)
            if not os.path.realpath(tree / "djepa" / "kernels").startswith(str(tree) + os.sep):
                raise SystemExit("mutate: the scratch tree's djepa/kernels does not lead to its own kernels/")
            t0 = time.time()
            stale = _apply(tree, m)
            if stale:
                results.append(Result(m.name, "stale", 0.0, stale))
            else:
                rc, tail = _run_tests(tree, m, timeout)
                dt = time.time() - t0
                if rc is None:
                    results.append(Result(m.name, "timeout", dt, tail))
                elif rc == 0:
                    status = "equivalent" if m.equivalent else "survived"
                    results.append(Result(m.name, status, dt, m.equivalent or tail))
                elif rc == 1:
                    results.append(Result(m.name, "killed", dt, tail))
                else:  # collection error, usage error, nothing collected: not a verdict
                    results.append(Result(m.name, "error", dt, f"pytest exit {rc}: {tail}"))
            r = results[-1]
            print(f"[{i}/{len(selected)}] {r.status:10s} {r.seconds:6.1f}s  {m.name}  {r.detail[:100]}", flush=True)
    return results


def _report_rows(path: Path):
    """{mutation name: (status, seconds, detail)} of an existing report's table."""
    rows = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        status, _, detail = cells[4].partition(": ")
        rows[cells[0].strip("`")] = Result(cells[0].strip("`"), status.strip("*"), float(cells[5] or 0), detail)
    return rows


def merge_results(path: Path, results):
    """The report's rows for every curated mutation, with `results` replacing theirs; a
    mutation the report lacks and that was not run now is listed as not run."""
    old = _report_rows(path)
    new = {r.name: r for r in results}
    return [new.get(m.name) or old.get(m.name) or Result(m.name, "not run", 0.0, "run tools/mutate.py")
            for m in MUTATIONS]


def write_report(path: Path, results, selected):
    by_name = {m.name: m for m in selected}
    counts = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [
        "# Mutation report",
        "",
        "Written by `python tools/mutate.py` (the curated list is `tools/mutations.py`). Each row is one",
        "planted bug, run against the tests that cover its file; **killed** means those tests failed.",
        "",
        "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" of {len(results)}.",
        "",
        "| mutation | file | what it breaks | tests | result | s |",
        "|---|---|---|---|---|---:|",
    ]
    for r in results:
        m = by_name[r.name]
        result = r.status if r.status == "killed" else f"**{r.status}**: {r.detail}"
        lines.append(f"| `{m.name}` | `{m.file}` | {m.what} | {' '.join(f'`{t}`' for t in m.tests)} | "
                     f"{result} | {r.seconds:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="mutation names or fnmatch patterns")
    ap.add_argument("--list", action="store_true", help="print the curated list and exit")
    ap.add_argument("--check", action="store_true", help="only check that every mutation applies")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test run")
    ap.add_argument("--report", type=Path, default=ROOT / "tests" / "mutation_report.md")
    ap.add_argument("--update-report", action="store_true",
                    help="with --only: replace those mutations' rows of the existing report")
    args = ap.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("mutate: duplicate mutation names in tools/mutations.py")
    selected = MUTATIONS
    if args.only:
        selected = [m for m in MUTATIONS if any(fnmatch.fnmatch(m.name, p) for p in args.only)]
        if not selected:
            raise SystemExit(f"mutate: nothing matches {args.only}; see --list")
    if args.list:
        for m in selected:
            print(f"{m.name:40s} {m.file:32s} {m.what}")
        return 0
    results = run(selected, args.timeout, check_only=args.check)
    bad = [r for r in results if r.status in ("survived", "stale", "error")]
    if not args.check and not args.only:
        write_report(args.report, results, selected)
        print(f"report: {args.report}")
    elif not args.check and args.update_report:
        write_report(args.report, merge_results(args.report, results), MUTATIONS)
        print(f"report updated: {args.report}")
    print(f"{len(results)} mutations: " + ", ".join(
        f"{sum(r.status == s for r in results)} {s}" for s in sorted({r.status for r in results})))
    for r in bad:
        print(f"  {r.status}: {r.name} ({r.detail})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
