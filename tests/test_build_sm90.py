"""The sm_90a entry points of djepa._C (csrc/attention_sm90.cu, csrc/denoise_sm90.cu): they are
registered, documented, built with sm_90a code when the build names 90a, and refuse clearly
(RuntimeError naming the function, never a crash) without a GPU.

Skipped where _C was not built, unless DJEPA_REQUIRE_C=1 (CI): the `ext` fixture of conftest.py.
"""
import os
import shutil
import subprocess

import pytest
import torch

from djepa import backends

SM90_FUNCTIONS = ("masked_attention_fwd_sm90", "masked_attention_bwd_sm90", "gemm_sm90")


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


# --- the boundary of gemm_sm90: gemm's argument checks, its own split range and workspace -----
HOST = torch.zeros(1 << 16)
P = HOST.data_ptr()  # host memory: refused before anything reads it
GEMM = dict(a=P, b=P, c=P, bias=0, M=16, N=16, K=16, a_trans=0, b_trans=1, epilogue=0, aux1=0, aux2=0, aux_out=0,
            dtype=1, stream=0)
SPLIT = dict(K=512, splits=2, workspace=P)  # any epilogue may split on sm_90a
WRONG = [
    (dict(dtype=0), r"unsupported dtype code 0 \(float32\)"),
    (dict(M=-1), r"M=-1 is outside \[0, 2147483647\]"),
    (dict(K=2 ** 31), r"K=2147483648 is outside"),
    (dict(b_trans=3), r"b_trans must be 0 or 1, got 3"),
    (dict(epilogue=20), r"unknown epilogue 20"),
    (dict(epilogue=2, aux1=P, aux2=P, aux2_ld=15), r"aux2_ld .*=15 is outside \[16, "),
    (dict(epilogue=2, aux2=P, aux2_ld=48), r"aux1 is required by epilogue 2"),
    (dict(epilogue=3), r"aux1 is required by epilogue 3"),
    (dict(c=0), r"c is required"),
    (dict(b=0), r"b is required when K > 0"),
    (dict(aux2=P + 1, epilogue=2, aux1=P, aux2_ld=48), r"aux2=0x[0-9a-f]+ is not aligned to 2 bytes"),
    (dict(epilogue=17, c=P + 2, aux_out=P), r"c=0x[0-9a-f]+ is not aligned to 4 bytes"),
    (dict(splits=65), r"splits \(0 = automatic\)=65 is outside \[0, 64\]"),
    (dict(splits=-1), r"splits \(0 = automatic\)=-1 is outside \[0, 64\]"),
    (dict(SPLIT, workspace=P + 4, workspace_numel=512), r"workspace=0x[0-9a-f]+ is not aligned to 16 bytes"),
    (dict(SPLIT), r"workspace_numel=0 float32 is too small for splits \* M \* N = 512"),
    (dict(SPLIT, workspace_numel=511), r"workspace_numel=511 float32 is too small for splits \* M \* N = 512"),
    (dict(SPLIT, epilogue=1, splits=3, workspace_numel=767), r"workspace_numel=767 float32 is too small for splits \* M \* N = 768"),
    # 10 k-tiles of 64 asked to split 6 ways run as 5 splits of 2: the workspace holds 5 partials
    (dict(SPLIT, K=640, splits=6, workspace_numel=5 * 256 - 1), r"workspace_numel=1279 float32 is too small for splits \* M \* N = 1280"),
]
STILL_VALID = [
    dict(SPLIT, workspace_numel=512),
    dict(SPLIT, K=640, splits=6, workspace_numel=5 * 256),
    dict(SPLIT, workspace=0),             # no workspace: the call allocates its own
    dict(splits=1, workspace=P),          # one split: the workspace is not used, its size not asked
    dict(epilogue=2, aux1=P, aux2=P + 64, aux2_ld=16),
]


@pytest.mark.parametrize("changes, message", WRONG, ids=["-".join(c) for c, _ in WRONG])
def test_gemm_sm90_refuses_each_wrong_argument_before_the_gpu(ext, changes, message):
    with pytest.raises(ValueError, match=rf"^djepa\._C\.gemm_sm90: {message}"):
        ext.gemm_sm90(**{**GEMM, **changes})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible")
@pytest.mark.parametrize("changes", STILL_VALID, ids=["-".join(c) for c in STILL_VALID])
def test_gemm_sm90_lets_valid_calls_through_to_the_device(ext, changes):
    with pytest.raises(RuntimeError, match=r"^djepa\._C\.gemm_sm90: no (usable )?CUDA device"):
        ext.gemm_sm90(**{**GEMM, **changes})


def test_an_empty_gemm_sm90_returns_without_a_gpu(ext):
    assert ext.gemm_sm90(**{**GEMM, "M": 0, "a": 0, "b": 0, "c": 0}) is None


def test_gemm_sm90_splits_checks_its_arguments(ext):
    for kw, message in [(dict(M=-1), r"M=-1 is outside"), (dict(N=2 ** 31), r"N=2147483648 is outside"),
                        (dict(K=-5), r"K=-5 is outside"), (dict(splits=65), r"splits \(0 = automatic\)=65")]:
        with pytest.raises(ValueError, match=rf"^djepa\._C\.gemm_sm90_splits: {message}"):
            ext.gemm_sm90_splits(**{**dict(M=16, N=16, K=16, sms=132), **kw})


@pytest.mark.parametrize("archs, holds", [
    ("90a", True), ("80,90a", True), ("80;90a", True), ("80, 90a-real", True), ("90a-virtual", True),
    ("80,90", False), ("90", False), ("80", False), ("", False), ("90a0", False), ("890a", False),
    ("90a-realistic", False), ("native", False), ("all-major", False),
])
def test_the_sm90a_entry_points_know_a_90a_build_from_a_plain_90_one(ext, archs, holds):
    """The rule gemm_sm90 applies to this build's arch list before anything else (a plain 90 pass
    compiles the Hopper kernels as empty bodies); this build (`cuda_archs`) passes it iff it
    names 90a, and lists wgmma ops iff it does."""
    assert ext.build_has_arch(archs, "90a") is holds
    assert ext.build_has_arch(ext.cuda_archs, "90a") == ("90a" in backends.parse_archs(ext.cuda_archs))
    assert bool(ext.wgmma_ops) == ext.build_has_arch(ext.cuda_archs, "90a")


def test_gemm_sm90_takes_an_optional_split_count(ext):
    # The extra trailing argument (splits) of gemm_sm90 over gemm's contract has a default.
    doc = ext.gemm_sm90.__doc__ or ""
    assert "splits" in doc and "aux2_ld" in doc and "workspace_numel" in doc, doc


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
