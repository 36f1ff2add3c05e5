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


def test_dry_run_checks_every_command_and_writes_what_the_run_would(tmp_path):
    out = tmp_path / "out"
    so = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"  # a stand-in with the shape of a real _C
    so.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 11 + (62).to_bytes(2, "little") + b"\0" * 40 + b"PyInit__C\0")
    r = _run(["--dry-run"], tmp_path, OUT=str(out), DJEPA_PREBUILT_C=str(so))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    plan = re.search(r"total estimate (\d+)s of (\d+)s", r.stdout)
    assert plan and int(plan.group(1)) <= int(plan.group(2)) <= 540, r.stdout[:2000]
    for stage in ("tests-gpu", "sanitize", "bench-ema", "bench-attention", "bench-denoise", "bench-model"):
        assert re.search(rf"^\s+\d+\s+{stage}\s", r.stdout, re.M), f"{stage} is not in the default plan"
    files = _within_limits(out)
    assert "gpu_run.log" in files and "summary.json" in files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["exit_status"] == 0
    checks = {s["stage"]: s for s in summary["stages"]}
    for name in ("imports", "gpu-snippets", "prebuilt-c", "collect:tests-gpu", "collect:tests-triton",
                 "collect:test_bench_ema", "collect:test_bench_attention", "collect:test_bench_denoise",
                 "collect:test_bench_model", "sanitize-cases", "render"):
        assert checks[f"check:{name}"]["status"] == "ok", checks.get(f"check:{name}")
    # one placeholder per file the run would write: every suite's JSON, the test stage's report
    suites = {f.rsplit("_", 1)[-1] for f in files if f.endswith(".json") and f != "summary.json"}
    assert suites == {"ema.json", "attention.json", "denoise.json", "model.json"}, files
    assert any(f.endswith("_tests-gpu.xml") for f in files)
    cases = json.loads(next(out.glob("*_denoise.json")).read_text())["cases"]
    assert cases and all("-M2048-" in c or "-M8192-" in c for c in cases)  # the run's knobs were applied
    assert "GPU faked" in (out / "gpu_run.log").read_text()


def test_a_prebuilt_c_of_another_python_or_no_extension_is_refused(tmp_path):
    def check(path):
        return subprocess.run(["bash", str(SCRIPT), "--check-prebuilt", str(path)], capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, PYTHON=sys.executable))

    other = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    other.write_bytes(b"\x7fELF" + b"\0" * 60 + b"PyInit__C")
    r = check(other)
    assert r.returncode == 1 and "not built for the GPU machine's Python (cpython-312)" in r.stdout
    junk = tmp_path / "_C.cpython-312-x86_64-linux-gnu.so"
    junk.write_text("not an ELF file")
    r = check(junk)
    assert r.returncode == 1 and "not an x86-64 ELF file" in r.stdout
    assert check(tmp_path / "missing.so").returncode == 1


def test_plan_fits_and_names_the_second_command():
    r = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, DJEPA_PREBUILT_C="x.so"))
    assert r.returncode == 0
    total, budget = map(int, re.search(r"total estimate (\d+)s of (\d+)s", r.stdout).groups())
    assert total <= budget == 540
    assert "a second command): tools/gpu_run.sh tests-triton tune" in r.stdout
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
    """env hangs (a stuck nvidia-smi): it is cut at the run's deadline, the next stage is left
    out for lack of time, files beyond 8 are packed into one archive, and the exit status is
    1 (setup) + 16 (cut / left out)."""
    out = tmp_path / "out"
    out.mkdir()
    for i in range(9):
        (out / f"extra{i}.txt").write_text(str(i))
    r = _run(["--budget", "3", "env", "tests-gpu"], tmp_path, OUT=str(out), PATH=_fake_bin(tmp_path, "sleep 60"),
             PYTHON="false", DJEPA_GPU_RUN_MIN_STAGE="1", timeout=120)
    assert r.returncode == 1 | 16, r.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "cut", "tests-gpu": "no-time"} and summary["exit_status"] == 17
    assert _within_limits(out) == ["gpu_run.log", "results.tar.gz", "summary.json"]
    with tarfile.open(out / "results.tar.gz") as t:
        assert sorted(t.getnames()) == [f"extra{i}.txt" for i in range(9)]
    log = (out / "gpu_run.log").read_text()
    assert "cut at its" in log and "exit status 17" in log  # the log holds the end of the run too


def test_a_failing_stage_fails_the_run_and_the_next_stage_still_runs(tmp_path):
    out = tmp_path / "out"
    r = _run(["--budget", "100", "env", "bench-ema"], tmp_path, OUT=str(out),
             PATH=_fake_bin(tmp_path, "echo fake; exit 0"), PYTHON="false", DJEPA_GPU_RUN_MIN_STAGE="1", timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert status == {"env": "failed", "bench-ema": "failed"}, r.stdout[-3000:]  # PYTHON=false: nothing runs
    assert r.returncode == 1 | 8 == summary["exit_status"]


def test_render_copies_and_renders_what_came_back(tmp_path):
    came_back, results = tmp_path / "back", tmp_path / "results"
    came_back.mkdir()
    doc = {"benchmarks": [{"group": "g", "name": "test_x[djepa-cuda]", "stats": {"median": 0.002},
                           "extra_info": {"ms": 2.0}}]}
    packed = tmp_path / "2026-01-01_h200_ema.json"
    packed.write_text(json.dumps(doc))
    with tarfile.open(came_back / "results.tar.gz", "w:gz") as t:
        t.add(packed, arcname=packed.name)
    (came_back / "summary.json").write_text("{}")
    r = _run(["--render", str(came_back), "--results", str(results)], tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    names = sorted(p.name for p in results.iterdir())
    assert {f"2026-01-01_h200_ema.{ext}" for ext in ("json", "md", "png")} | {"summary.json"} <= set(names), names


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
    for call in ("guard(_peer_forward", "guard(fn)", "guard(triton.testing.do_bench", "guard(benchmark.pedantic"):
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
