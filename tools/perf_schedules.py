"""Declared schedules of the sm_90a kernels, for the cost model (tools/perf_model.py).

A schedule says, per consumer warpgroup, the order in which one iteration of the kernel's main
loop issues its wgmma groups, waits on them, waits at and arrives on barriers, and does its
non-tensor work, with the instruction counts that work needs. It is the explicit overlap
structure of a kernel: `WgmmaWait(0)` after S = QK^T and before the softmax serialises the two;
`WgmmaWait(1)` with the next tile's S issued first lets the softmax run under it; `BarSync` /
`BarArrive` on named barriers order the warpgroups (ping-pong).

Elements (in program order):
    MbarWait(name)          wait on a full/empty mbarrier (data assumed there: the cost is issue)
    Arrive(name)            arrive on an mbarrier (release a stage)
    Gemm(name, instrs)      one committed wgmma group: Wgmma(n, k, rs, acc, a) per instruction
    WgmmaWait(n)            wgmma.wait_group n
    BarSync(bar, threads)   bar.sync on a named barrier; BarArrive(bar, threads): bar.arrive
    Alu(name, nodes)        non-tensor work: a dataflow graph of one thread's instructions
                            (templates below: softmax, rescale, convert, probs, ...)

A kernel that exists is compiled and its main loop read from the SASS (tools/sass.py):
`check_against_sass` compares the declared markers (waits, gemm groups with their shapes,
barriers) one by one and the instruction counts class by class, so a rewritten kernel that
declares one schedule and compiles to another is caught. A design that does not exist yet is
simulated from its declaration: its Alu graphs are ordered like a compiler would
(`list_schedule`), and `perf_model.py` reports, for today's kernels, the declared stream's
result beside the SASS stream's, so the synthesis is checked where both exist.
"""
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from perf_sim import CLASSES, Op, op_class


# ------------------------------------------------------------------------------------------
# Schedule elements
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MbarWait:
    name: str


@dataclass(frozen=True)
class Arrive:
    name: str


@dataclass(frozen=True)
class Wgmma:
    n: int                  # m64nNkK
    k: int = 16
    rs: bool = False        # A from registers (else shared memory)
    acc: str = "S"          # accumulator name (registers acc.0 .. acc.n/2-1)
    a: str = None           # RS: the A fragment registers a.0 .. a.3
    elt: int = 2            # operand bytes (2: fp16/bf16)


@dataclass(frozen=True)
class Gemm:
    name: str
    instrs: tuple
    desc: tuple = (0, 2)    # (vector ALU, uniform) instructions per wgmma for its descriptors:
                            # 2 uniform adds when descriptors are precomputed and advanced by
                            # constants; today's kernels build each one (~6-8 ALU + 6 uniform)


@dataclass(frozen=True)
class WgmmaWait:
    n: int


@dataclass(frozen=True)
class BarSync:
    bar: int
    threads: int = 256


@dataclass(frozen=True)
class BarArrive:
    bar: int
    threads: int = 256


@dataclass(frozen=True)
class Node:
    """One instruction of an Alu graph: opcode (decides the pipe), destination, sources."""
    op: str
    dst: tuple = ()
    src: tuple = ()
    smem_bytes: int = 0


@dataclass(frozen=True)
class Alu:
    name: str
    nodes: tuple


# ------------------------------------------------------------------------------------------
# Gemm builders
# ------------------------------------------------------------------------------------------
def ss_gemm(name, acc, n, k_total, elt=2, desc=(0, 2)):
    """acc (64 x n) = A (smem) x B (smem) over k_total: k_total / 16 wgmma.m64nNk16 (SS)."""
    kk = 32 if elt == 1 else 16
    return Gemm(name, tuple(Wgmma(n, kk, False, acc, elt=elt) for _ in range(k_total // kk)), desc)


def rs_gemm(name, chunks, a, k_total, elt=2, desc=(0, 2)):
    """acc_c (64 x n_c) += A (registers, fragments a{kk}) x B (smem), per k step one wgmma per
    output chunk [(acc, n)] (a head dim split in swizzle-width chunks)."""
    kk = 32 if elt == 1 else 16
    out = []
    for step in range(k_total // kk):
        for acc, n in chunks:
            out.append(Wgmma(n, kk, True, acc, f"{a}{step}", elt))
    return Gemm(name, tuple(out), desc)


# ------------------------------------------------------------------------------------------
# Alu templates: one thread's share of a 64-row warpgroup tile held as wgmma accumulators
# (m64nN: thread holds N/2 values, two rows; element i of the N/2 is in row (i >> 1) & 1)
# ------------------------------------------------------------------------------------------
def _row(i):
    return (i >> 1) & 1


def softmax(acc, n, *, scale_first, masked, state="sm"):
    """Online softmax of n = N/2 scores per thread (two rows): row max (a linear FMNMX chain per
    row, two xor-shuffles), the rescale factor alpha = ex2(m_old - m_new) per row, p = ex2(s *
    scale - m) per score, the row sums (a linear FADD chain per row). scale_first: the scores
    are scaled before the max (FMUL each, then FADD s - m: today's kernel); else one FFMA
    s * scale - m * scale per score (FlashAttention-3). masked: one FSEL per score (keys past
    the visible count, and the comparison that selects them)."""
    nodes = []
    x = []
    for i in range(n):
        v = f"{acc}.{i}"
        if masked:
            if i % 2 == 0:
                nodes.append(Node("ISETP", (f"{state}.k{i // 2}",), (f"{state}.col",)))
            nodes.append(Node("FSEL", (f"{state}.x{i}",), (v, f"{state}.k{i // 2}")))
            v = f"{state}.x{i}"
        if scale_first:
            nodes.append(Node("FMUL", (f"{state}.y{i}",), (v,)))
            v = f"{state}.y{i}"
        x.append(v)
    for r in (0, 1):
        cur = None
        for i in range(n):
            if _row(i) != r:
                continue
            nxt = f"{state}.mx{r}.{i}"
            nodes.append(Node("FMNMX", (nxt,), (x[i],) + ((cur,) if cur else ())))
            cur = nxt
        for sh in (1, 2):
            nodes.append(Node("SHFL.BFLY", (f"{state}.sh{r}{sh}",), (cur,)))
            nodes.append(Node("FMNMX", (f"{state}.q{r}{sh}",), (cur, f"{state}.sh{r}{sh}")))
            cur = f"{state}.q{r}{sh}"
        nodes.append(Node("FMNMX", (f"{state}.m{r}",), (cur, f"{state}.m{r}")))
        nodes.append(Node("FADD", (f"{state}.d{r}",), (f"{state}.m{r}",)))
        nodes.append(Node("MUFU.EX2", (f"{state}.alpha{r}",), (f"{state}.d{r}",)))
        if not scale_first:
            nodes.append(Node("FMUL", (f"{state}.ms{r}",), (f"{state}.m{r}",)))
    for i in range(n):
        r = _row(i)
        ref = f"{state}.m{r}" if scale_first else f"{state}.ms{r}"
        nodes.append(Node("FADD" if scale_first else "FFMA", (f"{state}.z{i}",), (x[i], ref)))
        nodes.append(Node("MUFU.EX2", (f"{state}.p{i}",), (f"{state}.z{i}",)))
    for r in (0, 1):
        cur = f"{state}.l{r}"
        nodes.append(Node("FMUL", (cur,), (cur, f"{state}.alpha{r}")))
        for i in range(n):
            if _row(i) == r:
                nodes.append(Node("FADD", (cur,), (cur, f"{state}.p{i}")))
    return nodes


def rescale(chunks, alpha):
    """O *= alpha (per row) for the accumulator chunks [(acc, n)]: one FMUL per O value."""
    return [Node("FMUL", (f"{acc}.{i}",), (f"{acc}.{i}", f"{alpha}{_row(i)}")) for acc, n in chunks
            for i in range(n // 2)]


def convert(values, n, frag):
    """Packs n fp32 values (names values(i)) to 16-bit A fragments frag{kk}.0..3 (F2FP per pair)."""
    return [Node("F2FP.BF16.F32.PACK_AB", (f"{frag}{j // 8}.{(j % 8) // 2}",), (values(j), values(j + 1)))
            for j in range(0, n, 2)]


def _global_load(dst, state, i):
    """A guarded global load of one float at a computed address (today's statistics loads):
    the base from the parameters (LDC), a 64-bit address (LEA, LEA.HI.X), the guard (ISETP)."""
    return [Node("LDC.64", (f"{state}.base{i}",), ()), Node("ISETP", (f"{state}.in{i}",), (f"{state}.q",)),
            Node("LEA", (f"{state}.lo{i}",), (f"{state}.base{i}", f"{state}.q")),
            Node("LEA.HI.X", (f"{state}.hi{i}",), (f"{state}.base{i}", f"{state}.lo{i}")),
            Node("LDG.E.CONSTANT", (dst,), (f"{state}.lo{i}", f"{state}.hi{i}", f"{state}.in{i}"))]


def probs(acc, n, *, stat, state):
    """Backward: p = ex2(s * scale - lse) for n scores per thread. stat: where the per-column
    statistic (lse) comes from: "ldg" (a guarded global load per score: today's kernels), "lds"
    (a shared-memory load per column pair, staged by the producer), "reg" (held in registers:
    per-row statistics, the dq kernel's case)."""
    nodes = []
    for i in range(n):
        s = f"{state}.st{i}"
        if stat == "ldg":
            nodes += _global_load(s, state, i)
        elif stat == "lds" and i % 2 == 0:
            nodes.append(Node("LDS.64", (s, f"{state}.st{i + 1}"), (f"{state}.sptr",), 8))
        elif stat == "reg":
            s = f"{state}.row{_row(i)}"
        nodes.append(Node("FFMA", (f"{state}.z{i}",), (f"{acc}.{i}", s)))
        nodes.append(Node("MUFU.EX2", (f"{state}.p{i}",), (f"{state}.z{i}",)))
    return nodes


def dsoftmax(p, dp, n, *, stat, state):
    """Backward: ds = p * (dp - delta) for n values per thread (delta as `stat` in probs)."""
    nodes = []
    for i in range(n):
        d = f"{state}.dl{i}"
        if stat == "ldg":
            nodes += _global_load(d, state, i)
        elif stat == "lds" and i % 2 == 0:
            nodes.append(Node("LDS.64", (d, f"{state}.dl{i + 1}"), (f"{state}.sptr",), 8))
        elif stat == "reg":
            d = f"{state}.drow{_row(i)}"
        nodes.append(Node("FADD", (f"{state}.u{i}",), (f"{dp}.{i}", d)))
        nodes.append(Node("FMUL", (f"{state}.ds{i}",), (p(i), f"{state}.u{i}")))
    return nodes


def overhead(mix, tag="ovh"):
    """Bookkeeping (addresses, loop and stage counters, predicates, descriptors): independent
    instructions, {opcode: count} (the opcode decides the pipe: IADD3 / LOP3 vector ALU,
    UIADD3 uniform, LDC constant loads, ...)."""
    return [Node(op, (f"{tag}.{op}{i}",), ()) for op, count in mix.items() for i in range(count)]


def zero(chunks):
    return [Node("CS2R", (f"{acc}.{i}", f"{acc}.{i + 1}"), ()) for acc, n in chunks for i in range(0, n // 2, 2)]


def fused_value(nodes, acc, j, fma_per_value, mufu_per_value):
    """Appends the epilogue's fused op on accumulator value `acc`.j (`fma_per_value` FP32 ops with
    the bias, `mufu_per_value` MUFU each followed by an FMUL: SiLU's ex2 + rcp) and returns the
    register holding the result."""
    v = f"{acc}.{j}"
    for f in range(fma_per_value):
        nodes.append(Node("FFMA", (f"ep.{acc}.{j}.f{f}",), (v, f"ep.b{j % 16}")))
        v = f"ep.{acc}.{j}.f{f}"
    for m in range(mufu_per_value):
        nodes.append(Node("MUFU.EX2" if m % 2 == 0 else "MUFU.RCP", (f"ep.{acc}.{j}.m{m}",), (v,)))
        nodes.append(Node("FMUL", (f"ep.{acc}.{j}.n{m}",), (f"ep.{acc}.{j}.m{m}", v)))
        v = f"ep.{acc}.{j}.n{m}"
    return v


def store_tile(acc_chunks, *, mufu_per_value=0, fma_per_value=1, loads_per_pair=0.5, stores_per_pair=1):
    """A register epilogue of a 64 x N accumulator tile: per value `fma_per_value` FP32 ops
    (bias, scale) and `mufu_per_value` MUFU (SiLU: ex2 + rcp), per value pair one F2FP and
    `stores_per_pair` 4-byte global stores, `loads_per_pair` bias / aux loads, and 2 integer ops
    of address and bounds per pair."""
    nodes = []
    for acc, n in acc_chunks:
        for i in range(0, n // 2, 2):
            vals = [fused_value(nodes, acc, j, fma_per_value, mufu_per_value) for j in (i, i + 1)]
            if loads_per_pair and (i // 2) % max(1, round(1 / loads_per_pair)) == 0:
                nodes.append(Node("LDG.E", (f"ep.b{i % 16}",), ("ep.ptr",)))
            nodes.append(Node("IMAD", (f"ep.addr{i}",), ("ep.row",)))
            nodes.append(Node("ISETP", (f"ep.ok{i}",), (f"ep.addr{i}",)))
            nodes.append(Node("F2FP.BF16.F32.PACK_AB", (f"ep.pk{acc}{i}",), tuple(vals)))
            for s in range(stores_per_pair):
                nodes.append(Node("STG.E", (), (f"ep.pk{acc}{i}", f"ep.addr{i}", f"ep.ok{i}")))
    return nodes


# ------------------------------------------------------------------------------------------
# Synthesis: elements -> an instruction stream (perf_sim.Op)
# ------------------------------------------------------------------------------------------
def _latency(op):
    return CLASSES[op_class(op)][2]


def list_schedule(nodes):
    """Orders a dataflow graph like a compiler's list scheduler: at each cycle the ready node
    (operands landed, pipe free) with the longest latency path to the end goes first; with none
    ready, the one ready soonest. Nodes keep their program order among equals."""
    producer = {}
    preds = []
    for idx, nd in enumerate(nodes):
        preds.append({producer[s] for s in nd.src if s in producer})
        for d in nd.dst:
            producer[d] = idx
    succs = [[] for _ in nodes]
    for idx, ps in enumerate(preds):
        for p in ps:
            succs[p].append(idx)
    height = [0] * len(nodes)
    for idx in reversed(range(len(nodes))):
        lat = _latency(nodes[idx].op)
        height[idx] = lat + max((height[s] for s in succs[idx]), default=0)
    remaining = [len(p) for p in preds]
    avail = [0] * len(nodes)      # cycle the operands are there
    ready = [i for i, r in enumerate(remaining) if r == 0]
    pipe_free = {}
    order, t = [], 0
    while ready:
        def when(i):
            pipe, occ, _ = CLASSES[op_class(nodes[i].op)]
            return max(avail[i], pipe_free.get(pipe, 0))
        now = [i for i in ready if when(i) <= t]
        pick = max(now, key=lambda i: (height[i], -i)) if now else min(ready, key=lambda i: (when(i), -height[i], i))
        t = max(t, when(pick))
        ready.remove(pick)
        order.append(pick)
        pipe, occ, lat = CLASSES[op_class(nodes[pick].op)]
        pipe_free[pipe] = t + (occ or 1)
        for s in succs[pick]:
            avail[s] = max(avail[s], t + lat)
            remaining[s] -= 1
            if remaining[s] == 0:
                ready.append(s)
        t += 1
    return [nodes[i] for i in order]


def _node_op(nd):
    return Op(f"{nd.op} {','.join(nd.dst)} <- {','.join(nd.src)}", op_class(nd.op), dst=nd.dst, src=nd.src,
              smem_bytes=nd.smem_bytes * 32)


def synthesize(elements):
    """The instruction stream of a list of elements (one iteration, one warpgroup)."""
    ops = []
    for e in elements:
        if isinstance(e, MbarWait):
            ops.append(Op(f"SYNCS.PHASECHK.TRANS64.TRYWAIT {e.name}", "sync", dst=(f"mbar.{e.name}",)))
            ops.append(Op("BRA (retry)", "branch", src=(f"mbar.{e.name}",)))
        elif isinstance(e, Arrive):
            ops.append(Op(f"SYNCS.ARRIVE.TRANS64.A1T0 {e.name}", "sync"))
        elif isinstance(e, Gemm):
            ops.append(Op("WARPGROUP.ARRIVE", "wgfence"))
            for j, w in enumerate(e.instrs):
                for d in range(e.desc[0]):
                    ops.append(Op("LOP3 (descriptor)", "alu", dst=(f"desc.a{d}",)))
                for d in range(e.desc[1]):
                    ops.append(Op("UIADD3 (descriptor)", "uniform", dst=(f"desc.u{d}",), src=(f"desc.u{d}",)))
                a_bytes = 0 if w.rs else 64 * w.k * w.elt
                ops.append(Op(f"HGMMA.64x{w.n}x{w.k} {w.acc}{' <- ' + w.a if w.rs else ''}", "wgmma",
                              dst=tuple(f"{w.acc}.{i}" for i in range(w.n // 2)),
                              src=tuple(f"{w.a}.{r}" for r in range(4)) if w.rs else (),
                              wgmma=(w.n, w.k, a_bytes + w.n * w.k * w.elt, w.rs, j == len(e.instrs) - 1, w.elt)))
        elif isinstance(e, WgmmaWait):
            ops.append(Op(f"WARPGROUP.DEPBAR.LE gsb0, {e.n}", "wgwait", wait_n=e.n))
        elif isinstance(e, BarSync):
            ops.append(Op(f"BAR.SYNC {e.bar}, {e.threads}", "bar", bar=("sync", e.bar, e.threads)))
        elif isinstance(e, BarArrive):
            ops.append(Op(f"BAR.ARV {e.bar}, {e.threads}", "bar", bar=("arrive", e.bar, e.threads)))
        elif isinstance(e, Alu):
            ops.extend(_node_op(nd) for nd in list_schedule(list(e.nodes)))
        else:
            raise TypeError(f"unknown schedule element {e!r}")
    return ops


# ------------------------------------------------------------------------------------------
# Checking a declaration against the SASS
# ------------------------------------------------------------------------------------------
def markers(elements):
    """The ordering skeleton of a declaration: mbarrier waits / arrives, wgmma groups (their
    instruction shapes), wgmma waits, named barriers."""
    out = []
    for e in elements:
        if isinstance(e, MbarWait):
            out.append(("mbar_wait",))
        elif isinstance(e, Arrive):
            out.append(("mbar_arrive",))
        elif isinstance(e, Gemm):
            out.append(("gemm", tuple(sorted(Counter((w.n, w.k, w.rs) for w in e.instrs).items()))))
        elif isinstance(e, WgmmaWait):
            out.append(("wgmma_wait", e.n))
        elif isinstance(e, BarSync):
            out.append(("bar_sync", e.bar))
        elif isinstance(e, BarArrive):
            out.append(("bar_arrive", e.bar))
    return out


def sass_markers(ops):
    """The same skeleton read from a decoded SASS loop body (perf_sim.Op list)."""
    out, group = [], []
    for op in ops:
        if op.cls == "sync":
            name = re.sub(r"^@\S+\s+", "", op.text)
            if name.startswith("SYNCS.PHASECHK"):
                out.append(("mbar_wait",))
            elif name.startswith("SYNCS.ARRIVE"):
                out.append(("mbar_arrive",))
        elif op.cls == "wgmma":
            n, k, _, rs, commit, _ = op.wgmma
            group.append((n, k, rs))
            if commit:
                out.append(("gemm", tuple(sorted(Counter(group).items()))))
                group = []
        elif op.cls == "wgwait":
            out.append(("wgmma_wait", op.wait_n))
        elif op.cls == "bar":
            kind, bar_id, _ = op.bar
            out.append(("bar_sync" if kind == "sync" else "bar_arrive", bar_id))
    return out


# Instruction classes compared between a declaration and the SASS (the ones that cost).
COUNTED = {
    "mufu": lambda op: op.startswith("MUFU"),
    "fp32": lambda op: re.match(r"(FFMA|FMUL|FADD)\b", op) is not None,
    "fmnmx": lambda op: op.startswith("FMNMX"),
    "f2fp": lambda op: op.startswith("F2FP"),
    "shfl": lambda op: op.startswith("SHFL"),
    "ldg": lambda op: op.startswith("LDG"),
    "lds_sts": lambda op: re.match(r"(LDS|STS|LDSM|STSM)\b", op) is not None,
    "hgmma": lambda op: op.startswith("HGMMA"),
}


def class_counts(ops):
    """{COUNTED class: count, "total": all instructions} of a stream (perf_sim.Op list)."""
    c = Counter()
    for op in ops:
        name = re.sub(r"^@\S+\s+", "", op.text).split(" ", 1)[0]
        for k, f in COUNTED.items():
            if f(name):
                c[k] += 1
        c["total"] += 1
    return dict(c)


def _same_marker(w, g):
    """A declared marker against the SASS one; a named barrier whose id the SASS holds in a register
    (None) matches the declared barrier of its kind."""
    if w == g:
        return True
    return (w is not None and g is not None and w[0] == g[0] and w[0] in ("bar_sync", "bar_arrive")
            and g[1] is None)


def check_against_sass(elements, sass_ops):
    """(problems, counts): problems lists every marker that differs (a declaration that does
    not describe the compiled loop); counts = {class: (declared, sass)}."""
    want, got = markers(elements), sass_markers(sass_ops)
    problems = []
    n = max(len(want), len(got))
    for i in range(n):
        w = want[i] if i < len(want) else None
        g = got[i] if i < len(got) else None
        if not _same_marker(w, g):
            problems.append(f"marker {i}: declared {w}, SASS {g}")
    dc, sc = class_counts(synthesize(elements)), class_counts(sass_ops)
    counts = {k: (dc.get(k, 0), sc.get(k, 0)) for k in list(COUNTED) + ["total"]}
    return problems, counts


# ------------------------------------------------------------------------------------------
# A kernel's schedule
# ------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """One kernel design at one variant.

    loop(wg)            elements of one main-loop iteration of consumer warpgroup wg (the part
                        checked against the SASS main loop)
    pre(wg), post(wg)   elements around `reps` loop iterations that make up one modelled
                        iteration (the GEMM: zeroing, 20 k tiles, the epilogue); default none
    start(wg)           elements run once before the first iteration (a barrier's first token)
    useful_flops        FLOPs per modelled iteration counted as work (all warpgroups; the
                        attention backward counts 5 matmuls of FlashAttention's convention)
    l2_bytes            operand bytes the producer loads per modelled iteration (TMA)
    smem_bytes / regs   the design's shared memory per CTA and registers per consumer thread
                        (estimated for designs, from ptxas for compiled kernels), for feasibility
    sass                (csrc file, mangled-name regex) of the compiled kernel, or None
    """
    kernel: str
    design: str
    variant: str
    consumers: int
    loop: object
    useful_flops: float
    l2_bytes: float
    smem_bytes: int
    regs: int
    reg_limit: int
    note: str
    pre: object = None
    post: object = None
    reps: int = 1
    start: object = None
    sass: tuple = None
    skip_fences: bool = True     # dense TMA path: the proxy fences of the gather path are skipped
    extra: dict = field(default_factory=dict)

    def iteration(self, wg, loop_ops=None):
        """The stream of one modelled iteration (loop_ops: the SASS loop body, else synthesised).
        Named barriers whose id the SASS holds in a register (one code for both warpgroups) take, in
        order, the ids the declaration gives warpgroup wg."""
        body = loop_ops if loop_ops is not None else synthesize(self.loop(wg))
        if loop_ops is not None and any(op.bar and op.bar[1] is None for op in body):
            ids = [("sync" if isinstance(e, BarSync) else "arrive", e.bar) for e in self.loop(wg)
                   if isinstance(e, (BarSync, BarArrive))]
            filled, k = [], 0
            for op in body:
                if op.bar and op.bar[1] is None:
                    if k >= len(ids) or ids[k][0] != op.bar[0]:
                        raise ValueError(f"{self.kernel} {self.design}: the SASS's barrier {op.text!r} has no "
                                         "declared counterpart")
                    op = replace(op, bar=(op.bar[0], ids[k][1], op.bar[2]))
                    k += 1
                filled.append(op)
            body = filled
        pre = synthesize(self.pre(wg)) if self.pre else []
        post = synthesize(self.post(wg)) if self.post else []
        return pre + body * self.reps + post

    def ordered(self):
        """Whether the consumer warpgroups order each other with named barriers (ping-pong)."""
        elems = list(self.loop(0)) + list(self.pre(0) if self.pre else []) + list(self.post(0) if self.post else [])
        return any(isinstance(e, (BarSync, BarArrive)) for e in elems)

    def startup(self, wg):
        return synthesize(self.start(wg)) if self.start else []
