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
    assert parse_labels("0,9", num_classes=10) == [0, 9]
    for bad in ("10", "9-10", "-1"):  # one past either end
        with pytest.raises(CLIError, match="out of range"):
            parse_labels(bad, num_classes=10)
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
    # the samples are the model's for these labels and this --cfg (the sampler itself is
    # value-tested in test_sampler): drawn again through the library, they are equal
    from djepa.evaluate import generate
    from djepa.train import load_checkpoint, make_tokenizer

    model, state = load_checkpoint(str(run_dir))
    tok = make_tokenizer(state["data"]["channels"], state["data"]["patch_size"])
    y = torch.tensor([1, 1, 3, 3])

    def draw(labels, cfg):
        img = generate(model, tok, labels, state["data"]["image_size"], num_iter=4, cfg=cfg, seed=0)
        return ((img + 1) * 8).clamp(0, 16).numpy()  # digits: model scale [-1, 1] -> 0..16

    np.testing.assert_allclose(z["images"], draw(y, 2.0), rtol=0, atol=1e-5)


def test_sample_passes_labels_and_sampling_flags_to_the_sampler(run_dir, tmp_path, monkeypatch):
    """A 3-step model barely depends on its class yet, so the link of --labels / --cfg /
    --temperature / --seed to the sampler is checked on what the sampler is asked for."""
    import djepa.evaluate

    seen = {}
    real = djepa.evaluate.generate

    def spy(model, tokenizer, labels, image_size, **kw):
        seen.update(kw, labels=labels.tolist())
        return real(model, tokenizer, labels, image_size, **kw)

    monkeypatch.setattr(djepa.evaluate, "generate", spy)
    assert main(["sample", "--ckpt", str(run_dir), "--labels", "0,2-3", "--n", "2", "--num-iter", "3", "--cfg", "2.5",
                 "--cfg-schedule", "constant", "--temperature", "0.7", "--seed", "4",
                 "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    assert seen["labels"] == [0, 0, 2, 2, 3, 3]
    assert (seen["cfg"], seen["cfg_schedule"], seen["temperature"], seen["seed"], seen["num_iter"]) == \
        (2.5, "constant", 0.7, 4, 3)
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [0, 0, 2, 2, 3, 3]


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
    # the run's --ckpt-every 2 and --log-every 1 hold on without being given again
    assert main(["train", "--out", str(run), "--resume", "--steps", "7", "--no-progress"]) == 0
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000006", "step-0000007"]
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7]


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



# ----------------------------------------------------------------------------- bad input, one line
@pytest.mark.parametrize("flag,value,pattern", [
    ("--steps", "0", "--steps must be a positive integer"),
    ("--lr", "0", "--lr must be > 0"),
    ("--batch-size", "0", "--batch-size must be a positive integer"),
    ("--warmup-steps", "-1", "--warmup-steps must be an integer >= 0"),
    ("--min-lr-ratio", "2", "--min-lr-ratio must lie in [0, 1]"),
    ("--grad-clip", "0", "--grad-clip must be > 0"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0"),
    ("--ckpt-every", "0", "--ckpt-every must be a positive integer"),
    ("--log-every", "-2", "--log-every must be a positive integer"),
    ("--keep", "-1", "--keep must be an integer >= 0"),
    ("--num-workers", "-1", "--num-workers must be an integer >= 0"),
    ("--backend", "cuda", "--backend cuda cannot run here"),
    ("--backend", "triton", "--backend triton cannot run here"),
])
def test_train_arguments_are_checked_before_any_work(tmp_path, capsys, monkeypatch, flag, value, pattern):
    if flag == "--backend" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: the backend can run here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a user's CPU machine
    out = tmp_path / "new" / "run"
    fails(capsys, ["train", "--out", str(out), flag, value, *SMALL], pattern)
    assert not (tmp_path / "new").exists()


def test_sample_backend_that_cannot_run_here(run_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the backend can run here")
    fails(capsys, ["sample", "--ckpt", str(run_dir), "--backend", "cuda", "--out", str(tmp_path / "s.png")],
          "--backend cuda cannot run here")


def test_state_json_of_random_bytes(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "step-0000003" / "state.json").write_bytes(np.random.default_rng(0).bytes(300))
    ckpt = str(run / "step-0000003")
    fails(capsys, ["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s.png")], "not JSON")
    fails(capsys, ["eval", "--ckpt", ckpt], "not JSON")
    fails(capsys, ["train", "--out", str(run), "--resume", ckpt, "--steps", "5"], "not JSON")
    (run / "latest").write_bytes(b"\xff\xfe\x00junk")  # a damaged pointer falls back to the newest folder
    fails(capsys, ["sample", "--ckpt", str(run), "--out", str(tmp_path / "s.png")], "step-0000003")


def test_label_ranges_are_checked_before_they_are_expanded(run_dir, tmp_path):
    """A huge range must fail at once, not build a list of 10^9 labels (the process is limited to
    6 GiB of address space, so expanding first dies with a MemoryError traceback)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    r = _cli("sample", "--ckpt", str(run_dir), "--labels", "0-1000000000", "--n", "1", "--device", "cpu",
             "--out", str(tmp_path / "s.png"), preexec_fn=limit)  # no CUDA context in 6 GiB
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "10-1000000000 are out of range" in lines[0] and "0-9" in lines[0], r.stderr
    assert parse_labels("0-3,7", num_classes=10) == [0, 1, 2, 3, 7]
    with pytest.raises(CLIError, match="out of range"):
        parse_labels("5-10000000000000", num_classes=10)
    with pytest.raises(CLIError, match="-1 is out of range"):
        parse_labels("-1-3", num_classes=10)


# ----------------------------------------------------------------------------- long runs
def test_sigterm_checkpoints_says_how_to_resume_and_exits_143(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "djepa", "train", "--out", str(out), "--steps", "100000",
                          "--batch-size", "16", "--log-every", "1", "--ckpt-every", "100000", "--no-progress",
                          *SMALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"djepa train --out {out} --resume" in lines[0], stderr
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (out / "latest").read_text().strip() == f"step-{step:07d}"
    assert main(["train", "--out", str(out), "--resume", "--steps", str(step + 1), "--no-progress"]) == 0


# ----------------------------------------------------------------------------- smaller things
def test_bench_without_a_gpu_says_so_in_one_line(tmp_path):
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the suites run")
    r = _cli("bench", "--dir", root, "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (r.stdout + r.stderr).strip().splitlines()
    assert len(text) == 1 and "need a CUDA GPU" in text[0] and "SKIPPED" not in text[0], text
    assert not (tmp_path / "b.json").exists()


def test_pytest_benchmarks_exits_0_without_a_gpu_and_says_why():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the suites run")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider"], cwd=root,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    reasons = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert len(reasons) >= 4 and all("needs a CUDA GPU" in ln for ln in reasons), r.stdout[-2000:]


def test_bench_finds_the_suites_from_anywhere_or_says_where_they_are(tmp_path, monkeypatch, capsys):
    """Without --dir: ./benchmarks, else the source tree's (an editable install); where neither
    exists, one line says the suites live in the source tree's benchmarks/ folder."""
    import djepa

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the suites would run")
    monkeypatch.chdir(tmp_path)
    r = _cli("bench", "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert r.returncode == 0 and "need a CUDA GPU" in r.stdout, r.stdout + r.stderr
    monkeypatch.setattr(djepa, "__file__", str(tmp_path / "site-packages" / "djepa" / "__init__.py"))
    fails(capsys, ["bench"], "the benchmark suites are not installed with the package: they are the benchmarks/")
    fails(capsys, ["bench", "--dir", str(tmp_path / "nowhere")], "not found")


def test_resuming_a_finished_run_says_there_is_nothing_to_train(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "nan" not in out, out
    assert (f"the run is already at step 3 (its --steps): nothing to train; last logged loss {last['loss']:.4f} "
            f"(step 3)") in out, out


def test_sampling_defaults_show_in_help():
    from djepa.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for cmd, want in (("sample", ("--cfg CFG", "default: 3.0", "default: the model's", "default: 0")),
                      ("eval", ("default: 3.0", "default: the model's", "default: 0"))):
        text = " ".join(sub[cmd].format_help().split("options:", 1)[1].split())
        for w in want:
            assert w in text, (cmd, w)
        for opt in ("--cfg", "--temperature", "--seed"):
            block = text[text.index(opt + " "):][:200]
            assert "default:" in block, (cmd, opt, block)


@pytest.mark.parametrize("n", [1, 2])
def test_sample_grid_title_clears_the_row_labels(tmp_path, monkeypatch, n):
    import djepa.plots as plots

    seen = {}
    real = plots._save

    def keep(fig, png):  # measured as saved: tight layout is applied at draw time
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        seen["title"] = fig._suptitle.get_window_extent(renderer)
        seen["labels"] = [(t.get_text(), t.get_window_extent(renderer)) for ax in fig.axes
                          for t in (ax.title, ax._left_title) if t.get_text()]
        seen["axes"] = [ax.get_window_extent(renderer) for ax in fig.axes]
        seen["width"] = fig.bbox.width
        real(fig, png)

    monkeypatch.setattr(plots, "_save", keep)
    images = np.random.default_rng(0).random((3 * n, 1, 8, 8))
    plots.sample_grid(images, np.repeat([0, 1, 2], n), str(tmp_path / "g.png"), title="tiny step 1000, cfg 3")
    title = seen["title"]
    assert 0 <= title.x0 and title.x1 <= seen["width"]  # not cut off by a narrow one-column grid
    assert len(seen["labels"]) == 3
    for text, box in seen["labels"]:
        assert title.y0 >= box.y1, (text, title, box)
    for box in seen["axes"]:
        assert title.y0 >= box.y1
