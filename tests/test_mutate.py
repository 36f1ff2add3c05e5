"""tools/mutate.py's curated list stays applicable, and its committed report is current."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import mutate  # noqa: E402
from mutations import MUTATIONS  # noqa: E402


def test_every_mutation_applies_to_exactly_one_snippet(capsys):
    assert len(MUTATIONS) >= 40
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    for m in MUTATIONS:
        assert m.find != m.replace and m.tests and m.what, m.name
    assert mutate.main(["--check"]) == 0, capsys.readouterr().err


def test_report_lists_every_mutation_killed_or_explained():
    rows = mutate._report_rows(ROOT / "tests" / "mutation_report.md")
    missing = [m.name for m in MUTATIONS if m.name not in rows]
    assert not missing, f"run tools/mutate.py: the report lacks {missing}"
    bad = {n: r.status for n, r in rows.items() if r.status not in ("killed", "equivalent")}
    assert not bad, f"survivors or errors in tests/mutation_report.md: {bad}"
