"""The first GPU run must not fail on anything a CPU machine can find: tools/gpu_run.sh (its dry
run, plan, time limits, exit status, output limits, rendering), the benchmark suites' partial
JSON and peer skipping, and the tests as they will run on the GPU machine (device audit)."""
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_run.sh"
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _run(args, tmp_path, timeout=600, **env):
    e = dict(os.environ)
    e["PYTHON"] = sys.executable
    e.update(env)
    e.pop("TRITON_INTERPRET", None)  # the script decides, as on the GPU machine
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=timeout,
                          cwd=tmp_path)


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _within_limits(out):
    files = _files(out)
    assert len(files) <= 8, files
    for f in files:
        parts = f.split("/")
        assert len(parts) <= 3 and all(NAME.match(p) for p in parts), f
    return files


def _sm90_case(nodeid):
    """A case of tests/test_dispatch_sm90.py run with kernels="sm90" (its id holds the param)."""
    return re.search(r"[\[-]sm90[\]-]", nodeid) is not None


def _summary(out):
    (path,) = out.glob("*_summary.json")  # dated: <UTC date-time>_summary.json
    return json.loads(path.read_text())


def _stand_in_c(tmp_path):
    """A file with the shape of a real _C for the GPU machine, and its build record."""
    so = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (62).to_bytes(2, "little") + b"\0" * 40 + b"PyInit__C\0")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_run_lib" / "build_record.py"), "write", str(so),
                        "--archs", "90a"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return so


def test_dry_run_checks_every_command_and_runs_the_plan_with_the_gpu_faked(tmp_path):
    """The whole plan fits 540 s and 8 files; every check passes; the driver runs every stage
    (the GPU faked) and writes what the run would, the benchmark JSON with the machine info."""
    out = tmp_path / "out"
    so = _stand_in_c(tmp_path)
    r = _run(["--dry-run"], tmp_path, OUT=str(out), DJEPA_PREBUILT_C=str(so))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    plan = re.search(r"total estimate (\d+)s of (\d+)s", r.stdout)
    assert plan and int(plan.group(1)) <= int(plan.group(2)) <= 540, r.stdout[:2000]
    stages = ("env", "install", "smoke", "tests-gpu", "tests-sm90", "sanitize", "bench-ema", "bench-attention",
              "bench-denoise", "tune", "bench-model")
    for stage in stages:
        assert re.search(rf"^\s+\d+\s+{stage}\s", r.stdout, re.M), f"{stage} is not in the default plan"
    files = _within_limits(out)
    summary = _summary(out)
    stamp = summary["stamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d{4}", stamp) and f"{stamp}_gpu_run.log" in files
    assert summary["dry_run"] and summary["exit_status"] == 0 and summary["fake_hang"] is None
    assert summary["sm90_kernels"] == {"on": True, "off_since": None, "why": None}
    status = {s["stage"]: s for s in summary["stages"]}
    for name in ("imports", "gpu-snippets", "prebuilt-c", "collect:tests-gpu", "collect:tests-sm90",
                 "collect:tests-triton", "collect:test_bench_ema", "collect:test_bench_attention",
                 "collect:test_bench_denoise", "collect:test_bench_model", "machine-info", "sanitize-cases", "render"):
        assert status[f"check:{name}"]["status"] == "ok", status.get(f"check:{name}")
    assert "matches this tree" in status["check:prebuilt-c"]["note"]
    assert all(status[s]["status"] == "ok" and status[s]["sm90_kernels"] == "on" for s in stages), summary["stages"]
    # one file per file the run would write: the log, the summary, the per-test results, every
    # suite's JSON (with the machine info), the tuning table: 8
    gpu = summary["gpu"]
    assert sorted(files) == sorted([f"{stamp}_gpu_run.log", f"{stamp}_summary.json", f"{stamp}_{gpu}_results.jsonl",
                                    f"{stamp}_{gpu}_tune.json"] +
                                   [f"{stamp}_{gpu}_{s}.json" for s in ("ema", "attention", "denoise", "model")])
    den = json.loads((out / f"{stamp}_{gpu}_denoise.json").read_text())
    # the run's knobs (the gemm case's ids name its GEMM shapes, not M)
    assert den["cases"] and all("-M2048-" in c or "-M8192-" in c for c in den["cases"] if "gemm" not in c)
    assert den["machine_info"]["gpu"] == "NVIDIA H200 (faked)" and "djepa_C" in den["machine_info"]
    attn = json.loads((out / f"{stamp}_{gpu}_attention.json").read_text())["cases"]
    assert attn and not any("sdpa-math" in c or "varlen" in c for c in attn) and any("sdpa-cudnn" in c for c in attn)
    # the dropout mode (fwd+bwd, dropout_p 0.1) at the B shape only: 2 fractions x 6 peers and djepa paths
    dropout = [c for c in attn if "fwdbwd-dropout" in c]
    assert len(dropout) == 12 and all("[djepa-B-" in c for c in dropout), dropout
    assert all(any(c.endswith(f"-{impl}]") for c in dropout) for impl in ("djepa-cuda", "djepa-triton"))
    assert not any(c.endswith("-eager]") for c in attn)  # trimmed for time: the targets are SDPA's and Flex's
    assert summary["knobs"]["DJEPA_BENCH_ATTN_DROPOUT_SHAPES"] == "djepa-B"
    assert "bench-attention: 60 cases would run:" in r.stdout  # the dry run names them
    assert "    test_masked_attention_dropout[djepa-B-random0.25-fwdbwd-dropout-djepa-cuda]" in r.stdout
    results = [json.loads(ln) for ln in (out / f"{stamp}_{gpu}_results.jsonl").read_text().splitlines()]
    smoke = [x for x in results if x["stage"] == "smoke"]
    assert len(smoke) == 6 and all(x["outcome"] == "passed" for x in smoke)
    sm90 = [x["nodeid"] for x in results if x["stage"] == "tests-sm90" and x["event"] == "result"]
    rest = [x["nodeid"] for x in results if x["stage"] == "tests-gpu" and x["event"] == "result"]
    assert sm90 and rest and all(_sm90_case(n) for n in sm90) and not any(_sm90_case(n) for n in rest)
    assert any("sm80" in n for n in rest)  # the mma.sync kernels on sm_90 run with the rest
    log = (out / f"{stamp}_gpu_run.log").read_text()
    assert "GPU faked" in log and "no new case after 55 s" in log  # djepa tune --quick --budget (75 - 20)
    for option in ("-v", "-p djepa_gpu_run", "--durations=15", "faulthandler_timeout=60"):
        assert option in log
    import importlib.util

    if importlib.util.find_spec("pytest_timeout"):
        assert "--timeout=120 --timeout-method=thread" in log


def test_dry_run_fake_hang_turns_the_sm90_kernels_off_for_every_later_stage(tmp_path):
    """tools/gpu_run.sh --dry-run --fake-hang CASE: that smoke case's process hangs ignoring
    SIGINT (a stuck kernel); the smoke stage catches it, every later stage runs with
    DJEPA_SM90_KERNELS=0, the sm_90a test session is skipped saying why, the summary says
    so, and everything else still runs and comes back."""
    out = tmp_path / "out"
    so = _stand_in_c(tmp_path)
    r = _run(["--dry-run", "--fake-hang", "masked_attention_sm90"], tmp_path, OUT=str(out), DJEPA_PREBUILT_C=str(so),
             DJEPA_GPU_RUN_DRY_CHECKS="0")
    summary = _summary(out)
    assert r.returncode == 2 == summary["exit_status"], r.stdout[-4000:]  # 2: the smoke stage failed
    assert summary["fake_hang"] == "masked_attention_sm90"
    off = summary["sm90_kernels"]
    assert off["on"] is False and off["off_since"] == "smoke"
    assert "masked_attention_sm90 hung" in off["why"] and "ignored SIGINT" in off["why"]
    status = {s["stage"]: s for s in summary["stages"] if not s["stage"].startswith("check:")}
    order = list(status)
    assert order == ["env", "install", "smoke", "tests-gpu", "tests-sm90", "sanitize", "bench-ema", "bench-attention",
                     "bench-denoise", "tune", "bench-model", "tests-triton"]
    assert status["smoke"]["status"] == "failed" and status["smoke"]["sm90_kernels"] == "on"
    assert status["smoke"]["note"] == "smoke case masked_attention_sm90 (sm_90a) hung"
    assert status["smoke"]["seconds"] <= 15
    assert status["tests-sm90"]["status"] == "skipped" and "off since smoke" in status["tests-sm90"]["note"]
    for s in ("tests-gpu", "sanitize", "bench-ema", "bench-attention", "bench-denoise", "tune", "bench-model"):
        assert status[s]["status"] == "ok" and status[s]["sm90_kernels"] == "off (DJEPA_SM90_KERNELS=0)", status[s]
    files = _within_limits(out)
    results = [json.loads(ln) for ln in next(out.glob("*_results.jsonl")).read_text().splitlines()]
    smoke = {x["nodeid"]: x["outcome"] for x in results if x["stage"] == "smoke"}
    assert smoke == {"smoke::ema_update_": "passed", "smoke::masked_attention": "passed",
                     "smoke::adaln_block": "passed", "smoke::denoise_step": "passed",
                     "smoke::masked_attention_sm90": "hung", "smoke::gemm_sm90": "passed"}
    assert len([f for f in files if f.endswith(".json") and not f.endswith("_summary.json")]) == 5  # 4 suites + tune
    log = next(out.glob("*_gpu_run.log")).read_text()
    assert "DJEPA_SM90_KERNELS=0 DJEPA_GPU_RUN_SELECT=rest" in log
    bad = _run(["--dry-run", "--fake-hang", "nonsense"], tmp_path, OUT=str(out))
    assert bad.returncode == 2 and "not a smoke case" in bad.stderr
    assert _run(["--fake-hang", "gemm_sm90"], tmp_path, OUT=str(out)).returncode == 2  # only with --dry-run


def test_a_prebuilt_c_of_another_python_no_extension_or_another_tree_is_refused(tmp_path):
    def check(path):
        return subprocess.run(["bash", str(SCRIPT), "--check-prebuilt", str(path)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, PYTHON=sys.executable))

    other = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    other.write_bytes(b"\x7fELF" + b"\0" * 60 + b"PyInit__C")
    r = check(other)
    assert r.returncode == 1 and "not built for the GPU machine's Python (cpython-312)" in r.stdout
    junk = tmp_path / "junk" / "_C.cpython-312-x86_64-linux-gnu.so"
    junk.parent.mkdir()
    junk.write_text("not an ELF file")
    r = check(junk)
    assert r.returncode == 1 and "not an x86-64 ELF file" in r.stdout
    assert check(tmp_path / "missing.so").returncode == 1
    so = _stand_in_c(tmp_path)
    r = check(so)
    assert r.returncode == 0 and "matches this tree" in r.stdout
    record = so.with_name(so.name + ".build.json")
    rec = json.loads(record.read_text())
    # built from other sources: one line, saying what differs and what to do
    record.write_text(json.dumps(dict(rec, inputs_sha256="0" * 64, commit="feedfacecafe", dirty=True)))
    r = check(so)
    assert r.returncode == 1 and r.stdout.count("\n") == 1, r.stdout
    assert r.stdout.startswith(f"REFUSED {so.name}: built from other sources") and "feedfacecafe+dirty" in r.stdout
    assert "rebuild with tools/prepare_gpu_run.sh" in r.stdout
    record.write_text(json.dumps(dict(rec, so_sha256="0" * 64)))
    assert "not the .so its build record" in check(so).stdout
    record.unlink()
    r = check(so)
    assert r.returncode == 1 and "no build record" in r.stdout and r.stdout.count("\n") == 1


def test_the_build_record_covers_csrc_and_the_build_files_but_not_build_outputs(tmp_path):
    sys.path.insert(0, str(ROOT / "tools" / "gpu_run_lib"))
    try:
        import build_record
    finally:
        sys.path.pop(0)
    for name in ("csrc/hopper/k.cuh", "csrc/a.cu", "CMakeLists.txt", "setup.py", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    base = build_record.inputs_hash(tmp_path)
    (tmp_path / "README.md").write_text("changed")  # not a build input
    (tmp_path / "csrc" / "__pycache__").mkdir()
    (tmp_path / "csrc" / "__pycache__" / "x.pyc").write_text("cache")
    (tmp_path / "csrc" / "a.o").write_text("object")
    assert build_record.inputs_hash(tmp_path) == base
    for name in ("csrc/hopper/k.cuh", "CMakeLists.txt", "setup.py"):
        old = (tmp_path / name).read_text()
        (tmp_path / name).write_text(old + " ")
        assert build_record.inputs_hash(tmp_path) != base, name
        (tmp_path / name).write_text(old)
    (tmp_path / "csrc" / "a.cu").rename(tmp_path / "csrc" / "b.cu")  # a rename changes it too
    assert build_record.inputs_hash(tmp_path) != base


def test_plan_fits_and_names_the_second_command():
    r = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DJEPA_PREBUILT_C="x.so"))
    assert r.returncode == 0
    total, budget = map(int, re.search(r"total estimate (\d+)s of (\d+)s", r.stdout).groups())
    assert total <= budget == 540
    assert "a second command): tools/gpu_run.sh tests-triton" in r.stdout
    rows = re.findall(r"^\s+\d+\s+(\S+)\s+(\d+)s\s+(\d+)s", r.stdout, re.M)
    assert [x[0] for x in rows][:6] == ["env", "install", "smoke", "tests-gpu", "tests-sm90", "sanitize"]
    assert all(int(est) < int(limit) for _, est, limit in rows)
    short = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, DJEPA_PREBUILT_C="x.so", GPU_RUN_BUDGET="300"))
    total, budget = map(int, re.search(r"total estimate (\d+)s of (\d+)s", short.stdout).groups())
    assert total <= budget == 300 and "smoke" in short.stdout
    assert "budget 200s" in subprocess.run(["bash", str(SCRIPT), "--plan", "--budget", "200"], capture_output=True,
                                           text=True, timeout=60).stdout
    bad = subprocess.run(["bash", str(SCRIPT), "bench-everything"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stage bench-everything" in bad.stderr


def _fake_bin(tmp_path, script):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script + "\n")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_a_stage_past_its_time_is_cut_the_rest_left_out_and_the_exit_status_says_so(tmp_path):
    """env hangs (a stuck nvidia-smi): it is cut at the run's deadline, which turns the sm_90a
    kernels off for the rest (a stage that ends killed), the next stage is left out for lack of
    time, files beyond 8 are packed into one archive, and the exit status is 1 (setup) + 16
    (cut / left out)."""
    out = tmp_path / "out"
    out.mkdir()
    for i in range(9):
        (out / f"extra{i}.txt").write_text(str(i))
    r = _run(["--budget", "3", "env", "tests-gpu"], tmp_path, OUT=str(out), PATH=_fake_bin(tmp_path, "sleep 60"),
             PYTHON="false", DJEPA_GPU_RUN_MIN_STAGE="1", timeout=120)
    assert r.returncode == 1 | 16, r.stdout[-3000:]
    summary = _summary(out)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "cut", "tests-gpu": "no-time"} and summary["exit_status"] == 17
    assert summary["sm90_kernels"]["off_since"] == "env" and "ended killed" in summary["sm90_kernels"]["why"]
    stamp = summary["stamp"]
    assert _within_limits(out) == [f"{stamp}_gpu_run.log", f"{stamp}_summary.json", "results.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as t:
        assert sorted(t.getnames()) == [f"{stamp}_gpu_results.jsonl"] + [f"extra{i}.txt" for i in range(9)]
    log = (out / f"{stamp}_gpu_run.log").read_text()
    assert "cut at its" in log and "exit status 17" in log  # the log holds the end of the run too


def test_a_failing_stage_fails_the_run_and_the_next_stage_still_runs(tmp_path):
    out = tmp_path / "out"
    r = _run(["--budget", "100", "env", "bench-ema"], tmp_path, OUT=str(out),
             PATH=_fake_bin(tmp_path, "echo fake; exit 0"), PYTHON="false", DJEPA_GPU_RUN_MIN_STAGE="1", timeout=300)
    summary = _summary(out)
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "failed", "bench-ema": "failed"}, r.stdout[-3000:]  # PYTHON=false: nothing runs
    assert r.returncode == 1 | 8 == summary["exit_status"]
    assert summary["sm90_kernels"]["on"] is True  # failures that are not hangs leave the sm_90a kernels on


def test_a_sticky_error_or_a_hang_in_a_test_stage_reruns_the_rest_and_an_sm90_hang_turns_them_off(tmp_path):
    """The test stages for real, on planted tests (DJEPA_GPU_RUN_TESTS): in tests-gpu a sticky
    CUDA error stops the session and a hang (the process ended as pytest-timeout ends it) kills
    the next; each time the rest runs again in a fresh process, the hung test is not rerun, and
    the sm_90a kernels stay on (that session runs without them). In tests-sm90 a hang turns them
    off for every later stage, said in the summary."""
    planted = tmp_path / "planted"
    planted.mkdir()
    body = ("import os, pytest\n"
            "pytestmark = pytest.mark.gpu\n"
            "@pytest.mark.parametrize('kernels', ['sm90', 'sm80'])\n"
            "def test_k(kernels):\n"
            "    if kernels == 'sm90' and os.environ.get('HANG_SM90'):\n"
            "        os._exit(1)\n"
            "def test_a():\n    assert os.environ['DJEPA_SM90_KERNELS'] == '0'\n"
            "def test_sticky():\n    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
            "def test_hang():\n    os._exit(1)\n"
            "def test_z():\n    pass\n")
    (planted / "test_dispatch_sm90.py").write_text(body)
    out = tmp_path / "out"
    r = _run(["--budget", "300", "tests-gpu", "tests-sm90", "env"], tmp_path, OUT=str(out),
             DJEPA_GPU_RUN_TESTS=str(planted), DJEPA_GPU_RUN_MIN_STAGE="1", HANG_SM90="1",
             PATH=_fake_bin(tmp_path, "exit 1"), timeout=300)
    summary = _summary(out)
    status = {x["stage"]: x for x in summary["stages"]}
    assert status["tests-gpu"]["status"] == "failed" and status["tests-gpu"]["sm90_kernels"] == "on", r.stdout[-4000:]
    assert "a session was killed in " in status["tests-gpu"]["note"] and "test_hang" in status["tests-gpu"]["note"]
    results = [json.loads(ln) for ln in next(out.glob("*_results.jsonl")).read_text().splitlines()]
    gpu = [(x["nodeid"].split("::")[-1], x["outcome"]) for x in results
           if x["stage"] == "tests-gpu" and x["event"] == "result"]
    assert gpu == [("test_k[sm80]", "passed"), ("test_a", "passed"), ("test_sticky", "failed"),
                   ("test_hang", "hung"), ("test_z", "passed")], gpu
    assert status["tests-sm90"]["status"] == "failed"
    off = summary["sm90_kernels"]
    assert off == {"on": False, "off_since": "tests-sm90", "why": "tests-sm90: "
                   f"{planted.name}/test_dispatch_sm90.py::test_k[sm90] hung (its session was killed)"} or \
        (off["off_since"] == "tests-sm90" and "test_k[sm90] hung" in off["why"]), off
    assert status["env"]["sm90_kernels"] == "off (DJEPA_SM90_KERNELS=0)"


def test_render_copies_and_renders_what_came_back(tmp_path):
    came_back, results, tables = tmp_path / "back", tmp_path / "results", tmp_path / "tables"
    came_back.mkdir()
    doc = {"benchmarks": [{"group": "g", "name": "test_x[djepa-cuda]", "stats": {"median": 0.002},
                           "extra_info": {"ms": 2.0}}]}
    packed = tmp_path / "2026-01-01-1200_h200_ema.json"
    packed.write_text(json.dumps(doc))
    table = {"format": 1, "gpu": "NVIDIA H200", "complete": False, "partial": "interrupted after 1 of 7 case(s)",
             "entries": [{"op": "ema_update_", "dtype": "bfloat16", "bucket": {"numel": 8}, "backend": "cuda",
                          "ms": {"cuda": 1.0, "triton": 2.0}}]}
    tune = tmp_path / "2026-01-01-1200_h200_tune.json"
    tune.write_text(json.dumps(table))
    with tarfile.open(came_back / "results.tar.gz", "w:gz") as t:
        t.add(packed, arcname=packed.name)
        t.add(tune, arcname=tune.name)
    (came_back / "2026-01-01-1200_summary.json").write_text("{}")
    (came_back / "2026-01-01-1200_gpu_run.log").write_text("log")
    (came_back / "2026-01-01-1200_h200_denoise.json").write_text(json.dumps({"dry_run": True, "benchmarks": []}))
    r = _run(["--render", str(came_back), "--results", str(results), "--tables", str(tables)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = sorted(p.name for p in results.iterdir())
    want = {f"2026-01-01-1200_h200_ema.{ext}" for ext in ("json", "md", "png")}
    want |= {"2026-01-01-1200_summary.json", "2026-01-01-1200_gpu_run.log", "2026-01-01-1200_h200_tune.md"}
    assert want <= set(names) and not any("denoise" in n for n in names), names
    assert sorted(p.name for p in tables.iterdir()) == ["2026-01-01-1200_h200_tune.json"]  # auto reads it from there
    assert "interrupted after 1 of 7" in (results / "2026-01-01-1200_h200_tune.md").read_text()
    assert "a dry run's placeholder" in r.stdout


def test_the_test_stage_plugin_streams_results_stops_on_a_sticky_error_and_names_a_hang(tmp_path):
    lib = ROOT / "tools" / "gpu_run_lib"
    results = tmp_path / "results.jsonl"
    (tmp_path / "test_fake.py").write_text(
        "import os, pytest\n"
        "@pytest.mark.parametrize('kernels', ['sm90', 'sm80'])\n"
        "def test_k(kernels):\n    pass\n"
        "def test_a():\n    pass\n"
        "def test_sticky():\n"
        "    if os.environ.get('STICKY'):\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
        "def test_hang():\n"
        "    if os.environ.get('HANG'):\n"
        "        os._exit(1)  # as pytest-timeout's thread method ends a hung test's process\n"
        "def test_z():\n    pass\n")

    def session(stage, **env):
        e = dict(os.environ, PYTHONPATH=str(lib), DJEPA_GPU_RUN_RESULTS=str(results), DJEPA_GPU_RUN_STAGE=stage, **env)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "djepa_gpu_run",
                        str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=e)
        r = subprocess.run([sys.executable, str(lib / "djepa_gpu_run.py"), "status", str(results), stage,
                            "--record-kill"], capture_output=True, text=True, timeout=60)
        return r.stdout.strip()

    def ran(stage):
        sys.path.insert(0, str(lib))
        try:
            import djepa_gpu_run
        finally:
            sys.path.pop(0)
        return [r["nodeid"].split("::")[-1] for r in djepa_gpu_run.read(results, stage) if r["event"] == "result"]

    assert session("sm90", DJEPA_GPU_RUN_SELECT="sm90") == "finished passed=1"
    assert ran("sm90") == ["test_k[sm90]"]
    st = session("rest", DJEPA_GPU_RUN_SELECT="rest", STICKY="1")
    assert st.startswith("stopped sticky CUDA error in test_fake.py::test_sticky") and "failed=1" in st
    assert ran("rest") == ["test_k[sm80]", "test_a", "test_sticky"]  # the session stopped there
    st = session("rest", DJEPA_GPU_RUN_SELECT="rest", DJEPA_GPU_RUN_SKIP_DONE="1", HANG="1")
    assert st == "killed test_fake.py::test_hang failed=1 hung=1 passed=2", st  # the kill names the test
    st = session("rest", DJEPA_GPU_RUN_SELECT="rest", DJEPA_GPU_RUN_SKIP_DONE="1", HANG="1")
    assert st.startswith("finished") and ran("rest")[-2:] == ["test_hang", "test_z"]  # the hung one is not rerun
    r = subprocess.run([sys.executable, str(lib / "djepa_gpu_run.py"), "status", str(results), "never"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "none"  # a stage that never started a session


# ------------------------------------------------------------------------------ benchmarks
def test_partial_benchmark_json_survives_a_killed_session(tmp_path):
    """Each case rewrites DJEPA_BENCH_PARTIAL_JSON, so a session killed before its end (where
    pytest-benchmark would write its own JSON) still leaves the finished cases, renderable."""
    (tmp_path / "conftest.py").write_text((ROOT / "benchmarks" / "conftest.py").read_text())
    (tmp_path / "test_fake_bench.py").write_text(
        "import os, pytest\n"
        "def test_a(benchmark):\n    benchmark.group = 'g'\n    benchmark.extra_info['ms'] = 1.0\n"
        "    benchmark.pedantic(lambda: None, rounds=2, iterations=1)\n"
        "def test_b():\n    pytest.skip('peer x: refuses')\n"
        "def test_killed(benchmark):\n    os._exit(9)\n")
    partial, full = tmp_path / "partial.json", tmp_path / "full.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                        f"--benchmark-json={full}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, DJEPA_BENCH_PARTIAL_JSON=str(partial)))
    assert r.returncode == 9 and not full.exists()
    doc = json.loads(partial.read_text())
    assert doc["partial"] and [b["name"] for b in doc["benchmarks"]] == ["test_a"]
    assert doc["benchmarks"][0]["stats"]["median"] >= 0 and doc["benchmarks"][0]["extra_info"]["ms"] == 1.0
    assert doc["skipped"][0]["name"] == "test_b" and "refuses" in doc["skipped"][0]["reason"]
    from djepa import benchreport

    md, png = benchreport.render(str(partial))
    assert "test_a" in open(md).read()


def test_benchmark_json_carries_the_machine_and_a_cuda_error_ends_the_suite_charged_to_djepa(tmp_path):
    """Under the fake GPU: pytest-benchmark's JSON and the partial one record the machine (GPU,
    driver, CUDA, torch, triton, djepa, djepa._C's build, the sm_90a switch, the commit); a CUDA
    error found by the synchronize after a djepa case, or wrapped in a peer's skip, fails that
    case, is charged to djepa, drops that case's timing and stops the suite (the rest is not
    run, the JSON keeps what came before)."""
    (tmp_path / "conftest.py").write_text((ROOT / "benchmarks" / "conftest.py").read_text())
    (tmp_path / "test_fake_bench.py").write_text(
        "import os, pytest, torch\n"
        "syncs = []\n"
        "def sync():\n"
        "    syncs.append(1)\n"
        "    if len(syncs) == int(os.environ['FAIL_AT_SYNC']):\n"
        "        raise RuntimeError('CUDA error: an illegal memory access was encountered\\nmore')\n"
        "torch.cuda.synchronize = sync\n"
        "@pytest.mark.parametrize('impl', ['djepa-cuda', 'sdpa', 'flex', 'djepa-triton', 'eager'])\n"
        "def test_case(benchmark, impl):\n"
        "    benchmark.group = 'g'\n"
        "    benchmark.extra_info['ms'] = 1.0\n"
        "    benchmark.pedantic(lambda: None, rounds=2, iterations=1)\n"
        "    if impl == 'flex' and os.environ.get('PEER_ERROR'):\n"
        "        pytest.skip('flex: RuntimeError: CUDA error: misaligned address')\n")

    def run(**env):
        full, partial = tmp_path / "full.json", tmp_path / "partial.json"
        for f in (full, partial):
            f.unlink(missing_ok=True)
        e = dict(os.environ, PYTHONPATH=str(ROOT / "tools" / "fake_gpu"), DJEPA_FAKE_GPU="1",
                 DJEPA_BENCH_PARTIAL_JSON=str(partial), DJEPA_SM90_KERNELS="0", **env)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                            f"--benchmark-json={full}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env=e)
        return r, json.loads(full.read_text()), json.loads(partial.read_text())

    r, full, partial = run(FAIL_AT_SYNC="2")  # the second djepa case's synchronize
    assert r.returncode != 0 and "CUDA error in" in r.stdout, r.stdout[-3000:]
    names = [b["name"] for b in full["benchmarks"]]
    assert names == ["test_case[djepa-cuda]", "test_case[sdpa]", "test_case[flex]"], names  # eager not run
    err = full["cuda_error"]
    assert err["case"].endswith("test_case[djepa-triton]") and err["charged_to"] == "djepa"
    assert "djepa's case" in err["surfaced_in"] and "illegal memory access" in err["error"]
    for doc in (full, partial):
        m = doc["machine_info"]
        assert m["gpu"] == "NVIDIA H200 (faked)" and m["gpu_capability"] == [9, 0] and m["sm90_kernels"] is False
        for key in ("gpu_driver", "cuda", "triton", "djepa", "djepa_C"):
            assert key in m
        assert m["torch"] == __import__("torch").__version__ and m["git"]["from"] == "git" and m["git"]["commit"]
    assert partial["cuda_error"] == err and len(partial["collected"]) == 5

    r, full, _ = run(FAIL_AT_SYNC="99", PEER_ERROR="1")  # a CUDA error inside a peer's skip reason
    err = full["cuda_error"]
    assert err["case"].endswith("test_case[flex]") and "a peer's case" in err["surfaced_in"]
    assert [b["name"] for b in full["benchmarks"]] == ["test_case[djepa-cuda]", "test_case[sdpa]"]
    assert "1 failed" in r.stdout and "misaligned address" in r.stdout


@pytest.fixture
def bench_peers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_peers

    monkeypatch.setattr(bench_peers, "_failed", {})
    return bench_peers


def test_a_failing_peer_is_skipped_with_its_reason_and_not_tried_again(bench_peers):
    calls = []

    def backward():
        calls.append(1)
        raise RuntimeError("No available kernel. Aborting execution.\n(a long trace)")

    key = ("sdpa-cudnn", "fwdbwd", "D64")
    with pytest.raises(pytest.skip.Exception, match="sdpa-cudnn: RuntimeError: No available kernel"):
        bench_peers.run(key, backward)
    with pytest.raises(pytest.skip.Exception, match="failed earlier in this session"):
        bench_peers.check(key)
    bench_peers.check(("sdpa-cudnn", "fwd", "D64"))  # another mode / head dim is still tried
    assert calls == [1]
    # a forward refusal (a skip raised inside) is remembered too, and covers forward+backward
    with pytest.raises(pytest.skip.Exception):
        bench_peers.run(("flex", "fwd", "D80"), lambda: pytest.skip("flex refuses D=80"))
    with pytest.raises(pytest.skip.Exception, match="flex refuses D=80"):
        bench_peers.check(("flex", "fwdbwd", "D80"), ("flex", "fwd", "D80"))
    assert bench_peers.run(("eager", "fwd", "D64"), lambda: 5) == 5


def test_benchmark_peers_go_through_the_failure_memory():
    """Every non-djepa path that compiles or calls a peer library runs under bench_peers."""
    attn = (ROOT / "benchmarks" / "test_bench_attention.py").read_text()
    assert "bench_peers.check((impl, mode, f\"D{D}\"), (impl, \"fwd\", f\"D{D}\"))" in attn
    for call in ("guard(PROVIDERS[impl]", "guard(fn)", "guard(triton.testing.do_bench", "guard(benchmark.pedantic"):
        assert call in attn, call
    den = (ROOT / "benchmarks" / "test_bench_denoise.py").read_text()
    assert 'if path == "compile":' in den and "bench_peers.check((path, case))" in den
    for call in ("guard(synced)", "guard(triton.testing.do_bench", "guard(benchmark.pedantic"):
        assert call in den, call


# ------------------------------------------------------------------------------ tests on a GPU machine
def test_triton_tests_use_the_device_they_ask_for(tmp_path):
    """The GPU-machine audit: the tests that can reach a Triton kernel run with triton_device on
    the meta device and djepa's dispatch as on a GPU machine (Triton refuses CPU tensors;
    launches on meta do nothing). A test that builds CPU tensors where it asked for the device,
    or mixes devices, fails with a CPU/meta message here as it would with "cuda" there. Failures
    from what meta tensors cannot do (read values) are expected and ignored."""
    report = tmp_path / "audit.xml"
    files = [f"tests/{name}" for name in ("test_attention.py", "test_ema.py", "test_denoise.py", "test_models.py")]
    env = dict(os.environ, DJEPA_AUDIT_DEVICE="meta", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, f"--junitxml={report}"],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    assert report.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    bad, ran = [], 0
    for case in ET.parse(report).iter("testcase"):
        ran += 1
        for f in list(case.findall("failure")) + list(case.findall("error")):
            msg = f.get("message") or ""
            if "on the CPU; Triton needs" in msg or (re.search("meta", msg, re.I) and re.search(r"\bcpu\b", msg, re.I)):
                bad.append(f"{case.get('classname')}::{case.get('name')}: {msg[:200]}")
    assert ran >= 40, r.stdout[-2000:]
    assert not bad, "\n".join(bad)
