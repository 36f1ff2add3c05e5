"""A cycle model of one Hopper (sm_90a) SM running the consumer warpgroups of a warp-specialised
kernel: the instruction streams of their main loop (from SASS, or synthesised from a declared
schedule, tools/perf_schedules.py) issued in order on one SM sub-partition, the wgmma
instructions queued on the SM's tensor pipe. A prediction for choosing designs, never a
measurement.

What is modelled
  * Symmetry: the 4 warps of a warpgroup sit on the SM's 4 sub-partitions (SMSPs) and run the
    same stream, so one SMSP holding one warp per warpgroup stands for all four; a wgmma is a
    warpgroup-wide instruction on the SM's tensor pipe.
  * Issue: one instruction per cycle per SMSP, in order per warp; the oldest-waiting ready warp
    issues (loose round robin). An instruction issues when its source registers are ready
    (fixed latencies per class, below) and its pipe is free (occupancy per class).
  * Pipes per SMSP: fma (FFMA/FMUL/FADD: 32 lanes, 1 cycle per warp instruction), alu (16 lanes:
    FMNMX, FSEL, integer, F2FP, 2 cycles), mufu (4 lanes: MUFU.EX2/RCP, 8 cycles), shfl, lsu,
    uniform; shared memory (LDS/STS) is an SM-wide port of SMEM_BYTES_PER_CLK, so a warp
    instruction of the representative SMSP costs 4x its bytes.
  * Tensor pipe (SM-wide): m64nNkK holds it max(2*64*N*K / TENSOR_FLOPS_PER_CLK, operand bytes
    / SMEM_BYTES_PER_CLK) cycles (operands read from shared memory: A 64xK for an SS wgmma, B NxK
    always; the 4 warps share one read); tensor-busy counts only the first term. Each warpgroup
    has its own queue, in issue order; the pipe takes the warpgroups' instructions in turn
    (round robin: two groups issued together finish together), an instruction at the earliest
    WGMMA_START_LATENCY after its issue; a committed group (the HGMMA with gsb0) is complete, for
    WARPGROUP.DEPBAR, WGMMA_DONE_LATENCY after its last instruction ends, and its accumulator
    registers cannot be read before.
  * WARPGROUP.ARRIVE (wgmma.fence) waits for the warp's outstanding fixed-latency register
    writes (not its loads);
    WARPGROUP.DEPBAR.LE gsb0, n (wgmma.wait_group n) until at most n of its groups are pending.
  * Named barriers (BAR.SYNC / BAR.ARV id, threads): a warpgroup's arrival counts 128 threads;
    the barrier opens when `threads` have arrived. The loads are assumed ahead of the consumers
    (mbarrier waits cost their issue and latency only): the producer's memory traffic is
    reported beside the result, not simulated.

What is not: bank conflicts, register-bank and reuse-cache effects, instruction-cache misses,
clock throttling under load, the producer warpgroup's issue slots (one TMA thread), L2 / HBM
contention, per-work-item prologues and epilogues of attention (the steady state of a long key
loop is modelled: FlashAttention-3's ablation setting), wave quantisation.

Every number below is a lead (vendor throughput tables and public microbenchmarks, rounded; the
wgmma latencies are guesses whose effect tools/perf_model.py reports): perf_model.py calibrates
the whole against FlashAttention-3's published throughput and this workplace's matmul.
"""
import re
from dataclasses import dataclass, field

# Hopper SXM (H100 SXM5 / H200 SXM: the same SM and clocks; they differ in HBM only).
SMS = 132
DATASHEET_CLOCK_MHZ = 1830          # 989.4 TFLOP/s dense 16-bit = 132 SMs x 4096 FLOP/clk x 1830 MHz
TENSOR_FLOPS_PER_CLK = {2: 4096, 1: 8192}   # per SM, by operand bytes (16-bit, 8-bit)
SMEM_BYTES_PER_CLK = 128            # per SM
WGMMA_START_LATENCY = 24            # issue -> first tensor cycle, when the pipe is idle
WGMMA_DONE_LATENCY = 48             # last tensor cycle of a group -> wait_group returns
BARRIER_LATENCY = 20                # named barrier opened -> the waiting warp issues

# class: (pipe, occupancy cycles on that pipe per warp instruction, result latency)
CLASSES = {
    "fma": ("fma", 1, 4),
    "alu": ("alu", 2, 5),
    "mufu": ("mufu", 8, 18),
    "conv": ("mufu", 8, 18),        # F2F/I2F/F2I: 16 per clock per SM, as MUFU
    "shfl": ("shfl", 4, 24),
    "lds": ("smem", None, 30),      # occupancy from the bytes moved (SM-wide port)
    "ldg": ("lsu", 1, 250),         # an L2 hit
    "ldg_nc": ("lsu", 1, 60),       # ld.global.nc of small read-only arrays every warp reads
                                    # (attention statistics): L1 hits (~35) and a miss per line
    "stg": ("lsu", 1, 0),
    "ldc": ("lsu", 1, 10),          # constant cache hit
    "s2r": ("lsu", 1, 20),
    "uniform": ("uniform", 1, 3),
    "r2ur": ("alu", 2, 8),
    "sync": ("lsu", 1, 20),         # mbarrier try-wait (data assumed there), arrive
    "fence": ("lsu", 1, 30),        # MEMBAR / FENCE.VIEW.ASYNC
    "branch": ("branch", 1, 0),
    "wgmma": ("tensor_issue", 1, 0),
    "wgfence": ("branch", 1, 0),
    "wgwait": ("branch", 1, 0),
    "bar": ("branch", 1, 0),
    "nop": ("branch", 1, 0),
}

_CLASS_RULES = [
    (r"HGMMA", "wgmma"), (r"WARPGROUP\.ARRIVE", "wgfence"), (r"WARPGROUP\.DEPBAR", "wgwait"),
    (r"BAR\.", "bar"), (r"(FFMA|FMUL|FADD|FFMA2|FMUL2|FADD2|HFMA2|HMUL2|HADD2)\b", "fma"),
    (r"MUFU", "mufu"), (r"(F2F|I2F|F2I|I2FP|F2IP)\b", "conv"), (r"SHFL", "shfl"),
    (r"(LDS|LDSM|STS|STSM)\b", "lds"), (r"LDG\S*\.CONSTANT", "ldg_nc"), (r"(LDG|LD|LDL|ATOM|ATOMG)\b", "ldg"),
    (r"(STG|ST|STL|RED|REDG)\b", "stg"),
    (r"LDGSTS|UTMALDG|UTMASTG|UBLKCP|UTMAPF|UTMACCTL", "stg"), (r"LDC|ULDC", "ldc"),
    (r"(S2R|CS2R|S2UR)\b", "s2r"), (r"R2UR", "r2ur"), (r"SYNCS", "sync"), (r"(MEMBAR|FENCE|CCTL|ERRBAR)\b", "fence"),
    (r"(BRA|EXIT|RET|CALL|BSSY|BSYNC|WARPSYNC|YIELD|JMP|BRX)\b", "branch"), (r"NOP\b", "nop"),
    (r"U[A-Z0-9]+", "uniform"),
]
_NO_DST = re.compile(r"^(ST|STS|STG|STL|RED|REDG|BRA|EXIT|RET|CALL|BAR|WARPGROUP|MEMBAR|FENCE|NOP|UTMA|UBLKCP|"
                     r"LDGSTS|CCTL|ERRBAR|DEPBAR|BSSY|BSYNC|WARPSYNC|YIELD|JMP|BRX)")
_REG = re.compile(r"(?<![\w.])(U?R\d+|U?P\d)(?:\.(64|128))?\b")


def op_class(op):
    """The class (CLASSES) of an opcode; integer and other vector-ALU work by default."""
    for pat, cls in _CLASS_RULES:
        if re.match(pat, op):
            return cls
    return "alu"


def _width(op):
    m = re.search(r"\.(64|128|U8|S8|U16|S16)\b", op)
    return {"64": 2, "128": 4}.get(m.group(1), 1) if m else 1


def _expand(reg, n):
    m = re.match(r"(U?R)(\d+)$", reg)
    if not m or n <= 1:
        return [reg]
    return [f"{m.group(1)}{int(m.group(2)) + i}" for i in range(n)]


def _regs(text, wide=None):
    out = []
    for m in _REG.finditer(text):
        n = {"64": 2, "128": 4}.get(m.group(2) or "", wide or 1)
        out += _expand(m.group(1), n)
    return out


@dataclass
class Op:
    """A decoded instruction: what the simulator needs of it."""
    text: str
    cls: str
    dst: tuple = ()
    src: tuple = ()
    smem_bytes: int = 0          # LDS/STS bytes per warp instruction
    wgmma: tuple = None          # (n, k, operand bytes, rs, commit)
    wait_n: int = None           # WARPGROUP.DEPBAR.LE n
    bar: tuple = None            # (kind "sync"/"arrive", id, threads or None)


_HGMMA = re.compile(r"HGMMA\.64x(\d+)x(\d+)\.\w+(?:\.(\w+))?")    # no type suffix: F16


def decode(ins):
    """Op from a tools/sass.Instr (or anything with .pred, .op, .operands)."""
    op, ops = ins.op, list(ins.operands)
    cls = op_class(op)
    text = str(ins)
    src = _regs(ins.pred) if ins.pred and ins.pred not in ("PT", "!PT") else []
    if cls == "wgmma":
        m = _HGMMA.match(op)
        n, k, ty = int(m.group(1)), int(m.group(2)), m.group(3) or "F16"
        elt = 1 if ty.startswith("E") else 2
        rs = len(ops) > 1 and re.match(r"R\d+$", ops[1]) is not None
        commit = any(o == "gsb0" for o in ops)
        a_bytes = 0 if rs else 64 * k * elt
        dst = tuple(_expand(ops[0], n // 2)) if re.match(r"R\d+$", ops[0]) else ()
        return Op(text, cls, dst=dst, src=tuple(src + (_expand(ops[1], 4) if rs else [])),
                  wgmma=(n, k, a_bytes + n * k * elt, rs, commit, elt))
    if cls == "wgwait":
        m = re.search(r"0x([0-9a-f]+)", " ".join(ops))
        return Op(text, cls, wait_n=int(m.group(1), 16) if m else 0)
    if cls == "bar":
        kind = "sync" if ".SYNC" in op or ".RED" in op else "arrive"
        nums = [int(x, 16) for x in re.findall(r"0x([0-9a-f]+)", " ".join(ops))]
        if ops and re.match(r"U?R\d+$", ops[0]):
            # a barrier id in a register (warpgroup-dependent ping-pong turns): id None, which the
            # declared schedule fills in per warpgroup (perf_schedules.Schedule.iteration)
            return Op(text, cls, src=tuple(src + _regs(ops[0])), bar=(kind, None, nums[0] if nums else None))
        bar_id = nums[0] if nums else 0
        return Op(text, cls, bar=(kind, bar_id, nums[1] if len(nums) > 1 else None))
    dst = []
    rest = ops
    if not _NO_DST.match(op) and ops:
        if op.startswith("SHFL"):
            dst, rest = _regs(ops[1]), [ops[0]] + ops[2:]
        else:
            wide = _width(op) if cls in ("lds", "ldg", "ldg_nc", "ldc") else None
            dst, rest = _regs(ops[0], wide), ops[1:]
            while rest and re.match(r"U?P\d$", rest[0]) and op.split(".")[0] in ("IADD3", "LEA", "IMAD", "LOP3",
                                                                                 "ISETP", "FSETP", "UISETP", "PLOP3"):
                dst += _regs(rest[0])
                rest = rest[1:]
    for o in rest:
        src += _regs(o)
    smem = 32 * 4 * _width(op) if cls == "lds" else 0
    return Op(text, cls, dst=tuple(d for d in dst), src=tuple(src), smem_bytes=smem)


@dataclass
class Warp:
    """One consumer warpgroup (its representative warp): `body` is run `iterations` times;
    `prologue` once before."""
    name: str
    body: list
    iterations: int
    prologue: list = field(default_factory=list)
    threads: int = 128
    delay: int = 0            # cycles before its first instruction


@dataclass
class Result:
    period: float                 # cycles per iteration (all warpgroups' iterations together)
    tensor_cycles: float          # per iteration (all warpgroups): the wgmma FLOPs at the peak rate
    tensor_busy: float            # tensor_cycles / period: the fraction of peak tensor throughput
                                  # (pipe_cycles["tensor"]: the cycles the pipe is held, longer for
                                  # wgmmas bound by their shared-memory operands)
    pipe_cycles: dict             # per SMSP pipe: occupancy cycles per iteration (all warps)
    issue_cycles: float           # instructions per iteration issued on one SMSP (all warps)
    smem_bytes: float             # SM shared-memory bytes per iteration (wgmma operands + LDS/STS)
    stalls: dict                  # per warp: {reason: cycles per iteration}
    iteration_ends: dict          # per warp: [cycle]


class Deadlock(RuntimeError):
    pass


class _TensorPipe:
    """The SM's tensor pipe: one queue of wgmma instructions per warpgroup; when the pipe is
    free it takes the next eligible instruction (issued WGMMA_START_LATENCY ago) of the next
    warpgroup in turn ("round_robin": the warpgroups share the pipe instruction by instruction,
    so two groups issued together finish together) or the earliest issued ("fifo": a
    warpgroup that issues first finishes first)."""

    def __init__(self, n, arbitration):
        self.queues = [[] for _ in range(n)]   # [eligible, duration, group, warp]
        self.clock = 0.0
        self.cur = None                        # (end, group)
        self.turn = 0
        self.arbitration = arbitration

    def push(self, warp, eligible, dur, group):
        self.queues[warp].append((eligible, dur, group))

    def next_event(self):
        if self.cur is not None:
            return self.cur[0]
        heads = [q[0][0] for q in self.queues if q]
        return max(self.clock, min(heads)) if heads else None

    def advance(self, t, on_done):
        """Runs the pipe up to cycle t; on_done(group, end) for each finished instruction."""
        while True:
            if self.cur is not None:
                end, group = self.cur
                if end > t:
                    return
                self.cur = None
                self.clock = end
                on_done(group, end)
            ready = [w for w, q in enumerate(self.queues) if q and q[0][0] <= max(self.clock, t)]
            if not ready:
                heads = [q[0][0] for q in self.queues if q]
                if heads and min(heads) <= t:
                    continue
                self.clock = max(self.clock, t)
                return
            start_at = max(self.clock, min(self.queues[w][0][0] for w in ready))
            ready = [w for w in ready if self.queues[w][0][0] <= start_at]
            if self.arbitration == "fifo":
                w = min(ready, key=lambda j: (self.queues[j][0][0], j))
            else:
                w = min(ready, key=lambda j: (j - self.turn) % len(self.queues))
                self.turn = (w + 1) % len(self.queues)
            eligible, dur, group = self.queues[w].pop(0)
            self.clock = start_at
            self.cur = (start_at + dur, group)


class _Group:
    def __init__(self):
        self.pending = 0
        self.committed = False
        self.done = None
        self.dst = []


INF = float("inf")


def simulate(warps, warmup=2, arbitration="round_robin"):
    """Runs the warps on one SMSP + the SM's tensor pipe; steady-state numbers per iteration
    over iterations [warmup, iterations)."""
    prog = []
    for w in warps:
        stream = [decode(i) if not isinstance(i, Op) else i for i in w.prologue]
        body = [decode(i) if not isinstance(i, Op) else i for i in w.body]
        prog.append((w, stream, body))
    n = len(warps)
    pc = [0] * n
    it = [-1 if p[1] else 0 for p in prog]            # -1: in the prologue
    cur = [p[1] if p[1] else p[2] for p in prog]
    ready = [dict() for _ in range(n)]                 # register -> cycle its value is ready
    alu_ready = [0] * n                                # last fixed-latency register write lands
    blocked = [w.delay for w in warps]                 # cycle the warp may issue again
    on_bar = [None] * n                                # barrier id the warp waits at
    groups = [[] for _ in range(n)]                    # committed, unfinished _Group
    open_group = [None] * n
    ends = [[] for _ in range(n)]
    last_issue = [w.delay for w in warps]
    stall = [dict() for _ in range(n)]
    first_why = [None] * n
    tensor_cycles = [0.0] * n                          # per warp, measured iterations: at the peak rate
    held_cycles = [0.0] * n                            # and as the pipe is held (operand-bound: longer)
    pipe_free = {}
    smem_free = 0
    smem_traffic = []                                  # (cycle, bytes)
    class_counts = [dict() for _ in range(n)]
    bars = {}                                          # id -> [threads arrived, [waiting warps]]
    done = [False] * n
    tensor = _TensorPipe(n, arbitration)
    owner = {}
    snap = [(0.0, {}, {}, 0.0) for _ in range(n)]     # the counters at the last iteration end

    def finished(group, end):
        group.pending -= 1
        if group.pending == 0 and group.committed:
            group.done = end + WGMMA_DONE_LATENCY
            for r in group.dst:
                ready[owner[id(group)]][r] = group.done

    def earliest(i, op, t):
        """(cycle the warp's next instruction can issue, reason); INF: not known yet."""
        if on_bar[i] is not None:
            return None, "barrier"
        best, why = blocked[i], "barrier" if blocked[i] > t else "issue"
        for r in op.src:
            if ready[i].get(r, 0) > best:
                best, why = ready[i][r], "dependency"
        if op.cls == "wgfence" and alu_ready[i] > best:
            best, why = alu_ready[i], "dependency"
        if op.cls == "wgwait":
            pend = [g for g in groups[i] if g.done is None or g.done > t]
            if len(pend) > op.wait_n:
                g = pend[len(pend) - op.wait_n - 1]
                c = INF if g.done is None else g.done
                if c > best:
                    best, why = c, "wgmma wait"
        pipe = CLASSES[op.cls][0]
        if pipe_free.get(pipe, 0) > best:
            best, why = pipe_free[pipe], f"pipe {pipe}"
        if op.cls == "lds" and smem_free > best:
            best, why = smem_free, "pipe smem"
        return best, why

    def open_barrier(bar_id, when):
        arrived, waiting = bars.pop(bar_id)
        for j in waiting:
            on_bar[j] = None
            blocked[j] = max(blocked[j], when + BARRIER_LATENCY)

    t = 0
    rr = 0
    # Until the first warpgroup has run its iterations (the others may then wait for it at a
    # barrier forever: the run ends there).
    while not any(done):
        tensor.advance(t, finished)
        issued = False
        for k in range(n):
            i = (rr + k) % n
            if done[i]:
                continue
            op = cur[i][pc[i]]
            e, why = earliest(i, op, t)
            if first_why[i] is None:
                first_why[i] = why if (e is None or e > t) else "issue"
            if e is None or e > t:
                continue
            # issue op of warp i at cycle t; the wait before it is charged to what first held it
            gap = t - last_issue[i] - 1
            if gap > 0 and it[i] >= warmup:
                stall[i][first_why[i]] = stall[i].get(first_why[i], 0) + gap
            first_why[i] = None
            last_issue[i] = t
            pipe, occ, lat = CLASSES[op.cls]
            if op.cls == "lds":
                smem_free = max(smem_free, t) + op.smem_bytes * 4 // SMEM_BYTES_PER_CLK
                smem_traffic.append((t, op.smem_bytes * 4))
                occ = 1
            pipe_free[pipe] = t + occ
            if it[i] >= warmup:
                class_counts[i][op.cls] = class_counts[i].get(op.cls, 0) + 1
            if op.cls == "wgmma":
                nn, kk, nbytes, rs, commit, elt = op.wgmma
                compute = 2 * 64 * nn * kk / TENSOR_FLOPS_PER_CLK[elt]
                dur = max(compute, nbytes / SMEM_BYTES_PER_CLK)
                if open_group[i] is None:
                    open_group[i] = _Group()
                    owner[id(open_group[i])] = i
                g = open_group[i]
                g.pending += 1
                g.dst.extend(op.dst)
                for r in op.dst:
                    ready[i][r] = INF
                tensor.push(i, t + WGMMA_START_LATENCY, dur, g)
                smem_traffic.append((t, nbytes))
                if it[i] >= warmup:
                    tensor_cycles[i] += compute
                    held_cycles[i] += dur
                if commit:
                    g.committed = True
                    groups[i].append(g)
                    open_group[i] = None
            else:
                for r in op.dst:
                    ready[i][r] = t + lat
                if op.dst and lat < 100:
                    alu_ready[i] = max(alu_ready[i], t + lat)
            if op.cls == "bar":
                kind, bar_id, threads = op.bar
                need = threads if threads else sum(w.threads for w in warps)
                entry = bars.setdefault(bar_id, [0, []])
                entry[0] += warps[i].threads
                if kind == "sync":
                    on_bar[i] = bar_id
                    entry[1].append(i)
                if entry[0] >= need:
                    open_barrier(bar_id, t)
            groups[i] = [g for g in groups[i] if g.done is None or g.done > t]
            pc[i] += 1
            if pc[i] == len(cur[i]):
                pc[i] = 0
                if it[i] >= 0:
                    ends[i].append(t)
                    snap[i] = (tensor_cycles[i], dict(class_counts[i]), dict(stall[i]), held_cycles[i])
                it[i] += 1
                cur[i] = prog[i][2]
                if it[i] >= warps[i].iterations:
                    done[i] = True
            rr = i + 1
            issued = True
            break
        if issued:
            t += 1
            continue
        nxt = [earliest(i, cur[i][pc[i]], t)[0] for i in range(n) if not done[i]]
        nxt = [e for e in nxt if e is not None and e != INF]
        ev = tensor.next_event()
        if ev is not None:
            nxt.append(ev)
        if not nxt:
            raise Deadlock("every unfinished warpgroup waits at a named barrier that cannot open: "
                           f"{ {warps[i].name: on_bar[i] for i in range(n) if not done[i]} }")
        t = max(t + 1, int(min(nxt) + 0.999999))

    return _summarise(warps, warmup, ends, snap, smem_traffic)


def _summarise(warps, warmup, ends, snap, smem_traffic):
    iters = [len(e) for e in ends]
    if min(iters) <= warmup + 1:
        raise ValueError("too few iterations to measure a steady state")
    lo = max(e[warmup] for e in ends)
    hi = min(e[-1] for e in ends)
    per = [(e[-1] - e[warmup]) / (len(e) - 1 - warmup) for e in ends]
    n_it = [len(e) - warmup for e in ends]
    period = max(per)
    window = hi - lo
    tensor = sum(snap[i][0] / n_it[i] for i in range(len(warps)))
    held = sum(snap[i][3] / n_it[i] for i in range(len(warps)))
    tensor_busy = tensor / period
    smem = sum(b for c, b in smem_traffic if lo <= c < hi) / window * period if window > 0 else 0.0
    pipes, issue = {}, 0.0
    for i, w in enumerate(warps):
        for cls, cnt in snap[i][1].items():
            pipe, occ, _ = CLASSES[cls]
            if pipe in ("branch", "tensor_issue"):
                pipe = "other"
            occ = occ or 1
            pipes[pipe] = pipes.get(pipe, 0.0) + cnt * occ / n_it[i]
            issue += cnt / n_it[i]
    stalls = {w.name: {k: v / n_it[i] for k, v in sorted(snap[i][2].items())}
              for i, w in enumerate(warps)}
    pipes["tensor"] = held
    return Result(period=period, tensor_cycles=tensor, tensor_busy=tensor_busy, pipe_cycles=pipes,
                  issue_cycles=issue, smem_bytes=smem, stalls=stalls,
                  iteration_ends={w.name: ends[i] for i, w in enumerate(warps)})
