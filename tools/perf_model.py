#!/usr/bin/env python
"""Static cost model of the sm_90a kernels: modelled tensor-busy fraction and TFLOP/s, without a GPU.

    python tools/perf_model.py [--json OUT] [--sass-dir DIR] [--only REGEX] [--no-declared]

For each hot sm_90a kernel (attention forward, dQ, dK/dV at head dims 64/80/96/128, the denoise
GEMM) the model takes the kernel's declared schedule (tools/perf_designs.py: what each consumer
warpgroup issues, waits for and computes per main-loop iteration) and the SASS of its main loop
(nvcc + cuobjdump, tools/sass.py), checks one against the other (the wait / wgmma-group /
barrier skeleton marker by marker, the instruction counts class by class), and runs the SASS
stream through a cycle model of one SM (tools/perf_sim.py): the tensor pipe's cycles per
iteration, each SM sub-partition pipe's (MUFU, FMA, ALU, issue), shared-memory bytes, and the
cycles the tensor pipe idles (the exposed part). Hence the tensor-busy fraction and a modelled
TFLOP/s. Candidate designs for the rewrite and FlashAttention-3 are simulated from their
declarations with the same machinery. Calibration, one factor per kernel family: attention by
FA3's published forward (661 TFLOP/s, H100 SXM5, hdim 128), checked against its ablation
without the softmax/GEMM overlap (582) and its backward (~560); the GEMM by this workplace's
measured bf16 matmul (798 / 790 TFLOP/s on H100 / H200) over a modelled cuBLAS-class kernel.

Every number is modelled (a prediction): the GPU run is the judge.

Clocks: TFLOP/s are at 1830 MHz, the clock of NVIDIA's dense 16-bit figure (989.4 TFLOP/s =
132 SMs x 4096 FLOP/clk x 1830 MHz) for both H100 SXM and H200 SXM (same SM, same clocks; they
differ in HBM: 3.35 vs 4.8 TB/s, which the steady-state loops modelled here do not touch).
"calibrated" multiplies by the family's factor (clocks under load, and all the model leaves
out).

Writes (with --json OUT) a list of records
    {kernel, design, variant, arch, tensor_busy, modelled_tflops, calibrated_tflops, source, ...}
(arch: "H100" / "H200"; source: "sass" for today's kernels, "declared" for designs) and a
Markdown table at OUT with .md. Without --json it prints the table.
"""
import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_designs  # noqa: E402
from perf_schedules import check_against_sass, class_counts  # noqa: E402
from perf_sim import DATASHEET_CLOCK_MHZ, SMS, TENSOR_FLOPS_PER_CLK, Op, Warp, decode, simulate  # noqa: E402
from sass import (ROOT, compile_cubin, dump_sass, main_loop, parse_ptxas, parse_wgmma_serialized,  # noqa: E402
                  sass_listing)

ARCHS = ("H100", "H200")
LABEL = "modelled (prediction)"
TARGETS = {"attn_fwd": 0.85, "attn_bwd": 0.70, "gemm": 0.85}
ITERATIONS = {"gemm": (4, 1)}          # (iterations, warm-up) per kernel; attention: (10, 3)
FENCES = re.compile(r"^(MEMBAR|FENCE\.VIEW\.ASYNC)")


# ------------------------------------------------------------------------------------------
# SASS of today's kernels
# ------------------------------------------------------------------------------------------
def compile_sources(files, sass_dir=None):
    """{file: (listing {mangled: [Instr]}, ptxas {mangled: report}, serialized {mangled: [msg]})}.
    sass_dir: reuse / keep `<stem>.sass` and `<stem>.ptxas` there."""
    out = {}
    for f in sorted(set(files)):
        stem = Path(f).stem
        cached = Path(sass_dir) / f"{stem}.sass" if sass_dir else None
        if cached is not None and cached.is_file():
            text, log = cached.read_text(), cached.with_suffix(".ptxas").read_text()
        else:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / f"{stem}.cubin"
                log = compile_cubin(ROOT / f, 90, cubin)
                text = dump_sass(cubin)
            print(f"perf_model: compiled {f} ({time.time() - t0:.0f} s)", file=sys.stderr)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(text)
                cached.with_suffix(".ptxas").write_text(log)
        out[f] = (sass_listing(text), parse_ptxas(log), parse_wgmma_serialized(log))
    return out


def loop_ops(instrs, skip_fences):
    """The decoded main-loop body: never-executing padding dropped, and (dense TMA path) the
    proxy fences that only the gather path executes."""
    body = [i for i in main_loop(instrs) if not i.never]
    if skip_fences:
        body = [i for i in body if not FENCES.match(i.op)]
    return [decode(i) for i in body]


def find_kernel(compiled, ref):
    path, pattern = ref
    listing, ptxas, serialized = compiled[path]
    names = [n for n in listing if re.search(pattern, n)]
    if len(names) != 1:
        raise LookupError(f"{path}: {len(names)} kernels match {pattern!r}")
    name = names[0]
    return name, listing[name], ptxas.get(name, {}), serialized.get(name, [])


# ------------------------------------------------------------------------------------------
# One schedule through the simulator
# ------------------------------------------------------------------------------------------
LOCKSTEP_BAR = 15      # a named-barrier id no kernel uses (16 per CTA)


def run(schedule, body=None, staggered=False):
    """perf_sim.Result of a schedule: body = the SASS loop ops (else synthesised).

    A schedule without named barriers between its consumer warpgroups leaves their phase to
    chance: they start together on the same full barriers and nothing staggers them (with the
    pipes shared fairly, a phase offset neither grows nor shrinks in the model), so they are run
    in lock step (a barrier of both at each iteration's start).
    staggered=True instead starts the second warpgroup half an iteration late and lets both run
    free: the bound such a kernel reaches if its warpgroups happen to fall into a ping-pong."""
    its, warm = ITERATIONS.get(schedule.kernel, (10, 3))
    ordered = schedule.ordered()
    lock = [] if staggered or ordered else [
        Op("BAR.SYNC (lock step)", "bar", bar=("sync", LOCKSTEP_BAR, 128 * schedule.consumers))]
    delay = 0
    if staggered and not ordered:
        delay = int(run(schedule, body).period / 2)
    warps = [Warp(f"wg{wg}", lock + schedule.iteration(wg, body), its, prologue=schedule.startup(wg),
                  delay=delay if wg == 1 else 0) for wg in range(schedule.consumers)]
    return simulate(warps, warmup=warm)


def tflops(flops_per_iter, period, clock_mhz=DATASHEET_CLOCK_MHZ):
    return flops_per_iter / period * clock_mhz * 1e6 * SMS / 1e12


def summary(schedule, res):
    per = res.period
    return dict(
        tensor_busy=round(res.tensor_busy, 4),
        modelled_tflops=round(tflops(schedule.useful_flops, per), 1),
        cycles_per_iter=round(per, 1),
        tensor_cycles_per_iter=round(res.tensor_cycles, 1),
        exposed_cycles_per_iter=round(per - res.tensor_cycles, 1),
        pipe_cycles_per_iter={k: round(v, 1) for k, v in sorted(res.pipe_cycles.items())},
        issue_cycles_per_iter=round(res.issue_cycles, 1),
        smem_bytes_per_clk=round(res.smem_bytes / per, 1),
        l2_bytes_per_iter=schedule.l2_bytes,
        l2_tbps_needed=round(schedule.l2_bytes / per * DATASHEET_CLOCK_MHZ * 1e6 * SMS / 1e12, 2),
        stalls_per_iter={w: {k: round(v, 1) for k, v in s.items()} for w, s in res.stalls.items()},
    )


def evaluate(schedule, compiled, declared=True):
    """One record (GPU-independent part) of a schedule."""
    rec = dict(kernel=schedule.kernel, design=schedule.design, variant=schedule.variant, label=LABEL,
               note=schedule.note, useful_flops_per_iter=schedule.useful_flops, ordered=schedule.ordered(),
               feasible=dict(smem_bytes=schedule.smem_bytes, smem_ok=schedule.smem_bytes <= perf_designs.SMEM_LIMIT,
                             regs=schedule.regs, reg_limit=schedule.reg_limit,
                             regs_ok=schedule.regs <= schedule.reg_limit))
    rec.update(schedule.extra)
    body = None
    if schedule.sass and compiled is not None:
        name, instrs, rep, serialized = find_kernel(compiled, schedule.sass)
        body = loop_ops(instrs, schedule.skip_fences)
        problems, counts = check_against_sass(schedule.loop(0), body)
        rec.update(source="sass", mangled=name, ptxas_regs=rep.get("regs"), wgmma_serialized=serialized,
                   schedule_check=dict(ok=not problems, problems=problems,
                                       counts={k: dict(declared=d, sass=s) for k, (d, s) in counts.items()}))
        if declared:
            rec["from_declaration"] = summary(schedule, run(schedule))
    else:
        rec["source"] = "declared"
        rec["declared_counts"] = class_counts(schedule.iteration(0))
    rec.update(summary(schedule, run(schedule, body)))
    if not rec["ordered"] and schedule.consumers > 1 and schedule.kernel != "gemm":
        rec["tensor_busy_staggered"] = round(run(schedule, body, staggered=True).tensor_busy, 4)
    return rec


def combine_backward(dq, dkdv, design):
    """The backward as FlashAttention counts it: 5 matmuls (2.5x the forward's FLOPs) per
    (query, key) pair, in the time of both kernels (today: 7 matmuls, S and dP twice)."""
    D = int(re.match(r"d(\d+)", dq["variant"]).group(1))
    t_pair = dq["cycles_per_iter"] / dq["pairs"] + dkdv["cycles_per_iter"] / dkdv["pairs"]
    tc_pair = dq["tensor_cycles_per_iter"] / dq["pairs"] + dkdv["tensor_cycles_per_iter"] / dkdv["pairs"]
    flops_pair = 5 * 2 * D
    l2_pair = dq["l2_bytes_per_iter"] / dq["pairs"] + dkdv["l2_bytes_per_iter"] / dkdv["pairs"]
    return dict(kernel="attn_bwd", design=design, variant=dq["variant"], label=LABEL, source=dq["source"],
                l2_tbps_needed=round(l2_pair / t_pair * DATASHEET_CLOCK_MHZ * 1e6 * SMS / 1e12, 2),
                note=f"dq ({dq['design']}) + dkdv ({dkdv['design']}); its FLOPs: 5 matmuls per (query, key) pair",
                tensor_busy=round(tc_pair / t_pair, 4),
                modelled_tflops=round(flops_pair / t_pair * DATASHEET_CLOCK_MHZ * 1e6 * SMS / 1e12, 1),
                useful_busy=round(flops_pair / (t_pair * TENSOR_FLOPS_PER_CLK[2]), 4),
                cycles_per_pair=round(t_pair, 4), parts=[dq["design"], dkdv["design"]],
                dq_busy=dq["tensor_busy"], dkdv_busy=dkdv["tensor_busy"],
                feasible=dict(smem_ok=dq["feasible"]["smem_ok"] and dkdv["feasible"]["smem_ok"],
                              regs_ok=dq["feasible"]["regs_ok"] and dkdv["feasible"]["regs_ok"]))


def calibrate(base):
    """The calibration factors (modelled -> expected TFLOP/s), per kernel family and GPU:
    attention: FlashAttention-3 published / modelled at its overlap point (661, H100 SXM5; the
    582 point without the overlap is the check); GEMM: this workplace's measured bf16 matmul /
    the modelled cuBLAS-class kernel. Returns ({family: {arch: factor}}, report)."""
    by = {r["design"]: r for r in base if r["kernel"] == "attn_fwd" and r["design"] in perf_designs.FA3_PUBLISHED}
    fa3 = perf_designs.FA3_PUBLISHED["fa3"] / by["fa3"]["modelled_tflops"]
    points = []
    for design, published in perf_designs.FA3_PUBLISHED.items():
        m = by[design]["modelled_tflops"]
        points.append(dict(kernel="attn_fwd", design=design, arch="H100", published_tflops=published,
                           modelled_tflops=m, calibrated_tflops=round(m * fa3, 1),
                           error=round(m * fa3 / published - 1, 4), fitted=design == "fa3"))
    bwd = next(r for r in base if r["design"] == "fa3-bwd")
    m = bwd["modelled_tflops"]
    points.append(dict(kernel="attn_bwd", design="fa3-bwd", arch="H100",
                       published_tflops=perf_designs.FA3_BWD_PUBLISHED,
                       modelled_tflops=m, calibrated_tflops=round(m * fa3, 1),
                       error=round(m * fa3 / perf_designs.FA3_BWD_PUBLISHED - 1, 4), fitted=False))
    ref = next(r for r in base if r["design"] == "cublas-class")
    gemm = {a: v / ref["modelled_tflops"] for a, v in perf_designs.MATMUL_MEASURED.items()}
    for a, v in perf_designs.MATMUL_MEASURED.items():
        points.append(dict(kernel="gemm", design="cublas-class", arch=a, published_tflops=v,
                           modelled_tflops=ref["modelled_tflops"], calibrated_tflops=v, error=0.0, fitted=True))
    ratio_model = by["fa3-no-overlap"]["modelled_tflops"] / by["fa3"]["modelled_tflops"]
    ratio_pub = perf_designs.FA3_PUBLISHED["fa3-no-overlap"] / perf_designs.FA3_PUBLISHED["fa3"]
    factors = {"attention": {a: fa3 for a in ARCHS}, "gemm": gemm}
    report = dict(factors={f: {a: round(v, 4) for a, v in d.items()} for f, d in factors.items()},
                  points=points, overlap_ratio_modelled=round(ratio_model, 4),
                  overlap_ratio_published=round(ratio_pub, 4),
                  effective_clock_mhz={f: {a: round(DATASHEET_CLOCK_MHZ * v) for a, v in d.items()}
                                       for f, d in factors.items()})
    return factors, report


def family(kernel):
    return "gemm" if kernel == "gemm" else "attention"


def select(only=None):
    """The schedules of a run: today's kernels and the candidates (matching `only`), and the
    calibration points (always)."""
    schedules = perf_designs.today() + perf_designs.candidates()
    if only:
        schedules = [s for s in schedules if re.search(only, f"{s.kernel} {s.design} {s.variant}")]
    return schedules + perf_designs.calibration() + [perf_designs.gemm_reference()]


def build(compiled, only=None, declared=True):
    """All records (one per GPU) and the calibration report."""
    base = [evaluate(s, compiled, declared) for s in select(only)]
    base += backward_records(base)
    factors, report = calibrate(base)
    published = {(p["design"], p["arch"]): p["published_tflops"] for p in report["points"]}
    out = []
    for rec in base:
        for arch in ARCHS:
            r = dict(rec, arch=arch, clock_mhz=DATASHEET_CLOCK_MHZ)
            f = factors[family(rec["kernel"])][arch]
            r["calibration_factor"] = round(f, 4)
            r["calibrated_tflops"] = round(rec["modelled_tflops"] * f, 1)
            if "l2_tbps_needed" in rec:
                r["l2_tbps_at_calibrated"] = round(rec["l2_tbps_needed"] * f, 2)
            if (rec["design"], arch) in published:
                r["published_tflops"] = published[(rec["design"], arch)]
            out.append(r)
    return out, report


SENSITIVITY = ((16, 32), (24, 48), (48, 96))     # (WGMMA_START_LATENCY, WGMMA_DONE_LATENCY)


def sensitivity(compiled):
    """How much the results hang on the two wgmma latencies (leads, not measured here)."""
    import perf_sim

    saved = perf_sim.WGMMA_START_LATENCY, perf_sim.WGMMA_DONE_LATENCY
    cases = perf_designs.calibration() + [s for s in perf_designs.candidates() if s.design == "cand:fa3-128x128"
                                          and s.variant == "d128-16bit"]
    today = perf_designs.attn_fwd_today(128, "bf16")
    body = None
    if compiled is not None:
        body = loop_ops(find_kernel(compiled, today.sass)[1], today.skip_fences)
    rows = []
    try:
        for start, done in SENSITIVITY:
            perf_sim.WGMMA_START_LATENCY, perf_sim.WGMMA_DONE_LATENCY = start, done
            row = dict(start_latency=start, done_latency=done)
            for sch in cases:
                row[sch.design] = round(run(sch).tensor_busy, 4)
            row["today d128-bf16"] = round(run(today, body).tensor_busy, 4)
            rows.append(row)
    finally:
        perf_sim.WGMMA_START_LATENCY, perf_sim.WGMMA_DONE_LATENCY = saved
    return rows


def backward_records(base):
    out = []
    idx = {(r["kernel"], r["design"], r["variant"]): r for r in base}
    for (kernel, design, variant), r in sorted(idx.items()):
        if kernel != "attn_dq":
            continue
        if not design.startswith("cand:"):  # a kernel that exists: its dq with its dkdv
            pair = idx.get(("attn_dkdv", design, variant))
            if pair:
                out.append(combine_backward(r, pair, design))
        elif design.startswith("cand:dq-pipelined"):
            suffix = design[len("cand:dq-pipelined"):]
            for dk in sorted(d for (k, d, v) in idx if k == "attn_dkdv" and v == variant
                             and d.startswith(f"cand:dkdv-pipelined{suffix}")
                             and d[len(f"cand:dkdv-pipelined{suffix}"):] in ("", "-fp32p")):
                tail = dk[len("cand:dkdv-pipelined"):]
                out.append(combine_backward(r, idx[("attn_dkdv", dk, variant)], f"cand:bwd-pipelined{tail}"))
    return out


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------
def markdown(records, cal, sens=None):
    h100 = [r for r in records if r["arch"] == "H100"]
    f = cal["factors"]
    lines = [
        "# Static cost model of the sm_90a kernels (modelled: a prediction, not a measurement)",
        "",
        "`python tools/perf_model.py --json benchmarks/results/static/perf_model.json`. Every number here is "
        "**modelled (prediction)** by tools/perf_model.py: a cycle model of one SM running the consumer "
        "warpgroups' main-loop instruction stream (today's kernels: their SASS, nvcc -arch sm_90a; designs: "
        "their declared schedule, tools/perf_designs.py). The GPU run is the judge.",
        "",
        f"- Clock: {DATASHEET_CLOCK_MHZ} MHz (NVIDIA's dense 16-bit 989.4 TFLOP/s = {SMS} SMs x 4096 FLOP/clk x "
        f"{DATASHEET_CLOCK_MHZ} MHz), the same for H100 SXM and H200 SXM: their modelled rows coincide (the "
        "loops modelled do not touch HBM). `TF` = useful FLOP/s at that clock; `cal. TF` = TF x the "
        "calibration factor of the kernel's family (below; for the GEMM per GPU, H100 shown).",
        "- tensor-busy: the wgmma FLOPs of a main-loop iteration at the peak rate / the iteration's cycles, in "
        "the steady state (a long key loop for attention, FA3's ablation setting; for the GEMM one unit of "
        "K/64 k tiles with its epilogue). Consumer warpgroups that no named barrier orders run in lock step "
        "(nothing staggers them; the JSON's `tensor_busy_staggered` is the bound if they happened to run "
        "half an iteration apart).",
        "",
        "## Calibration",
        "",
        "| kernel | schedule | GPU | published / measured TFLOP/s | modelled TF | calibrated | error |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for p in cal["points"]:
        err = "fitted" if p["fitted"] else f"{100 * p['error']:+.1f}%"
        lines.append(f"| {p['kernel']} | {p['design']} | {p['arch']} | {p['published_tflops']:.0f} | "
                     f"{p['modelled_tflops']:.0f} | {p['calibrated_tflops']:.0f} | {err} |")
    lines += ["", f"Attention factor {f['attention']['H100']}: FlashAttention-3's forward (hdim 128, 128x176 tiles, "
              "intra-warpgroup overlap + ping-pong) published at 661 TFLOP/s on an H100 SXM5 over its modelled "
              f"rate (an effective {cal['effective_clock_mhz']['attention']['H100']} MHz: what the model leaves out "
              "costs FA3 a third). The 582 point (FA3's ablation without the softmax/GEMM overlap) checks the "
              f"overlap modelling: ratio without / with modelled {cal['overlap_ratio_modelled']:.3f}, published "
              f"{cal['overlap_ratio_published']:.3f}: the model prices an exposed softmax lower than FA3 measured, "
              "so designs without the intra-warpgroup overlap read optimistic by about the difference. GEMM "
              f"factor {f['gemm']['H100']} (H100) / {f['gemm']['H200']} (H200): this workplace's measured bf16 "
              "matmul (798 / 790 TFLOP/s) over a modelled cuBLAS-class kernel (128x256x64, K = 8192; which "
              "kernel cuBLAS runs is not known here).", ""]
    lines += ["## Targets (issue 23): forward >= 0.85 tensor-busy, backward >= 0.70, GEMM >= 0.85", ""]
    lines += _targets(h100) + [""] + _what_it_takes(h100)
    today = [r for r in h100 if r["design"] == "today" and r["kernel"] != "attn_bwd" and r["variant"].endswith("bf16")
             or r["design"] == "today" and r["kernel"] == "gemm" and "bf16" in r["variant"]]
    others = [r for r in h100 if r["design"] != "today" and "cycles_per_iter" in r and "-fp16" not in r["variant"]]
    lines += ["", "## Kernels and designs (H100; H200 rows equal but for the GEMM factor; fp16 rows in the JSON)", "",
              "| kernel | design | variant | src | tensor-busy | TF | cal. TF | cycles/iter | tensor | exposed | "
              "MUFU | FMA | ALU | issue | smem B/clk | L2 TB/s | fits | check |",
              "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|:-:|"]
    for r in today + others:
        p = r.get("pipe_cycles_per_iter", {})
        fe = r["feasible"]
        fits = "yes" if fe.get("smem_ok") and fe.get("regs_ok") else "**no**"
        chk = ""
        if "schedule_check" in r:
            chk = "ok" if r["schedule_check"]["ok"] else "**differs**"
        lines.append(
            f"| {r['kernel']} | {r['design']} | {r['variant']} | {r['source']} | {r['tensor_busy']:.3f} | "
            f"{r['modelled_tflops']:.0f} | {r['calibrated_tflops']:.0f} | {r['cycles_per_iter']:.0f} | "
            f"{r['tensor_cycles_per_iter']:.0f} | {r['exposed_cycles_per_iter']:.0f} | "
            f"{p.get('mufu', 0):.0f} | {p.get('fma', 0):.0f} | {p.get('alu', 0):.0f} | "
            f"{r['issue_cycles_per_iter']:.0f} | {r['smem_bytes_per_clk']:.0f} | "
            f"{r['l2_tbps_at_calibrated']:.1f} | {fits} | {chk} |")
    lines += ["", "Columns: cycles per main-loop iteration (both consumer warpgroups); `tensor` its wgmma work at "
              "the peak rate, `exposed` the rest; MUFU / FMA / ALU: pipe cycles per iteration on one SM "
              "sub-partition (both warpgroups' warps); `issue`: instructions issued there; `smem B/clk`: "
              "shared-memory bytes per cycle (wgmma operands and LDS/STS; the port moves 128); `L2 TB/s`: the "
              "producer's loads at the calibrated rate (no TMA multicast unless the design says so; public "
              "figures for an H100's L2 bandwidth range 5.5-12 TB/s: a lead, not a limit the model applies); "
              "`fits`: shared memory <= 227 KiB and the estimated registers within the split; `check`: the "
              "declared schedule against the SASS (waits, wgmma groups, barriers).", ""]
    bwd = [r for r in h100 if r["kernel"] == "attn_bwd" and ("bf16" in r["variant"] or r["design"] != "today")]
    lines += ["## Backward (dq + dkdv, per (query, key) pair)", "",
              "| design | variant | src | tensor-busy | useful (5 of today's 7 matmuls) | dq busy | dkdv busy | TF | "
              "cal. TF | fits |", "|---|---|---|--:|--:|--:|--:|--:|--:|:-:|"]
    for r in bwd:
        fits = "yes" if r["feasible"]["smem_ok"] and r["feasible"]["regs_ok"] else "**no**"
        useful = r.get("useful_busy", r["tensor_busy"])
        parts = (f"{r['dq_busy']:.3f} | {r['dkdv_busy']:.3f}" if "dq_busy" in r else "(one kernel) | ")
        lines.append(f"| {r['design']} | {r['variant']} | {r['source']} | {r['tensor_busy']:.3f} | "
                     f"{useful:.3f} | {parts} | {r['modelled_tflops']:.0f} | {r['calibrated_tflops']:.0f} | {fits} |")
    lines += ["", "TF counts FlashAttention's backward FLOPs (5 matmuls per pair, 2.5x the forward's); today's "
              "deterministic pair of kernels runs 7 (S and dP in both).", ""]
    lines += _sass_vs_declared(h100)
    if sens:
        keys = [k for k in sens[0] if k not in ("start_latency", "done_latency")]
        lines += ["## Sensitivity to the wgmma latencies (leads)", "",
                  "| start / done latency (cycles) | " + " | ".join(keys) + " |",
                  "|---|" + "--:|" * len(keys)]
        for row in sens:
            lines.append(f"| {row['start_latency']} / {row['done_latency']} | "
                         + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        lines += ["", "Tensor-busy per setting; the tables above use "
                  f"{SENSITIVITY[1][0]} / {SENSITIVITY[1][1]}.", ""]
    return "\n".join(lines) + "\n"


def _what_it_takes(recs):
    """The model's reading of the targets, from the records (so it stays true to the table)."""
    by = {(r["kernel"], r["design"], r["variant"]): r for r in recs}

    def busy(kernel, design, variant="d128-16bit"):
        r = by.get((kernel, design, variant))
        return f"{r['tensor_busy']:.2f}" if r else "-"
    fwd = by.get(("attn_fwd", "today", "d128-bf16"))
    dq, dkdv = by.get(("attn_dq", "today", "d128-bf16")), by.get(("attn_dkdv", "today", "d128-bf16"))
    gemm, silu = by.get(("gemm", "today", "k1536-bf16")), by.get(("gemm", "today", "k1536-bf16-silu"))
    d64, fp32p = by.get(("attn_fwd", "cand:fa3-128x128", "d64-16bit")), by.get(
        ("attn_dkdv", "cand:dkdv-pipelined-64-fp32p", "d128-16bit"))
    if not (fwd and dq and dkdv and gemm and silu and d64 and fp32p):
        return []
    over = fp32p["feasible"]["regs"] - fp32p["feasible"]["reg_limit"]
    stall = fwd["stalls_per_iter"]["wg0"]
    return [
        "## What reaching the targets takes (modelled)", "",
        f"- **Forward.** Today's D=128 loop spends {fwd['exposed_cycles_per_iter']:.0f} of its "
        f"{fwd['cycles_per_iter']:.0f} cycles per 128-key tile with the tensor pipe idle: both warpgroups wait on "
        f"their own wgmma ({stall.get('wgmma wait', 0):.0f} cycles each) and then run their softmax together "
        f"({fwd['issue_cycles_per_iter']:.0f} instructions per sub-partition, "
        f"{fwd['pipe_cycles_per_iter']['mufu']:.0f} MUFU and {fwd['pipe_cycles_per_iter']['alu']:.0f} ALU cycles). "
        f"Ping-pong alone (named barriers, the turn passing after S) reaches {busy('attn_fwd', 'cand:pingpong')}, "
        "the intra-warpgroup overlap alone "
        f"(S of the next tile and P V of this one issued together, wait<1>) {busy('attn_fwd', 'cand:overlap')}; "
        f"both (FA3's schedule) {busy('attn_fwd', 'cand:fa3-128x128')} at 128x128 (even with today's softmax code: "
        f"{busy('attn_fwd', 'cand:fa3-128x128-todaysoftmax')}) and {busy('attn_fwd', 'cand:fa3-128x176')} at 128x176. "
        f"So the target needs both, not a bigger tile. At D=64 the same schedule models at "
        f"{busy('attn_fwd', 'cand:fa3-128x128', 'd64-16bit')}: there a tile's exponentials take the MUFU pipe "
        f"as long as its GEMMs take the tensor pipe ({d64['pipe_cycles_per_iter']['mufu']:.0f} vs "
        f"{d64['tensor_cycles_per_iter']:.0f} cycles), so the MUFU rate, not the schedule, bounds it (computing "
        "part of the exponentials with FMA polynomials would relieve it).",
        f"- **Backward.** Today's dq and dkdv model at {dq['tensor_busy']:.2f} and {dkdv['tensor_busy']:.2f}: 32-row "
        "stream tiles make every S / dP wgmma an m64n32k16 with both operands in shared memory (bound by their "
        "operand reads, 24 cycles for 16 of math), three wait<0> per tile, and in dkdv a guarded global load per "
        "score for lse and delta (serialised by the compiler under register pressure). Two deterministic kernels "
        f"with 64-row streams, the statistics in shared memory or registers and S / dP issued together (wait<1>) "
        f"model at {busy('attn_bwd', 'cand:bwd-pipelined-64')} (it fits a 24/240 split only with dS^T formed from "
        "P^T's 16-bit fragments, as today; with fp32 P^T, the issue's item, "
        f"{busy('attn_bwd', 'cand:bwd-pipelined-64-fp32p')} but ~{over} registers over); at 32-row streams, where fp32 "
        f"P^T fits, {busy('attn_bwd', 'cand:bwd-pipelined')}. They still run 7 matmuls for FlashAttention's 5: "
        "FA3's single "
        f"kernel (dQ by fp32 reduce-add, not deterministic) models at {busy('attn_bwd', 'fa3-bwd')}.",
        f"- **GEMM.** Today's loop keeps the tensor pipe busy (wait<1>); what it loses is the epilogue, run by both "
        f"warpgroups at once: {gemm['tensor_busy']:.2f} at K=1536 with a bias epilogue, {silu['tensor_busy']:.2f} with "
        "SiLU (two MUFU per value). Ping-pong consumers (each warpgroup its own unit, the epilogue under the "
        f"other's mainloop) model at {busy('gemm', 'cand:128x128-pingpong', 'k1536-16bit-silu')} with SiLU. The "
        f"model's warning is memory, not schedule: 128x128 tiles read {gemm['l2_tbps_at_calibrated']:.0f} TB/s from "
        "L2 at the calibrated rate (64 FLOP per byte); 128x256 tiles "
        f"{by[('gemm', 'cand:128x256-coop', 'k1536-16bit')]['l2_tbps_at_calibrated']:.0f}, with a 2-CTA cluster "
        f"multicasting B {by[('gemm', 'cand:128x256-coop-cluster2', 'k1536-16bit')]['l2_tbps_at_calibrated']:.0f}."
        + _wide_gemm(by),
        "",
    ]


def _wide_gemm(by):
    """The 128x256 kernel built on that reading, from its SASS (when modelled)."""
    wide, silu = by.get(("gemm", "128x256-cluster2", "k1536-bf16")), by.get(("gemm", "128x256-cluster2",
                                                                               "k1536-bf16-silu"))
    if not (wide and silu):
        return ""
    return (f" The 128x256 kernel built on this reading (`128x256-cluster2`, from its SASS; csrc/hopper/gemm_wide_*"
            f".cuh): {wide['tensor_busy']:.2f} with a bias epilogue, {silu['tensor_busy']:.2f} with SiLU (its "
            f"epilogue is not overlapped either), at {wide['l2_tbps_at_calibrated']:.0f} TB/s from L2.")


def _targets(recs):
    out = []
    for kernel, goal in TARGETS.items():
        today = [r for r in recs if r["kernel"] == kernel and r["design"] == "today"]
        pick = {"attn_fwd": "d128-bf16", "attn_bwd": "d128-bf16", "gemm": "k1536-bf16"}[kernel]
        t = next((r for r in today if r["variant"] == pick), None)
        cands = sorted((r for r in recs if r["kernel"] == kernel and r["design"] != "today"
                        and r["variant"].startswith(pick.split("-")[0]) and "-fp16" not in r["variant"]),
                       key=lambda r: -r["tensor_busy"])
        line = f"- **{kernel}** (target {goal:.2f}):"
        if t:
            line += f" today {t['variant']} **{t['tensor_busy']:.2f}** ({t['modelled_tflops']:.0f} TF, cal. " \
                    f"{t['calibrated_tflops']:.0f})"
            if "tensor_busy_staggered" in t:
                line += f", {t['tensor_busy_staggered']:.2f} if its warpgroups fell half an iteration apart"
        out.append(line + ".")
        for r in cands:
            fe = r["feasible"]
            ok = fe.get("smem_ok") and fe.get("regs_ok")
            mark = "meets" if r["tensor_busy"] >= goal else "misses"
            out.append(f"  - `{r['design']}` {r['variant']}: {r['tensor_busy']:.2f} ({r['calibrated_tflops']:.0f} cal. "
                       f"TF; L2 {r.get('l2_tbps_at_calibrated', 0):.1f} TB/s), {mark}"
                       f"{'' if ok else ', does not fit (registers or shared memory)'}: {r['note']}")
    return out


def _sass_vs_declared(recs):
    rows = [r for r in recs if r["source"] == "sass" and "from_declaration" in r and "bf16" in r["variant"]]
    if not rows:
        return []
    out = ["## Today's kernels: SASS stream vs their declared schedule", "",
           "The same schedule simulated from the SASS and from its declaration (the synthesis that designs "
           "rely on); instruction counts per iteration and warpgroup, declared / SASS.", "",
           "| kernel | variant | busy (SASS) | busy (declared) | MUFU | FP32 | FMNMX | F2FP | LDG | total |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        c = r["schedule_check"]["counts"]

        def pair(k):
            return f"{c[k]['declared']}/{c[k]['sass']}"
        name = r["kernel"] if r["design"] == "today" else f"{r['kernel']} ({r['design']})"
        out.append(f"| {name} | {r['variant']} | {r['tensor_busy']:.3f} | "
                   f"{r['from_declaration']['tensor_busy']:.3f} | {pair('mufu')} | {pair('fp32')} | {pair('fmnmx')} | "
                   f"{pair('f2fp')} | {pair('ldg')} | {pair('total')} |")
    gaps = {}
    for r in rows:
        gap = r["from_declaration"]["tensor_busy"] / r["tensor_busy"] - 1
        gaps.setdefault(r["kernel"], []).append(gap)
    out += ["", "Declared over SASS, tensor-busy: " + "; ".join(
        f"{k} {100 * min(v):+.0f}% to {100 * max(v):+.0f}%" for k, v in gaps.items()) + ". Where the declaration "
        "runs ahead, the synthesis orders work better than nvcc did (today's dK/dV: its per-score statistics "
        "loads, serialised under register pressure): a design with such code reads optimistic by about as much."]
    bad = [r for r in rows if not r["schedule_check"]["ok"]]
    for r in bad:
        out.append(f"\n- {r['kernel']} {r['variant']}: " + "; ".join(r["schedule_check"]["problems"][:4]))
    return out + [""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="write the records here and the Markdown table at OUT.md")
    ap.add_argument("--sass-dir", metavar="DIR", help="reuse (or keep) <file>.sass / .ptxas dumps here")
    ap.add_argument("--only", metavar="REGEX", help="only schedules whose 'kernel design variant' matches "
                    "(FA3's calibration points always run)")
    ap.add_argument("--no-declared", action="store_true", help="skip simulating today's kernels from their "
                    "declarations beside their SASS")
    args = ap.parse_args(argv)
    t0 = time.time()
    compiled = compile_sources({s.sass[0] for s in select(args.only) if s.sass}, args.sass_dir)
    records, cal = build(compiled, args.only, not args.no_declared)
    md = markdown(records, cal, None if args.only else sensitivity(compiled))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
        print(f"perf_model: wrote {out} and {out.with_suffix('.md')} ({time.time() - t0:.0f} s)", file=sys.stderr)
    else:
        print(md)
    bad = [r for r in records if r.get("schedule_check") and not r["schedule_check"]["ok"]]
    for r in bad[::len(ARCHS)]:
        print(f"perf_model: {r['kernel']} {r['variant']}: declared schedule differs from the SASS: "
              f"{r['schedule_check']['problems'][:3]}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
