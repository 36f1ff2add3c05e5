"""djepa.benchreport: pytest-benchmark JSON -> Markdown table + PNG."""
import json

import pytest

from djepa import benchreport


def _doc(tmp_path):
    doc = {"benchmarks": [
        {"group": "ema B fp32", "name": "test_ema_update[B-fp32-loop]", "stats": {"median": 0.004},
         "extra_info": {"ms": 4.0, "gb_per_s": 640.0, "fraction_of_copy_bw": 0.21}},
        {"group": "ema B fp32", "name": "test_ema_update[B-fp32-djepa-cuda]", "stats": {"median": 0.001},
         "extra_info": {"ms": 1.0, "gb_per_s": 2560.0, "fraction_of_copy_bw": 0.85, "speedup_vs_loop": 4.0}},
        {"group": "other", "name": "test_x", "stats": {"median": 0.5}, "extra_info": {}},
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    return path


def test_render_writes_table_and_png(tmp_path):
    md, png = benchreport.render(str(_doc(tmp_path)))
    text = open(md).read()
    lines = [ln for ln in text.splitlines() if ln.startswith("| test_ema")]
    # sorted fastest first, relative time and the suite's metrics shown
    assert lines[0].startswith("| test_ema_update[B-fp32-djepa-cuda] | 1 | 1.00 | 2.56e+03 | 0.85 | 4 |")
    assert lines[1].startswith("| test_ema_update[B-fp32-loop] | 4 | 4.00 | 640 | 0.21 |")
    assert "## other" in text and "| test_x | 500 | 1.00 |" in text
    assert open(png, "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("content,msg", [("{", "cannot read"), ("[]", "not a pytest-benchmark"),
                                         ('{"benchmarks": []}', "no benchmarks"),
                                         ('{"benchmarks": [{"name": "a"}]}', "stats.median")])
def test_bad_json(tmp_path, content, msg):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(benchreport.ReportError, match=msg):
        benchreport.render(str(path))
