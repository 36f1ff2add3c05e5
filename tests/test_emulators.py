"""The CUDA kernels of csrc/ checked without a GPU: tools/<op>_emulate.cpp compiles the exact
device code as C++ with an emulation of the warp-level PTX it uses (tools/cuda_emulate.h) and
compares every launch variant with a float64 reference. Needs g++ and the CUDA headers (skipped
without them, unless DJEPA_REQUIRE_C=1, as in CI).

The emulated cp.async lands in shared memory only when its group is waited for, so a pipeline
that reads a stage before waiting for it reads poison: the planted-bug tests make every
cp.async.wait_group wait for one group too few and require the emulators to fail.

The attention emulator also runs the dropout kernels (cases 9-12): the keep bits the forward
records must be the keep rule's, and forward and backward must match the float64 reference that
applies those bits. Planted: the backward handed the Philox offset + 1 must fail."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACROS = {"attention": "DJEPA_ATTN_EMULATE", "denoise": "DJEPA_DENOISE_EMULATE"}
# A subset that runs every multi-stage pipeline: attention case 6 (cp.async at D=128 over
# several key and query tiles in fwd, dq and dk/dv), the denoise GEMMs that cycle the stage
# ring and split K.
PIPELINE_ARGS = {"attention": ["1234", "6"], "denoise": ["1234", "pipeline"]}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory, emulator_compiler):
    gxx, include = emulator_compiler
    built = {}

    def get(op):
        if op not in built:
            exe = tmp_path_factory.mktemp("emu") / f"{op}_emulate"
            build = subprocess.run([gxx, "-std=c++17", "-O1", "-pthread", f"-D{MACROS[op]}", f"-I{include}",
                                    f"-I{ROOT / 'csrc'}", str(ROOT / "tools" / f"{op}_emulate.cpp"), "-o", str(exe)],
                                   capture_output=True, text=True)
            assert build.returncode == 0, build.stderr[-4000:]
            built[op] = exe
        return built[op]
    return get


def _run(exe, args=(), **env):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, **env))


@pytest.mark.parametrize("op", sorted(MACROS))
def test_cuda_kernels_match_the_reference_on_the_cpu(op, emulator):
    run = _run(emulator(op))
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), "\n".join(failed[:20]) or run.stdout[-2000:]


@pytest.mark.parametrize("op", sorted(MACROS))
def test_the_emulators_fail_a_pipeline_that_waits_for_one_group_too_few(op, emulator):
    exe = emulator(op)
    planted = _run(exe, PIPELINE_ARGS[op], DJEPA_EMU_WAIT_SLACK="1")
    assert "planted: wait_group slack 1" in planted.stdout
    assert planted.returncode == 1 and "FAIL" in planted.stdout and planted.stdout.rstrip().endswith("SOME FAILED")
    honest = _run(exe, PIPELINE_ARGS[op])
    assert honest.returncode == 0 and honest.stdout.rstrip().endswith("ALL OK"), honest.stdout[-2000:]


def test_the_attention_emulator_fails_a_backward_with_the_wrong_dropout_offset(emulator):
    exe = emulator("attention")
    planted = _run(exe, ["1234", "9"], DJEPA_EMU_BWD_OFFSET="1")
    assert "planted: backward Philox offset + 1" in planted.stdout
    assert planted.returncode == 1 and planted.stdout.rstrip().endswith("SOME FAILED")
    lines = [ln for ln in planted.stdout.splitlines() if "drop=0.30" in ln]
    # the forward (o, and the recorded bits) is untouched; only the gradients go wrong
    assert len(lines) == 2 and all(ln.startswith("FAIL") and "wrong-bits 0" in ln for ln in lines), planted.stdout
    honest = _run(exe, ["1234", "9"])
    assert honest.returncode == 0 and honest.stdout.rstrip().endswith("ALL OK"), honest.stdout[-2000:]
    assert "drop=0.30" in honest.stdout and "wrong-bits 0" in honest.stdout
