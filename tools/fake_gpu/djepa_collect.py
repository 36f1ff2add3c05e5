"""pytest plugin for tools/gpu_run.sh --dry-run (`-p djepa_collect`, this folder on PYTHONPATH).

After collection it writes $DJEPA_COLLECT_JSON: {"items": {nodeid: [marker names]}, "sm90":
[nodeids of the sm_90a cases], "stages": {stage: [nodeids]}} where $DJEPA_COLLECT_STAGES =
"stage=marker expression[@sm90|@rest];..." selects each stage's tests the way `pytest -m EXPR`
would (and, or, not, parentheses over marker names), then, with @sm90 / @rest, only the sm_90a
cases / all but them, as the test stages' plugin (tools/gpu_run_lib/djepa_gpu_run.py) does."""
import json
import os
import re

from djepa_gpu_run import is_sm90


def _selects(expr, markers):
    code = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: m.group(0) if m.group(0) in ("and", "or", "not")
                  else str(m.group(0) in markers), expr)
    return bool(eval(code, {"__builtins__": {}}))  # only True/False, and/or/not, parentheses remain


def pytest_collection_finish(session):
    path = os.environ.get("DJEPA_COLLECT_JSON")
    if not path:
        return
    items = {item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in session.items}
    sm90 = [item.nodeid for item in session.items if is_sm90(item)]
    stages = {}
    for spec in filter(None, os.environ.get("DJEPA_COLLECT_STAGES", "").split(";")):
        name, expr = spec.split("=", 1)
        expr, _, part = expr.partition("@")
        ids = [nodeid for nodeid, marks in items.items() if _selects(expr, set(marks))]
        if part:
            ids = [i for i in ids if (i in sm90) == (part == "sm90")]
        stages[name] = ids
    with open(path, "w") as f:
        json.dump({"items": items, "sm90": sm90, "stages": stages}, f, indent=1)
