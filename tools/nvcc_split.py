#!/usr/bin/env python3
"""CMake's CUDA compiler launcher for building djepa._C for several Pythons: the device code of
each .cu is compiled once, its host code once per Python.

nvcc compiles a .cu in two halves. The device half (cicc and ptxas, once per arch) takes nearly
all the time and does not depend on Python. The host half (cudafe++, then the host compiler)
holds the pybind11 bindings, which are compiled against one Python's headers. So a wheel build
for four Pythons need not compile the kernels four times:

* cache miss: run nvcc as asked, keeping its intermediate files, and store the three outputs of
  the device half that the host half reads: the embedded fatbinary (`<src>.fatbin.c`), the
  kernel stubs and their registration (`<src>...cudafe1.stub.c`, made by cicc) and the module id
  (`<src>.module_id`) that ties the host's names of kernels in anonymous namespaces to the
  device's.
* cache hit: run only nvcc's host steps, exactly as `nvcc --dryrun` lists them for this very
  command (host preprocessing, cudafe++ told to read the stored module id instead of making one,
  the host compiler), with the stored files in place. A kernel the host code names but the
  stored stubs lack fails to compile or link, so a stale entry cannot pass silently; the key
  below keeps entries from going stale.

An entry's key: nvcc's and the host compiler's versions, the command's options except outputs,
--threads and the include directories named by --host-include (Python's and pybind11's, which
only host code reads), and the contents of every file under --key-dir (the sources and headers
the device code can include). Any command that is not `nvcc ... -c SRC.cu -o OBJ` with SRC under
--key-dir runs unchanged.

usage (CMake: set_target_properties(_C PROPERTIES CUDA_COMPILER_LAUNCHER "python;...;--")):
  nvcc_split.py --cache DIR --key-dir DIR [--host-include DIR]... [--ccache EXE] -- NVCC ARGS...
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE_TOOLS = {"cicc", "ptxas", "fatbinary", "nvlink", "rm"}
STORED = ("module_id", "stub", "fatbin")  # the device half's outputs that the host half reads


def say(msg):
    print(f"djepa-nvcc: {msg}", flush=True)


def parse_command(args):
    """(source, output) of a `-c SRC.cu -o OBJ` compile, else None."""
    if "-c" not in args or "-o" not in args or "--dryrun" in args:
        return None
    sources = [a for a in args if a.endswith(".cu") and os.path.isfile(a)]
    if len(sources) != 1:
        return None
    return Path(sources[0]).resolve(), args[args.index("-o") + 1]


def key_of(nvcc, args, source, key_dir, host_includes, host_compiler):
    """The cache key: everything that decides the device code (see the module docstring)."""
    host_includes = {os.path.realpath(d) for d in host_includes}
    h = hashlib.sha256()

    def add(*parts):
        for p in parts:
            h.update(p.encode() if isinstance(p, str) else p)
            h.update(b"\0")

    add(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    add(subprocess.run([host_compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0])
    skip_value = {"-o", "-MF", "-MT", "-MQ", "--threads", "-t"}
    it = iter(args)
    for a in it:
        if a in skip_value:
            next(it, None)
            continue
        if a.startswith("--threads=") or a in ("-MD", "-MMD"):
            continue
        if a in ("-I", "-isystem"):
            d = next(it, "")
            if os.path.realpath(d) not in host_includes:
                add(a, _relative(d, key_dir))
            continue
        if a.startswith("-I") and os.path.realpath(a[2:]) in host_includes:
            continue
        if a.startswith("-I"):
            add("-I" + _relative(a[2:], key_dir))
            continue
        add(_relative(a, key_dir) if Path(a).resolve() == source else a)
    for f in sorted(p for p in Path(key_dir).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        add(str(f.relative_to(key_dir)), hashlib.sha256(f.read_bytes()).hexdigest())
    return h.hexdigest()


def _relative(path, key_dir):
    try:
        return str(Path(path).resolve().relative_to(Path(key_dir).resolve()))
    except ValueError:
        return path


class DryRun:
    """The steps `nvcc --dryrun --keep --keep-dir DIR ARGS` lists, sorted into host and device."""

    def __init__(self, nvcc, args, keep_dir, output):
        r = subprocess.run([nvcc, "--dryrun", "--keep", "--keep-dir", str(keep_dir)] + args,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc --dryrun failed:\n{r.stderr}")
        self.env = dict(os.environ)
        self.host = []  # [host preprocessing, cudafe++, host compile]
        self.unknown = []
        self.names = {}
        for line in (ln[3:] for ln in r.stderr.splitlines() if ln.startswith("#$ ")):
            m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
            if m:
                if m.group(1) in ("PATH", "LD_LIBRARY_PATH"):
                    self.env[m.group(1)] = m.group(2).strip()
                continue
            if line.startswith("--"):  # nvcc-internal steps ("-- Filter Dependencies --")
                continue
            argv = shlex.split(line)
            tool = os.path.basename(argv[0])
            if tool == "cudafe++":
                self.names["module_id"] = _value(argv, "--module_id_file_name")
                self.names["stub"] = str(Path(keep_dir) / _value(argv, "--stub_file_name"))
                self.host.append(argv)
            elif tool.endswith("cicc"):
                self.names["fatbin"] = str(Path(keep_dir) / _value(argv, "--include_file_name"))
            elif tool in DEVICE_TOOLS:
                continue
            elif "-E" in argv and any(a.startswith("-D__CUDA_ARCH__=") for a in argv):
                continue  # the device half's preprocessing
            elif "-E" in argv or ("-c" in argv and _value(argv, "-o") == output):
                self.host.append(argv)
            else:
                self.unknown.append(line)
        kinds = [os.path.basename(a[0]) == "cudafe++" for a in self.host]
        if len(self.host) != 3 or kinds != [False, True, False] or set(self.names) != set(STORED):
            self.unknown.append(f"expected host preprocessing, cudafe++ and a host compile; got {self.host}")


def _value(argv, flag):
    for i, a in enumerate(argv):
        if a == flag:
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    raise RuntimeError(f"nvcc --dryrun: no {flag} in {' '.join(argv)}")


def run(argv, env):
    r = subprocess.run(argv, env=env)
    if r.returncode != 0:
        raise SystemExit(r.returncode)


def _fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True)
    return Path(path)


def compile_host_only(nvcc, args, entry, output, ccache):
    keep = _fresh_dir(output + ".nvcc-host")  # a fixed path, so that ccache can hit
    try:
        plan = DryRun(nvcc, args, keep, output)
        if plan.unknown:
            say(f"nvcc's steps are not the ones this launcher knows ({'; '.join(plan.unknown)}): full compile")
            return False
        for kind in STORED:
            shutil.copyfile(entry / kind, plan.names[kind])
        preprocess, cudafe, host_compile = plan.host
        if "-MF" in args:  # the dependency file nvcc would have written, from the host preprocessing
            preprocess = preprocess + ["-MD", "-MF", _value(args, "-MF"), "-MT", _value(args, "-MT") if "-MT" in args
                                       else output]
        cudafe = [a for a in cudafe if a != "--gen_module_id_file"]
        if ccache:
            host_compile = [ccache] + host_compile
        for argv in (preprocess, cudafe, host_compile):
            run(argv, plan.env)
        return True
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def compile_and_store(nvcc, args, cache, key, output, meta):
    keep = _fresh_dir(output + ".nvcc-full")
    try:
        plan = DryRun(nvcc, args, keep, output)
        run([nvcc, "--keep", "--keep-dir", str(keep)] + args, os.environ)
        if plan.unknown:
            say(f"not caching the device code: {'; '.join(plan.unknown)}")
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        for kind in STORED:
            shutil.copyfile(plan.names[kind], staging / kind)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(staging, cache / key)
        except OSError:  # another build stored the same entry first
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("nvcc_split.py: usage: nvcc_split.py OPTIONS -- NVCC ARGS...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="nvcc_split.py")
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--key-dir", required=True, type=Path)
    p.add_argument("--host-include", action="append", default=[])
    p.add_argument("--ccache")
    opts = p.parse_args(argv[:split])
    nvcc, args = argv[split + 1], argv[split + 2:]
    parsed = parse_command(args)
    key_dir = opts.key_dir.resolve()
    if parsed is None or key_dir not in parsed[0].parents:
        os.execv(nvcc, [nvcc] + args)
    source, output = parsed
    opts.cache.mkdir(parents=True, exist_ok=True)
    host_compiler = _value(args, "-ccbin") if "-ccbin" in args else "gcc"
    key = key_of(nvcc, args, source, key_dir, opts.host_include, host_compiler)
    entry = opts.cache.resolve() / key
    if entry.is_dir() and compile_host_only(nvcc, args, entry, output, opts.ccache):
        say(f"{source.name}: device code from the cache ({key[:12]}), host code compiled")
        return 0
    compile_and_store(nvcc, args, opts.cache.resolve(), key, output,
                      {"source": str(source.relative_to(key_dir)), "nvcc": nvcc})
    say(f"{source.name}: device and host code compiled, device code cached ({key[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
