"""The CUDA extension djepa._C: it imports, exposes every kernel the ops need, reports its build,
and refuses clearly (RuntimeError, not a crash) when no GPU is visible.

Where `_C` was not built these tests skip, unless DJEPA_REQUIRE_C=1 (set by .ci/run, which
builds it): then a missing extension fails the run (the `ext` fixture of conftest.py).
"""
import os
import re

import pytest
import torch

import djepa
from djepa import backends



def test_extension_reports_its_build(ext):
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", ext.cuda_version), ext.cuda_version
    archs = backends.parse_archs(ext.cuda_archs)
    assert archs and all(re.fullmatch(r"\d+[af]?(-real|-virtual)?", a) for a in archs), ext.cuda_archs
    major, minor = ext.cuda_version.split(".")[:2]
    assert djepa.__version__.endswith(f"+cu{major}{minor}"), (
        f"a CUDA build's version must end in +cu{major}{minor}, got {djepa.__version__}")
    assert sorted(ext.registered) == sorted(set(ext.registered)) and len(ext.registered) >= 3


@pytest.mark.parametrize("text, archs", [("90a", ["90a"]), ("80,90a", ["80", "90a"]),
                                         ("80;90a", ["80", "90a"]), ("80-real, 90a", ["80-real", "90a"])])
def test_arch_lists_parse_in_either_separator(text, archs):
    # CMake's DJEPA_CUDA_ARCHS "80;90a" reaches djepa._C.cuda_archs as "80,90a"
    assert backends.parse_archs(text) == archs


@pytest.mark.parametrize("op", sorted(backends.OPS))
def test_extension_exposes_every_kernel_an_op_needs(ext, op):
    for name in backends.OPS[op].c_functions:
        assert callable(getattr(ext, name, None)), f"djepa._C lacks {name} (needed by {op})"


def _valid_calls(ext):
    """One plausible call per kernel entry point (host pointers: never dereferenced, because the
    entry point must refuse before touching memory when there is no GPU)."""
    buf = torch.zeros(4096)
    p = buf.data_ptr()
    f16 = 1
    return {
        "ema_update": lambda: ext.ema_update([p], [p + 1024], [16], 0, 0, 0, 0.9, 0.1, 0),
        "masked_attention_fwd": lambda: ext.masked_attention_fwd(
            p, p, p, p, p, 0, 0, 1, 1, 8, 8, 64, [512, 512, 64], [512, 512, 64], [512, 512, 64],
            0.125, f16, 0),
        "masked_attention_bwd": lambda: ext.masked_attention_bwd(
            p, p, p, p, p, p, 0, 0, p, p, p, p, 1, 1, 8, 8, 64, [512, 512, 64], [512, 512, 64],
            [512, 512, 64], 0.125, f16, 0),
        "adaln_modulate_fwd": lambda: ext.adaln_modulate_fwd(p, p, p, p, p, p, 4, 32, 1e-6, f16, 0),
        "adaln_modulate_bwd": lambda: ext.adaln_modulate_bwd(p, p, p, p, p, p, p, p, p, p, 4, 32, f16, 0),
        "gemm": lambda: ext.gemm(p, p, p, 0, 16, 16, 16, 0, 1, 0, 0, 0, 0, f16, 0),
        "denoise_update": lambda: ext.denoise_update(p, p, 0, p, p, 4, 16, 32, 1, p, 0.5, 0.5,
                                                     -1.0, 0.0, 0.0, f16, 0),
    }


def test_every_kernel_is_covered_here(ext):
    needed = {name for kernels in backends.OPS.values() for name in kernels.c_functions}
    assert needed <= set(_valid_calls(ext)), needed - set(_valid_calls(ext))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible")
@pytest.mark.parametrize("name", ["ema_update", "masked_attention_fwd", "masked_attention_bwd",
                                  "adaln_modulate_fwd", "adaln_modulate_bwd", "gemm", "denoise_update"])
def test_calling_a_kernel_without_a_gpu_raises_runtime_error(ext, name):
    assert ext.device_count() == 0
    with pytest.raises(RuntimeError, match=rf"djepa\._C\.{name}: no (usable )?CUDA device"):
        _valid_calls(ext)[name]()


# --- the boundary: each entry point refuses each wrong argument before it touches the GPU -----
# Host memory stands in for the buffers: the checks refuse before anything reads it, and a valid
# call ends at "no CUDA device" here (on a GPU machine, at "host memory, not GPU memory").
HOST = torch.zeros(1 << 16)
P = HOST.data_ptr()  # 64-byte aligned
F32, F16, BF16, F64 = 0, 1, 2, 3
VALID = {
    "ema_update": dict(ema_ptrs=[P], x_ptrs=[P + 4096], numels=[16], ema_dtype=F32, x_dtype=F32, decay_ptr=0,
                       decay=0.9, one_minus_decay=0.1, stream=0),
    "adaln_modulate_fwd": dict(x=P, mod=P, ln_w=P, ln_b=P, h=P, stats=P, M=4, W=32, eps=1e-6, dtype=F16, stream=0),
    "adaln_modulate_bwd": dict(x=P, mod=P, ln_w=P, ln_b=P, stats=P, dh=P, dx=P, dmod=P, dln_w_partial=P,
                               dln_b_partial=P, M=4, W=32, dtype=F16, stream=0),
    "gemm": dict(a=P, b=P, c=P, bias=0, M=16, N=16, K=16, a_trans=0, b_trans=1, epilogue=0, aux1=0, aux2=0,
                 aux_out=0, dtype=F16, stream=0),
    "denoise_update": dict(x=P, model_out=P, noise=0, out=P, xin_out=P, B=4, C=16, out_ld=32, cfg=1, cfg_scale=P,
                           coef_x=0.5, coef_eps=0.5, min_log=-1.0, max_log=0.0, noise_scale=0.0, dtype=F16, stream=0),
}
SPLIT_K = dict(epilogue=16, K=512, splits=2, workspace=P)  # a weight gradient split in 2
# (entry point, arguments over VALID's, what the ValueError says after "djepa._C.<name>: ")
WRONG = [
    ("ema_update", dict(x_ptrs=[P, P + 64]), r"pointer and size lists differ in length \(ema_ptrs 1, x_ptrs 2"),
    ("ema_update", dict(x_dtype=F64), r"unsupported dtype pair \(EMA float32, tensor float64\)"),
    ("ema_update", dict(ema_dtype=F16, x_dtype=F32), r"unsupported dtype pair \(EMA float16, tensor float32\)"),
    ("ema_update", dict(numels=[-1]), r"numels\[0\]=-1 < 0"),
    ("ema_update", dict(numels=[2 ** 62]), r"numels\[0\] in bytes overflows int64"),
    ("ema_update", dict(ema_ptrs=[0]), r"ema_ptrs\[0\] is required"),
    ("ema_update", dict(x_ptrs=[0]), r"x_ptrs\[0\] is required"),
    ("ema_update", dict(ema_ptrs=[P + 2]), r"ema_ptrs\[0\]=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("ema_update", dict(x_dtype=F16, x_ptrs=[P + 4097]), r"x_ptrs\[0\]=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("ema_update", dict(x_ptrs=[P + 60]), r"ema_ptrs\[0\] and x_ptrs\[0\] overlap"),
    ("ema_update", dict(ema_ptrs=[P + 4128]), r"x_ptrs\[0\] and ema_ptrs\[0\] overlap"),  # ema starts inside x
    ("ema_update", dict(ema_ptrs=[P, P + 32], x_ptrs=[P + 4096, P + 8192], numels=[16, 16]),
     r"ema_ptrs\[0\] and ema_ptrs\[1\] overlap"),
    ("ema_update", dict(decay_ptr=P + 8194), r"decay_ptr=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("ema_update", dict(ema_ptrs=[2 ** 64 - 32]), r"tensor 0 runs past the end of the address space"),
    ("ema_update", dict(numels=[2 ** 31 * 4096 + 1], x_ptrs=[P + 2 ** 46]), r"more than 2\^31-1 blocks in one launch"),
    ("adaln_modulate_fwd", dict(dtype=F64), r"unsupported dtype code 3 \(float64\); takes float16, bfloat16, float32"),
    ("adaln_modulate_fwd", dict(dtype=9), r"unsupported dtype code 9 \(unknown\)"),
    ("adaln_modulate_fwd", dict(W=0), r"W=0 is outside \[1, 2147483647\]"),
    ("adaln_modulate_fwd", dict(M=-1), r"M=-1 is outside \[0, 2147483647\]"),
    ("adaln_modulate_fwd", dict(M=2 ** 31), r"M=2147483648 is outside"),
    ("adaln_modulate_fwd", dict(mod_ld=40), r"mod_ld=40 < 2\*W=64"),
    ("adaln_modulate_fwd", dict(mod_ld=2 ** 61), r"mod's extent overflows int64"),
    ("adaln_modulate_fwd", dict(x=0), r"x is required"),
    ("adaln_modulate_fwd", dict(mod=0), r"mod is required"),
    ("adaln_modulate_fwd", dict(h=0), r"h is required"),
    ("adaln_modulate_fwd", dict(x=P + 1), r"x=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("adaln_modulate_fwd", dict(ln_b=P + 1), r"ln_b=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("adaln_modulate_fwd", dict(dtype=F32, h=P + 2), r"h=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("adaln_modulate_fwd", dict(stats=P + 2), r"stats=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("adaln_modulate_bwd", dict(dtype=F64), r"unsupported dtype code 3"),
    ("adaln_modulate_bwd", dict(W=0), r"W=0 is outside"),
    ("adaln_modulate_bwd", dict(M=-1), r"M=-1 is outside"),
    *[("adaln_modulate_bwd", {name: 0}, rf"{name} is required")
      for name in ("x", "mod", "stats", "dh", "dx", "dmod")],
    ("adaln_modulate_bwd", dict(dln_w_partial=0), r"dln_w_partial is required with ln_w"),
    ("adaln_modulate_bwd", dict(dmod=P + 1), r"dmod=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("adaln_modulate_bwd", dict(dln_w_partial=P + 2), r"dln_w_partial=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("adaln_modulate_bwd", dict(dln_b_partial=P + 2), r"dln_b_partial=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("adaln_modulate_bwd", dict(stats=P + 2), r"stats=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("gemm", dict(dtype=F32), r"unsupported dtype code 0 \(float32\); takes float16, bfloat16"),
    ("gemm", dict(M=-1), r"M=-1 is outside \[0, 2147483647\]"),
    ("gemm", dict(N=2 ** 31), r"N=2147483648 is outside"),
    ("gemm", dict(K=-1), r"K=-1 is outside"),
    ("gemm", dict(a_trans=2), r"a_trans must be 0 or 1, got 2"),
    ("gemm", dict(b_trans=-1), r"b_trans must be 0 or 1, got -1"),
    ("gemm", dict(epilogue=4), r"unknown epilogue 4"),
    ("gemm", dict(epilogue=32), r"unknown epilogue 32"),
    ("gemm", dict(epilogue=2, aux1=P, aux2=P, aux2_ld=8), r"aux2_ld .*=8 is outside \[16, "),
    ("gemm", dict(epilogue=2, aux2=P, aux2_ld=48), r"aux1 is required by epilogue 2 \(the residual\)"),
    ("gemm", dict(epilogue=2, aux1=P, aux2_ld=48), r"aux2 is required by epilogue 2 \(the gate\)"),
    ("gemm", dict(epilogue=3), r"aux1 is required by epilogue 3"),
    ("gemm", dict(c=0), r"c is required"),
    ("gemm", dict(a=0), r"a is required when K > 0"),
    ("gemm", dict(b=0), r"b is required when K > 0"),
    ("gemm", dict(a=P + 1), r"a=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("gemm", dict(bias=P + 1), r"bias=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("gemm", dict(epilogue=16, c=P + 2), r"c=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("gemm", dict(epilogue=1, aux_out=P + 1), r"aux_out=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("gemm", dict(M=65535 * 128 + 1), r"M=8388481 exceeds 65535 row tiles"),
    ("gemm", dict(splits=0), r"splits=0 is outside \[1, 65535\]"),
    ("gemm", dict(SPLIT_K, epilogue=0), r"split-K needs a float32 output with no epilogue and no bias"),
    ("gemm", dict(SPLIT_K, bias=P), r"split-K needs a float32 output with no epilogue and no bias"),
    ("gemm", dict(SPLIT_K, workspace=0), r"workspace is required when splits > 1"),
    ("gemm", dict(SPLIT_K, workspace=P + 2, workspace_numel=256), r"workspace=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("gemm", dict(SPLIT_K), r"workspace_numel=0 float32 is too small for \(splits - 1\) \* M \* N = 256"),
    ("gemm", dict(SPLIT_K, splits=3, workspace_numel=511), r"workspace_numel=511 float32 is too small for .* = 512"),
    ("gemm", dict(SPLIT_K, K=64, workspace_numel=512, splits=3), r"splits=3 leaves a split without k-tiles for K=64"),
    ("gemm", dict(SPLIT_K, M=65535 * 128, N=2 ** 31 - 1, splits=65535), r"the split-K workspace size overflows int64"),
    ("denoise_update", dict(dtype=F64), r"unsupported dtype code 3"),
    ("denoise_update", dict(C=0), r"C=0 is outside \[1, 2147483647\]"),
    ("denoise_update", dict(B=-1), r"B=-1 is outside"),
    ("denoise_update", dict(cfg=2), r"cfg must be 0 or 1, got 2"),
    ("denoise_update", dict(out_ld=31), r"out_ld=31 < 2\*C=32"),
    ("denoise_update", dict(out_ld=2 ** 61), r"model_out's extent overflows int64"),
    ("denoise_update", dict(x=0), r"x is required"),
    ("denoise_update", dict(model_out=0), r"model_out is required"),
    ("denoise_update", dict(out=0), r"out is required"),
    ("denoise_update", dict(noise_scale=1.0), r"noise is required when noise_scale != 0"),
    ("denoise_update", dict(cfg_scale=0), r"cfg_scale is required \(a device pointer to one float32\) when cfg != 0"),
    ("denoise_update", dict(x=P + 2), r"x=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("denoise_update", dict(noise=P + 2, noise_scale=1.0), r"noise=0x[0-9a-f]+ is not aligned to 4 bytes"),
    ("denoise_update", dict(model_out=P + 1), r"model_out=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("denoise_update", dict(xin_out=P + 1), r"xin_out=0x[0-9a-f]+ is not aligned to 2 bytes"),
    ("denoise_update", dict(cfg_scale=P + 2), r"cfg_scale=0x[0-9a-f]+ is not aligned to 4 bytes"),
]
# Calls the checks must let through (to "no CUDA device" here): the edges of what they refuse.
STILL_VALID = [
    ("ema_update", dict(x_ptrs=[P + 64])),                                         # ends where x starts
    ("ema_update", dict(ema_ptrs=[P, P + 64], x_ptrs=[P + 4096, P + 4096], numels=[16, 16])),  # shared sources
    ("ema_update", dict(ema_ptrs=[P, 0], x_ptrs=[P + 4096, 0], numels=[16, 0])),  # an empty pair needs no pointers
    ("ema_update", dict(ema_dtype=BF16, x_dtype=BF16, ema_ptrs=[P + 2], x_ptrs=[P + 4098])),
    ("adaln_modulate_fwd", dict(ln_w=0, ln_b=0, stats=0, mod_ld=64)),              # mod_ld = 2W: final layer
    ("adaln_modulate_bwd", dict(ln_w=0, ln_b=0, dln_w_partial=0, dln_b_partial=0)),
    ("gemm", dict(SPLIT_K, workspace_numel=256)),
    ("gemm", dict(SPLIT_K, splits=3, workspace_numel=512)),
    ("gemm", dict(K=0, a=0, b=0)),                                                 # c = bias only
    ("gemm", dict(epilogue=2, aux1=P, aux2=P + 64, aux2_ld=16)),
    ("denoise_update", dict(cfg=0, cfg_scale=0, noise=P, noise_scale=0.5, xin_out=0)),
]


def _name(case):
    return f"{case[0]}-{'-'.join(f'{k}' for k in case[1])}"


@pytest.mark.parametrize("name, changes, message", WRONG, ids=[_name(c) for c in WRONG])
def test_each_entry_point_refuses_each_wrong_argument(ext, name, changes, message):
    with pytest.raises(ValueError, match=rf"^djepa\._C\.{name}: {message}"):
        getattr(ext, name)(**{**VALID[name], **changes})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible")
@pytest.mark.parametrize("name, changes", STILL_VALID, ids=[_name(c) for c in STILL_VALID])
def test_the_checks_let_valid_calls_through_to_the_device(ext, name, changes):
    with pytest.raises(RuntimeError, match=rf"^djepa\._C\.{name}: no (usable )?CUDA device"):
        getattr(ext, name)(**{**VALID[name], **changes})


@pytest.mark.parametrize("name, changes", [
    ("adaln_modulate_fwd", dict(M=0, x=0, mod=0, h=0, stats=0)),
    ("adaln_modulate_bwd", dict(M=0, x=0, mod=0, stats=0, dh=0, dx=0, dmod=0)),
    ("gemm", dict(M=0, a=0, b=0, c=0)),
    ("gemm", dict(N=0, epilogue=16, splits=2)),  # nothing to split: no workspace needed
    ("denoise_update", dict(B=0, x=0, model_out=0, out=0)),
])
def test_an_empty_call_returns_without_a_gpu(ext, name, changes):
    assert getattr(ext, name)(**{**VALID[name], **changes}) is None


def test_gemm_splits_checks_its_sizes_before_the_gpu_and_plans_without_one(ext):
    with pytest.raises(ValueError, match=r"^djepa\._C\.gemm_splits: M=-1 is outside"):
        ext.gemm_splits(-1, 16, 16, 16, False, sms=132)
    with pytest.raises(ValueError, match=r"^djepa\._C\.gemm_splits: unknown epilogue 5"):
        ext.gemm_splits(16, 16, 16, 5, False, sms=132)
    # weight gradients (float32, no bias): 64 tiles against 264 block slots, K = 8192 tokens
    assert ext.gemm_splits(1024, 1024, 8192, 16, False, sms=132) == 4
    assert ext.gemm_splits(1024, 1024, 8192, 16, True, sms=132) == 1   # bias: never split
    assert ext.gemm_splits(1024, 1024, 8192, 0, False, sms=132) == 1   # half output: never split


@pytest.mark.gpu
def test_every_entry_point_refuses_host_memory_on_a_gpu_machine(ext):
    """Past the argument checks, the pointers must be GPU memory: host memory is named."""
    for name, call in VALID.items():
        with pytest.raises(ValueError, match=rf"^djepa\._C\.{name}: \w+(\[0\])?=0x[0-9a-f]+ is host memory"):
            getattr(ext, name)(**call)


def test_the_fake_extension_mirrors_the_bindings(ext):
    """tests/fake_c.SIGNATURES (the CPU dispatch tests' stand-in) has every bound parameter, in
    order, with the binding's defaults."""
    import re

    from fake_c import REQUIRED, SIGNATURES

    for name, params in SIGNATURES.items():
        first = getattr(ext, name).__doc__.splitlines()[0]
        inside = re.fullmatch(rf"{name}\((.*)\) -> \w+", first).group(1)
        bound = [] if not inside else [re.fullmatch(r"(\w+): [^=]+?(?: = (.+))?", p).groups()
                                      for p in re.split(r", (?=\w+: )", inside)]
        assert [n for n, _ in bound] == [n for n, _ in params], name
        for (n, default), (_, fake) in zip(bound, params):
            assert (default is None) == (fake is REQUIRED) and (default is None or default == repr(fake)), (name, n)


def test_ops_name_the_missing_gpu_for_an_explicit_cuda_backend():
    from djepa.ops import ema_update_

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="backend='cuda'"):
        ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5, backend="cuda")


def test_describe_reports_every_op_and_why_a_backend_is_unavailable():
    text = backends.describe()
    for op in backends.OPS:
        assert op in text
    assert "torch" in text and "triton" in text and "djepa._C" in text
    if not torch.cuda.is_available():
        assert "unavailable:" in text


# --- setup.py: when it builds djepa._C, and installing a prebuilt one ------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_version(**env):
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items()
            if k not in ("DJEPA_SKIP_CUDA", "DJEPA_BUILD_CUDA", "DJEPA_PREBUILT_C")}
    full.update(env)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=full,
                         capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout.strip().splitlines()[-1:] or [""], out.stderr


def _has_nvcc():
    import shutil

    return bool(shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                    "bin", "nvcc")))


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch default; this torch has CUDA")
def test_setup_does_not_compile_for_a_cpu_torch_by_default():
    rc, (version,), err = _setup_version()
    assert rc == 0, err
    assert version == "0.1.0", version
    assert "CPU build" in err or "no nvcc" in err, err


def test_setup_skip_and_force():
    rc, (version,), err = _setup_version(DJEPA_SKIP_CUDA="1", DJEPA_BUILD_CUDA="1")
    assert rc == 0 and version == "0.1.0" and "DJEPA_SKIP_CUDA=1" in err, err
    if _has_nvcc():
        rc, (version,), err = _setup_version(DJEPA_BUILD_CUDA="1")
        assert rc == 0 and re.fullmatch(r"0\.1\.0\+cu\d+", version), (version, err)
    rc, _, err = _setup_version(DJEPA_BUILD_CUDA="yes")
    assert rc != 0 and "DJEPA_BUILD_CUDA must be 0 or 1" in err


def test_setup_installs_a_prebuilt_extension_with_its_version(ext, tmp_path):
    rc, (version,), err = _setup_version(DJEPA_PREBUILT_C=ext.__file__)
    major, minor = ext.cuda_version.split(".")[:2]
    assert rc == 0 and version == f"0.1.0+cu{major}{minor}", (version, err)
    junk = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    junk.write_bytes(os.urandom(256))
    rc, _, err = _setup_version(DJEPA_PREBUILT_C=str(junk))
    assert rc != 0 and "does not load as djepa._C" in err, err
    rc, _, err = _setup_version(DJEPA_PREBUILT_C=str(tmp_path / "missing.so"))
    assert rc != 0 and "no such file" in err, err


# --- the attention entry points check what their kernels assume, before any CUDA call ---------
ATTENTION_ENTRY_POINTS = ("masked_attention_fwd", "masked_attention_bwd", "masked_attention_fwd_sm90",
                          "masked_attention_bwd_sm90")


def _attention_kwargs(name, p):
    """A call of `name` that passes every argument check (host pointers into one float buffer,
    64-byte aligned at p): [1, 1, 8, 64] q/k/v, fp16."""
    st = [512, 512, 64]
    kw = dict(q=p, k=p, v=p, o=p, lse=p, kv_index=0, kv_count=0, B=1, H=1, Nq=8, Nk=8, D=64, q_strides=st,
              k_strides=list(st), v_strides=list(st), scale=0.125, dtype=1, stream=0)
    if "bwd" in name:
        kw.update({"do": p, "dq": p, "dk": p, "dv": p, "delta": p})
    return kw


def _wrong_attention_arguments(name, p):
    """(change, message) for each argument the kernels of `name` make assumptions about."""
    sm90 = name.endswith("_sm90")
    wrong = [
        (dict(dtype=0), "unsupported dtype float32"), (dict(dtype=7), "unsupported dtype unknown"),
        (dict(D=48), "unsupported head dim 48"), (dict(B=0), "sizes must be"), (dict(Nq=0), "sizes must be"),
        (dict(Nk=-1), "sizes must be"), (dict(H=70000), "<= 65535" if not sm90 else "too large"),
        (dict(Nq=2 ** 31), "too large"), (dict(q_strides=[512, 64]), "3 ints"),
        (dict(k_strides=[-512, 512, 64]), "strides must be >= 0"), (dict(v_strides=[512, 512, -64]), ">= 0"),
        (dict(scale=float("inf")), "scale must be finite"), (dict(scale=float("nan")), "scale must be finite"),
        (dict(q=0), "non-null"), (dict(kv_index=p), "both be given"), (dict(kv_count=p), "both be given"),
        (dict(kv_index=p + 2, kv_count=p + 2), "4-byte aligned"), (dict(q=p + 1), "aligned to their element size"),
        (dict(v=p + 1), "aligned to their element size"), (dict(o=0), "non-null"),
    ]
    if sm90:
        wrong.append((dict(D=32), r"unsupported head dim 32 \(supported: 64, 80, 96, 128\)"))
    else:
        wrong.append((dict(B=70000), "grid limits"))
        wrong += [(dict(dropout_p=0.1), "dropout takes both"), (dict(philox=p), "dropout takes both"),
                  (dict(philox=p, dropout_p=1.0), r"dropout_p must lie in \[0, 1\)"),
                  (dict(philox=p, dropout_p=-0.5), r"\[0, 1\)"), (dict(philox=p, dropout_p=float("nan")), r"\[0, 1\)"),
                  (dict(philox=p + 4, dropout_p=0.1), "8-byte aligned")]
    if "fwd" in name:
        wrong += [(dict(lse=0), "o and lse must be non-null"), (dict(lse=p + 2), "4-byte aligned"),
                  (dict(o=p + 2), "4-byte aligned")]
        if not sm90:
            wrong.append((dict(keep_out=p), "keep_out .* needs dropout"))
    else:
        wrong += [(dict(do=0), "non-null"), (dict(delta=0), "non-null"), (dict(dq=0), "non-null"),
                  (dict(dk=0), "non-null"), (dict(delta=p + 2), "aligned"), (dict(do=p + 1), "aligned"),
                  (dict(dq=p + 2), "aligned"), (dict(dv=p + 2), "aligned")]
        if not sm90:
            wrong.append((dict(dk=p + 4), "16-byte aligned"))
    return wrong


@pytest.mark.parametrize("name", ATTENTION_ENTRY_POINTS)
def test_attention_entry_points_refuse_each_wrong_argument_before_any_cuda_call(ext, name):
    """Each wrong argument raises ValueError naming the entry point and the argument, on a
    machine with or without a GPU (the checks run before the device is touched); the same call
    with the argument right gets past them (to the missing GPU, on a CPU machine)."""
    fn = getattr(ext, name, None)
    if fn is None:
        pytest.skip(f"djepa._C was built without {name}")
    buf = torch.zeros(1 << 14, dtype=torch.float64)
    p = (buf.data_ptr() + 63) // 64 * 64
    good = _attention_kwargs(name, p)
    for change, message in _wrong_attention_arguments(name, p):
        with pytest.raises(ValueError, match=rf"djepa\._C\.{name}: .*{message}"):
            fn(**{**good, **change})
    if not torch.cuda.is_available():
        calls = [good] + ([{**good, "philox": p, "dropout_p": 0.1}] if not name.endswith("_sm90") else [])
        for kw in calls:
            with pytest.raises(RuntimeError, match=rf"djepa\._C\.{name}: no (usable )?CUDA device"):
                fn(**kw)
