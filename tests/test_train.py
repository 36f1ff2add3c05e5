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
