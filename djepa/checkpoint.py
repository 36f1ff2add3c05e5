"""djepa checkpoints: the format, atomic saving with retention, finding, verifying and loading.

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
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch

FORMAT = "djepa-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, STATE_FILE, LATEST_FILE = "model.safetensors", "trainer.safetensors", "state.json", "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or does not fit the request."""


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
