"""The two physical ceilings the suites report against, measured once per session on the GPU
(docs/design.md: bytes over measured copy bandwidth, FLOPs over measured bf16 matmul rate); the
machine info, synchronize and CUDA-error handling around every case; the partial JSON."""
import datetime
import json
import os
import platform
import re

import pytest
import torch


@pytest.fixture(scope="session")
def matmul_tflops():
    """bf16 torch.matmul rate of this GPU in TFLOP/s (8192^3 on random data, median of do_bench)."""
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Device copy bandwidth in GB/s (read + write bytes of a 1 GiB float32 copy_, median)."""
    import triton

    n = 1 << 28
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------
# What every JSON records, and what happens around each case:
# - machine_info (GPU, driver, CUDA, torch, triton, djepa, djepa._C's build, sm_90a kernels on or
#   off, git commit and dirty flag: djepa.benchreport.machine_info) in pytest-benchmark's JSON and
#   in the partial one;
# - after each djepa case the GPU is synchronized, so an asynchronous CUDA error of djepa's
#   kernels surfaces in djepa's case, not in the next (a peer's);
# - a CUDA error (raised, or found by that synchronize, or inside a peer's skip reason) fails its
#   case, is recorded as "cuda_error" (charged to djepa: the suite cannot tell a sticky error's
#   origin, and djepa's run must not pass over it) and ends the suite: the context is unusable.
# DJEPA_BENCH_PARTIAL_JSON=PATH: after collection and after every case, PATH is rewritten
# (atomically) with what this session has measured so far, in pytest-benchmark's JSON layout
# (plus "partial": true, the skip reasons, the collected cases and any CUDA error), so a run cut
# short by a timeout still leaves its results. With --benchmark-json=PATH too, pytest-benchmark's
# own file replaces it when the session ends (with the same additions).
# ------------------------------------------------------------------------------------------
_skipped = []
_collected = []
_state = {}
_CUDA_ERROR = re.compile(r"CUDA error|cudaError|illegal memory access|illegal instruction|unspecified launch "
                         r"failure|device-side assert|misaligned address|CUBLAS_STATUS_EXECUTION_FAILED|"
                         r"AcceleratorError")


def _machine_info():
    if "machine" not in _state:
        from djepa import benchreport

        _state["machine"] = benchreport.machine_info()
    return _state["machine"]


def _is_djepa_case(item):
    """A case that runs djepa's own path (not a peer's)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v.startswith("djepa") for v in params.values()) \
        or params.get("backend") in ("auto", "cuda", "triton")


def _cuda_error_text(exc):
    """The first line of `exc` when it is a CUDA error (a peer's skip that wraps one too)."""
    if exc is None:
        return None
    text = str(getattr(exc, "msg", None) or exc)
    if type(exc).__name__ == "AcceleratorError" or _CUDA_ERROR.search(text):
        return f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"
    return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(_machine_info())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = _skipped
    if "cuda_error" in _state:
        output_json["cuda_error"] = _state["cuda_error"]
        output_json["benchmarks"] = [b for b in output_json.get("benchmarks", []) if not _errored(b)]


def _errored(bench):
    """The measurement of the case a CUDA error surfaced in (not trusted: dropped)."""
    err = _state.get("cuda_error")
    return err is not None and err["case"].endswith(str(bench.get("fullname") or bench.get("name")))


def pytest_collection_finish(session):
    _collected[:] = [item.nodeid for item in session.items]
    _write_partial(session.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    excinfo = outcome.excinfo
    djepa_case = _is_djepa_case(item)
    error = _cuda_error_text(excinfo[1] if excinfo else None)
    if error is None and djepa_case and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (any failure to synchronize after djepa's kernels)
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]} (at the synchronize " \
                    f"after the case)"
    if error is None:
        return
    where = "djepa's case" if djepa_case else "a peer's case (a sticky error may come from an earlier launch)"
    _state["cuda_error"] = {"case": item.nodeid, "surfaced_in": where, "charged_to": "djepa", "error": error}
    item.session.shouldstop = f"CUDA error in {item.nodeid}: the suite stops (the CUDA context is unusable)"
    outcome.force_exception(RuntimeError(f"CUDA error, charged to djepa (it surfaced in {where}): {error}"))


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("DJEPA_BENCH_PARTIAL_JSON"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"name": report.nodeid.split("::")[-1], "reason": reason})


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _write_partial(item.config)


def _write_partial(config):
    path = os.environ.get("DJEPA_BENCH_PARTIAL_JSON")
    if not path:
        return
    session = getattr(config, "_benchmarksession", None)
    doc = {
        "partial": True,
        "machine_info": {"node": platform.node(), "python_version": platform.python_version(), **_machine_info()},
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "benchmarks": [d for d in (b.as_dict(include_data=False) for b in (session.benchmarks if session else ())
                                   if not b.has_error) if not _errored(d)],
        "skipped": _skipped,
        "collected": _collected,
    }
    if "cuda_error" in _state:
        doc["cuda_error"] = _state["cuda_error"]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Without a GPU every suite skips itself at import, saying why, and pytest would end with exit
# status 5 ("no tests ran"). When that is the only reason nothing ran, the session exits 0; the
# skip reasons stay in the summary (-rs, set in pyproject.toml).
# ------------------------------------------------------------------------------------------
_skipped_modules = []


def pytest_collectreport(report):
    if report.skipped:
        _skipped_modules.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and _skipped_modules and not torch.cuda.is_available():
        session.exitstatus = pytest.ExitCode.OK
