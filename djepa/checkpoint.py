"""djepa checkpoints: the format, atomic saving with retention, finding, verifying and loading.

A checkpoint is a folder `<out>/step-NNNNNNN/` holding
  model.safetensors    `model.state_dict()` (trainable weights and the EMA copy)
  trainer.safetensors  the optimizer's tensors
  state.json           format tag, step, preset, model config, training settings, data
                       description, the optimizer's other state, every rank's RNG states, and
                       the size and SHA-256 of both weight files
It is written into a temporary folder and renamed into place, then `<out>/latest` (also
replaced atomically) names it, so a kill at any moment leaves the previous checkpoint intact.
Files and folders get the modes the umask gives (as `open` and `mkdir` would), so a team can
share a run folder. Retention keeps the `keep` newest checkpoints that verify; a checkpoint
that does not verify is never deleted and never counted.
"""
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give `path` the mode `open`/`mkdir` would have (tempfile makes 0600 files, 0700 folders)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        follow_umask(tmp)
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


def restore_optimizer(optimizer, folder: str, state: dict) -> None:
    """Load the optimizer state of the checkpoint `folder` (its state.json is `state`)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.path.join(folder, TRAINER_FILE))
        optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer"]))
    except Exception as exc:  # a mismatching optimizer state raises ValueError/KeyError
        raise CheckpointError(f"cannot restore the optimizer from {folder!r}: {exc}") from None


def _optimizer_join(tensors: dict, rest: dict) -> dict:
    state = {int(pid): dict(st) for pid, st in rest["state"].items()}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    st = {"torch": _b64(torch.get_rng_state()), "generator": _b64(generator.get_state())}
    if device.type == "cuda":
        st["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return st


def set_rng_state(st: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(_unb64(st["torch"]))
    generator.set_state(_unb64(st["generator"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(_unb64(st["cuda"]), device)


def save_checkpoint(out: str, step: int, model, optimizer, state: dict, keep: int = 2) -> str:
    """Write `<out>/step-NNNNNNN` atomically, point `<out>/latest` at it, apply retention.

    `state` holds the JSON part (preset, config, settings, data, rng); files and format are
    added here. Refuses to replace an existing checkpoint folder. `keep` > 0: keep that many
    checkpoints that verify (this one included), delete older intact ones; 0 keeps all."""
    from safetensors.torch import save_file

    name = f"step-{step:07d}"
    final = os.path.join(out, name)
    if os.path.exists(final):
        raise CheckpointError(f"checkpoint {final!r} already exists; not overwriting it")
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out)
    try:
        follow_umask(tmp)
        save_file(_state_tensors(model.state_dict()), os.path.join(tmp, MODEL_FILE))
        opt_tensors, opt_rest = _optimizer_split(optimizer.state_dict())
        save_file(opt_tensors, os.path.join(tmp, TRAINER_FILE))
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **state,
               "optimizer": opt_rest,
               "files": {f: _file_digest(os.path.join(tmp, f)) for f in (MODEL_FILE, TRAINER_FILE)}}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(doc, f, indent=1)
        for f in (MODEL_FILE, TRAINER_FILE, STATE_FILE):
            follow_umask(os.path.join(tmp, f))  # safetensors writes 0600
            with open(os.path.join(tmp, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out)
    _remember_intact(final)  # digests computed from the bytes just written
    atomic_write_text(os.path.join(out, LATEST_FILE), name + "\n")
    if keep > 0:
        prune_checkpoints(out, keep)
    return final


# ----------------------------------------------------------------------------- verification
# Folders verified in this process -> (their files' (size, mtime), None or why they fail):
# retention then re-reads nothing it wrote or checked itself, and warns once per damaged folder.
_VERIFIED = {}


def _fingerprint(folder: str):
    try:
        return tuple((f, st.st_size, st.st_mtime_ns) for f in (STATE_FILE, MODEL_FILE, TRAINER_FILE)
                     for st in [os.stat(os.path.join(folder, f))])
    except OSError:
        return None


def _remember_intact(folder: str) -> None:
    fp = _fingerprint(folder)
    if fp is not None:
        _VERIFIED[os.path.abspath(folder)] = (fp, None)


def _verify(folder: str):
    """(None or why `folder` fails to verify, whether that was found out just now)."""
    folder = os.path.abspath(folder)
    fp = _fingerprint(folder)
    known = _VERIFIED.get(folder)
    if fp is not None and known is not None and known[0] == fp:
        return known[1], False
    try:
        _read_state(folder)
        why = None
    except CheckpointError as exc:
        why = str(exc)
    if fp is not None:
        _VERIFIED[folder] = (fp, why)
    return why, True


def verify_checkpoint(folder: str):
    """None when the checkpoint folder verifies (format, sizes, SHA-256), else why not."""
    return _verify(folder)[0]


def prune_checkpoints(out: str, keep: int) -> list:
    """Keep the `keep` newest checkpoints of `out` that verify; delete the intact ones older
    than those. Checkpoints that do not verify stay and are not counted (a warning on stderr
    names each once). Returns the deleted folders."""
    intact, deleted = 0, []
    for folder in reversed(list_checkpoints(out)):
        why, fresh = _verify(folder)
        if why is not None:
            if fresh:
                print(f"djepa: {folder} does not verify ({why}); retention keeps it and does not count it",
                      file=sys.stderr)
            continue
        intact += 1
        if intact > keep:
            shutil.rmtree(folder, ignore_errors=True)
            _VERIFIED.pop(os.path.abspath(folder), None)
            deleted.append(folder)
    return deleted


def supersede(out: str, step: int, also=()) -> Optional[str]:
    """Move the checkpoints of `out` past `step` (and a copy of the files `also`) into
    `<out>/superseded/<time>-after-step-N/`, and point `latest` at step `step`: resuming an older
    checkpoint forks the run there, keeping the later ones aside. The folder, or None."""
    later = [c for c in list_checkpoints(out) if int(_STEP_DIR.match(os.path.basename(c)).group(1)) > step]
    if not later:
        return None
    base = os.path.join(out, "superseded", f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step:07d}")
    aside, n = base, 1
    while os.path.exists(aside):
        aside, n = f"{base}.{n}", n + 1
    os.makedirs(aside)
    for f in also:
        if os.path.isfile(os.path.join(out, f)):
            shutil.copy2(os.path.join(out, f), os.path.join(aside, f))
    for c in later:
        os.replace(c, os.path.join(aside, os.path.basename(c)))
    _fsync_dir(out)
    name = f"step-{step:07d}"
    if os.path.isdir(os.path.join(out, name)):
        atomic_write_text(os.path.join(out, LATEST_FILE), name + "\n")
    return aside


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
        try:
            with open(latest, "rb") as f:
                name = f.read(256).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            name = ""  # a damaged pointer: fall back to the newest folder
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(path, name, STATE_FILE)):
            return os.path.join(path, name)
    found = [c for c in list_checkpoints(path) if os.path.isfile(os.path.join(c, STATE_FILE))]
    if found:
        return found[-1]
    raise CheckpointError(f"{path!r} holds no djepa checkpoint (no {STATE_FILE}, no step-* folder)")


def _read_state(folder: str) -> dict:
    """The verified state.json of the checkpoint folder `folder` (CheckpointError otherwise)."""
    sp = os.path.join(folder, STATE_FILE)
    try:
        with open(sp, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read {sp!r}: {exc.strerror or exc}") from None
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{sp!r} is truncated or not JSON (damaged)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder!r} is not a djepa checkpoint ({STATE_FILE} has no format tag {FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder!r} has checkpoint format version {state.get('format_version')!r}; "
                              f"this djepa reads version {FORMAT_VERSION}")
    kinds = {"step": int, "preset": str, "config": dict, "settings": dict, "data": dict, "files": dict}
    for key, kind in kinds.items():
        if key not in state:
            raise CheckpointError(f"{sp!r} lacks {key!r}: truncated or foreign checkpoint")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{sp!r}: {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}")
    for fname, want in state["files"].items():
        if (fname not in (MODEL_FILE, TRAINER_FILE) or not isinstance(want, dict)
                or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{sp!r} has a damaged file list (entry {fname!r})")
        fp = os.path.join(folder, fname)
        if not os.path.isfile(fp):
            raise CheckpointError(f"checkpoint {folder!r} is missing {fname}")
        have = os.path.getsize(fp)
        if have != want["bytes"]:
            raise CheckpointError(f"{fp!r} is truncated or altered ({have} bytes, expected {want['bytes']})")
        if _file_digest(fp)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{fp!r} is corrupt (SHA-256 differs from the one recorded at save)")
    return state


def _names_a_run(path: str) -> bool:
    return os.path.isdir(path) and not os.path.isfile(os.path.join(path, STATE_FILE))


def read_checkpoint_state(path: str) -> tuple:
    """`(folder, state dict)` after checking the format tag and both weight files' size and
    SHA-256; CheckpointError for anything missing, truncated or foreign. For a run folder
    whose newest checkpoint does not verify, the error names the newest one that does."""
    folder = resolve_checkpoint(path)
    try:
        state = _read_state(folder)
    except CheckpointError as exc:
        path = os.fspath(path)
        if not _names_a_run(path):
            raise
        intact = next((c for c in reversed(list_checkpoints(path))
                       if os.path.abspath(c) != os.path.abspath(folder) and verify_checkpoint(c) is None), None)
        run = os.path.abspath(path)
        if intact is None:
            raise CheckpointError(f"the newest checkpoint {folder} is corrupt or incomplete ({exc}), and no "
                                  f"other checkpoint in {run} verifies") from None
        raise CheckpointError(f"the newest checkpoint {folder} is corrupt or incomplete ({exc}); the newest "
                              f"intact checkpoint is {intact}: continue from it with djepa train --out {run} "
                              f"--resume {intact} (later checkpoints are moved aside), or pass it to "
                              f"--ckpt") from None
    _remember_intact(folder)
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
