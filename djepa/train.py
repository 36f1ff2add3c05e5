"""The D-JEPA training loop: AdamW with warm-up, grad clipping, bf16 autocast on GPU, the EMA
target, atomic checkpoints that resume exactly, metrics as JSONL, and DistributedDataParallel
under torchrun.

A checkpoint is a folder `<out>/step-NNNNNNN/` holding
  model.safetensors    `model.state_dict()` (trainable weights and the EMA copy)
  trainer.safetensors  the optimizer's tensors
  state.json           format tag, step, preset, model config, training settings, data
                       description, the optimizer's other state, every rank's RNG states, and
                       the size and SHA-256 of both weight files
It is written into a temporary folder and renamed into place, then `<out>/latest` (also
replaced atomically) names it, so a kill at any moment leaves the previous checkpoint intact.
"""
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

FORMAT = "djepa-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, STATE_FILE, LATEST_FILE = "model.safetensors", "trainer.safetensors", "state.json", "latest"
METRICS_FILE, LOSS_PLOT = "metrics.jsonl", "loss.png"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or does not fit the request."""


class TrainError(ValueError):
    """Training cannot start or go on (bad settings, an unusable output folder, a NaN loss)."""


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
        self.betas = tuple(float(b) for b in self.betas)
        self.overrides = dict(self.overrides)
        self.data_options = dict(self.data_options)
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("lr", "grad_clip"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.patch_size is not None and (not isinstance(self.patch_size, int) or self.patch_size < 1):
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}")
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


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device=None) -> Dist:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1):
    NCCL with one GPU per local rank when GPUs are visible, gloo on the CPU. Otherwise one
    process on `device` (default: the GPU when there is one)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                device=dev, initialized_here=initialized_here)


def _all_gather_object(dist_info: Dist, obj):
    if dist_info.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(dist_info: Dist, obj):
    if dist_info.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
                                             persistent_workers=False)
        for images, labels in loader:
            yield images, torch.as_tensor(labels)


# ----------------------------------------------------------------------------- files
def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def _file_digest(path: str) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


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


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _state_tensors(state_dict: dict) -> dict:
    """CPU, contiguous tensors for safetensors; tensors sharing storage are cloned apart."""
    out, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def _optimizer_split(opt_state: dict):
    tensors, rest = {}, {"state": {}, "param_groups": opt_state["param_groups"]}
    for pid, st in opt_state["state"].items():
        rest["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                rest["state"][str(pid)][k] = v
    return tensors, rest


def _optimizer_join(tensors: dict, rest: dict) -> dict:
    state = {int(pid): dict(st) for pid, st in rest["state"].items()}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    st = {"torch": _b64(torch.get_rng_state()), "generator": _b64(generator.get_state())}
    if device.type == "cuda":
        st["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return st


def _set_rng_state(st: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(_unb64(st["torch"]))
    generator.set_state(_unb64(st["generator"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(_unb64(st["cuda"]), device)


def save_checkpoint(out: str, step: int, model, optimizer, state: dict, keep: int = 2) -> str:
    """Write `<out>/step-NNNNNNN` atomically, point `<out>/latest` at it, prune to `keep`.

    `state` holds the JSON part (preset, config, settings, data, rng); files and format are
    added here. Refuses to replace an existing checkpoint folder."""
    from safetensors.torch import save_file

    name = f"step-{step:07d}"
    final = os.path.join(out, name)
    if os.path.exists(final):
        raise CheckpointError(f"checkpoint {final!r} already exists; not overwriting it")
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out)
    try:
        save_file(_state_tensors(model.state_dict()), os.path.join(tmp, MODEL_FILE))
        opt_tensors, opt_rest = _optimizer_split(optimizer.state_dict())
        save_file(opt_tensors, os.path.join(tmp, TRAINER_FILE))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **state,
               "optimizer": opt_rest,
               "files": {f: _file_digest(os.path.join(tmp, f)) for f in (MODEL_FILE, TRAINER_FILE)}}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(doc, f, indent=1)
        for f in (MODEL_FILE, TRAINER_FILE, STATE_FILE):
            with open(os.path.join(tmp, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out)
    atomic_write_text(os.path.join(out, LATEST_FILE), name + "\n")
    steps = sorted((int(m.group(1)), e) for e in os.listdir(out) if (m := _STEP_DIR.match(e)))
    for s, e in steps[:-keep] if keep > 0 else []:
        if s != step:
            shutil.rmtree(os.path.join(out, e), ignore_errors=True)
    return final


def list_checkpoints(folder: str) -> list:
    """The checkpoint folders directly under `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), e) for e in os.listdir(folder) if (m := _STEP_DIR.match(e))]
    return [os.path.join(folder, e) for _, e in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder that `path` means: a checkpoint folder, a file inside one, or a
    run folder (its `latest`, else its newest `step-*`)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    if os.path.isfile(path):
        if os.path.basename(path) in (MODEL_FILE, TRAINER_FILE, STATE_FILE):
            return resolve_checkpoint(os.path.dirname(path) or ".")
        raise CheckpointError(f"{path!r} is not a djepa checkpoint: pass the run folder or its step-* folder")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(path, name, STATE_FILE)):
            return os.path.join(path, name)
    found = [c for c in list_checkpoints(path) if os.path.isfile(os.path.join(c, STATE_FILE))]
    if found:
        return found[-1]
    raise CheckpointError(f"{path!r} holds no djepa checkpoint (no {STATE_FILE}, no step-* folder)")


def read_checkpoint_state(path: str) -> tuple:
    """`(folder, state dict)` after checking the format tag and both weight files' size and
    SHA-256; CheckpointError for anything missing, truncated or foreign."""
    folder = resolve_checkpoint(path)
    sp = os.path.join(folder, STATE_FILE)
    try:
        with open(sp) as f:
            state = json.load(f)
    except json.JSONDecodeError:
        raise CheckpointError(f"{sp!r} is truncated or not JSON") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {sp!r}: {exc.strerror or exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder!r} is not a djepa checkpoint ({STATE_FILE} has no format tag {FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder!r} has checkpoint format version {state.get('format_version')!r}; "
                              f"this djepa reads version {FORMAT_VERSION}")
    for key in ("step", "preset", "config", "settings", "data", "files"):
        if key not in state:
            raise CheckpointError(f"{sp!r} lacks {key!r}: truncated or foreign checkpoint")
    for fname, want in state["files"].items():
        fp = os.path.join(folder, fname)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {folder!r} is missing {fname}")
        have = os.path.getsize(fp)
        if have != want["bytes"]:
            raise CheckpointError(f"{fp!r} is truncated or altered ({have} bytes, expected {want['bytes']})")
        if _file_digest(fp)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{fp!r} is corrupt (SHA-256 differs from the one recorded at save)")
    return folder, state


def _model_overrides(state: dict, backend=None) -> dict:
    cfg = dict(state["config"])
    cfg["backend"] = backend
    return cfg


def build_model_from_state(state: dict, backend=None):
    from djepa.models import DJEPAConfig, PRESETS
    from djepa.models import build

    try:
        cfg = DJEPAConfig.from_dict(_model_overrides(state, backend))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's model config is not valid here: {exc}") from None
    if state["preset"] not in PRESETS:
        raise CheckpointError(f"the checkpoint's preset {state['preset']!r} is unknown to this djepa")
    return build(state["preset"], **cfg.to_dict())


def load_weights(model, folder: str) -> None:
    from safetensors.torch import load_file

    fp = os.path.join(folder, MODEL_FILE)
    try:
        tensors = load_file(fp)
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"cannot read {fp!r}: {exc}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{fp!r} does not fit its model config: {' '.join(first[:3])[:300]}") from None


def load_checkpoint(path: str, device="cpu", backend=None, preset: Optional[str] = None):
    """`(model, state)`: the model of a checkpoint with its weights (EMA included), in eval
    mode on `device`. `preset`, when given, must be the checkpoint's."""
    folder, state = read_checkpoint_state(path)
    if preset is not None and preset != state["preset"]:
        raise CheckpointError(f"checkpoint {folder!r} holds preset {state['preset']!r}, not {preset!r}")
    model = build_model_from_state(state, backend)
    load_weights(model, folder)
    state["folder"] = folder
    return model.to(device).eval(), state


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


def _param_groups(model, weight_decay: float):
    trainable = {id(p) for p in model.trainable_parameters()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if id(p) in trainable and p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_resume_settings(saved: TrainSettings, given: dict) -> TrainSettings:
    d = saved.to_dict()
    for k, v in given.items():
        if v is None or k not in d:
            continue
        if k == "betas":
            v = list(v)
        if k in TrainSettings.RESUMABLE:
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


def train(settings: TrainSettings, out: str, *, resume=None, given: Optional[dict] = None,
          ckpt_every: int = 500, log_every: int = 50, keep: int = 2, progress=None,
          backend: Optional[str] = None, device=None, num_workers: int = 0,
          plot: bool = True, stop_after: Optional[int] = None) -> TrainResult:
    """Train (or resume) a D-JEPA model; checkpoints, metrics.jsonl and loss.png go to `out`.

    `resume`: a checkpoint path, or True for the newest one in `out`. On resume the run keeps
    the checkpoint's settings; `given` lists settings the user set explicitly (default: all of
    `settings`), and any that differs from the checkpoint's raises TrainError, except `steps`.
    """
    from tqdm.auto import tqdm

    for name, v in (("ckpt_every", ckpt_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrainError(f"{name} must be a positive integer, got {v!r}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise TrainError(f"stop_after must be a positive integer, got {stop_after!r}")
    dist_info = setup_distributed(device)
    dev = dist_info.device
    try:
        out = os.path.abspath(out)
        if dist_info.is_main:
            ensure_writable_dir(out)
        ckpt_state, ckpt_folder = None, None
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
        elif dist_info.is_main and list_checkpoints(out):
            raise TrainError(f"{out!r} already holds checkpoints; pass --resume to continue them "
                             f"or choose another --out (nothing was overwritten)")
        start = ckpt_state["step"] if ckpt_state else 0
        if start > settings.steps:
            raise TrainError(f"the checkpoint is at step {start}, past --steps {settings.steps}")

        from djepa.data import build_dataset
        from djepa.models import build

        dataset = build_dataset(settings.data, "train", **settings.data_options)
        patch = settings.patch_size or dataset.default_patch_size
        from_data = data_overrides(dataset, patch)
        for k, v in from_data.items():
            if k in settings.overrides and settings.overrides[k] != v:
                raise TrainError(f"override {k}={settings.overrides[k]} contradicts the data ({k}={v})")
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
        model.to(dev)
        tokenizer = make_tokenizer(dataset.channels, patch)
        optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr,
                                      betas=settings.betas, weight_decay=settings.weight_decay)
        generator = torch.Generator(device=dev)
        generator.manual_seed(settings.seed * 7919 + dist_info.rank + 1)
        if ckpt_state is not None:
            load_weights(model, ckpt_folder)
            from safetensors.torch import load_file

            try:
                opt_tensors = load_file(os.path.join(ckpt_folder, TRAINER_FILE))
                optimizer.load_state_dict(_optimizer_join(opt_tensors, ckpt_state["optimizer"]))
            except Exception as exc:  # a mismatching optimizer state raises ValueError/KeyError
                raise CheckpointError(f"cannot restore the optimizer from {ckpt_folder!r}: {exc}") from None
            rngs = ckpt_state.get("rng", [])
            if len(rngs) == dist_info.world:
                _set_rng_state(rngs[dist_info.rank], generator, dev)
            else:  # another process count: the batches still replay, the masks/noise reseed
                torch.manual_seed(settings.seed + start)
                generator.manual_seed(settings.seed * 7919 + dist_info.rank + 1 + start)

        net = model
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        stop = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
        sampler = StepBatches(len(dataset), settings.batch_size, settings.seed, dist_info.rank,
                              dist_info.world, start, stop)
        metrics_path = os.path.join(out, METRICS_FILE)
        if dist_info.is_main and ckpt_state is not None:
            _truncate_metrics(metrics_path, start)

        def checkpoint(step):
            rng = _all_gather_object(dist_info, _rng_state(generator, dev))
            path = None
            if dist_info.is_main:
                doc = {"preset": settings.preset, "config": model.config.to_dict(),
                       "settings": settings.to_dict(), "data": {**dataset.describe(), "spec": settings.data,
                                                                "patch_size": patch},
                       "rng": rng, "world_size": dist_info.world,
                       "djepa_version": _version(), "torch_version": torch.__version__,
                       "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
                path = save_checkpoint(out, step, model, optimizer, doc, keep=keep)
                if plot:
                    _plot_losses(metrics_path, os.path.join(out, LOSS_PLOT))
            return _broadcast_object(dist_info, path)

        show = (sys.stderr.isatty() if progress is None else progress) and dist_info.is_main
        bar = tqdm(total=settings.steps, initial=start, disable=not show, desc="train", unit="step",
                   dynamic_ncols=True)
        losses, window, last_ckpt, t0 = [], [], None, time.perf_counter()
        net.train()
        step = start
        for images, labels in _batches(dataset, sampler, num_workers):
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True)
            lr = settings.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens = tokenizer.encode(images)
            with _autocast(dev, settings.precision):
                out_dict = net(tokens, labels, generator=generator)
            loss = out_dict["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], settings.grad_clip)
            optimizer.step()
            model.update_ema()
            step += 1
            window.append(torch.stack([loss.detach().float(), out_dict["diffusion"].detach().float(),
                                       out_dict["jepa"].detach().float(), grad_norm.detach().float()]))
            if step % log_every == 0 or step == stop or step % ckpt_every == 0:
                vals = torch.stack(window).cpu()
                window = []
                mean = vals.mean(0)
                if dist_info.world > 1:
                    import torch.distributed as tdist

                    mean = mean.to(dev)
                    tdist.all_reduce(mean)
                    mean = (mean / dist_info.world).cpu()
                if not (torch.isfinite(vals).all() and torch.isfinite(mean).all()):
                    raise TrainError(f"the loss became non-finite by step {step} (lr {lr:.3g}); "
                                     f"lower --lr or check the data. The last good checkpoint is kept.")
                losses.extend({"loss": v[0].item(), "diffusion": v[1].item(), "jepa": v[2].item()} for v in vals)
                if dist_info.is_main:
                    elapsed = time.perf_counter() - t0
                    rec = {"step": step, "loss": mean[0].item(), "diffusion": mean[1].item(),
                           "jepa": mean[2].item(), "grad_norm": mean[3].item(), "lr": lr,
                           "steps_per_s": (step - start) / max(elapsed, 1e-9), "elapsed_s": elapsed}
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
            if step % ckpt_every == 0 or step == stop:
                last_ckpt = checkpoint(step)
        bar.close()
        if step == start and dist_info.is_main:
            last_ckpt = ckpt_folder
        return TrainResult(step=step, checkpoint=last_ckpt, losses=losses,
                           metrics=metrics_path if dist_info.is_main else None, model=model)
    finally:
        if dist_info.initialized_here:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _plot_losses(metrics_path, png):
    try:
        from djepa.plots import loss_curve

        loss_curve(metrics_path, png)
    except (OSError, ValueError):  # a plot is a convenience: never stop training over it
        pass


def _version():
    import djepa

    return djepa.__version__
