"""The CUDA toolchain without a GPU: compile with nvcc, read ptxas reports and cuobjdump SASS.

Shared by the static gate (tools/static_check.py: registers, spills, tensor-core counts) and the
cost model (tools/perf_model.py: the instruction stream of a kernel's main loop).

    find_tool("cuobjdump")              the toolkit's binary, else the copy in Triton's wheel
    compile_cubin(src, arch, out)       nvcc -cubin -Xptxas -v; returns the ptxas log
    parse_ptxas(log)                    {kernel: regs, spill, stack, static smem}
    parse_wgmma_serialized(log)         {kernel: ["(C7515) ... serialized ..."]}
    parse_sass(text)                    {kernel: wgmma / mma.sync / 16-byte ld/st counts}
    sass_listing(text)                  {kernel: [Instr]} (address, predicate, opcode, operands)
    main_loop(instrs)                   the innermost loop that holds the HGMMAs
"""
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ARCHS = {
    90: dict(name="sm_90", smem_limit=232448, gencode="-gencode=arch=compute_90a,code=sm_90a"),
    80: dict(name="sm_80", smem_limit=166912, gencode="-gencode=arch=compute_80,code=sm_80"),
}


# ------------------------------------------------------------------------------------------
# Tools and flags
# ------------------------------------------------------------------------------------------
def find_tool(name):
    """A CUDA binary: the toolkit's, else the copy in Triton's wheel (None when neither)."""
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "bin" / name).is_file():
            return str(Path(base) / "bin" / name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else None


def include_flags():
    flags = ["-I", str(ROOT / "csrc"), "-I", sysconfig.get_paths()["include"]]
    try:
        import pybind11

        flags += ["-I", pybind11.get_include()]
    except ImportError:  # torch ships the pybind11 headers
        import torch

        flags += ["-I", str(Path(torch.__file__).parent / "include")]
    return flags


def nvcc_flags(arch):
    return ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", ARCHS[arch]["gencode"],
            f'-DDJEPA_CUDA_ARCHS="{arch}"', '-DDJEPA_CUDA_VERSION="static-check"'] + include_flags()


def compile_cubin(src, arch, out):
    """Compiles `src` to the cubin `out` (ptxas -v); returns ptxas's report, or raises."""
    cmd = [find_tool("nvcc"), *nvcc_flags(arch), "-cubin", "-Xptxas", "-v", str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr.strip()[-2000:]}")
    return res.stdout + res.stderr


def dump_sass(cubin_path):
    """`cuobjdump --dump-sass` of a cubin, as text."""
    res = subprocess.run([find_tool("cuobjdump"), "--dump-sass", str(cubin_path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {cubin_path}: {res.stderr.strip()[-500:]}")
    return res.stdout


def demangle(names):
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, res.stdout.splitlines()))


def split_template(demangled):
    """('djepa::attention::fwd_kernel', ['__nv_bfloat16', '128']) from a demangled signature."""
    s = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    s = s[5:] if s.startswith("void ") else s
    if "<" not in s:
        return s, []
    name, rest = s.split("<", 1)
    args, depth, cur = [], 0, ""
    for ch in rest.rsplit(">", 1)[0]:
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += ch == "<"
        depth -= ch == ">"
        cur += ch
    args.append(cur.strip())
    return name, args


# ------------------------------------------------------------------------------------------
# ptxas reports
# ------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SERIALIZED = re.compile(r"wgmma\S*\s.*serializ", re.IGNORECASE)
_IN_FUNCTION = re.compile(r"in the function '([^']+)'")


def parse_ptxas(log):
    """{mangled kernel name: {regs, spill_bytes, stack_bytes, static_smem}} from `ptxas -v`."""
    out, cur = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, spill_bytes=0, stack_bytes=0, static_smem=0))
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return out


def parse_wgmma_serialized(log):
    """{mangled kernel name: [message]} for ptxas's "wgmma.mma_async instructions are serialized
    due to ..." performance warnings (C7509-C7520). A message names its function; one that does
    not is charged to the entry function being compiled when it was printed ("" before any)."""
    out, cur = {}, ""
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            continue
        if _SERIALIZED.search(line):
            named = _IN_FUNCTION.search(line)
            msg = line.split(":", 1)[-1].strip() if "info" in line.split(":", 1)[0] else line.strip()
            out.setdefault(named.group(1) if named else cur, []).append(msg)
    return out


# ------------------------------------------------------------------------------------------
# SASS
# ------------------------------------------------------------------------------------------
_FUNC = re.compile(r"^\s*Function : (\S+)")
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text):
    """{mangled kernel name: instruction counts} from `cuobjdump --dump-sass`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1), dict(wgmma=0, mma_sync=0, ld128=0, st128=0))
            continue
        if cur is None or "/*" not in line:
            continue
        code = line.split("*/", 1)[-1]
        if re.search(r"\bHGMMA\.", code):
            cur["wgmma"] += 1
        elif re.search(r"\bHMMA\.", code):
            cur["mma_sync"] += 1
        elif re.search(r"\bLDG\.[\w.]*\b128\b", code):
            cur["ld128"] += 1
        elif re.search(r"\bSTG\.[\w.]*\b128\b", code):
            cur["st128"] += 1
    return out


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: `@!P0 FFMA R1, R2, R3, R4 ;` -> pred "!P0", op "FFMA",
    operands ("R1", "R2", "R3", "R4")."""
    addr: int
    pred: str
    op: str
    operands: tuple

    @property
    def never(self):
        """Predicated on !PT: padding that never executes."""
        return self.pred == "!PT"

    @property
    def branch_target(self):
        if self.op.split(".")[0] != "BRA":
            return None
        m = re.search(r"0x([0-9a-f]+)", " ".join(self.operands))
        return int(m.group(1), 16) if m else None

    def __str__(self):
        return f"{'@' + self.pred + ' ' if self.pred else ''}{self.op} {', '.join(self.operands)}".strip()


def _operands(text):
    """Splits an operand list at top-level commas (not inside [...] or {...})."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return tuple(out)


def parse_instr(addr, code):
    pred = ""
    code = code.strip()
    if code.startswith("@"):
        pred, code = code[1:].split(None, 1)
    parts = code.split(None, 1)
    return Instr(addr, pred, parts[0], _operands(parts[1]) if len(parts) > 1 else ())


def sass_listing(text):
    """{mangled kernel name: [Instr]} from `cuobjdump --dump-sass`."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and cur is not None:
            cur.append(parse_instr(int(m.group(1), 16), m.group(2)))
    return out


def main_loop(instrs):
    """The body of the innermost loop that holds wgmma instructions: the instructions from a
    backward branch's target up to and including that branch, smallest such range holding an
    HGMMA. Out-of-line code (mbarrier retry loops placed after the kernel's end) is outside it.
    Raises ValueError when there is none."""
    hgmma = [i.addr for i in instrs if i.op.startswith("HGMMA")]
    loops = []
    for ins in instrs:
        tgt = ins.branch_target
        if tgt is not None and tgt < ins.addr and any(tgt <= a <= ins.addr for a in hgmma):
            loops.append((ins.addr - tgt, tgt, ins.addr))
    if not loops:
        raise ValueError("no loop holds an HGMMA")
    _, lo, hi = min(loops)
    return [i for i in instrs if lo <= i.addr <= hi]
