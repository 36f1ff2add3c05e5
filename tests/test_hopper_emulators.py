"""The sm_90a kernels of csrc/hopper/ checked without a GPU: tools/hopper_emulate.h emulates wgmma
(descriptors, swizzles, fragments, the registers between issue and wait_group, wgmma.fence),
mbarriers, TMA loads (multicast too) and stores, cp.async, setmaxnreg, two CTAs at a time and
2-CTA clusters from the PTX ISA, with a happens-before model of shared memory (stages rewritten
before the wgmma reading them retired, the proxy fences in both directions, staged boxes before
their TMA store read them); tools/hopper_emulate_selftest.cpp checks the emulator itself,
tools/<op>_sm90_emulate.cpp run the exact kernels (the GEMM in both designs: 128x128, and
128x256 with clusters and a TMA-store epilogue; attention in both: --design=pipelined|baseline)
against float64 references, and every bug planted in the kernels (--plant=n, the DJEPA_FAULT_*
hook of csrc/hopper/ptx.cuh) must make its driver fail.
Needs g++ and the CUDA headers (skipped without them, unless DJEPA_REQUIRE_C=1, as in CI)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory, emulator_compiler):
    gxx, include = emulator_compiler
    out = tmp_path_factory.mktemp("hopper_emu")
    built = {}

    def make(source):
        if source not in built:
            exe = out / Path(source).stem
            cmd = [gxx, "-std=c++17", "-O2", "-pthread", f"-I{include}",
                   f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tools'}", str(ROOT / "tools" / source), "-o", str(exe)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-4000:]
            built[source] = exe
        return built[source]

    return make


def _run(exe, *args, timeout=900, env=None):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("section", ["desc", "tma", "wgmma", "mbar", "proxy", "cpasync", "regs", "stage",
                                     "setmaxnreg", "ctas", "tmastore", "cluster"])
def test_emulator_matches_the_ptx_isa(build, section):
    run = _run(build("hopper_emulate_selftest.cpp"), section)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), "\n".join(failed[:20]) or run.stdout[-3000:]


def test_emulator_reports_a_deadlock_instead_of_hanging(build):
    run = _run(build("hopper_emulate_selftest.cpp"), "deadlock", timeout=120, env={"DJEPA_EMU_DEADLOCK_S": "2"})
    assert run.returncode == 3 and "deadlock" in run.stdout, run.stdout[-2000:]


PLANTS = {1: "swizzle", 2: "descriptor stride", 3: "missing full-barrier wait", 4: "fragment index",
          5: "missing fence.proxy.async", 6: "accumulators read before wgmma.wait_group",
          7: "stage released before its wgmma retired", 8: "missing wgmma.fence",
          9: "stage released in its own CTA only", 10: "no barrier.cluster after the mbarrier inits"}
# The bugs planted in each driver's kernels (csrc/hopper/ptx.cuh, enum Plant); the GEMM's per
# design (gemm_sm90's 128x128 and 128x256 kernels; 9 and 10 are the cluster's).
DENOISE_PLANTS = [("128x128", p) for p in range(1, 9)] + [("128x256", p) for p in range(1, 11)]
ATTENTION_PLANTS = {"pipelined": list(range(1, 9)), "baseline": [1, 2, 3, 4, 5, 6, 8]}
# The attention kernels' two designs (csrc/attention_sm90.cu): the driver runs one per call.
DESIGNS = ("pipelined", "baseline")
# What the emulator must say for the plants its rules catch (the others may show as wrong data):
# one of the phrases.
# 9: the peer's multicast lands in a stage this CTA still reads, or one whose fill it has not yet
# observed (which of the two depends on the interleaving).
RULE = {5: ("fence.proxy.async",), 6: ("wait_group",), 7: ("retired",), 8: ("wgmma.fence",),
        9: ("retired", "that filled it was observed"), 10: ("uninitialised mbarrier", "before its mbarrier.init")}


def _says_rule(plant, out):
    return any(phrase in out for phrase in RULE.get(plant, ("",)))


def _passed(run):
    return run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK")


def _failures(run):
    return "\n".join([line for line in run.stdout.splitlines() if line.startswith("FAIL")][:20]) or run.stdout[-3000:]


@pytest.mark.parametrize("design", ["128x128", "128x256"])
def test_denoise_gemm_sm90_matches_float64(build, design):
    run = _run(build("denoise_sm90_emulate.cpp"), f"--design={design}")
    assert _passed(run), _failures(run)


@pytest.fixture(scope="module")
def denoise_quick(build):
    exe = build("denoise_sm90_emulate.cpp")
    clean = _run(exe, "quick")
    assert _passed(clean), _failures(clean)  # the quick cases pass without a planted bug
    return exe


@pytest.mark.parametrize("design,plant", DENOISE_PLANTS, ids=[f"{d}-{PLANTS[p]}" for d, p in DENOISE_PLANTS])
def test_denoise_gemm_sm90_planted_bug_is_caught(denoise_quick, design, plant):
    run = _run(denoise_quick, "quick", f"--design={design}", f"--plant={plant}", timeout=300,
               env={"DJEPA_EMU_DEADLOCK_S": "10"})
    assert not _passed(run) and "FAIL" in run.stdout, run.stdout[-3000:]
    assert _says_rule(plant, run.stdout), run.stdout[-3000:]


@pytest.mark.parametrize("design", DESIGNS)
def test_attention_sm90_matches_float64(build, design):
    run = _run(build("attention_sm90_emulate.cpp"), f"--design={design}")
    assert _passed(run), _failures(run)


@pytest.fixture(scope="module")
def attention_quick(build):
    """The driver, with each design's quick cases passing without a planted bug (checked once)."""
    exe = build("attention_sm90_emulate.cpp")
    checked = set()

    def get(design):
        if design not in checked:
            clean = _run(exe, "quick", f"--design={design}")
            assert _passed(clean), _failures(clean)
            checked.add(design)
        return exe

    return get


@pytest.mark.parametrize("design, plant", [(d, p) for d in DESIGNS for p in ATTENTION_PLANTS[d]],
                         ids=[f"{d}-{PLANTS[p]}" for d in DESIGNS for p in ATTENTION_PLANTS[d]])
def test_attention_sm90_planted_bug_is_caught(attention_quick, design, plant):
    run = _run(attention_quick(design), "quick", f"--design={design}", f"--plant={plant}", timeout=300,
               env={"DJEPA_EMU_DEADLOCK_S": "10"})
    assert not _passed(run) and "FAIL" in run.stdout, run.stdout[-3000:]
    assert _says_rule(plant, run.stdout), run.stdout[-3000:]


# Producer threads 1, 45, 89, 127 sleep 300 ms after every barrier wait (the old code hung on
# this schedule every time; a lagging consumer thread would slow its whole warpgroup instead).
LAG = {"DJEPA_EMU_LAG": "1,45,89,127:300", "DJEPA_EMU_DEADLOCK_S": "20"}


@pytest.mark.parametrize("design", DESIGNS)
def test_attention_sm90_survives_lagging_threads(attention_quick, design):
    # Producer threads that fall behind (DJEPA_EMU_LAG) must not hang the pipeline: before the
    # fix, threads waiting on the empty barriers of a TMA stream they do not fill missed a phase
    # and waited on the wrong parity for ever (first seen as a rare hang of the backward).
    run = _run(attention_quick(design), "quick", f"--design={design}", timeout=900, env=LAG)
    assert _passed(run), _failures(run)


def test_denoise_gemm_sm90_survives_lagging_threads(denoise_quick):
    run = _run(denoise_quick, "quick", timeout=900, env=LAG)
    assert _passed(run), _failures(run)
