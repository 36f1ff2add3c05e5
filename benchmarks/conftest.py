"""The two physical ceilings the suites report against, measured once per session on the GPU
(design.md: bytes over measured copy bandwidth, FLOPs over measured bf16 matmul rate)."""
import datetime
import json
import os
import platform

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
# DJEPA_BENCH_PARTIAL_JSON=PATH: after every case, PATH is rewritten (atomically) with what this
# session has measured so far, in pytest-benchmark's JSON layout (plus "partial": true and the
# skip reasons), so a run cut short by a timeout still leaves its results. With
# --benchmark-json=PATH too, pytest-benchmark's own file replaces it when the session ends.
# ------------------------------------------------------------------------------------------
_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("DJEPA_BENCH_PARTIAL_JSON"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"name": report.nodeid.split("::")[-1], "reason": reason})


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    path = os.environ.get("DJEPA_BENCH_PARTIAL_JSON")
    session = getattr(item.config, "_benchmarksession", None)
    if not path or session is None:
        return
    doc = {
        "partial": True,
        "machine_info": {"node": platform.node(), "python_version": platform.python_version(),
                         "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "benchmarks": [b.as_dict(include_data=False) for b in session.benchmarks if not b.has_error],
        "skipped": _skipped,
    }
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
