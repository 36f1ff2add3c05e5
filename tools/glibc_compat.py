#!/usr/bin/env python3
"""CMake's linker launcher for a djepa._C that loads on an older glibc than the one it is built on.

A library linked on glibc 2.34+ binds its calls to the newest version of each glibc symbol: the
pthread, dl, sem and shm functions that libcudart_static uses moved into libc in 2.34 and got a
GLIBC_2.34 version there, so the wheel's tag becomes manylinux_2_34, whatever older glibc would
serve the same calls. This launcher links as asked, reads which glibc symbol versions the result
needs (objdump -T), and when some are newer than --glibc it links again with:

* a trampoline per such function that jumps to the function's older version still exported by
  libc (pthread_create@GLIBC_2.2.5 ...), with `-Wl,--wrap=NAME` sending every call there, and
  libpthread.so.0, libdl.so.2 and librt.so.1 named as needed (where those versions live before
  glibc 2.34; stubs after);
* a local definition of what older glibc lacks altogether: __libc_single_threaded (2.32; 0 =
  "maybe multi-threaded": libstdc++ then always uses atomic reference counts, as it did before),
  arc4random (2.36; libstdc++'s std::random_device, from getentropy).

It fails if anything newer than --glibc is still needed. The C++ runtime is the other half:
CMake links libstdc++ statically and hides its symbols (-static-libstdc++ -Wl,--exclude-libs,ALL),
since gcc 12's headers call libstdc++ symbols newer than manylinux_2_28 allows.

usage (CMake: set_target_properties(_C PROPERTIES CXX_LINKER_LAUNCHER "python;...;--")):
  glibc_compat.py --glibc 2.28 -- LINKER ARGS...
"""
import argparse
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

# Functions older glibc lacks entirely, defined in the library itself (hidden).
HIDDEN = '__attribute__((visibility("hidden"))) '
LOCAL = {
    "__libc_single_threaded": HIDDEN + "char __libc_single_threaded = 0;\n",
    "arc4random": (HIDDEN + "unsigned int arc4random(void) {\n"
                   "  unsigned int v;\n"
                   "  if (getentropy(&v, sizeof v) != 0) abort();\n"
                   "  return v;\n}\n"),
}
LOCAL_PRELUDE = "#include <stdlib.h>\n#include <unistd.h>\n"
OLD_HOMES = ("libpthread.so.0", "libdl.so.2", "librt.so.1")  # where the old versions lived


def version_key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))


def dynamic_symbols(path):
    """{name: set of GLIBC versions} of a library's dynamic symbols, and the undefined ones."""
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    defined, undefined = {}, {}
    for line in out.splitlines():
        m = re.search(r"\s(\*UND\*|\S+)\s+[0-9a-f]+\s+(?:Base\s+)?\(?(GLIBC_[\d.]+)\)?\s+(\S+)$", line)
        if not m:
            continue
        section, version, name = m.groups()
        (undefined if section == "*UND*" else defined).setdefault(name, set()).add(version)
    return defined, undefined


def too_new(path, glibc):
    _, undefined = dynamic_symbols(path)
    limit = version_key(glibc)
    return {name: max(vs, key=version_key) for name, vs in undefined.items()
            if max(version_key(v) for v in vs) > limit}


def find_libc(linker):
    out = subprocess.run([linker, "-print-file-name=libc.so.6"], capture_output=True, text=True).stdout.strip()
    if os.path.isabs(out) and os.path.isfile(out):
        return out
    for cand in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6", "/lib64/libc.so.6"):
        if os.path.isfile(cand):
            return cand
    raise SystemExit("glibc_compat.py: cannot find libc.so.6")


def trampoline(name, version):
    jump = "b" if platform.machine() in ("aarch64", "arm64") else "jmp"
    plt = "" if jump == "b" else "@PLT"
    return (f"  .globl __wrap_{name}\n  .hidden __wrap_{name}\n  .type __wrap_{name}, %function\n"
            f"__wrap_{name}:\n  {jump} djepa_compat_{name}{plt}\n  .size __wrap_{name}, .-__wrap_{name}\n"
            f"  .symver djepa_compat_{name}, {name}@{version}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("glibc_compat.py: usage: glibc_compat.py --glibc X.Y -- LINKER ARGS...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="glibc_compat.py")
    p.add_argument("--glibc", required=True, help="the oldest glibc to load on, e.g. 2.28")
    opts = p.parse_args(argv[:split])
    link = argv[split + 1:]
    rc = subprocess.run(link).returncode
    if rc != 0 or "-o" not in link:
        return rc
    out = link[link.index("-o") + 1]
    need = too_new(out, opts.glibc)
    if not need:
        return 0
    libc_defined, _ = dynamic_symbols(find_libc(link[0]))
    limit = version_key(opts.glibc)
    asm, c_code, wraps, missing = [], [], [], []
    for name, newest in sorted(need.items()):
        older = [v for v in libc_defined.get(name, ()) if version_key(v) <= limit]
        if name in LOCAL:
            c_code.append(LOCAL[name])
        elif older:
            asm.append(trampoline(name, max(older, key=version_key)))
            wraps.append(f"-Wl,--wrap={name}")
        else:
            missing.append(f"{name}@{newest}")
    if missing:
        print(f"glibc_compat.py: {out} needs {', '.join(missing)}, which glibc {opts.glibc} lacks", file=sys.stderr)
        return 1
    objects = []
    sources = []
    if asm:
        sources.append(("S", "assembler-with-cpp",
                        "  .text\n" + "".join(asm) + '  .section .note.GNU-stack,"",%progbits\n'))
    if c_code:
        sources.append(("c", "c", LOCAL_PRELUDE + "".join(c_code)))
    for suffix, language, text in sources:
        source, obj = Path(f"{out}.glibc_compat.{suffix}"), f"{out}.glibc_compat.{suffix}.o"
        source.write_text(text)
        subprocess.run([link[0], "-x", language, "-c", "-fPIC", "-O2", str(source), "-o", obj], check=True)
        objects.append(obj)
    needed = ["-Wl,--no-as-needed"] + [f"-l:{lib}" for lib in OLD_HOMES] + ["-Wl,--as-needed"] if wraps else []
    relink = link + objects + wraps + needed
    if subprocess.run(relink).returncode != 0:
        return 1
    still = too_new(out, opts.glibc)
    if still:
        print(f"glibc_compat.py: {out} still needs {still} after the compat link", file=sys.stderr)
        return 1
    print(f"glibc_compat.py: {out} linked for glibc {opts.glibc}: {len(wraps)} functions bound to their "
          f"older versions, {len(c_code)} defined locally ({', '.join(n for n in sorted(need) if n in LOCAL)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
