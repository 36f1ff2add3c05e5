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


def test_render_heads_the_report_with_the_machine_and_a_cuda_error(tmp_path):
    path = _doc(tmp_path)
    doc = json.loads(path.read_text())
    doc["machine_info"] = {"gpu": "NVIDIA H200", "gpu_driver": "580.159.04", "cuda": "13.0", "torch": "2.11.0",
                           "triton": "3.6.0", "djepa": "0.1.0+cu130", "sm90_kernels": False,
                           "djepa_C": {"nvcc": "13.0.88", "archs": "90a"},
                           "git": {"commit": "0123456789abcdef", "dirty": True}}
    doc["partial"] = True
    doc["cuda_error"] = {"case": "test_x[djepa-cuda]", "error": "an illegal memory access was encountered"}
    path.write_text(json.dumps(doc))
    text = open(benchreport.render(str(path))[0]).read()
    assert ("NVIDIA H200 (driver 580.159.04, CUDA 13.0), torch 2.11.0, triton 3.6.0, djepa 0.1.0+cu130 "
            "(_C 13.0.88 for 90a; sm_90a kernels off), commit 0123456789ab+dirty") in text
    assert "partial" in text and "CUDA error in test_x[djepa-cuda] (charged to djepa): an illegal memory" in text


def test_a_tuning_table_renders_as_markdown_only(tmp_path):
    from djepa import tune_table

    env = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "djepa": "0.1.0", "c_build": "13.0.88/90a",
           "sm90_kernels": True}
    entry = {"op": "masked_attention", "dtype": "bfloat16", "bucket": (("D", 64), ("Nk", 512), ("mode", "train")),
             "shape": "B64 H12 N320 D64", "backend": "cuda", "ms": {"cuda": 0.5, "triton": 0.75},
             "unserved": {"eager": "too big"}}
    path = tune_table.write_table(tmp_path / "2026-12-01-1203_h200_tune.json", env, [entry], complete=False,
                                  partial="interrupted after 1 of 7 case(s)")
    md, png = benchreport.render(str(path))
    text = open(md).read()
    assert png is None and "1 entries (partial: interrupted after 1 of 7 case(s))" in text
    assert "| masked_attention | bfloat16 | D64-Nk512-train | B64 H12 N320 D64 | cuda | 0.5 | 0.75 |  | eager: too big |" \
        in text
    empty = tune_table.write_table(tmp_path / "e.json", env, [])
    with pytest.raises(benchreport.ReportError, match="without entries"):
        benchreport.render(str(empty))


def test_machine_info_names_the_versions_the_build_and_the_commit(monkeypatch, tmp_path):
    info = benchreport.machine_info()
    for key in ("gpu", "gpu_driver", "cuda", "torch", "triton", "djepa", "djepa_C", "sm90_kernels", "git"):
        assert key in info
    assert info["torch"] == __import__("torch").__version__
    # without git (the GPU machine's copy of the tree): the build record's commit, said so
    monkeypatch.setenv("DJEPA_GIT_COMMIT", "feedface")
    monkeypatch.setenv("DJEPA_GIT_DIRTY", "false")
    git = benchreport.git_state(str(tmp_path))
    assert git["commit"] == "feedface" and git["dirty"] is False and "build record" in git["from"]
