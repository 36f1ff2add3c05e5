"""pytest plugin for tools/gpu_run.sh --dry-run (`-p djepa_collect`, this folder on PYTHONPATH).

After collection it writes $DJEPA_COLLECT_JSON: {"items": {nodeid: [marker names]}, "stages":
{stage: [nodeids]}} where $DJEPA_COLLECT_STAGES = "stage=marker expression;..." selects each
stage's tests the way `pytest -m EXPR` would (and, or, not, parentheses over marker names)."""
import json
import os
import re


def _selects(expr, markers):
    code = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: m.group(0) if m.group(0) in ("and", "or", "not")
                  else str(m.group(0) in markers), expr)
    return bool(eval(code, {"__builtins__": {}}))  # only True/False, and/or/not, parentheses remain


def pytest_collection_finish(session):
    path = os.environ.get("DJEPA_COLLECT_JSON")
    if not path:
        return
    items = {item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in session.items}
    stages = {}
    for spec in filter(None, os.environ.get("DJEPA_COLLECT_STAGES", "").split(";")):
        name, expr = spec.split("=", 1)
        stages[name] = [nodeid for nodeid, marks in items.items() if _selects(expr, set(marks))]
    with open(path, "w") as f:
        json.dump({"items": items, "stages": stages}, f, indent=1)
