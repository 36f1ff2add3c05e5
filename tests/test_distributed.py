"""DistributedDataParallel on the CPU (gloo): two processes that meet through a file store
(no port to race for), and torchrun's --standalone rendezvous (it binds its own free port)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2, "diffloss_depth": 1, "diffloss_width": 32,
         "num_sampling_steps": "4", "class_tokens": 2}


def _join(rank, world, result_dir):
    """The process group of a file store in `result_dir`: setup_distributed finds it joined."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(result_dir, "rendezvous"),
                            rank=rank, world_size=world)


def _settings():
    from djepa.train import TrainSettings

    return TrainSettings(steps=3, batch_size=16, lr=1e-3, warmup_steps=1, overrides=SMALL, seed=5)


def _worker(rank, world, out, result_dir):
    _join(rank, world, result_dir)
    from djepa.train import train

    res = train(_settings(), out, ckpt_every=3, log_every=1, progress=False, plot=False, device="cpu")
    torch.save({"state": res.model.state_dict(), "losses": res.losses, "checkpoint": res.checkpoint},
               os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _single_process_reference(s, world):
    """The same training written out in one process on the whole global batch: each step, the
    mean of the `world` half-batch losses (each with that rank's generator: the ranks' masks
    and noise), one backward, clip, AdamW, EMA."""
    from djepa.data import build_dataset
    from djepa.models import build
    from djepa.train import StepBatches, data_overrides, make_tokenizer, param_groups

    dataset = build_dataset(s.data, "train", **s.data_options)
    patch = s.patch_size or dataset.default_patch_size
    torch.manual_seed(s.seed)
    model = build(s.preset, **{**s.overrides, **data_overrides(dataset, patch), "backend": None})
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = make_tokenizer(dataset.channels, patch)
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    gens = [torch.Generator().manual_seed(s.seed * 7919 + r + 1) for r in range(world)]
    batches = [StepBatches(len(dataset), s.batch_size, s.seed, r, world) for r in range(world)]
    model.train()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr_at(step)
        loss = 0.0
        for r in range(world):
            images, labels = dataset.get_batch(batches[r].indices(step))
            loss = loss + model(tokenizer.encode(images), labels, generator=gens[r])["loss"] / world
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], s.grad_clip)
        opt.step()
        model.update_ema()
    return init, model.state_dict()


def test_two_cpu_processes_match_single_process_training(tmp_path):
    out, results = str(tmp_path / "run"), str(tmp_path)
    mp.start_processes(_worker, args=(2, out, results), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(os.path.join(results, "rank0.pt"))
    r1 = torch.load(os.path.join(results, "rank1.pt"))
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # parameters and EMA
    # each rank trained on its own half of the global batch, so the local losses differ
    assert [d["loss"] for d in r0["losses"]] != [d["loss"] for d in r1["losses"]]
    # rank 0 wrote the checkpoint, and it holds the ranks' common weights
    assert r0["checkpoint"] and r1["checkpoint"] == r0["checkpoint"]
    from djepa.train import load_checkpoint

    model, state = load_checkpoint(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, r0["state"][k]), k
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]  # rank 0 alone writes the metrics
    # the logged loss is the mean over the ranks of their local losses
    for r, a, b in zip(records, r0["losses"], r1["losses"]):
        assert r["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-6)
    # and the ranks' weights are those of one process training on the whole batch: the
    # difference (summation order only) is far below what the training moved them
    torch.set_num_threads(1)
    init, ref = _single_process_reference(_settings(), 2)
    assert ref.keys() == r0["state"].keys()
    moved = max((ref[k].double() - init[k].double()).abs().max().item() for k in ref if ref[k].is_floating_point())
    off = max((ref[k].double() - r0["state"][k].double()).abs().max().item() for k in ref if ref[k].is_floating_point())
    assert moved > 1e-4 and off <= 1e-2 * moved, (off, moved)


def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():  # run it as on the one-GPU machine: the ranks see one GPU (faked)
        fake = os.path.join(os.path.dirname(__file__), "..", "tools", "fake_gpu")
        env.update(DJEPA_FAKE_GPU="1", DJEPA_FAKE_GPU_COUNT="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [fake, env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "djepa", "train", "--out", str(out), "--steps", "2",
           "--batch-size", "8", "--ckpt-every", "2", "--no-progress",
           "--device", "cpu"]  # gloo on the CPU: a one-GPU machine has no cuda:1 for rank 1
    for k, v in SMALL.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    state = json.load(open(out / "step-0000002" / "state.json"))
    assert state["world_size"] == 2 and state["step"] == 2
    assert r.stdout.count("trained to step 2") == 1  # only rank 0 reports


PROBE = """
import gc, json, os, sys
from torch.nn.parallel import DistributedDataParallel
from djepa.cli import main
rc = main(sys.argv[2:])
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({"rc": rc, "ddp_alive": alive}, f)
"""


def test_torchrun_train_frees_ddp_before_the_interpreter_exits(tmp_path):
    """DDP sits in reference cycles and holds the gloo group; left to the collection in Python's
    finalization, the group's worker threads decref tensors while the interpreter shuts down and
    rank 0 aborted ("terminate called without an active exception", test_torchrun_cli under load,
    about 1 run in 35). After `djepa train` returns, no rank may still hold a DDP."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe), str(tmp_path),
           "train", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    for k, v in SMALL.items():
        cmd += ["--set", f"{k}={v}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    assert ranks == [{"rc": 0, "ddp_alive": 0}] * 2, ranks


def _signal_worker(rank, world, out, result_dir):
    """Rank 1 alone gets SIGTERM while fetching its third batch; both ranks must stop after
    that step with one checkpoint."""
    import signal

    _join(rank, world, result_dir)
    from djepa.train import StepBatches, TrainInterrupted, TrainSettings, train

    if rank == 1:
        real = StepBatches.indices

        def indices(self, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, step)

        StepBatches.indices = indices
    s = TrainSettings(steps=50, batch_size=16, lr=1e-3, warmup_steps=1, overrides=SMALL, seed=5)
    try:
        train(s, out, ckpt_every=100, log_every=1, progress=False, plot=False, device="cpu")
        got = None
    except TrainInterrupted as exc:
        got = {"step": exc.step, "checkpoint": exc.checkpoint, "signal": exc.signal, "main": exc.main}
    torch.save(got, os.path.join(result_dir, f"stop{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import signal

    out, results = str(tmp_path / "run"), str(tmp_path)
    mp.start_processes(_signal_worker, args=(2, out, results), nprocs=2, join=True,
                       start_method="spawn")
    stops = [torch.load(os.path.join(results, f"stop{r}.pt")) for r in range(2)]
    assert all(s is not None for s in stops), stops
    assert [s["step"] for s in stops] == [3, 3] and {s["signal"] for s in stops} == {int(signal.SIGTERM)}
    assert stops[0]["checkpoint"] == stops[1]["checkpoint"] == os.path.join(out, "step-0000003")
    assert [s["main"] for s in stops] == [True, False]
    from djepa.train import read_checkpoint_state

    _, state = read_checkpoint_state(out)
    assert state["step"] == 3 and state["world_size"] == 2
