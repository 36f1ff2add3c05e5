"""The static gate's CUDA half: every csrc/*.cu compiled with nvcc for sm_90a (sm_80) with
`-Xptxas -v`; the SASS of the cubin (cuobjdump --dump-sass) gives the tensor-core instruction
counts per kernel, a probe program the dynamic shared memory each kernel is launched with."""
import re
import subprocess
import tempfile
from pathlib import Path

from sass import (ROOT, compile_cubin, demangle, dump_sass, find_tool, nvcc_flags, parse_ptxas, parse_sass,
                  parse_wgmma_serialized, split_template)
from static_report import cuda_file_op
from static_rules import record
from static_shapes import hot_shapes

# Dynamic shared memory is a launch argument, not in the cubin: per kernel, the C++ expression
# the host code launches with ({0}, {1}, ... = the instantiation's template arguments), read by
# compiling a small probe against the kernels' headers (a renamed constant fails it loudly).
CUDA_DYNAMIC_SMEM = {
    "djepa::attention::fwd_kernel": ("attention_kernels.cuh", "djepa::attention::FwdCfg<{1}>::kSmem"),
    "djepa::attention::dkdv_kernel": ("attention_kernels.cuh", "djepa::attention::DkdvCfg<{1}>::kSmem"),
    "djepa::attention::dq_kernel": ("attention_kernels.cuh", "djepa::attention::DqCfg<{1}>::kSmem"),
    "djepa::denoise::gemm_kernel": ("denoise_kernels.cuh", "djepa::denoise::kGemmSmem"),
    # launch_ln: 2 * W floats with W <= NC * 32 * VEC (NC = 0: none)
    "djepa::denoise::adaln_bwd_kernel": ("denoise_kernels.cuh", "2 * {2} * 32 * {1} * sizeof(float)"),
    # csrc/*_sm90.cu (sm_90a): the shared-memory plans of csrc/hopper/*_config.cuh
    "djepa::hopper::attn::attn_fwd_sm90_kernel": ("hopper/attn_config.cuh",
                                                  "djepa::hopper::attn::Chunks<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dkdv_sm90_kernel": ("hopper/attn_config.cuh",
                                                   "djepa::hopper::attn::BwdShape<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dq_sm90_kernel": ("hopper/attn_config.cuh",
                                                 "djepa::hopper::attn::BwdShape<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_fwd_pipelined_sm90_kernel": ("hopper/attn_pipelined_config.cuh",
                                                            "djepa::hopper::attn::pipe::FwdPlan<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dkdv_pipelined_sm90_kernel": ("hopper/attn_pipelined_config.cuh",
                                                             "djepa::hopper::attn::pipe::BwdPlan<{1}>::kSmemBytes"),
    "djepa::hopper::attn::attn_dq_pipelined_sm90_kernel": ("hopper/attn_pipelined_config.cuh",
                                                           "djepa::hopper::attn::pipe::BwdPlan<{1}>::kSmemBytes"),
    "djepa::hopper::gemm::gemm_sm90_kernel": ("hopper/gemm_config.cuh", "djepa::hopper::gemm::kSmemBytes"),
    "djepa::hopper::gemm::wide::gemm_sm90_wide_kernel": ("hopper/gemm_wide_config.cuh",
                                                        "djepa::hopper::gemm::wide::kSmemBytes"),
}
# Hot by head dim (the host dispatch picks the instantiation by D) and by LayerNorm chunk count.
CUDA_ATTENTION_KERNELS = {"djepa::attention::fwd_kernel", "djepa::attention::dkdv_kernel",
                          "djepa::attention::dq_kernel", "djepa::hopper::attn::attn_fwd_sm90_kernel",
                          "djepa::hopper::attn::attn_dkdv_sm90_kernel", "djepa::hopper::attn::attn_dq_sm90_kernel",
                          "djepa::hopper::attn::attn_fwd_pipelined_sm90_kernel",
                          "djepa::hopper::attn::attn_dkdv_pipelined_sm90_kernel",
                          "djepa::hopper::attn::attn_dq_pipelined_sm90_kernel"}
CUDA_LN_KERNELS = {"djepa::denoise::adaln_fwd_kernel", "djepa::denoise::adaln_bwd_kernel"}
# The mma.sync attention kernels' third template argument is their dropout (csrc/attention_kernels.cuh):
# the forward's FwdDropout (kNoDropout, kDropout, kDropoutRecord: the debug variant storing its keep
# bits), the backward's bool kDropout. Each instantiation's record says which (`dropout`: off, on,
# keep-bits) and so does its variant name; the keep-bit variant is never hot (return_dropout_mask).
CUDA_DROPOUT_KERNELS = {"djepa::attention::fwd_kernel": "FwdDropout", "djepa::attention::dkdv_kernel": "bool",
                        "djepa::attention::dq_kernel": "bool"}
_FWD_DROPOUT_MODES = {"kNoDropout": "off", "kDropout": "on", "kDropoutRecord": "keep-bits"}
_SIXTEEN_BIT = {"__half": 2, "__nv_bfloat16": 2}


def _fwd_dropout_enum():
    """{value: enumerator} of csrc/attention_kernels.cuh's FwdDropout (read, so a renumbered or
    renamed enumerator names its records correctly or fails them loudly)."""
    text = (ROOT / "csrc" / "attention_kernels.cuh").read_text()
    m = re.search(r"enum\s+FwdDropout\s*:\s*int\s*\{([^}]*)\}", text)
    if not m:
        return {}
    pairs = re.findall(r"(\w+)\s*=\s*(\d+)", m.group(1))
    return {value: name for name, value in pairs}


def cuda_dropout(name, args):
    """The dropout of a CUDA instantiation: None (the kernel has no dropout argument), "off",
    "on" or "keep-bits"; raises ValueError for a value it cannot name."""
    kind = CUDA_DROPOUT_KERNELS.get(name)
    if kind is None or len(args) < 3:
        return None
    value = args[2]
    if kind == "bool":
        modes = {"false": "off", "true": "on", "0": "off", "1": "on"}
        if value not in modes:
            raise ValueError(f"{name}<{', '.join(args)}>: dropout argument {value!r} is not a bool")
        return modes[value]
    enum = _fwd_dropout_enum()
    enumerator = enum.get(value) or (value if value in _FWD_DROPOUT_MODES else None)
    if enumerator not in _FWD_DROPOUT_MODES:
        raise ValueError(f"{name}<{', '.join(args)}>: dropout argument {value!r} is none of FwdDropout "
                         f"{sorted(_FWD_DROPOUT_MODES)} in csrc/attention_kernels.cuh ({enum or 'enum not found'}); "
                         "update tools/static_cuda.py")
    return _FWD_DROPOUT_MODES[enumerator]


def cuda_variant(name, args):
    """The record's variant name: the template arguments, and for the attention kernels what
    their dropout argument means ("<__half, 64, 1> dropout", "<__half, 64, 2> dropout keep-bits (debug)")."""
    text = "<" + ", ".join(args) + ">"
    mode = cuda_dropout(name, args)
    return text + {None: "", "off": "", "on": " dropout", "keep-bits": " dropout keep-bits (debug)"}[mode]


def compile_cuda_file(path, arch):
    """[(mangled name, ptxas report, sass counts)] of one .cu file, or raises. The report holds
    `wgmma_serialized`: ptxas's wgmma serialization messages for that kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (Path(path).stem + ".cubin")
        log = compile_cubin(path, arch, cubin)
        reports = parse_ptxas(log)
        serialized = parse_wgmma_serialized(log)
        sass = parse_sass(dump_sass(cubin))
    return [(name, dict(rep, wgmma_serialized=serialized.get(name, [])), sass.get(name, {}))
            for name, rep in reports.items()]


def _ln_chunks(W, vec):
    """The NC template argument csrc/denoise.cu's dispatch_ln picks for width W (vector path)."""
    nch = -(-W // (32 * vec))
    for nc in (1, 2, 4, 6, 8):
        if nch <= nc:
            return nc
    return 0



def cuda_hot(name, args, dims, widths):
    """Whether the CUDA instantiation serves a preset/benchmark shape in fp16/bf16 (mirrors the
    host dispatch of csrc/: attention by head dim, the LayerNorm kernels by chunk count)."""
    if not any(a in _SIXTEEN_BIT for a in args):
        return False
    if cuda_dropout(name, args) == "keep-bits":  # the debug switch: no training step launches it
        return False
    if name in CUDA_ATTENTION_KERNELS:
        return int(args[1]) in dims
    if name in CUDA_LN_KERNELS:
        vec = int(args[1])
        return vec == 16 // _SIXTEEN_BIT.get(args[0], 4) and int(args[2]) in {_ln_chunks(W, vec) for W in widths}
    return True


def dynamic_smem(instances, arch):
    """{(name, tuple(args)): bytes} for the kernels of CUDA_DYNAMIC_SMEM, by one probe program."""
    wanted = [(n, a) for n, a in instances if n in CUDA_DYNAMIC_SMEM]
    if not wanted:
        return {}
    headers = sorted({CUDA_DYNAMIC_SMEM[n][0] for n, _ in wanted})
    lines = [f'#include "{h}"' for h in headers] + ["#include <cstdio>", "int main() {"]
    for n, a in wanted:
        lines.append(f'  std::printf("%lld\\n", (long long)({CUDA_DYNAMIC_SMEM[n][1].format(*a)}));')
    lines.append("  return 0;\n}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "smem_probe.cu", Path(tmp) / "smem_probe"
        src.write_text("\n".join(lines) + "\n")
        res = subprocess.run([find_tool("nvcc"), *nvcc_flags(arch), str(src), "-o", str(exe)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("the dynamic shared memory probe (CUDA_DYNAMIC_SMEM in tools/static_cuda.py) "
                               f"does not compile against csrc/:\n{res.stderr.strip()[-1500:]}")
        values = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    return {(n, tuple(a)): int(x) for (n, a), x in zip(wanted, values)}


def cuda_records(results, arch):
    """Records from [(file, [(mangled, report, sass)]) or (file, error)]."""
    dims, widths = hot_shapes()
    out, items = [], []
    for path, res in results:
        if isinstance(res, str):
            out.append(record("cuda", Path(path).name, "(file)", arch, error=res.splitlines()[0][:300],
                              detail=res[-2000:]))
            continue
        dem = demangle([m for m, _, _ in res])
        for mangled, rep, sass in res:
            name, args = split_template(dem[mangled])
            items.append((path, mangled, name, args, rep, sass))
    try:
        dyn = dynamic_smem([(n, a) for _, _, n, a, _, _ in items], arch)
        probe_error = None
    except RuntimeError as exc:
        dyn, probe_error = {}, str(exc)
    for path, mangled, name, args, rep, sass in sorted(items, key=lambda t: (t[2], t[3])):
        extra = dict(op=cuda_file_op(path), file=f"csrc/{Path(path).name}", mangled=mangled,
                     static_smem=rep["static_smem"], dynamic_smem=dyn.get((name, tuple(args)), 0))
        if probe_error and name in CUDA_DYNAMIC_SMEM:
            extra["error"] = probe_error.splitlines()[0]
            extra["detail"] = probe_error
        try:
            variant, hot = cuda_variant(name, args), cuda_hot(name, args, dims, widths)
            if name in CUDA_DROPOUT_KERNELS:
                extra["dropout"] = cuda_dropout(name, args) or "off"
        except ValueError as exc:
            variant, hot = "<" + ", ".join(args) + ">", False
            extra["error"] = extra["detail"] = str(exc)
        out.append(record("cuda", name.split("::")[-1], variant, arch, regs=rep["regs"],
                          spill_bytes=rep["spill_bytes"], stack_bytes=rep["stack_bytes"],
                          smem_bytes=rep["static_smem"] + extra["dynamic_smem"], wgmma=sass.get("wgmma", 0),
                          mma_sync=sass.get("mma_sync", 0), hot=hot,
                          wgmma_serialized=rep.get("wgmma_serialized", []), **extra))
    return out


def cuda_sources(full, op=None):
    """The csrc/*.cu files of a run (without full: ema.cu, the test suite's); op: only that op's
    (csrc/<op>.cu and csrc/<op>_sm90.cu)."""
    files = sorted((ROOT / "csrc").glob("*.cu"))
    if op is not None:
        files = [f for f in files if cuda_file_op(f) == op]
    return files if full else [f for f in files if f.name == "ema.cu"]

