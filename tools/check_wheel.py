#!/usr/bin/env python3
"""Check djepa wheels as a user installs them: each into fresh virtual environments beside
several torch versions, then print a matrix of what passed.

  tools/check_wheel.py WHEEL [WHEEL ...] [--torch LIST] [--python X.Y=PATH] [--cpu-tests FILES]
                       [--quick] [--wheelhouse DIR] [--work DIR] [--keep] [--json FILE]

--torch, comma-separated (default oldest,newest):
  oldest    the lowest release that the wheel's torch requirement allows and that has a build
            for the wheel's Python (`pip index versions torch` with that Python)
  newest    what `pip install torch` picks: the newest that the index and pip's constraints allow
  2.13.0    that release
  current   the torch of the Python running this script, whose site-packages the fresh
            environment sees through a .pth file: nothing is downloaded (the in-suite test)
PyPI's Linux torch builds are CUDA builds of several GB (with their nvidia-* packages):
--wheelhouse DIR keeps what pip downloads there and installs torch from it (pip's own cache is
off on some machines, this one included).

Each cell (wheel x torch), in a fresh venv made by the wheel's Python (pyenv's newest X.Y, then
pythonX.Y on PATH, or --python X.Y=PATH), removed afterwards unless --keep:
  install   pip install torch (as asked), then the wheel with its [test] extra
  import    djepa and djepa._C load from the venv under that torch; _C names its CUDA version;
            djepa/tune_tables/ holds its README and every tuning table of this checkout
  info      `djepa info` exits 0 and reports djepa._C as built
  bindings  tests/test_build.py and test_build_sm90.py with DJEPA_REQUIRE_C=1: every kernel an
            op needs is exposed, each refuses clearly without a GPU, argument checks raise
            ValueError, the sm_90a code holds wgmma where the build names 90a
            (--quick leaves out that last one: reading the machine code takes minutes)
  cpu       the CPU test subset (CPU_TESTS, or --cpu-tests; '' skips it). The Triton kernels run
            under Triton's CPU interpreter there; where that interpreter fails with this NumPy
            (Triton <= 3.5 with NumPy >= 2.3: "only 0-dimensional arrays can be converted", a
            limitation of the test device, not of GPU runs), NumPy < 2.3 is installed for the
            tests and the cell says so
The tests come from this checkout's tests/ and run from an empty folder, so they import the
installed djepa, not the checkout's. Exit status 0 when every cell passed.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
# Files whose tests exercise the installed package across torch's API without a GPU, about a
# minute of tests on 2 cores (the whole CPU suite takes some 20): an op end to end (eager path,
# dispatch, autograd, the Triton kernel under the interpreter), the diffusion code, the model and
# the sampler. Their slow tests are left out.
CPU_TESTS = ["test_ema.py", "test_diffusion.py", "test_models.py", "test_sampler.py"]
STAGES = ("install", "import", "info", "bindings", "cpu")
# A loop bounded by a loaded scalar under Triton's CPU interpreter: old interpreters turn the
# scalar into an int through NumPy in a way NumPy 2.3 refuses.
INTERPRETER_PROBE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl

@triton.jit
def count(N, OUT):
    n = tl.load(N)
    acc = 0
    for _ in range(0, n, 1):
        acc += 1
    tl.store(OUT, acc)

n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
count[(1,)](n, out)
assert out.item() == 3, out
"""


def shipped_tables():
    """What djepa/tune_tables/ must hold once installed: its README and every table in this checkout."""
    return ["README.md"] + sorted(p.name for p in (ROOT / "djepa" / "tune_tables").glob("*.json"))


def log(msg):
    print(msg, flush=True)


def run(argv, *, cwd=None, env=None, timeout=3600):
    """(returncode, combined output)."""
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return r.returncode, r.stdout


def wheel_python(wheel):
    """'3.11' from a cp311 wheel."""
    m = re.search(r"-cp(\d)(\d+)-", Path(wheel).name)
    if not m:
        raise SystemExit(f"check_wheel.py: {wheel} is not a CPython wheel (cpXY tag); a py3-none-any wheel has no _C")
    return f"{m.group(1)}.{m.group(2)}"


def find_python(version, given):
    if version in given:
        return given[version]
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(glob.glob(str(root / f"{version}.*")),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in re.split(r"[.]", Path(p).name)])
    for p in reversed(found):
        exe = Path(p) / "bin" / f"python{version}"
        if exe.is_file():
            return str(exe)
    return shutil.which(f"python{version}")


def torch_requirement(wheel):
    """The wheel's Requires-Dist for torch, e.g. '>=2.4' ('' when unpinned)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            m = re.match(r"Requires-Dist:\s*torch\s*(\(?)([^;)]*)\)?", line)
            if m:
                return m.group(2).strip()
    return ""


def _specifier(spec):
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version
    return SpecifierSet(spec), Version


def oldest_torch(python, wheel):
    rc, out = run([python, "-m", "pip", "index", "versions", "torch"])
    m = re.search(r"Available versions:\s*(.+)", out)
    if rc != 0 or not m:
        raise RuntimeError(f"pip index versions torch failed:\n{out[-2000:]}")
    spec, Version = _specifier(torch_requirement(wheel))
    versions = sorted({Version(v.strip()) for v in m.group(1).split(",")})
    allowed = [v for v in versions if v in spec and not v.is_prerelease]
    if not allowed:
        raise RuntimeError(f"no torch release for this Python satisfies {spec}")
    return str(allowed[0].public)


class Cell:
    def __init__(self, wheel, torch_label):
        self.wheel = Path(wheel)
        self.label = torch_label  # what pip is asked for: newest, current or a version
        self.asked = torch_label  # as given: oldest, newest, current or a version
        self.python = wheel_python(wheel)
        self.torch = None  # the version installed
        self.stages = {}  # stage -> (ok, summary)
        self.seconds = 0.0

    @property
    def ok(self):
        return all(ok for ok, _ in self.stages.values()) and len(self.stages) > 0

    def record(self, stage, ok, summary):
        now = time.time()
        seconds, self._mark = now - getattr(self, "_mark", now), now
        self.stages[stage] = (ok, summary)
        log(f"   {stage:9s} {'ok  ' if ok else 'FAIL'} {summary} ({seconds:.0f} s)")
        return ok


def pytest_summary(out):
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", out))
    text = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    return counts, text


def check_cell(cell, python, work, cpu_tests, keep, quick, wheelhouse):
    venv = work / f"venv-cp{cell.python.replace('.', '')}-torch-{cell.label}"
    shutil.rmtree(venv, ignore_errors=True)
    t0 = cell._mark = time.time()
    try:
        _check(cell, python, venv, cpu_tests, quick, wheelhouse)
    finally:
        cell.seconds = time.time() - t0
        if not keep:
            shutil.rmtree(venv, ignore_errors=True)


def _check(cell, python, venv, cpu_tests, quick, wheelhouse):
    rc, out = run([python, "-m", "venv", venv])
    if rc != 0:
        return cell.record("install", False, f"python -m venv: {out.strip()[-300:]}")
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                                                            "TRITON_INTERPRET", "DJEPA_BACKEND")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if cell.label == "current":
        # The fresh venv sees this interpreter's packages (torch and the wheel's other
        # dependencies) after its own, so pip finds them installed and fetches nothing.
        site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])[1].strip()
        paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        Path(site, "_check_wheel_current_env.pth").write_text("".join(f"{p}\n" for p in paths))
        steps = [pip + [f"{cell.wheel}[test]"]]
    else:
        torch_spec = "torch" if cell.label == "newest" else f"torch=={cell.label}"  # oldest: resolved
        steps = [pip + [torch_spec], pip + [f"{cell.wheel}[test]"]]
        if wheelhouse:
            rc, out = run([py, "-m", "pip", "download", "-d", wheelhouse, torch_spec])
            got = re.findall(r"torch-(\d[^-]*)-cp", out)  # "Saved ..." / "File was already downloaded ..."
            if rc != 0 or not got:
                return cell.record("install", False, f"pip download {torch_spec}: {out.strip()[-600:]}")
            steps = [pip + ["--no-index", "--find-links", wheelhouse, f"torch=={got[0]}"],
                     pip + ["--find-links", wheelhouse, f"{cell.wheel}[test]"]]
    for argv in steps:
        rc, out = run(argv)
        if rc != 0:
            return cell.record("install", False, f"{' '.join(map(str, argv[3:]))}: " + out.strip()[-600:])
    probe = ("import os, sys, torch, djepa, djepa._C as C\n"
             "print(torch.__version__); print(C.cuda_version); print(C.cuda_archs)\n"
             "print(os.path.realpath(djepa.__file__)); print(os.path.realpath(C.__file__))\n"
             "tables = os.path.join(os.path.dirname(djepa.__file__), 'tune_tables')\n"
             "print(','.join(sorted(os.listdir(tables))) if os.path.isdir(tables) else '-')\n")
    rc, out = run([py, "-c", probe], cwd=venv, env=env)
    lines = out.strip().splitlines()
    if rc != 0 or len(lines) < 6:
        cell.record("install", True, "pip install torch, then the wheel")
        return cell.record("import", False, out.strip()[-600:])
    cell.torch, cuda, archs, djepa_file, c_file, tables = lines[-6:]
    where = os.path.realpath(venv)
    cell.record("install", True, f"torch {cell.torch}, then {cell.wheel.name}")
    if not (djepa_file.startswith(where) and c_file.startswith(where)):
        return cell.record("import", False, f"djepa or djepa._C came from outside the venv: {djepa_file}, {c_file}")
    missing = sorted(set(shipped_tables()) - set(tables.split(",")))
    if missing:
        return cell.record("import", False, f"djepa/tune_tables/ lacks {', '.join(missing)} (setup.py package_data)")
    if not cell.record("import", True, f"djepa._C (CUDA {cuda}, archs {archs}) under torch {cell.torch}; "
                                          f"tune_tables/ with {len(shipped_tables()) - 1} tables"):
        return False
    rc, out = run([venv / "bin" / "djepa", "info"], cwd=venv, env=env)
    built = re.search(r"^djepa\._C\s+built with CUDA", out, re.M)
    cell.record("info", rc == 0 and bool(built),
                "djepa info reports djepa._C built" if rc == 0 and built else out.strip()[-600:])
    tests_env = dict(env, DJEPA_REQUIRE_C="1")
    common = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT, "-o", "addopts="]
    select = "not setup and not static_gate" + (" and not wgmma_code" if quick else "")
    rc, out = run([py] + common + [TESTS / "test_build.py", TESTS / "test_build_sm90.py", "-k", select],
                  cwd=venv, env=tests_env)
    counts, text = pytest_summary(out)
    cell.record("bindings", rc == 0 and counts.get("passed", 0) > 0, text if rc == 0 else text + "\n" + out[-1500:])
    if cpu_tests:
        note = ""
        rc, out = run([py, "-c", INTERPRETER_PROBE], cwd=venv, env=env)
        if rc != 0 and "0-dimensional" in out:
            rc, out = run(pip + ["numpy<2.3"])
            triton = run([py, "-c", "import triton; print(triton.__version__)"])[1].strip().splitlines()[-1:]
            note = f" (NumPy < 2.3 for Triton {''.join(triton)}'s CPU interpreter)"
            if rc != 0:
                return cell.record("cpu", False, "pip install numpy<2.3: " + out.strip()[-600:])
        files = [TESTS / f for f in cpu_tests]
        rc, out = run([py] + common + ["-m", "not slow and not gpu"] + files, cwd=venv, env=tests_env)
        counts, text = pytest_summary(out)
        cell.record("cpu", rc == 0 and counts.get("passed", 0) > 0,
                    text + note if rc == 0 else text + note + "\n" + out[-3000:])


def matrix(cells):
    rows = ["| wheel | Python | torch | " + " | ".join(STAGES) + " | seconds |",
            "|---|---|---|" + "---|" * len(STAGES) + "---|"]
    for c in cells:
        marks = []
        for s in STAGES:
            if s not in c.stages:
                marks.append("–")
            else:
                ok, summary = c.stages[s]
                short = summary.splitlines()[0][:60] if s in ("bindings", "cpu") else ""
                marks.append(("✓" if ok else "✗") + (f" {short}" if short and ok else ""))
        torch = c.torch or c.label
        if c.asked in ("oldest", "newest", "current"):
            torch += f" ({c.asked})"
        rows.append(f"| {c.wheel.name} | {c.python} | {torch} | " + " | ".join(marks) + f" | {c.seconds:.0f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--torch", default="oldest,newest")
    p.add_argument("--python", action="append", default=[], metavar="X.Y=PATH")
    p.add_argument("--cpu-tests", default=" ".join(CPU_TESTS),
                   help="test files under tests/ for the cpu stage, space-separated ('' skips it)")
    p.add_argument("--quick", action="store_true", help="bindings without reading the sm_90a machine code")
    p.add_argument("--wheelhouse", type=Path, help="keep downloaded torch wheels here and install from it")
    p.add_argument("--work", type=Path, help="where the venvs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the venvs")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.python)
    labels = [t.strip() for t in args.torch.split(",") if t.strip()]
    cpu_tests = args.cpu_tests.split()
    work = args.work or Path(tempfile.mkdtemp(prefix="djepa-check-wheel-"))
    work.mkdir(parents=True, exist_ok=True)
    cells = []
    for wheel in args.wheels:
        wheel = wheel.resolve()
        if not wheel.is_file():
            raise SystemExit(f"check_wheel.py: no such wheel: {wheel}")
        version = wheel_python(wheel)
        python = find_python(version, given)
        for label in labels:
            cell = Cell(wheel, label)
            cells.append(cell)
            log(f"== {wheel.name} with torch {label} (Python {version})")
            if python is None:
                cell.record("install", False, f"no Python {version} found (pyenv, PATH, --python {version}=PATH)")
                continue
            if label == "current" and version != "%d.%d" % sys.version_info[:2]:
                cell.record("install", False, f"torch 'current' is this Python's ({sys.version.split()[0]}); "
                                              f"the wheel is for {version}")
                continue
            if label == "oldest":
                try:
                    cell.label = oldest_torch(python, wheel)
                except RuntimeError as exc:
                    cell.record("install", False, str(exc))
                    continue
                log(f"   oldest torch allowed ({torch_requirement(wheel) or 'any'}) with a build for {version}: "
                    f"{cell.label}")
            check_cell(cell, python, work, cpu_tests, args.keep, args.quick,
                       args.wheelhouse.resolve() if args.wheelhouse else None)
    log("\n" + matrix(cells))
    if args.json:
        args.json.write_text(json.dumps([{"wheel": c.wheel.name, "python": c.python, "torch": c.torch,
                                          "asked": c.asked, "seconds": round(c.seconds),
                                          "stages": {s: {"ok": ok, "summary": summ}
                                                     for s, (ok, summ) in c.stages.items()}}
                                         for c in cells], indent=1))
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    bad = [c for c in cells if not c.ok]
    log(f"\n{len(cells) - len(bad)} of {len(cells)} passed" + (": " + ", ".join(
        f"{c.wheel.name} x torch {c.torch or c.label}" for c in bad) + " failed" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
