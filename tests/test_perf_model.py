"""tools/perf_model.py, the static cost model: SASS parsing, the cycle model on synthetic
streams, the schedule check, the calibration arithmetic; and (nvcc only) today's forward kernel
compiled and checked against its declared schedule."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import perf_designs as pd  # noqa: E402  (tools/: the model's modules)
import perf_model as pm  # noqa: E402
import perf_schedules as ps  # noqa: E402
import perf_sim as sim  # noqa: E402
import sass  # noqa: E402

# A loop of one warpgroup as cuobjdump prints it: the main loop 0x0100-0x01b0 (two HGMMA groups),
# an mbarrier retry loop placed after EXIT that branches back into it (a larger range).
SASS = """\
\tcode for sm_90a
\t\tFunction : kern
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], R14 ;
        /*0110*/              @!P0 BRA 0x300 ;
        /*0120*/                   WARPGROUP.ARRIVE ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0158*/              @!PT LDS RZ, [RZ] ;
        /*0160*/                   MUFU.EX2 R90, R24 ;
        /*0168*/                   SHFL.BFLY PT, R91, R90, 0x1, 0x1f ;
        /*0170*/                   F2FP.BF16.F32.PACK_AB R92, R91, R90 ;
        /*0180*/                   HGMMA.64x64x16.F32 R88, R92, gdesc[UR12].tnspB, R88, gsb0 ;
        /*0190*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*01a0*/                   SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR8], RZ ;
        /*01b0*/              @!P1 BRA 0x100 ;
        /*01c0*/                   EXIT ;
        /*0300*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR9], R14 ;
        /*0310*/              @!P0 BRA 0x300 ;
        /*0320*/                   BRA 0x120 ;
"""


# ------------------------------------------------------------------------------ SASS
def test_listing_and_main_loop():
    ins = sass.sass_listing(SASS)["kern"]
    assert ins[0].op == "MOV" and ins[0].operands == ("R1", "c[0x0][0x28]")
    body = sass.main_loop(ins)
    assert (body[0].addr, body[-1].addr) == (0x100, 0x1b0)     # not the retry loop's 0x120-0x320
    assert body[-1].branch_target == 0x100 and body[-1].pred == "!P1"
    assert [i.addr for i in body if i.never] == [0x158]
    with pytest.raises(ValueError, match="no loop"):
        sass.main_loop(ins[:1])


def test_decode_wgmma_and_registers():
    ins = {i.addr: i for i in sass.sass_listing(SASS)["kern"]}
    ss = sim.decode(ins[0x140])
    assert ss.cls == "wgmma" and ss.wgmma == (128, 16, 64 * 16 * 2 + 128 * 16 * 2, False, True, 2)
    assert len(ss.dst) == 64 and ss.dst[0] == "R24" and ss.dst[-1] == "R87"
    rs = sim.decode(ins[0x180])                                  # fp16 prints no type suffix
    assert rs.wgmma[:5] == (64, 16, 64 * 16 * 2, True, True) and rs.src == ("R92", "R93", "R94", "R95")
    assert sim.decode(ins[0x190]).wait_n == 1
    shfl = sim.decode(ins[0x168])
    assert shfl.cls == "shfl" and shfl.dst == ("R91",) and shfl.src == ("R90",)
    tw = sim.decode(ins[0x100])
    assert tw.cls == "sync" and tw.dst == ("P0",)
    assert sim.decode(ins[0x110]).src == ("P0",)                 # the guard predicate is read
    ldg = sim.decode(sass.parse_instr(0, "@!P3 LDG.E.64 R4, desc[UR22][R202.64]"))
    assert ldg.cls == "ldg" and ldg.dst == ("R4", "R5") and set(ldg.src) == {"P3", "UR22", "R202", "R203"}
    assert sim.decode(sass.parse_instr(0, "LDG.E.CONSTANT R4, desc[UR22][R2.64]")).cls == "ldg_nc"
    bar = sim.decode(sass.parse_instr(0, "BAR.SYNC.DEFER_BLOCKING 0x1, 0x100"))
    assert bar.bar == ("sync", 1, 256)
    assert sim.decode(sass.parse_instr(0, "BAR.ARV 0x2, 0x100")).bar == ("arrive", 2, 256)


# ------------------------------------------------------------------------------ the cycle model
def _schedule(loop, consumers=2, start=None, kernel="attn_fwd"):
    return ps.Schedule(kernel, "test", "t", consumers, loop, useful_flops=1, l2_bytes=0, smem_bytes=0, regs=0,
                       reg_limit=1, note="", start=start)


def _mufu(n, tag):
    return ps.Alu(tag, tuple(ps.Node("MUFU.EX2", (f"{tag}{i}",), ("S.0",)) for i in range(n)))


def test_a_lone_gemm_group_costs_its_tensor_cycles_and_latencies():
    g = ps.ss_gemm("S", "S", 128, 128)                            # 8 x m64n128k16: 512 cycles
    res = pm.run(_schedule(lambda wg: [g, ps.WgmmaWait(0)], consumers=1))
    assert res.tensor_cycles == pytest.approx(512)
    assert 512 + sim.WGMMA_DONE_LATENCY < res.period < 512 + 200
    assert res.tensor_busy < 0.9


def test_small_n_ss_wgmma_is_bound_by_its_shared_memory_operands():
    g = ps.ss_gemm("S", "S", 32, 1024)                            # 64 x m64n32k16: 16 cycles of math
    res = pm.run(_schedule(lambda wg: [g, ps.WgmmaWait(0)], consumers=1))
    held = (64 * 16 * 2 + 32 * 16 * 2) / sim.SMEM_BYTES_PER_CLK  # 24 cycles to read A and B
    assert res.pipe_cycles["tensor"] == pytest.approx(64 * held)
    assert res.tensor_busy < 16 / held


def test_mufu_work_takes_8_cycles_per_warp_instruction():
    res = pm.run(_schedule(lambda wg: [_mufu(64, "p")], consumers=1))
    assert res.pipe_cycles["mufu"] == 64 * 8 and res.period >= 64 * 8


def test_overlap_structure_decides_the_busy_fraction():
    """The same work (a 512-cycle GEMM and 512 cycles of exponentials per warpgroup and
    iteration) under three declared schedules: serialised and in lock step, intra-warpgroup
    overlap (the next GEMM issued before the softmax, wait<1>), ping-pong on named barriers."""
    def serial(wg):
        return [ps.ss_gemm("S", "S", 128, 128), ps.WgmmaWait(0), _mufu(64, "p")]

    def overlap(wg):
        return [ps.ss_gemm("S", "T", 128, 128), ps.WgmmaWait(1), _mufu(64, "p")]

    def pingpong(wg):
        own, other = (1, 2)[wg], (1, 2)[1 - wg]
        return [ps.BarSync(own), ps.ss_gemm("S", "S", 128, 128), ps.BarArrive(other), ps.WgmmaWait(0),
                _mufu(64, "p")]
    a = pm.run(_schedule(serial))
    b = pm.run(_schedule(overlap))
    c = pm.run(_schedule(pingpong, start=lambda wg: [ps.BarArrive(1)] if wg == 0 else []))
    assert not _schedule(serial).ordered() and _schedule(pingpong).ordered()
    assert a.tensor_busy < 0.6                   # both warpgroups' exponentials share the MUFU
    assert b.tensor_busy > a.tensor_busy + 0.2 and c.tensor_busy > a.tensor_busy + 0.2


def test_a_barrier_nobody_arrives_at_deadlocks():
    sch = _schedule(lambda wg: [ps.BarSync(5, 384), _mufu(1, "p")])
    with pytest.raises(sim.Deadlock):
        pm.run(sch)


def test_list_schedule_keeps_dependencies_and_hides_latency():
    nodes = ps.softmax("S", 16, scale_first=False, masked=True)
    order = ps.list_schedule(nodes)
    assert sorted(map(id, order)) == sorted(map(id, nodes))
    pos = {id(nd): k for k, nd in enumerate(order)}
    last = {}                                    # register -> the node that last wrote it (program order)
    for nd in nodes:
        for r in nd.src:
            if r in last:
                assert pos[id(last[r])] < pos[id(nd)], (last[r], nd)
        for r in nd.dst:
            last[r] = nd
    # ordered, the same work runs no slower than in the template's program order
    def period(seq):
        return sim.simulate([sim.Warp("w", [ps._node_op(nd) for nd in seq], 6)], warmup=2).period
    assert period(order) <= period(nodes)


# ------------------------------------------------------------------------------ the check
def _loop_ops():
    return pm.loop_ops(sass.sass_listing(SASS)["kern"], skip_fences=True)


def test_schedule_check_matches_and_catches_a_changed_wait():
    decl = [ps.MbarWait("k"), ps.ss_gemm("S", "S", 128, 32), ps.WgmmaWait(0),
            ps.Alu("p", (ps.Node("MUFU.EX2", ("x",), ("S.0",)),)),
            ps.rs_gemm("O", [("O", 64)], "P", 16), ps.WgmmaWait(1), ps.Arrive("e")]
    problems, counts = ps.check_against_sass(decl, _loop_ops())
    assert problems == [] and counts["mufu"] == (1, 1) and counts["hgmma"] == (3, 3)
    bad = decl[:5] + [ps.WgmmaWait(0)] + decl[6:]
    problems, _ = ps.check_against_sass(bad, _loop_ops())
    assert problems == ["marker 4: declared ('wgmma_wait', 0), SASS ('wgmma_wait', 1)"]
    problems, _ = ps.check_against_sass(decl[:3] + decl[4:], _loop_ops()[:-3])
    assert problems and "SASS None" in problems[-1]


def test_today_declarations_describe_the_kernels_they_name():
    for D in pd.HEAD_DIMS:
        fwd = pd.attn_fwd_today(D, "bf16")
        assert fwd.sass[1] == f"attn_fwd_sm90_kernelI13__nv_bfloat16Li{D}E" and not fwd.ordered()
        n_s = sum(1 for e in fwd.loop(0) if isinstance(e, ps.Gemm) for _ in e.instrs)
        assert n_s == D // 16 + 8 * (1 if D == 64 else 2)
    assert pd.gemm_today(1536, "fp16").sass[1] == "gemm_sm90_kernelI6__halfLb1ELb1E"
    assert pd.gemm_today(1536, "bf16").reps == 24


def test_a_barrier_id_in_a_register_takes_the_declared_id_of_its_warpgroup():
    """The pipelined forward's ping-pong turns: one code for both consumer warpgroups, the named
    barrier's id in a register; the declaration gives each warpgroup its ids, in order."""
    sync = sim.decode(sass.parse_instr(0, "BAR.SYNC.DEFER_BLOCKING R5, 0x100"))
    arv = sim.decode(sass.parse_instr(0, "BAR.ARV UR7, 0x100"))
    assert sync.bar == ("sync", None, 256) and "R5" in sync.src and arv.bar == ("arrive", None, 256)
    assert ps.check_against_sass([ps.BarSync(1), ps.BarArrive(2)], [sync, arv])[0] == []

    def loop(wg):
        return [ps.BarSync(1 + wg), ps.BarArrive(2 - wg)]
    sch = _schedule(loop)
    assert [op.bar for op in sch.iteration(0, [sync, arv])] == [("sync", 1, 256), ("arrive", 2, 256)]
    assert [op.bar for op in sch.iteration(1, [sync, arv])] == [("sync", 2, 256), ("arrive", 1, 256)]
    with pytest.raises(ValueError, match="no declared counterpart"):
        sch.iteration(0, [arv, sync])


def test_pipelined_declarations_name_their_kernels_and_beat_todays():
    """The pipelined kernels (design 0 of csrc/attention_sm90.cu) are declared beside today's, for
    every head dim and dtype, with the SASS symbol of their instantiation."""
    names = {(s.kernel, s.design, s.variant): s for s in pd.today()}
    for D in pd.HEAD_DIMS:
        for kernel in ("attn_fwd", "attn_dq", "attn_dkdv"):
            sch = names[(kernel, "pipelined", f"d{D}-bf16")]
            assert sch.sass == ("csrc/attention_sm90.cu", f"{kernel}_pipelined_sm90_kernelI13__nv_bfloat16Li{D}E")
            assert (kernel, "today", f"d{D}-bf16") in names
    fwd = pm.run(names[("attn_fwd", "pipelined", "d128-bf16")])
    today = pm.run(names[("attn_fwd", "today", "d128-bf16")])
    assert fwd.tensor_busy > today.tensor_busy


# ------------------------------------------------------------------------------ calibration
def _rec(kernel, design, tf, **kw):
    return dict(kernel=kernel, design=design, variant="v", modelled_tflops=tf, **kw)


def test_calibration_factors_and_the_checks():
    base = [_rec("attn_fwd", "fa3", 1000.0), _rec("attn_fwd", "fa3-no-overlap", 900.0),
            _rec("attn_bwd", "fa3-bwd", 800.0), _rec("gemm", "cublas-class", 950.0)]
    factors, rep = pm.calibrate(base)
    assert factors["attention"]["H100"] == pytest.approx(0.661)
    assert factors["gemm"]["H200"] == pytest.approx(790 / 950)
    pts = {(p["design"], p["arch"]): p for p in rep["points"]}
    assert pts[("fa3-no-overlap", "H100")]["error"] == pytest.approx(900 * 0.661 / 582 - 1, abs=1e-4)
    assert not pts[("fa3-bwd", "H100")]["fitted"] and pts[("fa3", "H100")]["fitted"]
    assert rep["overlap_ratio_modelled"] == pytest.approx(0.9)


def test_backward_counts_five_matmuls_per_pair():
    dq = dict(variant="d128-bf16", design="today", source="sass", cycles_per_iter=1000.0, pairs=4096,
              tensor_cycles_per_iter=768.0, tensor_busy=0.768, feasible=dict(smem_ok=True, regs_ok=True),
              l2_bytes_per_iter=2 * 32 * 128 * 2)
    dkdv = dict(dq, cycles_per_iter=2000.0, tensor_cycles_per_iter=1024.0, tensor_busy=0.512)
    r = pm.combine_backward(dq, dkdv, "today")
    t_pair = 3000.0 / 4096
    assert r["cycles_per_pair"] == pytest.approx(t_pair, abs=1e-4)
    assert r["tensor_busy"] == pytest.approx(1792 / 3000, abs=1e-4)
    assert r["useful_busy"] == pytest.approx(1280 / t_pair / 4096, abs=1e-4)
    assert r["modelled_tflops"] == pytest.approx(1280 / t_pair * 1830e6 * 132 / 1e12, abs=0.1)
    assert r["l2_tbps_needed"] == pytest.approx(2 * 16384 / 4096 / t_pair * 1830e6 * 132 / 1e12, abs=0.01)


def test_markdown_labels_every_number_a_prediction():
    rec = dict(_rec("attn_fwd", "today", 500.0), variant="d128-bf16", source="sass", arch="H100",
               tensor_busy=0.5, calibrated_tflops=330.0, cycles_per_iter=4000.0, tensor_cycles_per_iter=2000.0,
               exposed_cycles_per_iter=2000.0, issue_cycles_per_iter=1600.0, smem_bytes_per_clk=40.0,
               l2_tbps_at_calibrated=2.6, note="n", feasible=dict(smem_ok=True, regs_ok=True))
    cal = dict(points=[], factors={"attention": {"H100": 0.66, "H200": 0.66}, "gemm": {"H100": 0.8, "H200": 0.8}},
               overlap_ratio_modelled=0.95, overlap_ratio_published=0.88,
               effective_clock_mhz={"attention": {"H100": 1200}})
    md = pm.markdown([rec], cal)
    assert md.startswith("# Static cost model") and "modelled (prediction)" in md and "GPU run is the judge" in md
    assert "| attn_fwd | today | d128-bf16 | sass | 0.500 | 500 | 330 |" in md


# ------------------------------------------------------------------------------ a real kernel
# One instantiation of today's forward (its SASS is the one csrc/attention_sm90.cu compiles:
# ~6 s instead of the file's ~1 min on 2 busy cores).
PROBE = """#include "hopper/attn_fwd_kernel.cuh"
template __global__ void djepa::hopper::attn::attn_fwd_sm90_kernel<__nv_bfloat16, 128>(
    const __grid_constant__ djepa::hopper::attn::Params, const __grid_constant__ djepa::hopper::attn::Maps);
"""


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """(compiled, a --sass-dir folder) holding today's D=128 bf16 forward as attention_sm90's."""
    if sass.find_tool("nvcc") is None or sass.find_tool("cuobjdump") is None:
        pytest.skip("nvcc / cuobjdump not found")
    folder = tmp_path_factory.mktemp("sass")
    src = folder / "probe.cu"
    src.write_text(PROBE)
    log = sass.compile_cubin(src, 90, folder / "probe.cubin")
    (folder / "attention_sm90.sass").write_text(sass.dump_sass(folder / "probe.cubin"))
    (folder / "attention_sm90.ptxas").write_text(log)
    return pm.compile_sources(["csrc/attention_sm90.cu"], folder), folder


def test_todays_forward_matches_its_declared_schedule(dumps):
    """nvcc's SASS of today's D=128 forward: the declared wait / wgmma-group skeleton, the MUFU
    count, and a modelled tensor-busy from the SASS stream that the declared stream reproduces."""
    sch = pd.attn_fwd_today(128, "bf16")
    name, instrs, rep, serialized = pm.find_kernel(dumps[0], sch.sass)
    assert rep["regs"] > 0 and serialized == []
    body = pm.loop_ops(instrs, sch.skip_fences)
    problems, counts = ps.check_against_sass(sch.loop(0), body)
    assert problems == [] and counts["mufu"][0] == counts["mufu"][1] and counts["hgmma"] == (24, 24)
    from_sass = pm.run(sch, body)
    declared = pm.run(sch)
    assert from_sass.tensor_cycles == pytest.approx(2048)
    assert 0.3 < from_sass.tensor_busy < 0.75
    assert declared.tensor_busy == pytest.approx(from_sass.tensor_busy, rel=0.1)


def test_cli_writes_records(dumps, tmp_path):
    out = tmp_path / "pm.json"
    rc = pm.main(["--json", str(out), "--sass-dir", str(dumps[1]), "--only", "attn_fwd today d128-bf16",
                  "--no-declared"])
    assert rc == 0
    recs = json.loads(out.read_text())
    fwd = [r for r in recs if r["kernel"] == "attn_fwd" and r["design"] == "today"]
    assert {r["arch"] for r in fwd} == {"H100", "H200"}
    for r in recs:
        assert {"kernel", "variant", "arch", "tensor_busy", "modelled_tflops", "calibrated_tflops"} <= set(r)
        assert r["label"] == "modelled (prediction)"
    assert any(r["design"] == "fa3" and r.get("published_tflops") == 661 for r in recs)
    assert "modelled (prediction)" in out.with_suffix(".md").read_text()
