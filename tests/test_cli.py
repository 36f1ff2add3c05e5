import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from djepa.cli import CLIError, main, parse_labels, parse_overrides

SMALL = ["--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2", "--set", "diffloss_depth=1",
         "--set", "diffloss_width=32", "--set", "num_sampling_steps=4", "--set", "class_tokens=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main(["train", "--out", str(out), "--steps", "3", "--batch-size", "16", "--ckpt-every", "2",
               "--log-every", "1", "--no-progress", *SMALL])
    assert rc == 0
    return out


def fails(capsys, argv, pattern):
    """`djepa argv` ends with exit status 2 and exactly one line on stderr matching `pattern`."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]
    return lines[0]


def test_parse_labels_and_overrides():
    assert parse_labels("0-9") == list(range(10))
    assert parse_labels("1,3,5-7") == [1, 3, 5, 6, 7]
    assert parse_labels(" 4 ") == [4]
    for bad in ("a", "3-1", "1,,2", ""):
        with pytest.raises(CLIError):
            parse_labels(bad)
    assert parse_overrides(["depth=2", "qk_norm=false", "loss=flow", "mlp_ratio=2.5"]) == {
        "depth": 2, "qk_norm": False, "loss": "flow", "mlp_ratio": 2.5}
    with pytest.raises(CLIError):
        parse_overrides(["depth"])


def test_train_writes_checkpoints_metrics_and_plot(run_dir):
    assert sorted(os.listdir(run_dir)) == ["latest", "loss.png", "metrics.jsonl", "step-0000002", "step-0000003"]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    state = json.load(open(run_dir / "step-0000003" / "state.json"))
    assert state["config"]["embed_dim"] == 32 and state["settings"]["steps"] == 3


def test_sample_writes_grid_and_npz_in_pixel_scale(run_dir, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc = main(["sample", "--ckpt", str(run_dir), "--labels", "1,3", "--n", "2", "--num-iter", "4",
               "--cfg", "2.0", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert out.stat().st_size > 0
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (4, 1, 8, 8) and z["labels"].tolist() == [1, 1, 3, 3]
    assert z["images"].min() >= 0 and z["images"].max() <= 16 and np.isfinite(z["images"]).all()
    assert z["images"].std() > 0
    assert list(z["pixel_range"]) == [0, 16]


def test_eval_prints_table_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["eval", "--ckpt", str(run_dir), "--n-per-class", "2", "--num-iter", "2", "--cfg", "1.0",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "linear probe" in text and "Fréchet" in text
    res = json.load(open(out))
    for k in ("probe_features", "probe_token_features", "probe_pixels", "sample_accuracy", "judge_accuracy_real"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["probe_pixels"] > 0.9 and res["judge_accuracy_real"] > 0.9  # real digits are easy
    assert res["n_samples"] == 20 and res["frechet_samples_vs_heldout"] >= 0
    assert res["step"] == 3


def test_resume_via_cli_and_its_guards(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    good = (run / "step-0000003" / "model.safetensors").read_bytes()
    fails(capsys, ["train", "--out", str(run), "--steps", "3", *SMALL], "already holds checkpoints")
    fails(capsys, ["train", "--out", str(run), "--resume", "--preset", "B", "--steps", "4"],
          "holds preset 'tiny', not 'B'")
    fails(capsys, ["train", "--out", str(run), "--resume", "--lr", "0.1", "--steps", "4"], "lr=0.1 differs")
    assert (run / "step-0000003" / "model.safetensors").read_bytes() == good
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    assert (run / "latest").read_text().strip() == "step-0000004"
    assert (run / "step-0000003" / "model.safetensors").read_bytes() == good


def test_bad_input_gives_one_line_and_exit_2(run_dir, tmp_path, capsys):
    fails(capsys, ["sample", "--ckpt", str(tmp_path / "nope")], "checkpoint not found")
    fails(capsys, ["eval", "--ckpt", str(tmp_path)], "holds no djepa checkpoint")
    fails(capsys, ["sample", "--ckpt", str(run_dir), "--preset", "L"], "holds preset 'tiny', not 'L'")
    fails(capsys, ["sample", "--ckpt", str(run_dir), "--labels", "3,12", "--out", str(tmp_path / "x.png")],
          "12 is out of range")
    fails(capsys, ["sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "x.txt")], "expected a .png")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    fails(capsys, ["sample", "--ckpt", str(run_dir), "--out", str(blocker / "s.png")], "cannot create output")
    fails(capsys, ["train", "--out", str(blocker / "run"), "--steps", "1"], "cannot create output directory")
    fails(capsys, ["eval", "--ckpt", str(run_dir), "--out", str(blocker / "e.json")], "cannot create output")
    # truncated and foreign checkpoints
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir / "step-0000003", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])
    fails(capsys, ["sample", "--ckpt", str(bad)], "truncated")
    (bad / "state.json").write_text("{}")
    fails(capsys, ["eval", "--ckpt", str(bad)], "not a djepa checkpoint")
    # image folders: empty, unreadable
    empty = tmp_path / "imgs"
    (empty / "a").mkdir(parents=True)
    fails(capsys, ["train", "--data", f"folder:{empty}", "--out", str(tmp_path / "r1"), "--steps", "1"],
          "holds no images")
    (empty / "a" / "x.png").write_bytes(b"not a png")
    fails(capsys, ["train", "--data", f"folder:{empty}", "--out", str(tmp_path / "r2"), "--steps", "1"],
          "unreadable image")
    # latents with labels out of range
    np.savez(tmp_path / "lat.npz", latents=np.ones((8, 2, 2, 2), np.float32), labels=np.arange(8))
    fails(capsys, ["train", "--data", f"latents:{tmp_path / 'lat.npz'}", "--num-classes", "4",
                   "--out", str(tmp_path / "r3"), "--steps", "1"], "out of range")
    fails(capsys, ["train", "--out", str(tmp_path / "r4"), "--set", "depth"], "expected KEY=VALUE")
    fails(capsys, ["train", "--out", str(tmp_path / "r5"), "--preset", "XL"], "unknown D-JEPA preset")
    assert not (tmp_path / "r1").exists() or not os.listdir(tmp_path / "r1")


def test_train_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").save(
                tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--no-progress", *SMALL]) == 0
    state = json.load(open(out / "step-0000002" / "state.json"))
    assert state["data"]["classes"] == ["a", "b", "c"]
    assert state["config"]["num_classes"] == 3 and state["config"]["token_channels"] == 3
    assert main(["sample", "--ckpt", str(out), "--labels", "0-2", "--n", "1", "--num-iter", "2",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (3, 3, 4, 4) and z["images"].max() <= 255


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "djepa", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def test_module_entry_point_info_and_errors(tmp_path):
    r = _cli("info")
    assert r.returncode == 0 and "torch" in r.stdout and "ops on" in r.stdout
    r = _cli("eval", "--ckpt", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "checkpoint not found" in r.stderr
    r = _cli("frobnicate")
    assert r.returncode == 2


def test_bench_runs_a_suite_into_json(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "test_bench_toy.py").write_text(
        "def test_toy(benchmark):\n    benchmark(sum, range(100))\n")
    out = tmp_path / "res.json"
    r = _cli("bench", "--dir", str(bench), "--op", "toy", "--json", str(out), "--", "-p", "no:cacheprovider",
             cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.load(open(out))
    assert [b["name"] for b in doc["benchmarks"]] == ["test_toy"]
    assert "| test_toy |" in (tmp_path / "res.md").read_text()
    assert (tmp_path / "res.png").read_bytes()[:4] == b"\x89PNG"
    r = _cli("bench", "--dir", str(bench), "--op", "nothing")
    assert r.returncode == 2 and "available: toy" in r.stderr
    (tmp_path / "bad.json").write_text("{}")
    r = _cli("bench", "--render", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "not a pytest-benchmark JSON" in r.stderr and "Traceback" not in r.stderr

