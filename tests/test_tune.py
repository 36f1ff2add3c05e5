"""backend="auto" follows evidence: the static rule per arch, tuning tables (read by
djepa.tune_table) that `djepa tune` (djepa.tune) writes on a GPU, and `djepa info`'s account of
both. Everything here runs on the
CPU: the GPU is faked (name, capability, versions) and the timer is a fake that returns set
timings, so the mechanism is checked without measuring anything."""
import json
import os
import subprocess
import sys

import pytest
import torch

from djepa import backends, tune, tune_table
from djepa.ops import _dispatch

GPU = torch.device("cuda", 0)
VERSIONS = {"torch": "2.11.0+cu130", "triton": "3.6.0", "cuda_driver": 13000, "djepa": "0.1.0+cu130",
            "c_build": "13.0/90a"}


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A GPU that is not there: backends see one (name, capability), every backend can serve
    it, versions are fixed, and no user table leaks in from the real cache."""
    state = {"name": "NVIDIA H200", "capability": (9, 0)}
    monkeypatch.setattr(backends, "gpu_available", lambda: True)
    monkeypatch.setattr(backends, "device_info", lambda device: {
        "name": state["name"], "capability": state["capability"], "sms": 132})
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda op, device: None)
    monkeypatch.setattr(backends, "build_versions", lambda: dict(VERSIONS))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: state["name"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(tune.ENV_VAR, raising=False)
    monkeypatch.setattr(tune_table, "SHIPPED_DIR", tmp_path / "shipped")
    # djepa._C as built here, less its sm_90a kernels (tests/test_dispatch_sm90.py has them)
    monkeypatch.setenv("DJEPA_SM90_KERNELS", "0")
    backends.reset_caches()
    yield state
    backends.reset_caches()


def _auto(op, dtype=torch.bfloat16, **dims):
    return _dispatch.select_backend(op, "auto", GPU, dtype=dtype, case=dims)


def _entry(op, dtype, dims, ms):
    b = tune.bucket(op, **dims)
    return {"op": op, "dtype": dtype, "bucket": b, "key": tune.bucket_key(b), "shape": "test",
            "backend": min(ms, key=ms.get), "ms": ms, "unserved": {}}


def _table(path, entries, **meta):
    env = {"gpu": "NVIDIA H200", "capability": [9, 0], "sms": 132, **VERSIONS, **meta}
    return tune.write_table(path, env, entries)


# ----------------------------------------------------------------------------- buckets
def test_buckets_round_sizes_to_powers_of_two_and_keep_the_mode():
    assert tune.bucket("masked_attention", D=80, Nk=320, train=True) == (("D", 80), ("Nk", 512), ("mode", "train"))
    assert tune.bucket("masked_attention", D=64, Nk=512, train=False)[1] == ("Nk", 512)
    assert tune.bucket("adaln_block", W=1024, M=8193, train=False) == (("W", 1024), ("M", 16384), ("mode", "infer"))
    assert tune.bucket("denoise_step", W=1536, M=2048) == (("W", 1536), ("M", 2048))
    assert tune.bucket("ema_update_", numel=212_000_000) == (("numel", 2 ** 28),)
    assert tune.bucket_key(tune.bucket("masked_attention", D=64, Nk=300, train=True)) == "D64-Nk512-train"
    with pytest.raises(ValueError, match="no shape bucket"):
        tune.bucket("frobnicate", n=1)


def test_bucket_distance_is_log2_of_the_size_ratios_and_labels_must_match():
    a = tune.bucket("adaln_block", W=1024, M=8192, train=True)
    assert tune.distance(a, a) == 0
    assert tune.distance(a, tune.bucket("adaln_block", W=1024, M=2048, train=True)) == 2
    assert tune.distance(a, tune.bucket("adaln_block", W=2048, M=4096, train=True)) == 2
    assert tune.distance(a, tune.bucket("adaln_block", W=1024, M=8192, train=False)) == float("inf")
    assert tune.distance(a, tune.bucket("denoise_step", W=1024, M=8192)) == float("inf")


# ----------------------------------------------------------------------------- static rule
@pytest.mark.parametrize("op", ["masked_attention", "adaln_block", "denoise_step"])
def test_static_rule_puts_wgmma_before_mma_sync_for_matmul_bound_ops_on_sm90(fake_gpu, op):
    order, why = backends.static_rule(op, GPU)
    assert order == ("triton", "cuda", "eager") and "wgmma" in why and "sm_90" in why
    fake_gpu["capability"] = (8, 0)
    backends.reset_caches()
    order, why = backends.static_rule(op, GPU)
    assert order == ("cuda", "triton", "eager") and "sm_80" in why


def test_static_rule_keeps_c_first_for_memory_bound_ema(fake_gpu):
    for cap in ((9, 0), (8, 0)):
        fake_gpu["capability"] = cap
        order, why = backends.static_rule("ema_update_", GPU)
        assert order[0] == "cuda" and "memory-bound" in why


def test_static_rule_prefers_c_once_it_ships_wgmma_kernels(fake_gpu, monkeypatch):
    monkeypatch.delenv("DJEPA_SM90_KERNELS")
    class Ext:
        cuda_archs = "80,90a"
        wgmma_ops = ("masked_attention",)

    monkeypatch.setattr(backends, "cuda_extension", lambda: Ext)
    assert backends.static_rule("masked_attention", GPU)[0][0] == "cuda"
    assert backends.static_rule("adaln_block", GPU)[0][0] == "triton"


def test_auto_without_a_table_follows_the_static_rule_and_skips_what_cannot_serve(fake_gpu):
    assert _auto("masked_attention", D=64, Nk=320, train=True) == "triton"
    assert _auto("ema_update_", numel=1000) == "cuda"
    assert _dispatch.select_backend("masked_attention", "auto", GPU, triton_reason="no") == "cuda"
    assert _dispatch.select_backend("masked_attention", "auto", GPU, triton_reason="no", cuda_reason="no") == "eager"
    assert _dispatch.select_backend("masked_attention", "auto", torch.device("cpu")) == "eager"


def test_arch_check_of_the_extension():
    assert backends._arch_runs(["80", "90a"], (9, 0))
    assert backends._arch_runs(["80"], (8, 6))        # sm_80 SASS runs on 8.6
    assert backends._arch_runs(["80"], (12, 0))       # compute_80 PTX is JIT-compiled
    assert not backends._arch_runs(["90a"], (8, 0))   # arch-specific code runs on its arch only
    assert not backends._arch_runs(["90a"], (10, 0))
    assert not backends._arch_runs(["100a"], (9, 0))


def test_arch_check_at_its_boundaries():
    assert backends._arch_runs(["80"], (8, 0)) and backends._arch_runs(["86"], (8, 6))  # SASS of exactly this GPU
    assert backends._arch_runs(["90a"], (9, 0)) and not backends._arch_runs(["86"], (8, 0))  # no newer SASS


# ----------------------------------------------------------------------------- tables
def test_auto_follows_a_matching_table_exactly_and_at_the_nearest_bucket(fake_gpu, tmp_path, monkeypatch):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0, "eager": 9.0}),
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=4096, train=True), {"cuda": 3.0, "triton": 2.0}),
        _entry("ema_update_", "bfloat16", dict(numel=2 ** 28), {"cuda": 2.0, "triton": 1.5}),
        _entry("adaln_block", "bfloat16", dict(W=1024, M=64, train=True), {"cuda": 1.0, "triton": 2.0, "eager": 0.5}),
    ])
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert _auto("masked_attention", D=64, Nk=320, train=True) == "cuda"       # measured bucket
    assert _auto("masked_attention", D=64, Nk=1024, train=True) == "cuda"      # nearest: Nk512 (1) over 4096 (2)
    assert _auto("masked_attention", D=64, Nk=3000, train=True) == "triton"    # nearest: Nk4096
    assert _auto("masked_attention", D=64, Nk=2 ** 16, train=True) == "triton"  # too far: static rule
    assert _auto("masked_attention", D=64, Nk=512, train=False) == "triton"    # other mode: static
    assert _auto("masked_attention", dtype=torch.float16, D=64, Nk=512, train=True) == "triton"  # other dtype
    assert _auto("ema_update_", numel=200_000_000) == "triton"                  # measured beat the static rule
    assert _auto("adaln_block", W=1024, M=50, train=True) == "eager"            # eager measured fastest
    # The measured winner cannot serve this call: the next fastest measured backend gets it.
    assert _dispatch.select_backend("masked_attention", "auto", GPU, dtype=torch.bfloat16, cuda_reason="D=48",
                                    case=dict(D=64, Nk=320, train=True)) == "triton"
    # The tables measure no dropout: such a call follows the static rule.
    assert _auto("masked_attention", D=64, Nk=320, train=True, dropout=True) == "triton"
    # A lazy case is evaluated only when a table is active.
    calls = []
    _dispatch.select_backend("ema_update_", "auto", GPU, dtype=torch.bfloat16,
                             case=lambda: calls.append(1) or dict(numel=10))
    assert calls == [1]
    order, why = backends.auto_order("masked_attention", GPU, torch.bfloat16, dict(D=64, Nk=1024, train=True))
    assert order[0] == "cuda" and "nearest measured bucket" in why and str(path) in why


@pytest.mark.parametrize("field,value", [("gpu", "NVIDIA A100-SXM4-80GB"), ("torch", "2.10.0"),
                                         ("triton", "3.5.0"), ("cuda_driver", 12080), ("djepa", "0.0.9"),
                                         ("c_build", "none")])
def test_a_table_for_another_gpu_or_versions_is_ignored_and_info_says_why(fake_gpu, tmp_path, monkeypatch,
                                                                            field, value):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})],
        **{field: value})
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert _auto("masked_attention", D=64, Nk=512, train=True) == "triton"  # the static rule, not the table
    text = backends.describe()
    assert f"ignored {path}" in text and field in text and str(value) in text
    assert "no tuning table for this GPU" in text


def test_unreadable_tables_are_ignored_with_a_reason(fake_gpu, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    for content, reason in (("{not json", "not a readable JSON"), (json.dumps({"format": 99}), "format"),
                            (json.dumps({"format": 1, "entries": [{"op": "x"}]}), "malformed")):
        bad.write_text(content)
        monkeypatch.setenv(tune.ENV_VAR, str(bad))
        backends.reset_caches()
        assert backends.active_table(GPU) is None
        assert reason in backends.describe_tables(GPU)
    monkeypatch.setenv(tune.ENV_VAR, str(tmp_path / "missing.json"))
    backends.reset_caches()
    assert "no such file" in backends.describe_tables(GPU)


def test_served_arch_is_the_code_a_build_runs_on_the_gpu():
    assert tune_table.served_arch(["80", "90a"], (9, 0)) == "90a"
    assert tune_table.served_arch(["90a"], (9, 0)) == "90a"
    assert tune_table.served_arch(["80"], (9, 0)) == "ptx80"   # sm_80 SASS does not run on sm_90: its PTX
    assert tune_table.served_arch(["80", "86"], (8, 9)) == "86"
    assert tune_table.served_arch(["90a"], (8, 0)) is None
    assert tune_table.served_arch(["90a", "100a"], (10, 0)) == "100a"


@pytest.mark.parametrize("machine,followed", [("13.0.88/80,90a", True), ("13.0.88/90a", True),
                                              ("13.0.88/90a,100a", True), ("13.0.88/80", False),
                                              ("12.8.93/80,90a", False), ("none", False)])
def test_a_table_of_a_90a_build_serves_every_build_that_holds_90a(fake_gpu, tmp_path, monkeypatch, machine,
                                                                  followed):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})],
        c_build="13.0.88/90a")
    monkeypatch.setattr(backends, "build_versions", lambda: dict(VERSIONS, c_build=machine))
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert (backends.active_table(GPU) is not None) == followed
    if not followed:
        assert "c_build '13.0.88/90a'" in backends.describe_tables(GPU) and machine in backends.describe_tables(GPU)


def test_a_table_measured_with_the_sm90a_kernels_on_is_ignored_while_they_are_off(fake_gpu, tmp_path,
                                                                                   monkeypatch):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})],
        sm90_kernels=True)
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert backends.active_table(GPU) is None  # the fixture sets DJEPA_SM90_KERNELS=0
    assert "sm_90a kernels on" in backends.describe_tables(GPU)
    monkeypatch.delenv("DJEPA_SM90_KERNELS")
    assert backends.active_table(GPU).path == path  # no reset needed: the switch is part of the cache key


def test_search_order_user_cache_then_shipped_and_off_switch(fake_gpu, tmp_path, monkeypatch):
    e = _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})
    _table(tune_table.SHIPPED_DIR / "2026-11-30-0900_h200_tune.json", [e])
    shipped = _table(tune_table.SHIPPED_DIR / "2026-12-01-1203_h200_tune.json", [e])
    assert backends.active_table(GPU).path == shipped  # of the shipped ones, the newest (dated name) first
    backends.reset_caches()
    user = _table(tune.default_path("NVIDIA H200"), [dict(e, backend="triton", ms={"cuda": 2.0, "triton": 1.0})])
    assert user.parent == tmp_path / "cache" / "djepa" and user.name == "tune-h200.json"
    assert backends.active_table(GPU).path == user
    assert _auto("masked_attention", D=64, Nk=512, train=True) == "triton"
    monkeypatch.setenv(tune.ENV_VAR, "off")
    assert backends.active_table(GPU) is None and "off" in backends.describe_tables(GPU)


def test_describe_names_each_ops_rule_and_the_tuned_buckets(fake_gpu, tmp_path, monkeypatch):
    text = backends.describe()
    assert "NVIDIA H200, sm_90" in text
    for op in backends.OPS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(op))
        assert "auto ->" in line and "static rule" in line
    assert "Triton's tl.dot emits wgmma" in text and "memory-bound" in text
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.25, "triton": 2.5})])
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    text = backends.describe()
    assert f"following {path}" in text
    assert "D64-Nk512-train" in text and "-> cuda" in text and "cuda 1.25 ms" in text
    assert "the table has no measurement of this op" in text


# ----------------------------------------------------------------------------- djepa tune's core
def _tiny_cases():
    return [tune._attention_case(1, 8, 1, 16, torch.float32, train=True),
            tune._attention_case(1, 8, 1, 16, torch.float32, train=False),
            tune._block_case(4, 16, torch.float32, train=True)]


def test_run_times_every_backend_and_the_written_table_drives_auto(fake_gpu, tmp_path, monkeypatch):
    script = {("masked_attention", "train"): {"cuda": 3.0, "triton": 1.0, "eager": 5.0},
              ("masked_attention", "infer"): {"cuda": 1.0, "triton": 2.0, "eager": 5.0},
              ("adaln_block", "train"): {"cuda": 2.0, "triton": 4.0, "eager": 3.0}}
    calls = []

    def timer(fn, backend, case):
        calls.append((case.key, backend))
        if backend == "eager":  # the eager backend really runs here (on the CPU)
            fn()
        if case.op == "adaln_block" and backend == "triton":
            raise tune.Unserved("triton: no")
        return script[(case.op, dict(case.bucket)["mode"])][backend]

    entries, complete = tune.run(_tiny_cases(), torch.device("cpu"), timer=timer)
    assert complete and len(entries) == 3 and len(calls) == 9
    assert [e["backend"] for e in entries] == ["triton", "cuda", "cuda"]
    assert entries[2]["unserved"] == {"triton": "triton: no"} and "triton" not in entries[2]["ms"]
    path = tune.write_table(tmp_path / "out" / "table.json", tune.environment(GPU), entries)
    data = json.loads(path.read_text())
    assert data["gpu"] == "NVIDIA H200" and data["torch"] == VERSIONS["torch"] and data["complete"] is True
    assert data["entries"][0]["bucket"] == {"D": 16, "Nk": 8, "mode": "train"}
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert _auto("masked_attention", dtype=torch.float32, D=16, Nk=8, train=True) == "triton"
    assert _auto("masked_attention", dtype=torch.float32, D=16, Nk=8, train=False) == "cuda"
    assert _auto("adaln_block", dtype=torch.float32, W=16, M=4, train=True) == "cuda"


def test_run_times_each_sm90_gemm_design_of_the_denoise_ops(monkeypatch):
    """Where djepa._C runs its sm_90a GEMMs, adaln_block / denoise_step are timed on cuda once
    per DJEPA_SM90_GEMM design too (the entry's "sm90_gemm"); other ops and backends are not."""
    import os

    class FakeCase:
        def __init__(self, op):
            self.op, self.dtype, self.shape, self.key = op, torch.bfloat16, "s", "k"
            self.bucket = (("W", 16),)

        def build(self, device):
            return lambda backend: (backend, os.environ.get("DJEPA_SM90_GEMM"))

    monkeypatch.setattr(tune._backends, "uses_wgmma", lambda op, device: op != "ema_update_")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.delenv("DJEPA_SM90_GEMM", raising=False)
    calls = []
    times = {(None,): 2.0, ("128x256",): 1.0, ("128x128",): 3.0}

    def timer(fn, backend, case):
        got = fn()
        calls.append((case.op,) + got)
        return times[(got[1],)] if backend == "cuda" else 5.0

    entries, _ = tune.run([FakeCase("adaln_block"), FakeCase("ema_update_")], torch.device("cuda", 0), timer=timer,
                          backends=("cuda", "triton"))
    assert entries[0]["sm90_gemm"] == {"128x128": 3.0, "128x256": 1.0} and entries[0]["ms"] == {"cuda": 2.0,
                                                                                               "triton": 5.0}
    assert "sm90_gemm" not in entries[1]
    assert [c[1:] for c in calls if c[0] == "adaln_block"] == [("cuda", None), ("triton", None), ("cuda", "128x128"),
                                                              ("cuda", "128x256")]
    assert "DJEPA_SM90_GEMM" not in os.environ  # restored


def test_run_stops_at_the_budget_and_marks_the_table_partial(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(tune.time, "monotonic", lambda: next(clock))
    logged, saved = [], []
    entries, complete = tune.run(_tiny_cases(), torch.device("cpu"), timer=lambda fn, b, c: 1.0, budget_s=5,
                                 log=logged.append, on_entry=lambda e: saved.append(len(e)))
    assert not complete and len(entries) == 1 and "budget" in logged[-1] and "2 case(s) not timed" in logged[-1]
    assert saved == [1]  # the table is rewritten after every timed case


def _main_with(monkeypatch, fake_run, *args):
    import contextlib

    from djepa import cli

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(tune, "run", fake_run)
    return cli.main(["tune", "--quick", *args])


def test_tune_writes_a_partial_table_when_interrupted_or_out_of_budget(fake_gpu, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t.json"
    e = _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})
    n = len(tune.cases(quick=True))

    def interrupted(selected, device, budget_s, log, on_entry):
        on_entry([e])
        on_entry([e, dict(e, key="x")])
        raise KeyboardInterrupt  # SIGINT from `timeout`, or SIGTERM (turned into the same)

    assert _main_with(monkeypatch, interrupted, "--out", str(out)) == 130
    table = tune_table.Table.load(out)
    assert len(table.entries) == 2 and table.meta["complete"] is False
    assert table.meta["partial"] == f"interrupted after 2 of {n} case(s)"
    assert table.meta["sm90_kernels"] is False and table.meta["c_build"] == VERSIONS["c_build"]
    assert "interrupted: wrote" in capsys.readouterr().out

    def budget_spent(selected, device, budget_s, log, on_entry):
        assert budget_s == 30
        on_entry([e])
        return [e], False

    assert _main_with(monkeypatch, budget_spent, "--budget", "30", "--out", str(out)) == 0
    table = tune_table.Table.load(out)
    assert table.meta["partial"] == f"--budget 30 s spent after 1 of {n} case(s)" and len(table.entries) == 1
    assert _main_with(monkeypatch, lambda *a, **k: ([e], True), "--out", str(out)) == 0
    assert tune_table.Table.load(out).meta["complete"] is True and "partial" not in tune_table.Table.load(out).meta


def test_gpu_timer_reports_an_unserved_backend():
    def refuse():
        raise ValueError("masked_attention: backend='cuda' cannot serve this call: no")
    with pytest.raises(tune.Unserved, match="cannot serve"):
        tune.gpu_timer(refuse)


def test_the_default_cases_cover_every_op_at_preset_and_benchmark_shapes():
    full, quick = tune.cases(), tune.cases(quick=True)
    assert {c.op for c in full} == set(backends.OPS) == {c.op for c in quick}
    assert {c.key for c in quick} <= {c.key for c in full} and len(quick) < len(full)
    keys = {(c.op, tune.dtype_name(c.dtype), c.key) for c in full}
    assert ("masked_attention", "bfloat16", "D80-Nk512-train") in keys       # D-JEPA-H attention
    assert ("adaln_block", "bfloat16", "W1536-M32768-train") in keys          # H head, training rows
    assert ("denoise_step", "bfloat16", "W1024-M2048") in keys                # B head, CFG sampling
    assert all(tune.dtype_name(c.dtype) == "float32" for c in tune.cases(dtypes=["float32"]))
    assert {c.op for c in tune.cases(ops=["ema_update_"])} == {"ema_update_"}


# ----------------------------------------------------------------------------- command line
def _cli(*args, **env):
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "djepa", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_cli_tune_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "t.json"
    r = _cli("tune", "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no CUDA GPU" in r.stderr
    assert not out.exists()


def test_cli_tune_dry_run_and_bad_options(tmp_path, capsys):
    from djepa import cli

    out = tmp_path / "t.json"
    assert cli.main(["tune", "--dry-run", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "masked_attention" in printed and "ema_update_" in printed and str(out) in printed
    assert not out.exists()
    assert cli.main(["tune", "--budget", "-3"]) == 2 and "--budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--op", "frobnicate"])
    assert exc.value.code == 2


def test_cli_info_shows_the_rule_per_op():
    r = _cli("info", DJEPA_TUNE_TABLE="off")
    assert r.returncode == 0
    for op in backends.OPS:
        assert any(ln.strip().startswith(op) and "auto ->" in ln and "[" in ln for ln in r.stdout.splitlines())


# ----------------------------------------------------------------------------- layers
def _module_files():
    """{module name: file} of djepa's modules (djepa.kernels lives in kernels/)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for base, package in ((root / "djepa", "djepa"), (root / "kernels", "djepa.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = f
    return files


def _imports(name, path, known):
    """The djepa modules `name` imports anywhere in its file (inside functions too)."""
    import ast

    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # djepa.ops.attention.masked_attention -> djepa.ops.attention
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_dispatch_and_ops_never_import_the_tuning_runner_or_the_models():
    """The layers run one way (cli -> train -> models -> nn -> ops -> dispatch/backends ->
    kernels): what auto's dispatch needs of a tuning table is djepa.tune_table, which imports
    nothing from djepa; djepa.tune (the runner, which builds model-shaped cases) sits above the
    models. Walks every import, lazy ones inside functions too, transitively."""
    files = _module_files()
    graph = {name: _imports(name, path, files) for name, path in files.items()}
    assert "djepa.tune" in graph["djepa.cli"] or any("djepa.tune" in v for v in graph.values())  # the walk sees it
    assert graph["djepa.tune_table"] <= {"djepa"}, graph["djepa.tune_table"]
    start = ["djepa.backends", "djepa.tune_table"] + [n for n in files if n.startswith(("djepa.ops", "djepa.kernels"))]
    above = ("djepa.tune", "djepa.models", "djepa.nn", "djepa.train", "djepa.cli")
    for first in start:
        seen, todo, via = {first}, [first], {first: None}
        while todo:
            mod = todo.pop()
            for dep in graph[mod] - seen:
                seen.add(dep)
                via[dep] = mod
                todo.append(dep)
        bad = sorted(m for m in seen if m.startswith(above) and m != "djepa.tune_table")
        chains = []
        for m in bad:
            chain = [m]
            while via[chain[-1]] is not None:
                chain.append(via[chain[-1]])
            chains.append(" <- ".join(chain))
        assert not bad, f"{first} reaches a higher layer: " + "; ".join(chains)
        if first in ("djepa.backends", "djepa.tune_table"):  # (a package and its modules import each other)
            assert first not in {d for m in seen - {first} for d in graph[m]}, f"an import cycle through {first}"


def test_the_walk_catches_an_import_of_the_runner(tmp_path):
    """The check above would fail if dispatch imported djepa.tune (as it did before the split)."""
    f = tmp_path / "backends.py"
    f.write_text("def f():\n    from djepa import tune\n    return tune.bucket\n")
    files = _module_files()
    assert _imports("djepa.backends", f, files) - {"djepa"} == {"djepa.tune"}
    f.write_text("from . import tune_table\nfrom .tune_table import bucket\n")
    assert _imports("djepa.backends", f, files) - {"djepa"} == {"djepa.tune_table"}


def test_a_bucket_exactly_the_largest_distance_away_is_followed(fake_gpu, tmp_path, monkeypatch):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0, "triton": 2.0})])
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    assert tune_table.MAX_DISTANCE == 2.0
    assert _auto("masked_attention", D=64, Nk=2048, train=True) == "cuda"     # distance 2: followed
    assert _auto("masked_attention", D=64, Nk=4096, train=True) == "triton"   # distance 3: the static rule


def test_backends_a_table_did_not_time_stay_behind_the_timed_ones(fake_gpu, tmp_path, monkeypatch):
    path = _table(tmp_path / "t.json", [
        _entry("masked_attention", "bfloat16", dict(D=64, Nk=512, train=True), {"cuda": 1.0})])
    monkeypatch.setenv(tune.ENV_VAR, str(path))
    case = dict(D=64, Nk=512, train=True)
    assert backends.auto_order("masked_attention", GPU, torch.bfloat16, case)[0] == ("cuda", "triton", "eager")
    assert _dispatch.select_backend("masked_attention", "auto", GPU, dtype=torch.bfloat16, cuda_reason="no",
                                    case=case) == "triton"


def test_changing_the_table_variable_in_a_process_changes_the_table_followed(fake_gpu, tmp_path, monkeypatch):
    bucket = dict(D=64, Nk=512, train=True)
    a = _table(tmp_path / "a.json", [_entry("masked_attention", "bfloat16", bucket, {"cuda": 1.0, "triton": 2.0})])
    b = _table(tmp_path / "b.json", [_entry("masked_attention", "bfloat16", bucket, {"cuda": 2.0, "triton": 1.0})])
    monkeypatch.setenv(tune.ENV_VAR, str(a))
    assert _auto("masked_attention", **bucket) == "cuda"
    monkeypatch.setenv(tune.ENV_VAR, str(b))  # no reset: the cache is keyed on the variable
    assert _auto("masked_attention", **bucket) == "triton"
    assert backends.active_table(GPU).path == b
