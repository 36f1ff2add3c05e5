"""The D-JEPA training loop: AdamW with warm-up, grad clipping, bf16 autocast on GPU, the EMA
target, checkpoints that resume exactly (djepa.checkpoint), metrics as JSONL, and
DistributedDataParallel under torchrun (djepa.distributed).

A run folder holds `step-NNNNNNN/` checkpoints, `latest`, `metrics.jsonl` and `loss.png`.
- A fresh run refuses a folder that holds checkpoints and starts `metrics.jsonl` empty.
- `resume` continues a checkpoint exactly, with every setting of the run (also how often it
  checkpoints, logs and how many checkpoints it keeps) unless given again. Resuming an older
  checkpoint than the newest forks the run: the later checkpoints (and a copy of the metrics)
  are moved into `superseded/`, and the metrics are cut back to the checkpoint's step.
- SIGTERM or SIGINT stops the run at the next step boundary (every rank at the same step),
  with a checkpoint there: `TrainInterrupted` (exit status 128 + signal in the CLI). A second
  signal acts at once (the checkpoints on disk stay intact).
- A run that fails removes the folders it created if they are still empty.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from djepa import distributed
from djepa.checkpoint import (CheckpointError, atomic_write_text, list_checkpoints, load_checkpoint,  # noqa: F401
                              load_weights, read_checkpoint_state, resolve_checkpoint, save_checkpoint)
from djepa.checkpoint import restore_optimizer, rng_state, set_rng_state, supersede
from djepa.distributed import Dist, setup_distributed  # noqa: F401

__all__ = ["CheckpointError", "Dist", "LOOP_DEFAULTS", "StepBatches", "TrainError", "TrainInterrupted",
           "TrainResult", "TrainSettings", "atomic_write_text", "check_backend", "ensure_writable_dir",
           "list_checkpoints", "load_checkpoint", "load_weights", "make_tokenizer", "output_dir", "param_groups",
           "read_checkpoint_state", "resolve_checkpoint", "save_checkpoint", "setup_distributed", "train"]

METRICS_FILE, LOSS_PLOT = "metrics.jsonl", "loss.png"
# The data of a run converted from an official checkpoint without --data (djepa convert): a
# resume must be told its training data (--data), which then becomes the run's.
UNRECORDED_DATA = "latents:PATH-NOT-RECORDED"
# How often a run checkpoints and logs, and how many checkpoints it keeps (0 = all): recorded
# in each checkpoint, so that a resumed run keeps them.
LOOP_DEFAULTS = {"ckpt_every": 500, "log_every": 50, "keep": 2}


class TrainError(ValueError):
    """Training cannot start or go on (bad settings, an unusable output folder, a NaN loss).
    `field` names the setting at fault, when one is."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class TrainInterrupted(KeyboardInterrupt):
    """The run stopped on a signal, after a checkpoint at the step boundary it reached."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[str], out: str, main: bool = True):
        self.signal, self.step, self.checkpoint, self.out, self.main = signum, step, checkpoint, out, main
        self.exit_code = 128 + signum
        super().__init__(self.message())

    def message(self) -> str:
        name = signal.Signals(self.signal).name
        if self.checkpoint is None:
            return f"stopped by {name} before the first step; nothing was saved"
        return (f"stopped by {name} at step {self.step}; checkpoint {self.checkpoint}; "
                f"continue with: djepa train --out {self.out} --resume")

    def __str__(self):
        return self.message()


def _int_at_least(name, v, low):
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise TrainError(f"{name} must be {what}, got {v!r}", field=name)


def _positive_number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise TrainError(f"{name} must be > 0, got {v!r}", field=name)


@dataclass
class TrainSettings:
    """Everything that decides the numbers a run produces (recorded in every checkpoint)."""

    preset: str = "tiny"
    data: str = "digits"
    steps: int = 1000
    batch_size: int = 128  # global: split evenly over the ranks
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warm-up
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.02
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 3.0
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32", "bf16"
    patch_size: Optional[int] = None  # None: the data set's default (2 for the digits)
    overrides: dict = field(default_factory=dict)  # DJEPAConfig fields over the preset
    data_options: dict = field(default_factory=dict)  # image_size/channels, num_classes/scale

    # Settings a resumed run may change: they do not alter the steps already taken.
    RESUMABLE = ("steps",)

    def __post_init__(self):
        """TrainError (a ValueError) naming the field for any setting out of its range."""
        self.betas = tuple(float(b) for b in self.betas)
        self.overrides = dict(self.overrides)
        self.data_options = dict(self.data_options)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        _positive_number("lr", self.lr)
        _positive_number("grad_clip", self.grad_clip)
        if not (isinstance(self.weight_decay, (int, float)) and 0.0 <= self.weight_decay < math.inf):
            raise TrainError(f"weight_decay must be >= 0, got {self.weight_decay!r}", field="weight_decay")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise TrainError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}", field="min_lr_ratio")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainError(f"betas must be two numbers in [0, 1), got {self.betas!r}", field="betas")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TrainError(f"seed must be an integer, got {self.seed!r}", field="seed")
        if self.lr_schedule not in ("cosine", "constant"):
            raise TrainError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}",
                             field="lr_schedule")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise TrainError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}",
                             field="precision")
        if self.patch_size is not None:
            _int_at_least("patch_size", self.patch_size, 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training setting(s) {unknown}")
        return cls(**d)

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step that takes the run from `step` to `step + 1`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        low = self.lr * self.min_lr_ratio
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))



@dataclass
class TrainResult:
    step: int
    checkpoint: Optional[str]  # the last checkpoint written (rank 0), else None
    losses: list  # per step taken in this call, this rank's batch: dicts of loss/diffusion/jepa
    metrics: Optional[str]
    model: Optional[torch.nn.Module] = None  # the trained model (this rank's copy, unwrapped)


# ----------------------------------------------------------------------------- data order
class StepBatches(torch.utils.data.Sampler):
    """Batch indices as a pure function of the step: epoch `e` is a permutation seeded by
    (seed, e); each global batch is split into equal per-rank slices. Restarting at any step
    therefore replays exactly the batches an uninterrupted run would have seen."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0, stop: int = 0):
        if global_batch % world:
            raise TrainError(f"batch size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise TrainError(f"batch size {global_batch} exceeds the {n} training items")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self.per_rank = global_batch // world
        self.batches_per_epoch = n // global_batch
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        lo = k * self.global_batch + self.rank * self.per_rank
        return self._perm[lo: lo + self.per_rank]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.indices(step).tolist()

    def __len__(self):
        return max(0, self.stop - self.start)


def _batches(dataset, sampler: StepBatches, num_workers: int):
    if hasattr(dataset, "get_batch") and num_workers == 0:
        for step in range(sampler.start, sampler.stop):
            yield dataset.get_batch(sampler.indices(step))
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             persistent_workers=False,
                                             worker_init_fn=_ignore_sigint if num_workers else None)
        for images, labels in loader:
            yield images, torch.as_tensor(labels)


def _ignore_sigint(worker_id):
    """Ctrl-C reaches the loader's workers too: the main process stops the run at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- output
def ensure_writable_dir(path: str, what: str = "output directory") -> str:
    """Create `path` if needed and prove a file can be written there (TrainError otherwise)."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"cannot create {what} {path!r}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise TrainError(f"{what} {path!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TrainError(f"{what} {path!r} is not writable: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def output_dir(path: str, what: str = "output directory", create: bool = True):
    """`ensure_writable_dir(path)` for the duration of a job: if the job raises, the folders
    created here are removed again when they are still empty. Yields the absolute path."""
    path = os.path.abspath(path)
    missing, p = [], path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if create:
        ensure_writable_dir(path, what)
    try:
        yield path
    except BaseException:
        for d in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise


def check_backend(backend: Optional[str], device) -> None:
    """TrainError (field "backend") unless the model's ops can run with `backend` (None: the
    DJEPA_BACKEND default) on `device`; "auto" and "eager" always can."""
    from djepa import backends

    try:
        chosen = backends.default_backend() if backend is None else str(backend).lower()
    except ValueError as exc:
        raise TrainError(str(exc), field="backend") from None
    if chosen not in backends.BACKENDS:
        raise TrainError(f"backend must be one of {', '.join(backends.BACKENDS)}, got {backend!r}", field="backend")
    if chosen in ("auto", "eager"):
        return
    device = torch.device(device)
    why_not = backends.cuda_unavailable_reason if chosen == "cuda" else backends.triton_unavailable_reason
    for op in ("masked_attention", "adaln_block", "denoise_step"):
        reason = why_not(op, device)
        if reason:
            raise TrainError(f"backend {chosen} cannot run here ({op} on {device.type}): {reason}; "
                             f"use --backend auto", field="backend")


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary (main thread
    only); a second signal gets the previous handler's behaviour at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        for s, old in self._old.items():
            signal.signal(s, old)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        return False


# ----------------------------------------------------------------------------- the loop
def data_overrides(dataset, patch_size: int) -> dict:
    """The DJEPAConfig fields that the data fix: sequence length, token channels, classes."""
    h, w = dataset.image_size
    if h % patch_size or w % patch_size:
        raise TrainError(f"patch size {patch_size} does not divide the {h}x{w} images")
    return {"seq_len": (h // patch_size) * (w // patch_size),
            "token_channels": dataset.channels * patch_size * patch_size,
            "num_classes": dataset.num_classes}


def make_tokenizer(channels: int, patch_size: int):
    from djepa.models import Patchifier

    return Patchifier(patch_size=patch_size, channels=channels)


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def param_groups(model, weight_decay: float):
    """AdamW's parameter groups: `weight_decay` on the trainable parameters of 2 or more dims,
    none on the rest (biases, norm weights)."""
    trainable = {id(p) for p in model.trainable_parameters()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if id(p) in trainable and p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_resume_settings(saved: TrainSettings, given: dict) -> TrainSettings:
    d = saved.to_dict()
    if d["data"] == UNRECORDED_DATA and given.get("data") is None:
        raise TrainError("this run was converted from an official checkpoint without its training data: "
                         "pass --data latents:PATH (the latents it trains on) to resume it", field="data")
    for k, v in given.items():
        if v is None or k not in d:
            continue
        if k == "betas":
            v = list(v)
        if k in TrainSettings.RESUMABLE or (k == "data" and d[k] == UNRECORDED_DATA):
            d[k] = v
        elif v != d[k]:
            raise TrainError(f"--resume keeps the checkpoint's settings: {k}={v!r} differs from its {d[k]!r}")
    return TrainSettings.from_dict(d)


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    atomic_write_text(path, "".join(keep))


def _check_loop(loop: dict, num_workers, stop_after) -> None:
    for name, v in loop.items():
        if v is not None:
            _int_at_least(name, v, 0 if name == "keep" else 1)
    _int_at_least("num_workers", num_workers, 0)
    if stop_after is not None:
        _int_at_least("stop_after", stop_after, 1)


def _fresh_metrics(out: str) -> None:
    """A fresh run starts clean: no records or loss curve of a run that died before a checkpoint."""
    atomic_write_text(os.path.join(out, METRICS_FILE), "")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, LOSS_PLOT))


def train(settings: TrainSettings, out: str, *, resume=None, given: Optional[dict] = None,
          ckpt_every: Optional[int] = None, log_every: Optional[int] = None, keep: Optional[int] = None,
          progress=None, backend: Optional[str] = None, device=None, num_workers: int = 0,
          plot: bool = True, stop_after: Optional[int] = None) -> TrainResult:
    """Train (or resume) a D-JEPA model; checkpoints, metrics.jsonl and loss.png go to `out`.

    `resume`: a checkpoint path, or True for the newest one in `out`. On resume the run keeps
    the checkpoint's settings; `given` lists settings the user set explicitly (default: all of
    `settings`), and any that differs from the checkpoint's raises TrainError, except `steps`.
    `ckpt_every` / `log_every` / `keep` (0 = keep all): None takes the resumed run's values,
    else 500 / 50 / 2. `stop_after`: stop after that many steps of this call (with a
    checkpoint). SIGTERM/SIGINT raise TrainInterrupted after a checkpoint (see the module doc).
    """
    loop_given = {"ckpt_every": ckpt_every, "log_every": log_every, "keep": keep}
    _check_loop(loop_given, num_workers, stop_after)
    dist_info = setup_distributed(device)
    try:
        check_backend(backend, dist_info.device)
        folder = output_dir(out) if dist_info.is_main else contextlib.nullcontext(os.path.abspath(out))
        with folder as out, _StopOnSignal() as signals:
            return _train(settings, out, dist_info, signals, resume=resume, given=given, loop_given=loop_given,
                          progress=progress, backend=backend, num_workers=num_workers, plot=plot,
                          stop_after=stop_after)
    finally:
        distributed.teardown(dist_info)


def _train(settings, out, dist_info, signals, *, resume, given, loop_given, progress, backend, num_workers,
           plot, stop_after) -> TrainResult:
    show = (sys.stderr.isatty() if progress is None else progress) and dist_info.is_main
    run = _set_up(settings, out, dist_info, resume=resume, given=given, loop_given=loop_given, backend=backend,
                  show=show, stop_after=stop_after)
    return _loop(run, signals, num_workers=num_workers, plot=plot, show=show)


@dataclass
class _Run:
    """What the loop works with, built by _set_up before the first step."""

    settings: TrainSettings
    out: str
    dist: Dist
    loop: dict  # ckpt_every, log_every, keep
    start: int
    stop: int
    resumed: Optional[str]  # the checkpoint folder the run resumed, if any
    dataset: object
    patch: int
    model: torch.nn.Module
    net: torch.nn.Module  # the model, wrapped in DDP when there are several processes
    tokenizer: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    sampler: StepBatches

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out, METRICS_FILE)


def _set_up(settings, out, dist_info, *, resume, given, loop_given, backend, show, stop_after) -> _Run:
    """Everything before the first step (as MAR's main_mar.py before engine_mar's
    train_one_epoch): the settings of a resumed run, the data, the model, the optimizer and
    random state (restored on resume), the data order, and the run folder."""
    dev = dist_info.device
    settings, loop, ckpt_folder, ckpt_state = _resume_point(settings, out, dist_info, resume, given, loop_given)
    start = ckpt_state["step"] if ckpt_state else 0
    if start > settings.steps:
        raise TrainError(f"the checkpoint is at step {start}, past --steps {settings.steps}")
    dataset, patch, from_data = _load_data(settings, dist_info, show)
    model = _build_model(settings, from_data, backend, ckpt_state, ckpt_folder)
    model.to(dev)
    tokenizer = make_tokenizer(dataset.channels, patch)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=settings.betas, weight_decay=settings.weight_decay)
    generator = torch.Generator(device=dev)
    generator.manual_seed(settings.seed * 7919 + dist_info.rank + 1)
    if ckpt_state is not None:
        _restore(model, optimizer, generator, settings, dist_info, ckpt_folder, ckpt_state)
    net = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    stop = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
    sampler = StepBatches(len(dataset), settings.batch_size, settings.seed, dist_info.rank,
                          dist_info.world, start, stop)
    run = _Run(settings, out, dist_info, loop, start, stop, ckpt_folder, dataset, patch, model, net, tokenizer,
               optimizer, generator, sampler)
    if dist_info.is_main:  # every check passed: now the folder may change
        _prepare_folder(run)
    distributed.broadcast_object(dist_info, None)  # no rank starts before the folder is ready
    return run


def _resume_point(settings, out, dist_info, resume, given, loop_given):
    """(settings, loop settings, checkpoint folder, checkpoint state) the run starts from: the
    checkpoint's (checked against what the user gave) on resume, else the fresh run's."""
    ckpt_state, ckpt_folder = None, None
    loop = dict(LOOP_DEFAULTS)
    if resume:
        ckpt_folder, ckpt_state = read_checkpoint_state(out if resume is True else resume)
        given = settings.to_dict() if given is None else dict(given)
        if given.get("preset") not in (None, ckpt_state["preset"]):
            raise CheckpointError(f"checkpoint {ckpt_folder!r} holds preset {ckpt_state['preset']!r}, "
                                  f"not {given['preset']!r}")
        try:
            saved = TrainSettings.from_dict(ckpt_state["settings"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_folder!r} has unusable settings: {exc}") from None
        settings = _check_resume_settings(saved, given)
        saved_loop = ckpt_state.get("loop", {})
        if isinstance(saved_loop, dict):
            loop.update({k: v for k, v in saved_loop.items() if k in loop})
    elif dist_info.is_main and list_checkpoints(out):
        raise TrainError(f"{out!r} already holds checkpoints; pass --resume to continue them "
                         f"or choose another --out (nothing was overwritten)")
    loop.update({k: v for k, v in loop_given.items() if v is not None})
    try:
        _check_loop(loop, 0, None)
    except TrainError as exc:
        raise CheckpointError(f"checkpoint {ckpt_folder!r} has unusable loop settings: {exc}") from None
    return settings, loop, ckpt_folder, ckpt_state


def _load_data(settings, dist_info, show):
    """(dataset, patch size, the config fields the data fix), checked against the overrides."""
    from djepa.data import build_dataset

    dataset = build_dataset(settings.data, "train", progress=show, **settings.data_options)
    skipped = getattr(dataset, "skipped", None)
    if skipped and dist_info.is_main:
        first, why = skipped[0]
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        print(f"djepa train: skipped {len(skipped)} unreadable image(s): {first} ({why}){more}", file=sys.stderr)
    patch = settings.patch_size or dataset.default_patch_size
    from_data = data_overrides(dataset, patch)
    for k, v in from_data.items():
        if k in settings.overrides and settings.overrides[k] != v:
            raise TrainError(f"override {k}={settings.overrides[k]} contradicts the data ({k}={v})")
    return dataset, patch, from_data


def _build_model(settings, from_data, backend, ckpt_state, ckpt_folder):
    """The model, initialised from the run's seed (CheckpointError if a resumed checkpoint's
    config differs)."""
    from djepa.models import build

    torch.manual_seed(settings.seed)
    try:
        model = build(settings.preset, **{**settings.overrides, **from_data, "backend": backend})
    except (TypeError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    if ckpt_state is not None:
        diff = sorted(k for k, v in model.config.to_dict().items()
                      if k != "backend" and ckpt_state["config"].get(k, v) != v)
        if diff:
            raise CheckpointError(f"checkpoint {ckpt_folder!r} has another model config "
                                  f"({', '.join(diff)} differ)")
    return model


def _restore(model, optimizer, generator, settings, dist_info, ckpt_folder, ckpt_state):
    """A resumed run's weights, optimizer state and random state."""
    start = ckpt_state["step"]
    load_weights(model, ckpt_folder)
    restore_optimizer(optimizer, ckpt_folder, ckpt_state)
    rngs = ckpt_state.get("rng", [])
    if len(rngs) == dist_info.world:
        set_rng_state(rngs[dist_info.rank], generator, dist_info.device)
    else:  # another process count: the batches still replay, the masks/noise reseed
        torch.manual_seed(settings.seed + start)
        generator.manual_seed(settings.seed * 7919 + dist_info.rank + 1 + start)


def _prepare_folder(run):
    """A fresh run's metrics start empty; a resumed one moves later checkpoints aside and cuts
    the metrics back to its step (rank 0)."""
    if run.resumed is None:
        _fresh_metrics(run.out)
        return
    aside = supersede(run.out, run.start, also=(METRICS_FILE,))
    if aside:
        print(f"djepa train: resuming step {run.start}: the later checkpoints are moved aside into {aside}",
              file=sys.stderr)
    _truncate_metrics(run.metrics_path, run.start)


def _loop(run, signals, *, num_workers, plot, show) -> TrainResult:
    """The steps from run.start to run.stop: logs every log_every steps, checkpoints every
    ckpt_every steps, at the end and on a signal (then TrainInterrupted)."""
    from tqdm.auto import tqdm

    settings, optimizer, dist_info = run.settings, run.optimizer, run.dist
    signum = distributed.any_rank(dist_info, signals.signum)
    if signum:
        raise TrainInterrupted(signum, run.start, run.resumed, run.out, dist_info.is_main)
    bar = tqdm(total=settings.steps, initial=run.start, disable=not show, desc="train", unit="step",
               dynamic_ncols=True)
    losses, window, last_ckpt, t0 = [], [], None, time.perf_counter()
    run.net.train()
    step = run.start
    for images, labels in _batches(run.dataset, run.sampler, num_workers):
        lr = settings.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window.append(_train_step(run, images, labels))
        step += 1
        signum = distributed.any_rank(dist_info, signals.signum)  # every rank stops at the same step
        boundary = step % run.loop["ckpt_every"] == 0 or step == run.stop or signum
        if step % run.loop["log_every"] == 0 or boundary:
            losses.extend(_log(run, window, step, lr, t0, bar))
            window = []
        bar.update(1)
        if boundary:
            last_ckpt = _save(run, step, plot)
        if signum:
            bar.close()
            raise TrainInterrupted(signum, step, last_ckpt, run.out, dist_info.is_main)
    bar.close()
    if step == run.start and dist_info.is_main:
        last_ckpt = run.resumed
    return TrainResult(step=step, checkpoint=last_ckpt, losses=losses,
                       metrics=run.metrics_path if dist_info.is_main else None, model=run.model)


def _train_step(run, images, labels) -> torch.Tensor:
    """One optimizer step (forward, backward, clipping, AdamW, EMA) at the learning rate the
    optimizer holds; returns (loss, diffusion loss, JEPA loss, gradient norm), detached."""
    settings, optimizer, dev = run.settings, run.optimizer, run.dist.device
    images = images.to(dev, non_blocking=True)
    labels = labels.to(dev, non_blocking=True)
    tokens = run.tokenizer.encode(images)
    with _autocast(dev, settings.precision):
        out_dict = run.net(tokens, labels, generator=run.generator)
    loss = out_dict["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], settings.grad_clip)
    optimizer.step()
    run.model.update_ema()
    return torch.stack([loss.detach().float(), out_dict["diffusion"].detach().float(),
                        out_dict["jepa"].detach().float(), grad_norm.detach().float()])


def _log(run, window, step, lr, t0, bar) -> list:
    """The window's rows, averaged over them and the ranks into a metrics.jsonl record (rank 0);
    TrainError if any is not finite. Returns this rank's per-step losses."""
    vals = torch.stack(window).cpu()
    mean = distributed.mean(run.dist, vals.mean(0))
    if not (torch.isfinite(vals).all() and torch.isfinite(mean).all()):
        raise TrainError(f"the loss became non-finite by step {step} (lr {lr:.3g}); "
                         f"lower --lr or check the data. The last good checkpoint is kept.")
    if run.dist.is_main:
        elapsed = time.perf_counter() - t0
        rec = {"step": step, "loss": mean[0].item(), "diffusion": mean[1].item(),
               "jepa": mean[2].item(), "grad_norm": mean[3].item(), "lr": lr,
               "steps_per_s": (step - run.start) / max(elapsed, 1e-9), "elapsed_s": elapsed}
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
    return [{"loss": v[0].item(), "diffusion": v[1].item(), "jepa": v[2].item()} for v in vals]


def _save(run, step, plot) -> Optional[str]:
    """A checkpoint at `step` (rank 0 writes it, every rank's random state in it) and the loss
    plot; returns its folder on every rank."""
    dist_info = run.dist
    rng = distributed.all_gather_object(dist_info, rng_state(run.generator, dist_info.device))
    path = None
    if dist_info.is_main:
        settings = run.settings
        doc = {"preset": settings.preset, "config": run.model.config.to_dict(),
               "settings": settings.to_dict(), "loop": run.loop,
               "data": {**run.dataset.describe(), "spec": settings.data, "patch_size": run.patch},
               "rng": rng, "world_size": dist_info.world,
               "djepa_version": _version(), "torch_version": torch.__version__,
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = save_checkpoint(run.out, step, run.model, run.optimizer, doc, keep=run.loop["keep"])
        if plot:
            _plot_losses(run.metrics_path, os.path.join(run.out, LOSS_PLOT))
    return distributed.broadcast_object(dist_info, path)


def _plot_losses(metrics_path, png):
    try:
        from djepa.plots import loss_curve

        loss_curve(metrics_path, png)
    except (OSError, ValueError):  # a plot is a convenience: never stop training over it
        pass


def _version():
    import djepa

    return djepa.__version__
