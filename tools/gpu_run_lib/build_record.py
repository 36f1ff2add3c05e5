"""The build record of a djepa._C built for the GPU machine (tools/prepare_gpu_run.sh writes it
beside the .so; tools/gpu_run.sh checks it before installing), so a stale build cannot test old
kernels silently:

    python3 build_record.py write SO --archs 90a --nvcc /usr/local/cuda/bin/nvcc
    python3 build_record.py check SO      exit 0: one line, it matches this tree; 1: one line, why not
    python3 build_record.py env SO        shell assignments: DJEPA_BUILD_RECORD, DJEPA_GIT_COMMIT,
                                          DJEPA_GIT_DIRTY (the GPU machine's tree has no .git)

The record ({so}.build.json): the .so's sha256, the commit and dirty flag of the tree it was built
from, a hash of the build inputs (csrc/, CMakeLists.txt, setup.py: paths and contents; build
outputs and caches left out), nvcc's version, the archs, and when. The check recomputes the
inputs' hash over the tree it runs in (git is not needed) and compares.
"""
import argparse
import datetime
import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ("csrc", "CMakeLists.txt", "setup.py")
SKIP_DIRS = {"__pycache__", "build", ".git"}
SKIP_SUFFIXES = {".so", ".o", ".a", ".pyc"}


def record_path(so) -> Path:
    so = Path(so)
    return so.with_name(so.name + ".build.json")


def inputs_hash(root=ROOT) -> str:
    """sha256 over the build inputs' relative paths and contents, in sorted order."""
    files = []
    for name in INPUTS:
        p = Path(root) / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for f in p.rglob("*"):
                rel = f.relative_to(root).parts
                if f.is_file() and not any(part in SKIP_DIRS or part.startswith(".") for part in rel) \
                        and f.suffix not in SKIP_SUFFIXES:
                    files.append(f)
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _git(*args):
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write(so, archs, nvcc) -> Path:
    version = None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        version = next((ln.strip() for ln in out.splitlines() if "release" in ln), None)
    except (OSError, subprocess.TimeoutExpired):
        pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    rec = {"so": Path(so).name, "so_sha256": _sha256(so), "commit": _git("rev-parse", "HEAD"),
           "dirty": None if status is None else bool(status),
           "dirty_build_inputs": bool(_git("status", "--porcelain", "--", *INPUTS)),
           "inputs": list(INPUTS), "inputs_sha256": inputs_hash(), "nvcc": version, "archs": archs,
           "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = record_path(so)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return path


def check(so):
    """(ok, one line)."""
    path = record_path(so)
    if not path.is_file():
        return False, (f"REFUSED {Path(so).name}: no build record {path.name} beside it, so nothing ties it to "
                       f"this tree's csrc/ (tools/prepare_gpu_run.sh builds both)")
    try:
        rec = json.loads(path.read_text())
        want, so_sha = rec["inputs_sha256"], rec["so_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        return False, f"REFUSED {Path(so).name}: its build record {path.name} is unreadable ({exc})"
    if _sha256(so) != so_sha:
        return False, f"REFUSED {Path(so).name}: it is not the .so its build record {path.name} describes"
    have = inputs_hash()
    commit = (rec.get("commit") or "?")[:12] + ("+dirty" if rec.get("dirty") else "")
    if have != want:
        return False, (f"REFUSED {Path(so).name}: built from other sources ({', '.join(INPUTS)} hash "
                       f"{want[:12]} at commit {commit}; this tree's is {have[:12]}): rebuild with "
                       f"tools/prepare_gpu_run.sh")
    return True, (f"{Path(so).name} matches this tree ({', '.join(INPUTS)} hash {have[:12]}; built at commit "
                  f"{commit} by nvcc {rec.get('nvcc')} for {rec.get('archs')}, {rec.get('built')})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["write", "check", "env"])
    p.add_argument("so")
    p.add_argument("--archs", default=None)
    p.add_argument("--nvcc", default="nvcc")
    args = p.parse_args(argv)
    if args.action == "write":
        print(f"wrote {write(args.so, args.archs, args.nvcc)}")
        return 0
    if args.action == "check":
        ok, line = check(args.so)
        print(line)
        return 0 if ok else 1
    path = record_path(args.so)
    rec = json.loads(path.read_text()) if path.is_file() else {}
    print(f"DJEPA_BUILD_RECORD={shlex.quote(str(path.resolve()) if path.is_file() else '')} "
          f"DJEPA_GIT_COMMIT={shlex.quote(rec.get('commit') or '')} "
          f"DJEPA_GIT_DIRTY={shlex.quote('' if rec.get('dirty') is None else str(rec['dirty']).lower())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
