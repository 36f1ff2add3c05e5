import json
import os

import pytest
import torch

from djepa.train import (CheckpointError, StepBatches, TrainError, TrainSettings, list_checkpoints,
                         load_checkpoint, read_checkpoint_state, resolve_checkpoint, train)

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2, "diffloss_depth": 1, "diffloss_width": 32,
         "num_sampling_steps": "4", "class_tokens": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared CI box
    yield
    torch.set_num_threads(n)


def settings(**kw):
    base = dict(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, overrides=SMALL, seed=3)
    base.update(kw)
    return TrainSettings(**base)


def run(out, s=None, **kw):
    kw.setdefault("ckpt_every", 3)
    kw.setdefault("log_every", 1)
    kw.setdefault("plot", False)
    return train(s or settings(), str(out), progress=False, **kw)


def test_lr_schedule():
    s = TrainSettings(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)
    assert s.lr_at(109) == pytest.approx(0.1, abs=1e-3)
    assert TrainSettings(lr_schedule="constant", lr=0.5, warmup_steps=0).lr_at(1000) == 0.5


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(lr=0.0), dict(precision="fp8"),
                                 dict(lr_schedule="step"), dict(patch_size=0), dict(min_lr_ratio=2.0)])
def test_settings_validation(bad):
    with pytest.raises(ValueError):
        TrainSettings(**bad)


def test_step_batches_split_the_global_batch_over_ranks():
    whole = StepBatches(50, 8, seed=1)
    ranks = [StepBatches(50, 8, seed=1, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 6, 13):  # 6 batches per epoch: 6 and 13 are in later epochs
        parts = [r.indices(step) for r in ranks]
        assert torch.equal(torch.cat(parts), whole.indices(step))
        assert len(set(parts[0].tolist()) & set(parts[1].tolist())) == 0
    assert not torch.equal(whole.indices(0), whole.indices(6))  # reshuffled per epoch
    assert list(StepBatches(50, 8, 1, start=4, stop=6)) == [whole.indices(4).tolist(), whole.indices(5).tolist()]
    with pytest.raises(TrainError, match="divisible"):
        StepBatches(50, 9, 0, world=2)
    with pytest.raises(TrainError, match="exceeds"):
        StepBatches(5, 8, 0)


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path / "a")
    assert straight.step == 6 and len(straight.losses) == 6
    first = run(tmp_path / "b", stop_after=3)
    assert first.step == 3 and os.path.basename(first.checkpoint) == "step-0000003"
    second = run(tmp_path / "b", resume=True)
    assert second.step == 6
    assert [d["loss"] for d in first.losses + second.losses] == [d["loss"] for d in straight.losses]
    with open(os.path.join(straight.checkpoint, "model.safetensors"), "rb") as f1, \
            open(os.path.join(second.checkpoint, "model.safetensors"), "rb") as f2:
        assert f1.read() == f2.read()  # weights and EMA bit-identical
    records = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    model, state = load_checkpoint(tmp_path / "b")
    assert state["step"] == 6 and state["preset"] == "tiny" and state["data"]["patch_size"] == 2
    for k, v in straight.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_checkpoint_errors(tmp_path):
    run(tmp_path / "r", settings(steps=2), ckpt_every=2)
    ckpt = resolve_checkpoint(tmp_path / "r")
    assert ckpt.endswith("step-0000002") and list_checkpoints(tmp_path / "r") == [ckpt]
    for p in (tmp_path / "r", ckpt, os.path.join(ckpt, "state.json")):
        assert read_checkpoint_state(p)[0] == ckpt
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_state(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no djepa checkpoint"):
        read_checkpoint_state(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="holds preset 'tiny', not 'B'"):
        load_checkpoint(ckpt, preset="B")
    with pytest.raises(CheckpointError, match="holds preset 'tiny', not 'B'"):
        run(tmp_path / "r", settings(steps=4, preset="B"), resume=True)
    with pytest.raises(TrainError, match="lr=0.5 differs"):
        run(tmp_path / "r", settings(steps=4, lr=0.5), resume=True)

    model_file = os.path.join(ckpt, "model.safetensors")
    good = open(model_file, "rb").read()
    with open(model_file, "wb") as f:
        f.write(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ckpt)
    with open(model_file, "wb") as f:
        f.write(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)
    with open(model_file, "wb") as f:
        f.write(good)
    load_checkpoint(ckpt)

    state_file = os.path.join(ckpt, "state.json")
    doc = open(state_file).read()
    with open(state_file, "w") as f:
        f.write(doc[:100])
    with pytest.raises(CheckpointError, match="truncated or not JSON"):
        load_checkpoint(ckpt)
    with open(state_file, "w") as f:
        json.dump({"weights": "someone else's"}, f)
    with pytest.raises(CheckpointError, match="not a djepa checkpoint"):
        load_checkpoint(ckpt)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(good)
    with pytest.raises(CheckpointError, match="not a djepa checkpoint"):
        load_checkpoint(foreign)


def test_weights_that_do_not_fit_the_config(tmp_path):
    res = run(tmp_path / "r", settings(steps=1), ckpt_every=1)
    state_file = os.path.join(res.checkpoint, "state.json")
    doc = json.load(open(state_file))
    doc["config"]["embed_dim"] = 16
    doc["config"]["num_heads"] = 2
    json.dump(doc, open(state_file, "w"))
    with pytest.raises(CheckpointError, match="does not fit its model config"):
        load_checkpoint(res.checkpoint)


def test_never_overwrites_a_checkpoint(tmp_path):
    res = run(tmp_path / "r", settings(steps=2), ckpt_every=2)
    before = open(os.path.join(res.checkpoint, "model.safetensors"), "rb").read()
    with pytest.raises(TrainError, match="already holds checkpoints"):
        run(tmp_path / "r", settings(steps=2, seed=9))
    assert open(os.path.join(res.checkpoint, "model.safetensors"), "rb").read() == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainError, match="cannot create output directory"):
        run(blocker / "sub", settings(steps=1))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    first = run(tmp_path / "r", settings(steps=4), ckpt_every=2, stop_after=2)
    real = safetensors.torch.save_file
    calls = []

    def dying_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # after the weights, while writing the optimizer state
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r", resume=True, ckpt_every=2)
    assert resolve_checkpoint(tmp_path / "r") == first.checkpoint
    assert sorted(os.listdir(tmp_path / "r")) == ["latest", "metrics.jsonl", "step-0000002"]
    load_checkpoint(tmp_path / "r")


def test_keep_prunes_old_checkpoints(tmp_path):
    run(tmp_path / "r", settings(steps=4), ckpt_every=1, keep=2)
    assert [os.path.basename(c) for c in list_checkpoints(tmp_path / "r")] == ["step-0000003", "step-0000004"]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    import numpy as np

    lat = np.random.default_rng(0).standard_normal((20, 1, 4, 4)).astype(np.float32)
    lat[:, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", latents=lat, labels=np.arange(20) % 4)
    s = settings(steps=3, data=str(tmp_path / "nan.npz"), batch_size=8, patch_size=1)
    with pytest.raises(TrainError, match="non-finite"):
        run(tmp_path / "r", s)
    assert list_checkpoints(tmp_path / "r") == []


def test_override_that_contradicts_the_data(tmp_path):
    with pytest.raises(TrainError, match="contradicts the data"):
        run(tmp_path / "r", settings(overrides={**SMALL, "seq_len": 64}))
    with pytest.raises(TrainError, match="unknown key"):
        run(tmp_path / "r", settings(overrides={"depht": 1}))


# ----------------------------------------------------------------------------- long runs lose nothing
def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _names(out):
    return [os.path.basename(c) for c in list_checkpoints(out)]


def _corrupt(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 1
    open(f, "wb").write(bytes(data))


def test_fresh_run_starts_metrics_clean(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    with open(out / "metrics.jsonl", "w") as f:  # what a run that died before its first checkpoint left
        for step in range(1, 19):
            f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
    run(out, settings(steps=3))
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in _records(out))


def test_resume_from_an_older_checkpoint_forks(tmp_path):
    """Resuming step 2 of 2/4/6 moves 4 and 6 aside (nothing deleted) before any step, then
    replays exactly what an uninterrupted run does."""
    straight = run(tmp_path / "a", ckpt_every=2, keep=0)
    out = tmp_path / "b"
    run(out, ckpt_every=2, keep=0)
    assert _names(out) == ["step-0000002", "step-0000004", "step-0000006"]
    older = os.path.join(out, "step-0000002")
    res = run(out, resume=older, ckpt_every=2, keep=0)
    assert res.step == 6 and _names(out) == ["step-0000002", "step-0000004", "step-0000006"]
    aside = sorted(os.listdir(out / "superseded"))
    assert len(aside) == 1
    assert sorted(os.listdir(out / "superseded" / aside[0])) == ["metrics.jsonl", "step-0000004", "step-0000006"]
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(straight.checkpoint, "model.safetensors"), "rb") as f1, \
            open(os.path.join(res.checkpoint, "model.safetensors"), "rb") as f2:
        assert f1.read() == f2.read()


def test_resume_keeps_every_setting_unless_given_again(tmp_path):
    out = tmp_path / "r"
    run(out, settings(steps=8), ckpt_every=2, log_every=2, keep=3, stop_after=2)
    res = train(settings(steps=8), str(out), resume=True, progress=False, plot=False)
    assert res.step == 8
    assert _names(out) == ["step-0000004", "step-0000006", "step-0000008"]  # every 2, keep 3
    assert [r["step"] for r in _records(out)] == [2, 4, 6, 8]
    run(out, settings(steps=9), resume=True, ckpt_every=9, keep=1, log_every=9)  # given again: taken
    assert _names(out) == ["step-0000009"]
    assert json.load(open(out / "step-0000009" / "state.json"))["loop"] == {"ckpt_every": 9, "log_every": 9, "keep": 1}


def test_retention_never_deletes_the_newest_intact_checkpoint(tmp_path):
    from djepa.checkpoint import save_checkpoint

    out = tmp_path / "r"
    run(out, settings(steps=4), ckpt_every=1, keep=0)
    _corrupt(os.path.join(out, "step-0000003"))
    _corrupt(os.path.join(out, "step-0000004"))
    model, state = load_checkpoint(os.path.join(out, "step-0000002"))
    doc = {k: v for k, v in state.items() if k not in ("format", "format_version", "step", "files", "folder", "optimizer")}
    opt = torch.optim.AdamW(model.trainable_parameters())
    save_checkpoint(str(out), 5, model, opt, doc, keep=2)
    # kept: step 5 and the newest intact one before it (2); the corrupt 3 and 4 are not counted
    # and not deleted; the intact 1, beyond the two kept, goes
    assert _names(out) == ["step-0000002", "step-0000003", "step-0000004", "step-0000005"]


def test_a_corrupt_newest_checkpoint_names_the_newest_intact_one(tmp_path):
    out = tmp_path / "r"
    run(out, settings(steps=4), ckpt_every=2, keep=0)
    _corrupt(os.path.join(out, "step-0000004"))
    intact = os.path.join(out, "step-0000002")
    for call in (lambda: read_checkpoint_state(out), lambda: run(out, settings(steps=6), resume=True)):
        with pytest.raises(CheckpointError) as info:
            call()
        msg = str(info.value)
        assert "step-0000004" in msg and "corrupt" in msg and f"newest intact checkpoint is {intact}" in msg
        assert f"--resume {intact}" in msg
    res = run(out, settings(steps=6), resume=intact, ckpt_every=2, keep=0)  # forks past the corrupt one
    assert res.step == 6 and _names(out) == ["step-0000002", "step-0000004", "step-0000006"]
    read_checkpoint_state(out)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "r"
        res = run(out, settings(steps=2), ckpt_every=2, plot=True)
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    paths = [out, res.checkpoint] + [os.path.join(out, f) for f in os.listdir(out)] \
        + [os.path.join(res.checkpoint, f) for f in os.listdir(res.checkpoint)]
    for p in paths:
        mode = os.stat(p).st_mode & 0o777
        assert mode == (want_dir if os.path.isdir(p) else want_file), (p, oct(mode))


def test_a_failed_run_leaves_no_empty_folder_it_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(TrainError):
        run(out, settings(steps=2, batch_size=100000))
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(TrainError):
        run(kept, settings(steps=2, batch_size=100000))
    assert kept.is_dir()  # a folder that existed before stays


def test_unusable_backend_is_refused_before_any_work(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the backends can run here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for backend, why in (("cuda", "backend cuda cannot run"), ("triton", "backend triton cannot run")):
        with pytest.raises(TrainError, match=why):
            run(tmp_path / backend, settings(steps=1), backend=backend)
        assert not (tmp_path / backend).exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_the_next_step_boundary(tmp_path, monkeypatch, signame):
    import signal

    from djepa.train import TrainInterrupted

    signum = getattr(signal, signame)
    straight = run(tmp_path / "a", ckpt_every=100)
    real = StepBatches.indices

    def indices(self, step):
        if step == 2:  # while fetching the third batch: that step still runs
            os.kill(os.getpid(), signum)
        return real(self, step)

    monkeypatch.setattr(StepBatches, "indices", indices)
    before = signal.getsignal(signum)
    out = tmp_path / "b"
    with pytest.raises(TrainInterrupted) as info:
        run(out, ckpt_every=100)
    assert signal.getsignal(signum) == before  # the handler is put back
    stop = info.value
    assert stop.signal == signum and stop.exit_code == 128 + signum and stop.step == 3
    assert stop.checkpoint == os.path.join(out, "step-0000003") and _names(out) == ["step-0000003"]
    assert f"--resume" in str(stop) and signame in str(stop)
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    monkeypatch.setattr(StepBatches, "indices", real)
    res = run(out, resume=True)
    assert [d["loss"] for d in res.losses] == [d["loss"] for d in straight.losses][3:]
    with open(os.path.join(straight.checkpoint, "model.safetensors"), "rb") as f1, \
            open(os.path.join(res.checkpoint, "model.safetensors"), "rb") as f2:
        assert f1.read() == f2.read()


def test_settings_errors_are_train_errors():
    for bad in (dict(steps=0), dict(lr=0.0), dict(batch_size=0), dict(warmup_steps=-1), dict(min_lr_ratio=2.0),
                dict(grad_clip=0.0), dict(weight_decay=-1.0), dict(lr=float("nan"))):
        with pytest.raises(TrainError) as info:
            TrainSettings(**bad)
        assert info.value.field == next(iter(bad))


def _record_optimizer_steps(monkeypatch):
    """Wrap AdamW.step: for each step, the optimizer's groups and the gradients it is given."""
    steps = []
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        grads = [p.grad.detach().double().clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        steps.append({"groups": [(g["weight_decay"], g["lr"], [p for p in g["params"]]) for g in self.param_groups],
                      "norm": torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])).item(),
                      "optimizer": self})
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return steps


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_gradients_are_clipped_to_the_setting(tmp_path, monkeypatch, clip):
    """The optimizer sees gradients of total norm min(clip, raw norm); the logged grad_norm is
    the raw one."""
    steps = _record_optimizer_steps(monkeypatch)
    run(tmp_path / "a", settings(steps=3, grad_clip=clip))
    raw = [json.loads(line)["grad_norm"] for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert len(steps) == 3 and all(r > 1e-2 for r in raw)
    for s, r in zip(steps, raw):
        assert s["norm"] == pytest.approx(min(clip, r), rel=1e-4)


def test_weight_decay_groups_and_learning_rate(tmp_path, monkeypatch):
    """Matrices decay with the setting, vectors (biases, norms, embeddings' 1-D) do not; every
    trainable parameter is in exactly one group, the EMA copy in none; each group's lr is the
    schedule's."""
    steps = _record_optimizer_steps(monkeypatch)
    s = settings(steps=3, weight_decay=0.25, warmup_steps=2, lr=1e-3)
    model = run(tmp_path / "a", s).model

    for i, rec in enumerate(steps):
        (wd_a, lr_a, decay), (wd_b, lr_b, no_decay) = rec["groups"]
        assert (wd_a, wd_b) == (0.25, 0.0)
        assert lr_a == lr_b == pytest.approx(s.lr_at(i))
        assert decay and no_decay
        assert all(p.ndim >= 2 for p in decay) and all(p.ndim < 2 for p in no_decay)
    opt = steps[0]["optimizer"]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.trainable_parameters()}
    assert not set(ids) & {id(p) for p in model.ema.parameters()}
    # AdamW's decoupled decay on a decayed matrix: with its gradient and moments zeroed, one
    # step multiplies it by exactly 1 - lr * wd; an undecayed vector stays put
    (wd_a, _, decay), (_, _, no_decay) = steps[-1]["groups"]
    w, v = decay[0], no_decay[0]
    for p in (w, v):
        p.grad = torch.zeros_like(p)
        st = opt.state[p]
        st["exp_avg"].zero_()
        st["exp_avg_sq"].zero_()
    w0, v0 = w.detach().clone(), v.detach().clone()
    for g in opt.param_groups:
        g["params"] = [p for p in g["params"] if p is w or p is v]
    monkeypatch.undo()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    assert torch.allclose(w.detach().double(), w0.double() * (1 - lr * 0.25), rtol=1e-6, atol=0)
    assert torch.equal(v.detach(), v0)


def test_no_function_of_the_training_loop_runs_over_80_lines():
    """The loop reads as a loop: set-up, one step, logging and checkpoints are functions apart."""
    import ast
    import inspect

    import djepa.train as module

    tree = ast.parse(inspect.getsource(module))
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {"_train", "_set_up", "_loop", "_train_step"} <= set(lengths)
    assert {name: n for name, n in lengths.items() if n > 80} == {}


def test_a_run_folder_means_the_checkpoint_latest_names(tmp_path):
    """`latest` wins over the newest step-* folder (e.g. a newer folder copied back in by hand);
    a damaged or dangling `latest` falls back to the newest folder with a state.json."""
    from djepa.checkpoint import resolve_checkpoint

    for step in (2, 4):
        (tmp_path / f"step-000000{step}").mkdir()
        (tmp_path / f"step-000000{step}" / "state.json").write_text("{}")
    (tmp_path / "latest").write_text("step-0000002\n")
    assert resolve_checkpoint(tmp_path) == str(tmp_path / "step-0000002")
    (tmp_path / "latest").write_text("step-0000009\n")
    assert resolve_checkpoint(tmp_path) == str(tmp_path / "step-0000004")
    (tmp_path / "latest").write_bytes(b"\xff\xfe")
    assert resolve_checkpoint(tmp_path) == str(tmp_path / "step-0000004")
