"""pytest plugin of tools/gpu_run.sh's test stages (`-p djepa_gpu_run`, this folder on PYTHONPATH),
and the stage's reading of what it wrote (`python3 djepa_gpu_run.py status RESULTS STAGE`).

Per-test results are appended to $DJEPA_GPU_RUN_RESULTS (JSON lines) as they happen, each line
flushed and fsynced, so a session killed by a hung kernel keeps every result before it and names
the test it was in:

    {"stage": S, "event": "session-start", "pid": ..., "selected": n, "deselected": n}
    {"stage": S, "event": "start", "nodeid": ...}
    {"stage": S, "event": "result", "nodeid": ..., "when": "call", "outcome": "passed", "seconds": 0.12,
     "message": "(first line of a failure or skip)"}
    {"stage": S, "event": "session-finish", "exitstatus": 0, "stopped": null, "counts": {...}}

Settings (environment): DJEPA_GPU_RUN_STAGE (S above); DJEPA_GPU_RUN_SELECT=sm90 keeps only the
sm_90a cases (parametrized kernels="sm90", or marked sm90), =rest all but them;
DJEPA_GPU_RUN_SKIP_DONE=1 deselects the tests this stage already has a result for (the rerun
after a sticky CUDA error or a hang). A failure that shows a sticky CUDA error (an illegal
address, a launch failure: every later test in the process would fail too) stops the session,
saying so in session-finish, so that the stage can go on in a fresh process.
"""
import json
import os
import re
import sys
import time

STICKY = re.compile(r"illegal memory access|illegal instruction|unspecified launch failure|misaligned address|"
                    r"device-side assert|CUDA error: an? |cudaErrorLaunch|AcceleratorError")
_session = {}


def is_sm90(item) -> bool:
    """A test of the sm_90a (wgmma) kernels: tests/test_dispatch_sm90.py's kernels="sm90" cases,
    or a test marked sm90."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("kernels") == "sm90" or item.get_closest_marker("sm90") is not None


def _emit(record):
    path = os.environ.get("DJEPA_GPU_RUN_RESULTS")
    if not path:
        return
    record = {"stage": os.environ.get("DJEPA_GPU_RUN_STAGE", "tests"), "time": round(time.time(), 3), **record}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path, stage):
    """The records of `stage` in `path` ([] when there is none)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
                if r.get("stage") == stage:
                    out.append(r)
    except FileNotFoundError:
        pass
    return out


def pytest_sessionstart(session):
    _session["session"] = session
    _session["counts"] = {}


def pytest_collection_modifyitems(config, items):
    select = os.environ.get("DJEPA_GPU_RUN_SELECT")
    keep = list(items)
    if select in ("sm90", "rest"):
        keep = [i for i in keep if is_sm90(i) == (select == "sm90")]
    if os.environ.get("DJEPA_GPU_RUN_SKIP_DONE") == "1":
        done = {r["nodeid"] for r in read(os.environ.get("DJEPA_GPU_RUN_RESULTS", ""),
                                          os.environ.get("DJEPA_GPU_RUN_STAGE", "tests")) if r["event"] == "result"}
        keep = [i for i in keep if i.nodeid not in done]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_collection_finish(session):
    _emit({"event": "session-start", "pid": os.getpid(), "selected": len(session.items),
           "sm90_kernels": os.environ.get("DJEPA_SM90_KERNELS", "(unset: on)")})


def pytest_runtest_logstart(nodeid, location):
    _emit({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    if report.when != "call" and report.passed:
        return
    message = ""
    if report.longrepr is not None:
        text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E ")]
        message = (errors[0] if errors else lines[-1] if lines else "")[:400]
    outcome = report.outcome
    _emit({"event": "result", "nodeid": report.nodeid, "when": report.when, "outcome": outcome,
           "seconds": round(report.duration, 3), "message": message})
    counts = _session.setdefault("counts", {})
    counts[outcome] = counts.get(outcome, 0) + 1
    session = _session.get("session")
    if report.failed and session is not None and STICKY.search(str(report.longrepr)):
        session.shouldstop = f"sticky CUDA error in {report.nodeid}: {message}"


def pytest_sessionfinish(session, exitstatus):
    stopped = session.shouldstop if isinstance(session.shouldstop, str) else None
    _emit({"event": "session-finish", "exitstatus": int(exitstatus), "stopped": stopped,
           "counts": _session.get("counts", {})})


def status(path, stage, record_kill=False) -> str:
    """One line on how the last session of `stage` ended: "finished", "stopped REASON" (a sticky
    CUDA error), "killed NODEID" (no session-finish: the test it was in, "-" between tests) or
    "none" (it never started); then the counts over all its sessions. record_kill: add a
    result "hung" for the test a killed session was in (a rerun then skips it)."""
    records = read(path, stage)
    starts = [i for i, r in enumerate(records) if r["event"] == "session-start"]
    results = [r for r in records if r["event"] == "result"]
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    tail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    if not starts:
        return f"none {tail}".strip()
    last = records[starts[-1]:]
    finish = [r for r in last if r["event"] == "session-finish"]
    if finish:
        return (f"stopped {finish[-1]['stopped']} | {tail}" if finish[-1]["stopped"] else f"finished {tail}").strip()
    done = {r["nodeid"] for r in last if r["event"] == "result"}
    running = [r["nodeid"] for r in last if r["event"] == "start" and r["nodeid"] not in done]
    nodeid = running[-1] if running else "-"
    if record_kill and running:
        os.environ["DJEPA_GPU_RUN_STAGE"] = stage
        os.environ["DJEPA_GPU_RUN_RESULTS"] = path
        _emit({"event": "result", "nodeid": nodeid, "when": "call", "outcome": "hung", "seconds": None,
               "message": "the session was killed while this test ran (a hang: pytest-timeout or the stage limit)"})
        counts["hung"] = counts.get("hung", 0) + 1
        tail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"killed {nodeid} {tail}".strip()


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "status":
        print(status(sys.argv[2], sys.argv[3], record_kill="--record-kill" in sys.argv[4:]))
        sys.exit(0)
    print("usage: djepa_gpu_run.py status RESULTS STAGE [--record-kill]", file=sys.stderr)
    sys.exit(2)
