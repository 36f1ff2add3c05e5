"""The two designs of djepa._C's sm_90a attention kernels (csrc/attention_sm90.cu's `design`):
DJEPA_SM90_ATTENTION=pipelined (the default, FlashAttention-3's schedule) or baseline (the first
sm_90a kernels), read at each launch.

CPU (the extension and an sm_90 GPU faked): the ops pass the design to both sm_90a entry points
and none to the mma.sync ones, a bad value is an op-prefixed ValueError, `djepa info` says which
design runs, a tuning table records the design its "cuda" times are of and is ignored under the
other, and `djepa tune` times "cuda" under both.

GPU (pytest.mark.gpu and sm90, so tools/gpu_run.sh runs them in its tests-sm90 session; an sm_90
device and a 90a build): each design against the float64 eager reference under the tolerance rule,
forward and backward, dense and masked, odd shapes.
"""
import contextlib
import os

import pytest
import torch

from djepa import backends, tune, tune_table
from djepa.ops import _dispatch, masked_attention, masked_attention_reference
from djepa.testing import assert_close_to_reference
from fake_c import Call
from test_dispatch_sm90 import sm90_extension

GPU = torch.device("cuda", 0)
SM90 = ("masked_attention_fwd_sm90", "masked_attention_bwd_sm90")
DESIGNS = tuple(backends.SM90_ATTENTION_DESIGNS)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DJEPA_SM90_ATTENTION", raising=False)
    backends.reset_caches()
    yield
    backends.reset_caches()


class _Ext:
    """djepa._C as the attention op sees it: records (name, positional args) with the keyword
    arguments as .kwargs, runs nothing."""
    cuda_version, cuda_archs, registered, wgmma_ops = "13.0", "80,90a", (), ("masked_attention",)

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("masked_attention_"):
            return lambda *args, **kwargs: self.calls.append(Call(name, args, kwargs=kwargs))
        raise AttributeError(name)


@pytest.fixture
def faked(monkeypatch):
    """Launches from CPU tensors as if on an sm_90 GPU of a 90a build (state["wgmma"]: whether the
    sm_90a kernels serve them)."""
    state = {"wgmma": True, "ext": _Ext()}
    monkeypatch.setattr(backends, "cuda_extension", lambda: state["ext"])
    monkeypatch.setattr(_dispatch, "extension", lambda: state["ext"])
    monkeypatch.setattr(backends, "uses_wgmma", lambda op, device: state["wgmma"] and op == "masked_attention")
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(_dispatch, "on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_dispatch, "stream_handle", lambda device: 77)
    return state


def _launches(state, D=64):
    state["ext"].calls.clear()
    q = torch.randn(2, 3, 13, D, dtype=torch.float16).requires_grad_()
    k, v = (torch.randn(2, 3, 19, D, dtype=torch.float16).requires_grad_() for _ in range(2))
    masked_attention(q, k, v, torch.rand(2, 19) < 0.5, backend="cuda").sum().backward()
    return [(c.name, c.kwargs) for c in state["ext"].calls]


def test_the_sm90_entry_points_get_the_design_the_switch_names(faked, monkeypatch):
    assert _launches(faked) == [(n, {"design": 0}) for n in SM90]  # unset: pipelined
    for value, code in (("baseline", 1), (" Baseline ", 1), ("pipelined", 0), ("", 0)):
        monkeypatch.setenv("DJEPA_SM90_ATTENTION", value)
        assert _launches(faked) == [(n, {"design": code}) for n in SM90], value
    faked["wgmma"] = False  # the mma.sync kernels have one design: no argument
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "baseline")
    assert _launches(faked) == [("masked_attention_fwd", {}), ("masked_attention_bwd", {})]
    faked["wgmma"] = True
    assert _launches(faked, D=32) == [("masked_attention_fwd", {}), ("masked_attention_bwd", {})]  # no sm_90a D=32


def test_a_bad_design_is_an_op_prefixed_value_error_before_any_launch(faked, monkeypatch):
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "fa3")
    with pytest.raises(ValueError, match=r"masked_attention: DJEPA_SM90_ATTENTION='fa3' is not one of "
                                         r"\('pipelined', 'baseline'\)"):
        _launches(faked)
    assert faked["ext"].calls == []
    faked["wgmma"] = False  # where the sm_90a kernels do not run, the switch is not read
    assert [n for n, _ in _launches(faked)] == ["masked_attention_fwd", "masked_attention_bwd"]


def test_info_says_which_design_runs(monkeypatch):
    line = next(ln for ln in backends.describe().splitlines() if ln.startswith("sm90 attn"))
    assert line.startswith("sm90 attn    pipelined (FlashAttention-3") and "pipelined | baseline" in line
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "baseline")
    assert "sm90 attn    baseline (the first sm_90a kernels)" in backends.describe()
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "nope")
    assert "sm90 attn    invalid: masked_attention: DJEPA_SM90_ATTENTION='nope'" in backends.describe()


# ----------------------------------------------------------------------------- tuning
@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """An H200 that is not there, with fixed versions and no user or shipped tables; the sm_90a
    attention kernels run on it (state["wgmma"])."""
    state = {"wgmma": True}
    monkeypatch.setattr(backends, "gpu_available", lambda: True)
    monkeypatch.setattr(backends, "device_info", lambda device: {"name": "NVIDIA H200", "capability": (9, 0),
                                                                 "sms": 132})
    monkeypatch.setattr(backends, "uses_wgmma", lambda op, device: state["wgmma"])
    monkeypatch.setattr(backends, "build_versions", lambda: {"torch": "t", "triton": "3", "cuda_driver": 1,
                                                             "djepa": "d", "c_build": "13.0/90a"})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_table, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("DJEPA_SM90_KERNELS", raising=False)
    return state


def _table(path, design):
    env = backends.table_environment(GPU)
    assert env["sm90_attention"] == backends.sm90_attention_design()
    if design is None:
        del env["sm90_attention"]  # a table from before the switch
    else:
        env["sm90_attention"] = design
    b = tune.bucket("masked_attention", D=64, Nk=512, train=True)
    entry = {"op": "masked_attention", "dtype": "bfloat16", "bucket": b, "key": tune.bucket_key(b), "shape": "s",
             "backend": "cuda", "ms": {"cuda": 1.0, "triton": 2.0}, "unserved": {}}
    return tune.write_table(path, env, [entry])


def test_a_table_is_followed_only_under_the_design_it_measured(fake_gpu, tmp_path, monkeypatch):
    path = _table(tmp_path / "t.json", "pipelined")
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert backends.active_table(GPU).path == path
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "baseline")  # part of the cache key: no reset needed
    assert backends.active_table(GPU) is None
    assert ("measured with the sm_90a attention design 'pipelined', here DJEPA_SM90_ATTENTION selects 'baseline'"
            in backends.describe_tables(GPU))
    fake_gpu["wgmma"] = False  # where the sm_90a kernels do not run the design does not matter
    backends.reset_caches()
    assert backends.active_table(GPU).path == path
    fake_gpu["wgmma"] = True
    monkeypatch.setenv(tune.ENV_VAR, str(_table(tmp_path / "old.json", None)))
    assert backends.active_table(GPU) is not None  # a table without the field matches either design


def test_tune_times_cuda_under_each_design_and_restores_the_switch(fake_gpu, monkeypatch):
    class FakeCase:
        dtype, shape, key, bucket = torch.bfloat16, "s", "k", (("D", 64),)

        def __init__(self, op):
            self.op = op

        def build(self, device):
            return lambda backend: (backend, os.environ.get("DJEPA_SM90_ATTENTION"))

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "baseline")
    times = {None: 9.0, "baseline": 3.0, "pipelined": 1.0}
    calls = []

    def timer(fn, backend, case):
        got = fn()
        calls.append((case.op,) + got)
        return times[got[1]] if backend == "cuda" else 2.0

    entries, _ = tune.run([FakeCase("masked_attention"), FakeCase("ema_update_")], GPU, timer=timer,
                          backends=("cuda", "triton"))
    assert entries[0]["ms"] == {"cuda": 3.0, "triton": 2.0}  # the design in force
    assert entries[0]["sm90_attention"] == {"pipelined": 1.0, "baseline": 3.0}
    assert "sm90_attention" not in entries[1]
    assert [c[1:] for c in calls if c[0] == "masked_attention"] == [
        ("cuda", "baseline"), ("triton", "baseline"), ("cuda", "pipelined"), ("cuda", "baseline")]
    assert os.environ["DJEPA_SM90_ATTENTION"] == "baseline"
    fake_gpu["wgmma"] = False
    entries, _ = tune.run([FakeCase("masked_attention")], GPU, timer=timer, backends=("cuda",))
    assert "sm90_attention" not in entries[0]


def test_tune_refuses_a_bad_design_before_timing_anything(monkeypatch, capsys):
    from djepa.cli import build_parser

    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "fast")
    assert tune.main(build_parser().parse_args(["tune", "--dry-run"])) == 2
    assert "djepa tune: error: masked_attention: DJEPA_SM90_ATTENTION='fast'" in capsys.readouterr().err


def test_reports_say_which_design_ran(monkeypatch, tmp_path):
    from djepa import benchreport

    monkeypatch.setenv("DJEPA_SM90_ATTENTION", "baseline")
    info = benchreport.machine_info()
    assert info["sm90_attention"] == "baseline"
    line = benchreport.machine_line(dict(info, sm90_kernels=True))
    assert "sm_90a kernels on, attention baseline)" in line
    assert "attention" not in benchreport.machine_line(dict(info, sm90_kernels=False))
    b = (("D", 64), ("Nk", 512), ("mode", "train"))
    entry = {"op": "masked_attention", "dtype": "bfloat16", "bucket": b, "shape": "s", "backend": "cuda",
             "ms": {"cuda": 0.5, "triton": 0.75}, "unserved": {}, "sm90_attention": {"pipelined": 0.5,
                                                                                    "baseline": 0.625}}
    env = {"gpu": "NVIDIA H200", "c_build": "13.0/90a", "sm90_kernels": True, "sm90_attention": "pipelined"}
    md, _ = benchreport.render(str(tune_table.write_table(tmp_path / "t_tune.json", env, [entry])))
    text = open(md).read()
    assert "sm_90a kernels on, attention pipelined; 1 entries" in text
    assert "| cuda | 0.5 (pipelined 0.5, baseline 0.625) | 0.75 |" in text


# ----------------------------------------------------------------------------- GPU
@pytest.fixture(params=DESIGNS, ids=lambda d: f"sm90-{d}")
def design(request, monkeypatch):
    """Each design on the GPU, checked to be the one the ops pass to the sm_90a entry points (ids
    sm90-<design>: tools/gpu_run.sh's tests-sm90 cases)."""
    ext = sm90_extension()
    monkeypatch.setenv("DJEPA_SM90_KERNELS", "1")
    monkeypatch.setenv("DJEPA_SM90_ATTENTION", request.param)
    seen = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            if not name.startswith("masked_attention"):
                return fn

            def call(*args, **kwargs):
                seen.append((name, kwargs.get("design")))
                return fn(*args, **kwargs)
            return call

    monkeypatch.setattr(_dispatch, "extension", lambda: Spy())
    return request.param, seen


def _check(q, k, v, mask, design, scale=None, atol=1e-3):
    name, seen = design
    do = torch.randn(q.shape, dtype=q.dtype, device=q.device)

    def grads(fn, *t):
        t = [x.detach().requires_grad_() for x in t]
        o = fn(*t)
        return (o, *torch.autograd.grad(o, t, do.to(o.dtype).to(o.device)))

    seen.clear()
    fast = grads(lambda a, b, c: masked_attention(a, b, c, mask, scale=scale, backend="cuda"), q, k, v)
    code = backends.SM90_ATTENTION_DESIGNS[name]
    assert seen == [(SM90[0], code), (SM90[1], code)]
    m = None if mask is None else mask.cpu()
    ref = grads(lambda a, b, c: masked_attention_reference(a, b, c, m, scale=scale), q.double().cpu(),
                k.double().cpu(), v.double().cpu())
    low = grads(lambda a, b, c: masked_attention_reference(a, b, c, mask, scale=scale, upcast=False), q, k, v)
    for what, f, lo, r in zip(("output", "dq", "dk", "dv"), fast, low, ref):
        assert f.dtype == q.dtype and f.shape == r.shape and torch.isfinite(f).all()
        assert_close_to_reference(f, lo, r, atol=atol, what=f"{name} {what}")
    return fast


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_each_design_matches_the_reference_masked_and_dense(design, dtype, D):
    B, H, Nq, Nk = 2, 3, 197, 203
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype, device="cuda") for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device="cuda") < 0.3
    mask[0] = False      # a sample without a visible key: zeros, zero gradients
    mask[1, Nk - 1] = True
    o, dq, dk, dv = _check(q, k, v, mask, design)
    for t in (o, dq, dk, dv):
        assert torch.equal(t[0], torch.zeros_like(t[0]))
    _check(q, k, v, None, design)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 63, 65), (2, 1, 129, 64), (1, 1, 300, 7), (1, 2, 257, 520)])
@pytest.mark.parametrize("D", [64, 128])
def test_each_design_at_odd_shapes(design, shape, D):
    B, H, Nq, Nk = shape
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.bfloat16, device="cuda") for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device="cuda") < 0.5
    mask[:, 0] = True
    _check(q, k, v, mask, design)
    _check(q, k, v, None, design, scale=0.3)
