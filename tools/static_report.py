"""The static gate's tables: the Markdown beside the JSON records, and merging a partial run
into a committed table."""
import re
from pathlib import Path

from sass import ARCHS
from static_rules import check, violations

HOT_SCOPE = "hot Triton variants"


def _record_order(r):
    return (r["backend"] != "cuda", r["kernel"], r["variant"])


def record_op(r, triton_ops=None):
    """The op a record belongs to: its `op` field, else (records written before it) the CUDA
    file's name (csrc/attention_sm90.cu -> attention) or the Triton kernel's module
    (triton_ops: {kernel name: op}, tools/static_triton.triton_kernel_ops)."""
    if r.get("op"):
        return r["op"]
    if r["backend"] == "cuda":
        return cuda_file_op(r.get("file") or r["kernel"])
    return (triton_ops or {}).get(r["kernel"])


def cuda_file_op(path):
    """csrc/attention.cu, csrc/attention_sm90.cu -> attention."""
    stem = Path(path).name.split(".", 1)[0]
    return stem[:-len("_sm90")] if stem.endswith("_sm90") else stem


def merge(old, new, backends, kernel_filter=None, op=None, triton_ops=None):
    """`old` with the records a run of `backends` (Triton: only kernels matching kernel_filter;
    op: only that op's kernels, record_op) replaced by `new`: refreshes one part of a committed
    table."""
    def replaced(r):
        if r["backend"] not in backends:
            return False
        if op is not None and record_op(r, triton_ops) != op:
            return False
        return r["backend"] != "triton" or not kernel_filter or re.search(kernel_filter, r["kernel"])
    archs = {r["arch"] for r in old + new}
    if len(archs) > 1:
        raise ValueError(f"cannot merge records of different archs: {sorted(archs)}")
    return sorted([r for r in old if not replaced(r)] + new, key=_record_order)


def _versions(records):
    """'triton 3.9.0 (2026-12-02) for 700 Triton records; ...' from the records' stamps."""
    parts = []
    for backend in ("cuda", "triton"):
        stamps = sorted({(r.get("toolchain", "?"), r.get("date", "?")) for r in records if r["backend"] == backend})
        n = sum(1 for r in records if r["backend"] == backend)
        if n:
            parts.append(f"{backend.upper() if backend == 'cuda' else 'Triton'}: "
                         f"{', '.join(f'{t} on {d}' for t, d in stamps)} ({n} records)")
    return "; ".join(parts) or "no records"


def markdown(records, arch, elapsed, full, scope=None):
    bad = check(records)
    hot = [r for r in records if r["hot"]]
    lines = [
        f"# Static gate, {ARCHS[arch]['name']} ({scope or ('full' if full else 'subset')})",
        "",
        f"`python tools/static_check.py --arch {arch}{' --full' if full else ''}"
        f"{' --hot --only triton' if scope == HOT_SCOPE else ''}`. {_versions(records)}; "
        f"last run {elapsed:.0f} s. Shared-memory limit {ARCHS[arch]['smem_limit']} B per block. "
        f"{len(records)} variants, {len(hot)} hot; "
        f"hot with spills: {sum(1 for r in hot if r['spill_bytes'])}, with a stack frame: "
        f"{sum(1 for r in hot if r['stack_bytes'])}; all with spills: "
        f"{sum(1 for r in records if r['spill_bytes'])}; wgmma serialized by ptxas: "
        f"{sum(1 for r in records if r.get('wgmma_serialized'))} of the "
        f"{sum(1 for r in records if 'wgmma_serialized' in r)} records that carry the check; "
        f"gate violations: {len(bad)}.",
        "",
    ]
    for backend in ("cuda", "triton"):
        mine, hot_mine = [r for r in records if r["backend"] == backend], [r for r in hot if r["backend"] == backend]
        if mine:
            lines += [f"- {backend}: {len(mine)} variants, {len(hot_mine)} hot; hot with spills or a stack frame: "
                      f"{sum(1 for r in hot_mine if r['spill_bytes'] or r['stack_bytes'])}; violations: "
                      f"{sum(1 for r, _ in bad if r['backend'] == backend)}"]
    lines.append("")
    if bad:
        lines += ["## Violations", ""]
        lines += [f"- {r['backend']} `{r['kernel']}` {r['variant']}: {v}" for r, v in bad]
        lines.append("")
    lines += ["| backend | kernel | variant | hot | regs | spill B | stack B | smem B | wgmma | mma.sync | ld/st 128 |",
              "|---|---|---|:-:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in records:
        vec = r.get("vector_ldst")
        ldst = f"{vec['ld128']}/{vec['st128']}" if vec else ""
        mark = " **!**" if violations(r) else ""
        err = f" (error: {r['error']})" if r.get("error") else ""
        lines.append(f"| {r['backend']} | {r['kernel']}{mark} | {r['variant']}{err} | {'yes' if r['hot'] else ''} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['stack_bytes']} | {r['smem_bytes']} | "
                     f"{r['tensor_core']['wgmma']} | {r['tensor_core']['mma_sync']} | {ldst} |")
    return "\n".join(lines) + "\n"

