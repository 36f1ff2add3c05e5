"""The sm_90a entry points of djepa._C (csrc/attention_sm90.cu, csrc/denoise_sm90.cu): they are
registered, documented, built with sm_90a code when the build names 90a, and refuse clearly
(RuntimeError naming the function, never a crash) without a GPU.

Skipped where _C was not built, unless DJEPA_REQUIRE_C=1 (CI), as tests/test_build.py does.
"""
import os
import shutil
import subprocess

import pytest
import torch

from djepa import backends

REQUIRE = os.environ.get("DJEPA_REQUIRE_C") == "1"
SM90_FUNCTIONS = ("masked_attention_fwd_sm90", "masked_attention_bwd_sm90", "gemm_sm90")


@pytest.fixture(scope="module")
def ext():
    module = backends.cuda_extension()
    if module is None:
        if REQUIRE:
            pytest.fail(f"DJEPA_REQUIRE_C=1 but {backends.cuda_extension_error()}")
        pytest.skip(f"djepa._C is not built here: {backends.cuda_extension_error()}")
    return module


@pytest.mark.parametrize("name", SM90_FUNCTIONS)
def test_sm90_entry_points_exist(ext, name):
    fn = getattr(ext, name, None)
    assert callable(fn), f"djepa._C lacks {name}"
    assert "sm_90" in (fn.__doc__ or ""), fn.__doc__


def _calls(ext):
    """One plausible call per entry point (host pointers: the entry point must refuse before it
    touches memory when no GPU is visible)."""
    buf = torch.zeros(4096)
    p = buf.data_ptr()
    f16, bf16 = 1, 2
    st = [512, 512, 64]
    return {
        "masked_attention_fwd_sm90": lambda: ext.masked_attention_fwd_sm90(
            p, p, p, p, p, 0, 0, 1, 1, 8, 8, 64, st, st, st, 0.125, f16, 0),
        "masked_attention_bwd_sm90": lambda: ext.masked_attention_bwd_sm90(
            p, p, p, p, p, p, 0, 0, p, p, p, p, 1, 1, 8, 8, 64, st, st, st, 0.125, bf16, 0),
        "gemm_sm90": lambda: ext.gemm_sm90(p, p, p, 0, 16, 16, 16, 0, 1, 0, 0, 0, 0, f16, 0),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible")
@pytest.mark.parametrize("name", SM90_FUNCTIONS)
def test_sm90_entry_points_refuse_without_a_gpu(ext, name):
    assert ext.device_count() == 0
    with pytest.raises(RuntimeError, match=rf"djepa\._C\.{name}: no (usable )?CUDA device"):
        _calls(ext)[name]()


def test_gemm_sm90_takes_an_optional_split_count(ext):
    # The extra trailing argument (splits) of gemm_sm90 over gemm's contract has a default.
    doc = ext.gemm_sm90.__doc__ or ""
    assert "splits" in doc and "aux2_ld" in doc, doc


def _cuobjdump():
    for name in ("cuobjdump",):
        found = shutil.which(name)
        if found:
            return found
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return cand if os.path.isfile(cand) else None
    except ImportError:
        return None


def test_a_90a_build_carries_wgmma_code(ext):
    """Where the build names 90a, its sm_90a machine code holds HGMMA (wgmma) and UTMALDG (TMA):
    the Hopper kernels were compiled for the arch that has them, not left as empty bodies."""
    if "90a" not in backends.parse_archs(ext.cuda_archs):
        pytest.skip(f"this build is for {ext.cuda_archs}, without 90a")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's copy) to read the machine code")
    sass = subprocess.run([tool, "--dump-sass", ext.__file__], capture_output=True, text=True, timeout=600).stdout
    for kernel in ("gemm_sm90_kernel", "attn_fwd_sm90_kernel", "attn_dkdv_sm90_kernel", "attn_dq_sm90_kernel"):
        assert kernel in sass, f"{kernel} is missing from the sm_90a code"
    assert "HGMMA" in sass and "UTMALDG" in sass


# ----------------------------------------------------------------------------- the static gate
def _static_check():
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "static_check.py"
    spec = importlib.util.spec_from_file_location("static_check_sm90", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sm90_record(sc, kernel="attn_fwd_sm90_kernel", variant="<__nv_bfloat16, 128>", arch=90, **kw):
    base = dict(regs=168, wgmma=96, mma_sync=0, hot=True)
    base.update(kw)
    return sc.record("cuda", kernel, variant, arch, **base)


def test_static_gate_fails_an_sm90_kernel_without_wgmma_spills_stack_or_too_much_smem():
    sc = _static_check()
    for kernel in ("attn_fwd_sm90_kernel", "attn_dkdv_sm90_kernel", "attn_dq_sm90_kernel", "gemm_sm90_kernel"):
        assert sc.violations(_sm90_record(sc, kernel)) == []
        assert any("wgmma" in v for v in sc.violations(_sm90_record(sc, kernel, wgmma=0)))
        assert any("wgmma" in v for v in sc.violations(_sm90_record(sc, kernel, wgmma=0, hot=False)))
    assert sc.violations(_sm90_record(sc, arch=80, wgmma=0)) == []            # sm_80 pass: empty bodies
    assert sc.violations(_sm90_record(sc, "delta_sm90_kernel", wgmma=0)) == []  # not a matmul
    assert any("spills" in v for v in sc.violations(_sm90_record(sc, spill_bytes=8)))
    assert any("stack" in v for v in sc.violations(_sm90_record(sc, stack_bytes=16)))
    assert any("shared memory" in v for v in sc.violations(_sm90_record(sc, smem_bytes=232448 + 1024)))


def test_static_gate_knows_the_sm90_kernels_shared_memory_and_hot_head_dims():
    sc = _static_check()
    for kernel in ("attn_fwd_sm90_kernel", "attn_dkdv_sm90_kernel", "attn_dq_sm90_kernel"):
        name = f"djepa::hopper::attn::{kernel}"
        assert name in sc.CUDA_DYNAMIC_SMEM and name in sc.CUDA_ATTENTION_KERNELS
        assert sc.cuda_hot(name, ["__nv_bfloat16", "64"], {64, 80}, set())
        assert not sc.cuda_hot(name, ["__nv_bfloat16", "96"], {64, 80}, set())
    assert "djepa::hopper::gemm::gemm_sm90_kernel" in sc.CUDA_DYNAMIC_SMEM
    assert sc.split_template("void djepa::hopper::attn::attn_fwd_sm90_kernel<__half, 80>(djepa::hopper::attn::"
                             "Params, djepa::hopper::attn::Maps)") == (
        "djepa::hopper::attn::attn_fwd_sm90_kernel", ["__half", "80"])
