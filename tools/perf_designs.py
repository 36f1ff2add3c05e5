"""The schedules the cost model evaluates (tools/perf_model.py): today's sm_90a kernels (checked
against their SASS), FlashAttention-3's forward (the calibration), and candidate designs for the
rewrite. Each is a perf_schedules.Schedule; the element lists below are the documented overlap
structure of each kernel (what waits for what).

Naming: kernel (attn_fwd, attn_dq, attn_dkdv, attn_bwd, gemm), design ("today", "fa3...",
"cand:..."), variant (head dim and dtype: "d128-bf16"; the GEMM: reduction length, dtype,
epilogue).

A rewritten kernel declares its schedule here: a function returning a Schedule whose `loop(wg)`
lists, in program order, what each consumer warpgroup does per main-loop iteration (mbarrier
waits and arrives, each committed wgmma group with its instruction shapes, wgmma.wait_group n,
named-barrier syncs and arrives, Alu work from the templates of perf_schedules.py, with the
bookkeeping counts its SASS shows), and `sass=(source file, mangled-name regex)`; listed in
today(), perf_model.py compiles it, checks the declaration against the SASS marker by marker
(a mismatch fails the run) and models it from its SASS.
"""
from perf_schedules import (Alu, Arrive, BarArrive, BarSync, Gemm, MbarWait, Node, Schedule, WgmmaWait, convert,
                            dsoftmax, fused_value, overhead, probs, rescale, rs_gemm, softmax, ss_gemm, store_tile,
                            zero)

SMEM_LIMIT = 232448      # bytes per block on sm_90
BM = 128                 # attention query rows per CTA: two consumer warpgroups of 64
DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half"}


def _chunks(acc, D):
    """Today's head-dim chunks: d 0..63 (n64) and d 64..D-1 (n16 / n32 / n64)."""
    return [(f"{acc}0", 64)] + ([(f"{acc}1", D - 64)] if D > 64 else [])


def _one_chunk(acc, D):
    """A head dim as one wgmma N (FlashAttention-3's layout: n = D)."""
    return [(acc, D)]


# ------------------------------------------------------------------------------------------
# Attention forward
# ------------------------------------------------------------------------------------------
# Today's kernels build every wgmma descriptor from scratch (tools/perf_model.py prints the
# SASS per segment): per SS wgmma ~8 vector-ALU (LOP3, IMAD, SHF, R2UR) and ~6 uniform
# instructions, per RS wgmma ~6 uniform.
TODAY_SS, TODAY_RS = (8, 6), (0, 6)


def attn_fwd_today(D, dtype):
    """csrc/hopper/attn_fwd_mainloop.cuh, per 128-key tile, both consumer warpgroups alike and
    unsynchronised with each other: wait K -> S = Q K^T (D/16 x m64n128k16, SS) -> wait<0> ->
    softmax (scores scaled, then masked, then max; FMUL + FADD per score), O rescale, P to
    16-bit -> wait V -> O += P V (8 k steps x one wgmma per head-dim chunk, RS) -> wait<0> ->
    release K and V. Nothing overlaps the softmax but the other warpgroup's work."""
    chunks = _chunks("O", D)

    def loop(wg):
        sm = softmax("S", 64, scale_first=True, masked=True) + rescale(chunks, "sm.alpha")
        sm += convert(lambda j: f"sm.p{j}", 64, "P") + overhead({"LOP3": 22, "ISETP": 5})
        return [Alu("loop counters", tuple(overhead({"UIADD3": 8, "LOP3": 5}, "o0"))),
                MbarWait("k_full"), ss_gemm("S = Q K^T", "S", 128, D, desc=TODAY_SS), WgmmaWait(0),
                Alu("softmax, rescale, convert", tuple(sm)),
                MbarWait("v_full"), rs_gemm("O += P V", chunks, "P", 128, desc=TODAY_RS),
                Alu("stage counters", tuple(overhead({"UIADD3": 4}, "o2"))), WgmmaWait(0), Arrive("kv_empty"),
                Alu("loop", tuple(overhead({"LOP3": 2}, "o3")))]
    stages = 3 if (SMEM_LIMIT - 2048 - 2 * BM * D * 2) // (2 * 128 * D * 2) >= 3 else 2
    return Schedule("attn_fwd", "today", f"d{D}-{dtype}", 2, loop, useful_flops=4 * BM * 128 * D,
                    l2_bytes=2 * 128 * D * 2, smem_bytes=1024 + 2 * BM * D * 2 + stages * 2 * 128 * D * 2 + 1024,
                    regs=224, reg_limit=224, note="128x128 tiles, 2 consumer warpgroups in phase, wait<0> twice",
                    sass=_sass_ref("attn_fwd", dtype, D))


def _sass_ref(kernel, dtype, D):
    """(source file, regex on the mangled name) of today's sm_90a instantiation."""
    if dtype not in DTYPES:
        return None
    return ("csrc/attention_sm90.cu", rf"{kernel}_sm90_kernelI{len(DTYPES[dtype])}{DTYPES[dtype]}Li{D}E")


# Designs and FlashAttention-3: descriptors advanced by constants (2 uniform adds per wgmma) and
# a few dozen bookkeeping instructions per iteration (pipeline states, barriers, loop).
LEAN_OVERHEAD = {"IADD3": 12, "LOP3": 8, "ISETP": 4, "UIADD3": 12}
TODAY_SOFTMAX_OVERHEAD = {"LOP3": 22, "ISETP": 5, "IADD3": 10, "UIADD3": 12}


def attn_fwd_fa3(D, BN, *, overlap, pingpong, masked=False, scale_first=False, design="fa3", variant=None,
                 ovh=None, desc=(0, 2), chunks=None, note=None):
    """FlashAttention-3's forward mainloop (hopper/mainloop_fwd_sm90_tma_gmma_ws.hpp), per BN-key
    tile, 2 consumer warpgroups of 64 rows, O as one n=D chunk, P in registers (RS):

    overlap + pingpong (FA3): sync(own barrier) -> issue S_next = Q K^T and O += P_prev V ->
      arrive(other's barrier) -> wait<1> (S_next) -> release K -> softmax(S_next) under the PV ->
      wait<0> -> release V -> P to 16-bit, O rescale.
    pingpong only (FA3's ablation "no GEMM-softmax pipelining"): issue S -> arrive(other) ->
      wait<0> -> softmax, P, rescale -> sync(own) -> issue O += P V -> wait<0>; the turn passes
      after each S, so one warpgroup's softmax runs under the other's GEMMs.
    overlap only: as FA3 without the barriers.
    The warpgroups' barriers are 1 and 2 (256 threads); the first consumer starts with the turn."""
    chunks = chunks or _one_chunk("O", D)
    n = BN // 2
    bars = (1, 2)

    mix = ovh or LEAN_OVERHEAD

    def sm_alu():
        return Alu("softmax", tuple(softmax("S", n, scale_first=scale_first, masked=masked) + overhead(mix, "ovh1")))

    def p_alu():
        return Alu("P, rescale", tuple(convert(lambda j: f"sm.p{j}", n, "P") + rescale(chunks, "sm.alpha")))

    def loop(wg):
        own, other = bars[wg], bars[1 - wg]
        s = ss_gemm("S = Q K^T", "S", BN, D, desc=desc)
        pv = rs_gemm("O += P V", chunks, "P", BN, desc=desc)
        if overlap:
            return ([BarSync(own)] if pingpong else []) + [MbarWait("k_full"), s, MbarWait("v_full"), pv] + \
                ([BarArrive(other)] if pingpong else []) + \
                [WgmmaWait(1), Arrive("k_empty"), sm_alu(), WgmmaWait(0), Arrive("v_empty"), p_alu()]
        return [MbarWait("k_full"), s] + ([BarArrive(other)] if pingpong else []) + \
            [WgmmaWait(0), Arrive("k_empty"), sm_alu(), p_alu(), MbarWait("v_full")] + \
            ([BarSync(own)] if pingpong else []) + [pv, WgmmaWait(0), Arrive("v_empty")]

    def start(wg):
        if not pingpong:
            return []
        if overlap:
            return [BarArrive(bars[0])] if wg == 0 else []
        return [BarArrive(bars[0]), BarSync(bars[0])] if wg == 0 else [BarSync(bars[1])]

    s_regs = n
    regs = s_regs + D // 2 + n // 2 + 40     # S, O, P fragments, addresses and softmax state
    stage = 2 * BN * D * 2
    smem = BM * D * 2 + 2 * stage + 1024     # Q, 2 stages of K + V (O staged through Q's buffer)
    what = {(True, True): "intra-warpgroup overlap + ping-pong", (False, True): "ping-pong only",
            (True, False): "intra-warpgroup overlap only", (False, False): "neither"}[(overlap, pingpong)]
    return Schedule("attn_fwd", design, variant or f"d{D}-16bit", 2, loop, useful_flops=4 * BM * BN * D,
                    l2_bytes=stage, smem_bytes=smem, regs=regs, reg_limit=240, start=start,
                    note=note or f"128x{BN} tiles, {what}, P in registers, 24/240 registers")


# ------------------------------------------------------------------------------------------
# Attention backward (today: deterministic, two kernels; 7 matmuls per (query, key) pair)
# ------------------------------------------------------------------------------------------
def stream_rows(D):
    return 32 if D >= 96 else 64


def _bwd_smem(D):
    R = stream_rows(D)
    fixed, stream = 2 * 128 * D * 2, 2 * R * D * 2
    stages = 3 if (SMEM_LIMIT - 2048 - 2 * fixed) // stream >= 3 else 2
    return 1024 + 2 * fixed + stages * stream + 1024


def _unpack(frag, n):
    """16-bit values of register fragments back to fp32 (today's dS^T from P^T's fragments)."""
    return [Node("IMAD.U32", (f"pv{i}",), (f"{frag}{i // 8}.{(i % 8) // 2}",)) for i in range(n)]


def _hoisted(nodes):
    """(loads, the rest): loads a compiler hoists above the wgmma issue (independent of it)."""
    loads = [x for x in nodes if x.op.startswith(("LDG", "LDS"))]
    return loads, [x for x in nodes if x not in loads]


def _guards(n, tag, select):
    """Per-score validity (key < count, query < Nq): a compare per column pair, and a select
    per score (or, select=False, predicated instructions: no extra)."""
    out = [Node("ISETP", (f"{tag}.ok{i // 2}",), (f"{tag}.col",)) for i in range(0, n, 2)]
    if select:
        out += [Node("FSEL", (f"{tag}.g{i}",), (f"{tag}.p{i}", f"{tag}.ok{i // 2}")) for i in range(n)]
    return out


def attn_dkdv_today(D, dtype, *, stat="ldg", design="today", note=None):
    """csrc/hopper/attn_bwd_mainloop.cuh dkdv_tiles, per R-query stream tile (R = 64, 32 at
    D >= 96), each warpgroup 64 keys: wait Q -> S^T = K Q^T (SS, n=R) -> wait<0> -> P^T =
    ex2(s scale - lse[q] log2 e) (lse: a guarded global load per score, hoisted above the wgmma
    issue) -> 16-bit fragments -> wait dO -> {dV += P^T dO (RS), dP^T = V dO^T (SS)} one group ->
    wait<0> -> dS^T = P^T (dP^T - delta[q]) from P^T's 16-bit fragments (delta: a global load per
    score, after the wait) -> dK += dS^T Q (RS) -> wait<0> -> release the stage."""
    R = stream_rows(D)
    n = R // 2
    dk, dv = _chunks("dK", D), _chunks("dV", D)

    def loop(wg):
        loads, p_nodes = _hoisted(probs("S", n, stat=stat, state="pt"))
        p_nodes += [Node("FMUL", (f"pt.ls{i}",), (f"pt.st{i}",)) for i in range(n)]
        p_nodes += _guards(n, "pt", select=False) + convert(lambda j: f"pt.p{j}", n, "PT")
        ds_nodes = _unpack("PT", n) + dsoftmax(lambda i: f"pv{i}", "DP", n, stat=stat, state="ds")
        ds_nodes += convert(lambda j: f"ds.ds{j}", n, "DS")
        guard = {"LOP3": 3 * n, "P2R": n, "IADD3": n, "VIADD": n} if stat == "ldg" else {"LOP3": n}
        return [Alu("addresses", tuple(overhead({"LEA": 12, "LOP3": 9, "ISETP": 6, "LDC": 4, "IADD3": 4,
                                                 "UIADD3": 7}, "o0"))),
                MbarWait("q_full"), Alu("lse loads", tuple(loads + overhead(guard, "o1"))),
                ss_gemm("S^T = K Q^T", "S", R, D, desc=TODAY_SS), WgmmaWait(0), Alu("P^T", tuple(p_nodes)),
                MbarWait("do_full"),
                Gemm("dV += P^T dO, dP^T = V dO^T", rs_gemm("", dv, "PT", R).instrs + ss_gemm("", "DP", R, D).instrs,
                     TODAY_SS),
                WgmmaWait(0), Alu("dS^T", tuple(ds_nodes + overhead({"IMAD": n, "IADD3": n // 2}, "o2"))),
                rs_gemm("dK += dS^T Q", dk, "DS", R, desc=TODAY_RS), Alu("stage", tuple(overhead({"UIADD3": 7}, "o3"))),
                WgmmaWait(0), Arrive("stage_empty"), Alu("loop", tuple(overhead({"LOP3": 3}, "o4")))]
    flops = 2 * 64 * 2 * R * D * 4           # 4 matmuls of 128 keys x R queries x D
    return Schedule("attn_dkdv", design, f"d{D}-{dtype}", 2, loop, useful_flops=flops,
                    l2_bytes=2 * R * D * 2, smem_bytes=_bwd_smem(D), regs=224, reg_limit=224,
                    note=note or f"{R}-query stream tiles, wait<0> after each of 3 groups, lse/delta by global loads",
                    sass=_sass_ref("attn_dkdv", dtype, D),
                    extra=dict(pairs=128 * R))


def attn_dq_today(D, dtype, *, design="today", note=None):
    """csrc/hopper/attn_bwd_mainloop.cuh dq_tiles, per R-key stream tile, each warpgroup 64
    queries: wait K -> S = Q K^T (SS, n=R) committed -> wait V -> dP = dO V^T (SS) committed ->
    wait<0> -> P = ex2(s scale - lse) (lse, delta per row in registers; masked keys by
    predicate), dS = P (dP - delta) -> 16-bit fragments -> dQ += dS K (RS) -> wait<0> -> release
    the stage."""
    R = stream_rows(D)
    n = R // 2
    dq = _chunks("dQ", D)

    def loop(wg):
        nodes = probs("S", n, stat="reg", state="pr") + _guards(n, "pr", select=False)
        nodes += dsoftmax(lambda i: f"pr.p{i}", "DP", n, stat="reg", state="ds")
        nodes += convert(lambda j: f"ds.ds{j}", n, "DS")
        nodes += overhead({"LDC": 9, "CS2R": 5, "LOP3": 4, "IMAD": 4, "UMOV": 3})
        return [Alu("loop counters", tuple(overhead({"UIADD3": 9, "LOP3": 3}, "o0"))),
                MbarWait("k_full"), ss_gemm("S = Q K^T", "S", R, D, desc=TODAY_SS), MbarWait("v_full"),
                ss_gemm("dP = dO V^T", "DP", R, D, desc=TODAY_SS),
                Alu("parameters", tuple(overhead({"LDC": 7, "ISETP": 5}, "o1"))), WgmmaWait(0),
                Alu("P, dS", tuple(nodes)), rs_gemm("dQ += dS K", dq, "DS", R, desc=TODAY_RS),
                Alu("stage", tuple(overhead({"UIADD3": 4}, "o2"))), WgmmaWait(0), Arrive("stage_empty"),
                Alu("loop", tuple(overhead({"LOP3": 2}, "o3")))]
    flops = 2 * 64 * 2 * R * D * 3           # 3 matmuls of 128 queries x R keys x D
    return Schedule("attn_dq", design, f"d{D}-{dtype}", 2, loop, useful_flops=flops,
                    l2_bytes=2 * R * D * 2, smem_bytes=_bwd_smem(D), regs=224, reg_limit=224,
                    note=note or f"{R}-key stream tiles, S and dP committed apart, wait<0> twice",
                    sass=_sass_ref("attn_dq", dtype, D),
                    extra=dict(pairs=128 * R))


def attn_dkdv_pipelined(D, R, *, fp32_p, stat="lds", design="cand:dkdv-pipelined"):
    """Candidate dK/dV: the statistics staged in shared memory by the producer (one LDS.64 per
    column pair instead of a global load per score), S^T and dP^T issued together, P^T computed
    under dP^T (wait<1>), dV issued before dS^T is formed, dK last; the stage is released after
    wait<0>. fp32_p: dS^T formed from fp32 P^T (FlashAttention's rounding; the issue's item),
    else from P^T's 16-bit fragments (today's)."""
    n = R // 2
    dk, dv = _chunks("dK", D), _chunks("dV", D)

    def loop(wg):
        loads, p_nodes = _hoisted(probs("S", n, stat=stat, state="pt"))
        p_of = (lambda i: f"pt.p{i}") if fp32_p else (lambda i: f"pv{i}")
        ds_loads, ds_nodes = _hoisted(dsoftmax(p_of, "DP", n, stat=stat, state="ds"))
        if not fp32_p:
            ds_nodes = _unpack("PT", n) + ds_nodes
        return [MbarWait("q_full"), Alu("statistics", tuple(loads + ds_loads)), ss_gemm("S^T = K Q^T", "S", R, D),
                MbarWait("do_full"),
                ss_gemm("dP^T = V dO^T", "DP", R, D), WgmmaWait(1),
                Alu("P^T", tuple(p_nodes + convert(lambda j: f"pt.p{j}", n, "PT") + overhead(LEAN_OVERHEAD, "o1"))),
                rs_gemm("dV += P^T dO", dv, "PT", R), WgmmaWait(1),
                Alu("dS^T", tuple(ds_nodes + convert(lambda j: f"ds.ds{j}", n, "DS"))),
                rs_gemm("dK += dS^T Q", dk, "DS", R), WgmmaWait(0), Arrive("stage_empty")]
    # Registers at the peak (forming dS^T): dK and dV (64 x D fp32 each per warpgroup: D / 2
    # each), P^T's 16-bit fragments (n / 2) and, fp32_p, P^T itself (n), dP^T (n), dS^T's
    # fragments (n / 2), ~40 for addresses and state.
    est = D + n // 2 + (n if fp32_p else 0) + n + n // 2 + 40
    fixed, stream = 2 * 128 * D * 2, 2 * R * D * 2
    smem = 1024 + 2 * fixed + 2 * stream + 1024
    return Schedule("attn_dkdv", design, f"d{D}-16bit", 2, loop, useful_flops=2 * 64 * 2 * R * D * 4,
                    l2_bytes=2 * R * D * 2, smem_bytes=smem, regs=est, reg_limit=240,
                    note=f"{R}-query streams, stats in smem, S^T/dP^T together, wait<1> pipelining, dS^T from "
                         f"{'fp32' if fp32_p else '16-bit'} P^T",
                    extra=dict(pairs=128 * R))


def attn_dq_pipelined(D, R, *, design="cand:dq-pipelined"):
    """Candidate dQ: S and dP issued together, P formed under dP (wait<1>), statistics in
    registers, dQ += dS K, the stage released after wait<0>."""
    n = R // 2
    dq = _chunks("dQ", D)

    def loop(wg):
        nodes_p = probs("S", n, stat="reg", state="pr") + overhead(LEAN_OVERHEAD, "o1")
        nodes_ds = dsoftmax(lambda i: f"pr.p{i}", "DP", n, stat="reg", state="ds")
        nodes_ds += convert(lambda j: f"ds.ds{j}", n, "DS")
        return [MbarWait("k_full"), ss_gemm("S = Q K^T", "S", R, D), MbarWait("v_full"),
                ss_gemm("dP = dO V^T", "DP", R, D), WgmmaWait(1), Alu("P", tuple(nodes_p)), WgmmaWait(0),
                Alu("dS", tuple(nodes_ds)), rs_gemm("dQ += dS K", dq, "DS", R), WgmmaWait(0), Arrive("stage_empty")]
    est = D // 2 + 2 * n + n // 2 + 40        # dQ, P and dP (fp32), dS fragments, addresses
    fixed, stream = 2 * 128 * D * 2, 2 * R * D * 2
    return Schedule("attn_dq", design, f"d{D}-16bit", 2, loop, useful_flops=2 * 64 * 2 * R * D * 3,
                    l2_bytes=2 * R * D * 2, smem_bytes=1024 + 2 * fixed + 2 * stream + 1024, regs=est,
                    reg_limit=240, note=f"{R}-key streams, S/dP together, wait<1> pipelining",
                    extra=dict(pairs=128 * R))


def attn_bwd_fa3(D=128, BM=80, *, design="fa3-bwd", note=None):
    """FlashAttention-3's backward at hdim 128 (hopper/mainloop_bwd_sm90_tma_gmma_ws.hpp, non-causal
    config: 80 queries x 128 keys, 2 consumer warpgroups of 64 keys, S^T / dP^T swapped so P^T
    and dS^T are register A operands): one kernel, 5 matmuls per pair; dQ accumulated in fp32 by
    TMA reduce-add (not deterministic). Per BM-query tile, each warpgroup: S^T = K Q^T, dP^T = V
    dO^T (SS, n=BM) -> wait<1> -> P^T = ex2(s scale - lse) (lse from shared memory) -> wait<0>
    -> dS^T = P^T (dP^T - dPsum), P^T and dS^T to 16-bit, dS^T to shared memory -> both
    warpgroups sync -> dV += P^T dO (RS) -> sync -> dQ = dS K (SS, n=BM) -> wait<1> -> dK +=
    dS^T Q (RS) -> wait<1> -> dQ to shared memory for the reduce-add."""
    n = BM // 2
    dkv = _one_chunk("dV", D), _one_chunk("dK", D)

    def loop(wg):
        lse, p_nodes = _hoisted(probs("S", n, stat="lds", state="pt"))
        dps, ds_nodes = _hoisted(dsoftmax(lambda i: f"pt.p{i}", "DP", n, stat="lds", state="ds"))
        conv = convert(lambda j: f"pt.p{j}", n, "PT") + convert(lambda j: f"ds.ds{j}", n, "DS")
        sts_ds = [Node("STS.128", (), (f"DS{j // 8}.{(j % 8) // 2}",), 16) for j in range(0, n, 8)]
        sts_dq = [Node("STS.128", (), tuple(f"dQ.{4 * j + e}" for e in range(4)), 16) for j in range(n // 4)]
        return [MbarWait("q_full"), ss_gemm("S^T = K Q^T", "S", BM, D), Alu("lse", tuple(lse)),
                MbarWait("do_full"), ss_gemm("dP^T = V dO^T", "DP", BM, D), Alu("dPsum", tuple(dps)),
                WgmmaWait(1), Alu("P^T", tuple(p_nodes + overhead(LEAN_OVERHEAD, "o1"))), WgmmaWait(0),
                Alu("dS^T", tuple(ds_nodes + conv + sts_ds)), BarSync(3, 256),
                rs_gemm("dV += P^T dO", dkv[0], "PT", BM), BarSync(3, 256),
                ss_gemm("dQ = dS K", "dQ", BM, 128), WgmmaWait(1), Arrive("do_empty"),
                rs_gemm("dK += dS^T Q", dkv[1], "DS", BM), WgmmaWait(1), Alu("dQ to smem", tuple(sts_dq)),
                Arrive("q_empty")]
    smem = 2 * 2 * BM * D * 2 + 2 * 128 * D * 2 + BM * 128 * 2 + BM * D * 4 + 2048
    return Schedule("attn_bwd", design, f"d{D}-16bit", 2, loop, useful_flops=5 * 2 * BM * 128 * D,
                    l2_bytes=2 * BM * D * 2 + BM * D * 4, smem_bytes=smem, regs=240, reg_limit=240,
                    note=note or f"FA3's backward: {BM}x128 tiles, one kernel, 5 matmuls, dQ by fp32 reduce-add "
                                 "(not deterministic), 24/240 registers (FA3's own split)",
                    extra=dict(pairs=BM * 128))


FA3_BWD_PUBLISHED = 560.0    # FA3 paper, backward hdim 128 (up to; H100 SXM5)


# ------------------------------------------------------------------------------------------
# The pipelined sm_90a attention kernels (csrc/hopper/attn_pipelined_*.cuh; design 0 of
# csrc/attention_sm90.cu, the default; "today" above is design 1, the baseline)
# ------------------------------------------------------------------------------------------
def _pipelined_ref(kernel, dtype, D):
    if dtype not in DTYPES:
        return None
    return ("csrc/attention_sm90.cu", rf"{kernel}_pipelined_sm90_kernelI{len(DTYPES[dtype])}{DTYPES[dtype]}Li{D}E")


def _fwd_plan_smem(D):
    fixed = 1024 + 3 * BM * D * 2 + 1024            # alignment slack, two Q tiles, the O tile, barriers
    stages = min(4, (SMEM_LIMIT - fixed) // (2 * 128 * D * 2))
    return fixed + stages * 2 * 128 * D * 2


def attn_fwd_pipelined(D, dtype):
    """csrc/hopper/attn_pipelined_fwd.cuh FwdConsumer::step, the loop over an item's 128-key tiles after
    its first, warpgroup cw: wait K_t -> bar.sync (its turn) -> S_t = Q K_t^T (D/16 x m64n128k16, SS)
    -> O *= alpha (FMUL per O value) -> wait V_{t-1} -> O += P_{t-1} V_{t-1} (8 k steps x one RS wgmma per
    head-dim chunk) -> bar.arrive (the other's turn) -> wait<1> -> release K_t (and, predicated, Q on
    the item's last tile) -> online softmax of S_t under the P V (FFMA s scale - m scale per score) ->
    wait<0> -> release V_{t-1} -> P_t to 16-bit. The loop serves the last full tile too, so its masking
    (ISETP + FSEL per column pair / score) sits in it behind a uniform branch taken on that tile only;
    the model runs the SASS loop straight and counts it (a pessimistic reading). Turns: warpgroup 0
    syncs on barrier 1 and hands over on 2, warpgroup 1 the reverse; warpgroup 0 starts with a turn."""
    chunks = _chunks("O", D)
    bars = (1, 2)

    def loop(wg):
        own, other = bars[wg], bars[1 - wg]
        sm = softmax("S", 64, scale_first=False, masked=True) + overhead(LEAN_OVERHEAD, "o1")
        return [MbarWait("k_full"), BarSync(own), ss_gemm("S = Q K^T", "S", 128, D),
                Alu("O rescale", tuple(rescale(chunks, "sm.alpha"))), MbarWait("v_full"),
                rs_gemm("O += P V", chunks, "P", 128), BarArrive(other), WgmmaWait(1), Arrive("k_empty"),
                Arrive("q_empty (last tile)"), Alu("softmax", tuple(sm)), WgmmaWait(0), Arrive("v_empty"),
                Alu("P", tuple(convert(lambda j: f"sm.p{j}", 64, "P")))]

    def start(wg):
        return [BarArrive(bars[0])] if wg == 0 else []
    return Schedule("attn_fwd", "pipelined", f"d{D}-{dtype}", 2, loop, useful_flops=4 * BM * 128 * D,
                    l2_bytes=2 * 128 * D * 2, smem_bytes=_fwd_plan_smem(D), regs=224, reg_limit=224, start=start,
                    note="128x128 tiles, S_next and P V in flight (wait<1>), ping-pong turns, K and V released apart, "
                         "56/224 registers",
                    sass=_pipelined_ref("attn_fwd", dtype, D))


def _bwd_plan_smem(D):
    fixed = 1024 + 2 * 2 * 128 * D * 2 + 512 + 4 * 512
    stages = min(4, (SMEM_LIMIT - fixed) // (2 * 64 * D * 2))
    return fixed + stages * 2 * 64 * D * 2


def attn_dkdv_pipelined_kernel(D, dtype):
    """csrc/hopper/attn_pipelined_bwd.cuh DkdvConsumer::tile, per 64-query stream tile, each warpgroup
    64 keys: wait Q -> S^T = K Q^T (SS, n64) -> wait dO -> dP^T = V dO^T (SS, n64) -> wait the tile's
    statistics (staged in shared memory by the producer) -> wait<1> -> P^T = ex2(s scale - lse log2 e)
    (an LDS.64 per column pair) -> 16-bit -> dV += P^T dO (RS) -> wait<1> -> dS^T = P^T (dP^T - delta)
    from fp32 P^T (LDS.64 per pair) -> 16-bit -> dK += dS^T Q (RS) -> wait<0> -> release the stage."""
    R, n = 64, 32
    dk, dv = _chunks("dK", D), _chunks("dV", D)

    def loop(wg):
        loads, p_nodes = _hoisted(probs("S", n, stat="lds", state="pt"))
        ds_loads, ds_nodes = _hoisted(dsoftmax(lambda i: f"pt.p{i}", "DP", n, stat="lds", state="ds"))
        return [MbarWait("q_full"), ss_gemm("S^T = K Q^T", "S", R, D), MbarWait("do_full"),
                ss_gemm("dP^T = V dO^T", "DP", R, D), MbarWait("stat_full"), WgmmaWait(1),
                Alu("P^T", tuple(loads + p_nodes + convert(lambda j: f"pt.p{j}", n, "PT")
                                 + overhead(LEAN_OVERHEAD, "o1"))),
                rs_gemm("dV += P^T dO", dv, "PT", R), WgmmaWait(1),
                Alu("dS^T", tuple(ds_loads + ds_nodes + convert(lambda j: f"ds.ds{j}", n, "DS"))),
                rs_gemm("dK += dS^T Q", dk, "DS", R), WgmmaWait(0), Arrive("stage_empty")]
    return Schedule("attn_dkdv", "pipelined", f"d{D}-{dtype}", 2, loop, useful_flops=2 * 64 * 2 * R * D * 4,
                    l2_bytes=2 * R * D * 2 + 2 * R * 4, smem_bytes=_bwd_plan_smem(D), regs=232, reg_limit=232,
                    note="64-query streams, statistics in shared memory, S^T / dP^T together, wait<1> twice, dS^T from "
                         "fp32 P^T, 40/232 registers",
                    sass=_pipelined_ref("attn_dkdv", dtype, D), extra=dict(pairs=128 * R))


def attn_dq_pipelined_kernel(D, dtype):
    """csrc/hopper/attn_pipelined_bwd.cuh DqConsumer::tile, per 64-key stream tile (the last, masked,
    outside the loop), each warpgroup 64 queries: wait K -> S = Q K^T (SS, n64) -> wait V -> dP = dO V^T
    (SS, n64) -> wait<1> -> P = ex2(s scale - lse log2 e) (statistics in registers) -> wait<0> -> dS =
    P (dP - delta) -> 16-bit -> dQ += dS K (RS) -> wait<0> -> release the stage."""
    R, n = 64, 32
    dq = _chunks("dQ", D)

    def loop(wg):
        nodes_p = probs("S", n, stat="reg", state="pr") + overhead(LEAN_OVERHEAD, "o1")
        nodes_ds = dsoftmax(lambda i: f"pr.p{i}", "DP", n, stat="reg", state="ds")
        nodes_ds += convert(lambda j: f"ds.ds{j}", n, "DS")
        return [MbarWait("k_full"), ss_gemm("S = Q K^T", "S", R, D), MbarWait("v_full"),
                ss_gemm("dP = dO V^T", "DP", R, D), WgmmaWait(1), Alu("P", tuple(nodes_p)), WgmmaWait(0),
                Alu("dS", tuple(nodes_ds)), rs_gemm("dQ += dS K", dq, "DS", R), WgmmaWait(0), Arrive("stage_empty")]
    return Schedule("attn_dq", "pipelined", f"d{D}-{dtype}", 2, loop, useful_flops=2 * 64 * 2 * R * D * 3,
                    l2_bytes=2 * R * D * 2, smem_bytes=_bwd_plan_smem(D), regs=224, reg_limit=224,
                    note="64-key streams, S / dP together, wait<1> pipelining, statistics in registers, "
                         "56/224 registers",
                    sass=_pipelined_ref("attn_dq", dtype, D), extra=dict(pairs=128 * R))


# ------------------------------------------------------------------------------------------
# The denoise GEMM
# ------------------------------------------------------------------------------------------
EPILOGUES = {
    # name: store_tile arguments (per accumulator value / pair)
    "bias": dict(fma_per_value=1, mufu_per_value=0, loads_per_pair=0.5, stores_per_pair=1),
    "silu": dict(fma_per_value=2, mufu_per_value=2, loads_per_pair=0.5, stores_per_pair=2),
    "store": dict(fma_per_value=0, mufu_per_value=0, loads_per_pair=0, stores_per_pair=1),
}


def gemm_today(K, dtype, epilogue="bias"):
    """csrc/hopper/gemm_consumer.cuh + gemm_epilogue.cuh: 128x128x64 tiles, both consumer
    warpgroups on the same unit (64 rows each), per k tile: wait full -> 4 x m64n128k16 (SS) ->
    wait<1> (one group in flight) -> release the previous stage; per unit: zero the
    accumulators, K/64 k tiles, wait<0>, the register epilogue (bias, the fused op, 4-byte
    stores) during which neither warpgroup issues a wgmma."""
    acc = [("C", 128)]

    def loop(wg):
        return [Alu("stage", tuple(overhead({"IMAD": 3, "LOP3": 2, "UIADD3": 4}, "o0"))), MbarWait("full"),
                ss_gemm("C += A B", "C", 128, 64, desc=(7, 7)), WgmmaWait(1), Arrive("empty"),
                Alu("loop", tuple(overhead({"IMAD": 1, "ISETP": 2}, "o1")))]

    def pre(wg):
        return [Alu("zero", tuple(zero(acc)))]

    def post(wg):
        return [WgmmaWait(0), Arrive("empty"), Alu("epilogue", tuple(store_tile(acc, **EPILOGUES[epilogue])))]
    tag = "" if epilogue == "bias" else f"-{epilogue}"
    return Schedule("gemm", "today", f"k{K}-{dtype}{tag}", 2, loop, useful_flops=2 * 128 * 128 * K,
                    l2_bytes=(128 + 128) * K * 2, smem_bytes=1024 + 6 * 2 * 128 * 64 * 2 + 1024, regs=232,
                    reg_limit=232, pre=pre, post=post, reps=K // 64,
                    note="128x128x64, 6 stages, both warpgroups on one unit, register epilogue not overlapped",
                    sass=("csrc/denoise_sm90.cu", rf"gemm_sm90_kernelI{len(DTYPES[dtype])}{DTYPES[dtype]}Lb1ELb1E"))


def stage_tile(n, *, out_bytes=2, mufu_per_value=0, fma_per_value=1, loads_per_pair=0.5, stores_per_pair=1,
               acc="C"):
    """The TMA-store epilogue of a 64 x n accumulator tile (csrc/hopper/gemm_wide_epilogue.cuh), one
    thread's share: per value the fused op (as store_tile), per pair one F2FP (16-bit outputs),
    one ISETP (the bounds the fused ops' loads need), `stores_per_pair` 4- or 8-byte shared stores
    at swizzled offsets fixed per thread, the bias / aux loads; per 128-byte chunk of the rows (64
    16-bit or 32 fp32 columns) two bar.sync of the warpgroup alone (issue cost: its warps arrive
    together; written WARPSYNC here, since a BAR element would order the warpgroups), a
    fence.proxy.async, and the store thread's TMA store."""
    nodes = []
    pairs_per_chunk = 128 // out_bytes // 8 * 2
    for i in range(0, n // 2, 2):
        vals = [fused_value(nodes, acc, j, fma_per_value, mufu_per_value) for j in (i, i + 1)]
        if loads_per_pair and (i // 2) % max(1, round(1 / loads_per_pair)) == 0:
            nodes.append(Node("LDG.E", (f"ep.b{i % 16}",), ("ep.ptr",)))
        nodes.append(Node("ISETP", (f"ep.ok{i}",), ("ep.row",)))
        if out_bytes == 2:
            nodes.append(Node("F2FP.BF16.F32.PACK_AB", (f"ep.pk{acc}{i}",), tuple(vals)))
            vals = [f"ep.pk{acc}{i}"]
        for st in range(stores_per_pair):
            nodes.append(Node("STS" if out_bytes == 2 else "STS.64", (), tuple(vals) + (f"ep.ok{i}",), out_bytes * 2))
        if (i // 2 + 1) % pairs_per_chunk == 0:
            chunk = i // 2 // pairs_per_chunk
            nodes += [Node("WARPSYNC", (f"ep.free{chunk}",), ()), Node("FENCE.VIEW.ASYNC.S", (), ()),
                      Node("WARPSYNC", (f"ep.full{chunk}",), ()), Node("UTMASTG", (), (f"ep.full{chunk}",))]
    return nodes


# The 128x256 kernel's epilogues: (out_bytes, stage_tile arguments) per variant tag.
WIDE_EPILOGUES = {
    "bias": dict(out_bytes=2, fma_per_value=1, mufu_per_value=0, loads_per_pair=0.5, stores_per_pair=1),
    "silu": dict(out_bytes=2, fma_per_value=2, mufu_per_value=2, loads_per_pair=0.5, stores_per_pair=2),
}


def gemm_wide(K, dtype, epilogue="bias"):
    """csrc/hopper/gemm_wide_*.cuh: 128x256x64 tiles in clusters of 2 CTAs (B multicast, so each
    CTA reads A [128 x K] and half of B [256 x K] from L2), both consumer warpgroups on one unit
    (64 rows each, m64n256k16), per k tile: wait full -> 4 x m64n256k16 (SS) -> wait<1> ->
    release the previous stage in both CTAs (a local and a remote arrive); per unit: zero the
    accumulators, K/64 k tiles, wait<0>, the TMA-store epilogue (stage_tile), during which
    neither warpgroup issues a wgmma (the producer runs ahead into the next unit)."""
    acc = [("C", 256)]

    def loop(wg):
        return [Alu("stage", tuple(overhead({"ULEA": 1, "UIADD3": 3, "ULOP3": 1, "SHF": 1}, "o0"))),
                MbarWait("full"), ss_gemm("C += A B", "C", 256, 64, desc=(6, 7)), WgmmaWait(1),
                Arrive("empty"), Arrive("empty (peer CTA)"),
                Alu("loop", tuple(overhead({"UIADD3": 2, "USEL": 2, "UISETP": 2, "LOP3": 1, "PLOP3": 1}, "o1")))]

    def pre(wg):
        return [Alu("zero", tuple(zero(acc)))]

    def post(wg):
        return [WgmmaWait(0), Arrive("empty"), Arrive("empty (peer CTA)"),
                Alu("epilogue", tuple(stage_tile(256, **WIDE_EPILOGUES[epilogue])))]
    tag = "" if epilogue == "bias" else f"-{epilogue}"
    stage = (128 + 256) * 64 * 2
    return Schedule("gemm", "128x256-cluster2", f"k{K}-{dtype}{tag}", 2, loop, useful_flops=2 * 128 * 256 * K,
                    l2_bytes=(128 + 256 / 2) * K * 2, smem_bytes=1024 + 4 * stage + 4 * 8192 + 256, regs=232,
                    reg_limit=232, pre=pre, post=post, reps=K // 64,
                    note="128x256x64, 4 stages, clusters of 2 multicasting B, TMA-store epilogue (not overlapped)",
                    sass=("csrc/denoise_sm90.cu",
                          rf"gemm_sm90_wide_kernelI{len(DTYPES[dtype])}{DTYPES[dtype]}Lb1ELb1E"))


def gemm_cooperative(K, BN, epilogue="bias", design=None, multicast=False):
    """Candidate: 128 x BN x 64 tiles, both warpgroups on one unit (m64nBN each); multicast: a
    2-CTA cluster shares each B tile (TMA multicast), halving its L2 reads."""
    acc = [("C", BN)]

    def loop(wg):
        return [MbarWait("full"), ss_gemm("C += A B", "C", BN, 64), WgmmaWait(1), Arrive("empty")]

    def pre(wg):
        return [Alu("zero", tuple(zero(acc)))]

    def post(wg):
        return [WgmmaWait(0), Arrive("empty"), Alu("epilogue", tuple(store_tile(acc, **EPILOGUES[epilogue])))]
    stage = (128 + BN) * 64 * 2
    stages = min(8, (SMEM_LIMIT - 2048) // stage)
    tag = "" if epilogue == "bias" else f"-{epilogue}"
    name = design or f"cand:128x{BN}-coop{'-cluster2' if multicast else ''}"
    return Schedule("gemm", name, f"k{K}-16bit{tag}", 2, loop,
                    useful_flops=2 * 128 * BN * K, l2_bytes=(128 + BN / (2 if multicast else 1)) * K * 2,
                    smem_bytes=1024 + stages * stage + 1024, regs=BN // 2 + 40, reg_limit=240, pre=pre, post=post,
                    reps=K // 64, note=f"128x{BN}x64, {stages} stages, cooperative, epilogue not overlapped")


def gemm_pingpong(K, epilogue="bias"):
    """Candidate: ping-pong consumers (CUTLASS's KernelTmaWarpSpecializedPingpong): each
    warpgroup owns a whole 128x128 unit (2 x m64n128 per k step); their mainloops take turns on
    named barriers (1, 2) and each one's epilogue runs under the other's mainloop."""
    acc = [("C0", 128), ("C1", 128)]
    bars = (1, 2)

    def loop(wg):
        g = ss_gemm("C0 += A0 B", "C0", 128, 64).instrs + ss_gemm("C1 += A1 B", "C1", 128, 64).instrs
        return [MbarWait("full"), Gemm("C += A B", g), WgmmaWait(1), Arrive("empty")]

    def pre(wg):
        return [Alu("zero", tuple(zero(acc))), BarSync(bars[wg])]

    def post(wg):
        return [BarArrive(bars[1 - wg]), WgmmaWait(0), Arrive("empty"),
                Alu("epilogue", tuple(store_tile(acc, **EPILOGUES[epilogue])))]

    def start(wg):
        return [BarArrive(bars[0])] if wg == 0 else []
    stage = (128 + 128) * 64 * 2
    tag = "" if epilogue == "bias" else f"-{epilogue}"
    return Schedule("gemm", "cand:128x128-pingpong", f"k{K}-16bit{tag}", 2, loop,
                    useful_flops=2 * 2 * 128 * 128 * K, l2_bytes=2 * (128 + 128) * K * 2,
                    smem_bytes=1024 + 6 * stage + 1024, regs=128 + 40, reg_limit=240, pre=pre, post=post,
                    reps=K // 64, start=start,
                    note="each warpgroup a 128x128 unit, mainloops in turn, epilogue under the other's mainloop")


# ------------------------------------------------------------------------------------------
# The sets perf_model.py runs
# ------------------------------------------------------------------------------------------
HEAD_DIMS = (64, 80, 96, 128)
GEMM_K = (1024, 1536)


def today():
    """The kernels that exist (checked against their SASS): the baseline attention kernels ("today"),
    the pipelined ones, the GEMM."""
    out = []
    for dtype in ("bf16", "fp16"):
        for D in HEAD_DIMS:
            out += [attn_fwd_today(D, dtype), attn_dq_today(D, dtype), attn_dkdv_today(D, dtype)]
            out += [attn_fwd_pipelined(D, dtype), attn_dq_pipelined_kernel(D, dtype),
                    attn_dkdv_pipelined_kernel(D, dtype)]
        for K in GEMM_K:
            out.append(gemm_today(K, dtype))
        out.append(gemm_today(1536, dtype, "silu"))
        for K in GEMM_K:
            out.append(gemm_wide(K, dtype))
        out.append(gemm_wide(1536, dtype, "silu"))
    return out


def calibration():
    """FlashAttention-3's forward at hdim 128 (128x176 tiles), with and without the
    intra-warpgroup softmax/GEMM overlap: its paper's ablation (661 and 582 TFLOP/s, H100 SXM5)."""
    return [attn_fwd_fa3(128, 176, overlap=True, pingpong=True),
            attn_fwd_fa3(128, 176, overlap=False, pingpong=True, design="fa3-no-overlap"),
            attn_bwd_fa3()]


FA3_PUBLISHED = {"fa3": 661.0, "fa3-no-overlap": 582.0}
# This workplace's bf16 matmul (torch / cuBLAS, large square shapes; docs/design.md, the cost model):
MATMUL_MEASURED = {"H100": 798.0, "H200": 790.0}


def gemm_reference():
    """The GEMM calibration point: a cuBLAS-class kernel (128x256x64 tiles, cooperative
    consumers, plain store epilogue) at K = 8192, against this workplace's measured bf16 matmul
    rate. Which kernel cuBLAS picks is not known here: this is the closest design modelled."""
    return gemm_cooperative(8192, 256, "store", design="cublas-class")


def candidates():
    D = 128
    fwd = [
        attn_fwd_fa3(D, 128, overlap=False, pingpong=True, masked=True, scale_first=True, ovh=TODAY_SOFTMAX_OVERHEAD,
                     design="cand:pingpong", variant="d128-16bit",
                     note="today's loop + ping-pong barriers (turn passes after S), 128x128, today's softmax"),
        attn_fwd_fa3(D, 128, overlap=True, pingpong=False, masked=True, scale_first=True, ovh=TODAY_SOFTMAX_OVERHEAD,
                     design="cand:overlap", variant="d128-16bit",
                     note="today's softmax + intra-warpgroup overlap (S_next, PV_prev, wait<1>), no ping-pong"),
        attn_fwd_fa3(D, 128, overlap=True, pingpong=True, masked=True, scale_first=True, ovh=TODAY_SOFTMAX_OVERHEAD,
                     design="cand:fa3-128x128-todaysoftmax", variant="d128-16bit",
                     note="FA3's schedule at 128x128 with today's softmax code (masked, FMUL+FADD)"),
        attn_fwd_fa3(D, 128, overlap=True, pingpong=True, design="cand:fa3-128x128", variant="d128-16bit",
                     note="FA3's schedule at 128x128, FFMA softmax, mask only on the last tile"),
        attn_fwd_fa3(D, 176, overlap=True, pingpong=True, design="cand:fa3-128x176", variant="d128-16bit",
                     note="FA3's schedule and tile (= the calibration point's design)"),
    ]
    bwd = [
        attn_dkdv_today(D, "16bit", stat="lds", design="cand:dkdv-lds",
                        note="today's dK/dV schedule with lse/delta staged in shared memory"),
        attn_dkdv_pipelined(D, 32, fp32_p=True),
        attn_dkdv_pipelined(D, 64, fp32_p=False, design="cand:dkdv-pipelined-64"),
        attn_dkdv_pipelined(D, 64, fp32_p=True, design="cand:dkdv-pipelined-64-fp32p"),
        attn_dq_pipelined(D, 32),
        attn_dq_pipelined(D, 64, design="cand:dq-pipelined-64"),
    ]
    for d in (64, 80, 96):
        fwd.append(attn_fwd_fa3(d, 128, overlap=True, pingpong=True, design="cand:fa3-128x128", variant=f"d{d}-16bit",
                                chunks=_chunks("O", d),
                                note="FA3's schedule at 128x128, today's head-dim chunks, mask only on the last tile"))
    gemm = [gemm_cooperative(1536, 256), gemm_cooperative(1536, 256, multicast=True), gemm_pingpong(1536),
            gemm_cooperative(1536, 256, "silu"), gemm_pingpong(1536, "silu")]
    return fwd + bwd + gemm
