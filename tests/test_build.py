"""The CUDA extension djepa._C: it imports, exposes every kernel the ops need, reports its build,
and refuses clearly (RuntimeError, not a crash) when no GPU is visible.

Where `_C` was not built these tests skip, unless DJEPA_REQUIRE_C=1 (set by .ci/run, which
builds it): then a missing extension fails the run.
"""
import os
import re

import pytest
import torch

import djepa
from djepa import backends

REQUIRE = os.environ.get("DJEPA_REQUIRE_C") == "1"


@pytest.fixture(scope="module")
def ext():
    module = backends.cuda_extension()
    if module is None:
        if REQUIRE:
            pytest.fail(f"DJEPA_REQUIRE_C=1 but {backends.cuda_extension_error()}")
        pytest.skip(f"djepa._C is not built here: {backends.cuda_extension_error()}")
    return module


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
    for name in backends.OPS[op][0]:
        assert callable(getattr(ext, name, None)), f"djepa._C lacks {name} (needed by {op})"


def _valid_calls(ext):
    """One plausible call per kernel entry point (host pointers: never dereferenced, because the
    entry point must refuse before touching memory when there is no GPU)."""
    buf = torch.zeros(4096)
    p = buf.data_ptr()
    f16 = 1
    return {
        "ema_update": lambda: ext.ema_update([p], [p], [16], 0, 0, 0, 0.9, 0.1, 0),
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
    needed = {name for names, _ in backends.OPS.values() for name in names}
    assert needed <= set(_valid_calls(ext)), needed - set(_valid_calls(ext))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal; a GPU is visible")
@pytest.mark.parametrize("name", ["ema_update", "masked_attention_fwd", "masked_attention_bwd",
                                  "adaln_modulate_fwd", "adaln_modulate_bwd", "gemm", "denoise_update"])
def test_calling_a_kernel_without_a_gpu_raises_runtime_error(ext, name):
    assert ext.device_count() == 0
    with pytest.raises(RuntimeError, match=rf"djepa\._C\.{name}: no (usable )?CUDA device"):
        _valid_calls(ext)[name]()


def test_bad_arguments_raise_value_error_not_crash(ext):
    with pytest.raises(ValueError, match="differ in length"):
        ext.ema_update([1, 2], [1], [4, 4], 0, 0, 0, 0.9, 0.1, 0)
    with pytest.raises(ValueError, match="dtype"):
        ext.ema_update([1], [1], [4], 0, 3, 0, 0.9, 0.1, 0)


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
