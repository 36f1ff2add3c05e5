"""Official D-JEPA (D-JEPA/djepa-imagenet) and MAR (LTH14/mar) checkpoints as djepa models.

`from_official("djepa" | "mar", checkpoint_or_state_dict)` returns a `DJEPA` with the online
weights (`model`) and the EMA weights (`model_ema`, else a copy of the online ones). djepa's
parameter names are the official ones, so loading is a strict `load_state_dict` after dropping
torch.compile's `_orig_mod.` (and DDP's `module.`) prefixes. The architecture is read from the
tensors' shapes and, when the checkpoint carries them, its training `args`; what shapes cannot
tell (the head count, dropout, sampling defaults) comes from `args`, else the official defaults,
and keyword overrides win over both.
"""
import argparse
import os
from collections import namedtuple
from typing import Optional

import torch

from djepa.models.config import DJEPAConfig
from djepa.models.ema_schedule import official_ema_schedule  # noqa: F401 (public here too)

__all__ = ["SOURCES", "OfficialCheckpoint", "load_official", "official_config", "from_official",
           "official_ema_schedule", "preset_for", "matching_preset"]

SOURCES = ("djepa", "mar")
OfficialCheckpoint = namedtuple("OfficialCheckpoint", "model model_ema args")

# official model names -> heads (the only architecture number the tensors do not hold)
_HEADS_BY_NAME = {"base": 12, "large": 16, "huge": 16}
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
_PREFIXES = ("_orig_mod.", "module.")
_MAX_NAMED = 6


# ----------------------------------------------------------------------------- reading
def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else "")


def _strip(sd: dict, what: str) -> dict:
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{what} is not a state dict (a dict of named tensors)")
    out = {}
    for key, value in sd.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name[len(next(p for p in _PREFIXES if name.startswith(p))):]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        if name in out:
            raise ValueError(f"{what}: {key!r} and another key both mean {name!r}")
        out[name] = value
    return out


def _looks_like_torch_save(path: str) -> bool:
    """torch.save writes a zip archive (or, before 1.6, a pickle: protocol 2+ starts with 0x80)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _torch_load(path: str, trust_pickle: bool):
    if not _looks_like_torch_save(path):
        raise ValueError(f"{path!r} is not a PyTorch checkpoint (neither the zip archive torch.save writes "
                         "nor a pickle): damaged, truncated or another format")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    # MAR and D-JEPA store their argparse.Namespace beside the weights.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals([argparse.Namespace])
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises UnpicklingError/RuntimeError/... for foreign objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path!r} cannot be read as weights only ({first[:200]}); if you trust the file, "
                         "pass trust_pickle=True (djepa convert --trust-pickle)") from None


def load_official(checkpoint_or_state_dict, trust_pickle: bool = False) -> OfficialCheckpoint:
    """(model state dict, EMA state dict or None, args dict or None) of an official checkpoint:
    a path (`.pth`/`.pt` as torch.save wrote it, or `.safetensors`), a checkpoint dict
    (`model`, `model_ema`, `args`) or a plain state dict; prefixes stripped."""
    obj = checkpoint_or_state_dict
    if isinstance(obj, OfficialCheckpoint):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if os.path.isdir(path):
            found = sorted(n for n in os.listdir(path) if n.endswith((".pth", ".pt", ".safetensors")))
            inside = f"the checkpoint files in it: {_names(found)}" if found else "it holds no .pth/.pt/.safetensors file"
            raise ValueError(f"official checkpoint {path!r} is a folder: pass the checkpoint file itself "
                             f"(e.g. checkpoint-last.pth); {inside}")
        if not os.path.isfile(path):
            raise ValueError(f"official checkpoint {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                obj = load_file(path)
            except Exception as exc:  # safetensors raises its own error type for a damaged file
                raise ValueError(f"cannot read {path!r}: {exc}") from None
        else:
            obj = _torch_load(path, trust_pickle)
    if not isinstance(obj, dict):
        raise ValueError(f"an official checkpoint is a dict (model/model_ema/args) or a state dict, "
                         f"got {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        if args is not None and not isinstance(args, dict):
            args = None
        ema = obj.get("model_ema")
        return OfficialCheckpoint(_strip(obj["model"], "checkpoint['model']"),
                                  None if ema is None else _strip(ema, "checkpoint['model_ema']"), args)
    return OfficialCheckpoint(_strip(obj, "the state dict"), None, None)


# ----------------------------------------------------------------------------- architecture
def _count(sd, prefix):
    n = 0
    while f"{prefix}.{n}.norm1.weight" in sd or f"{prefix}.{n}.in_ln.weight" in sd:
        n += 1
    return n


def _heads(width, model_name):
    for part, h in _HEADS_BY_NAME.items():
        if model_name and model_name.endswith(part):
            return h
    if width in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[width]
    return None


def official_config(source: str, state_dict: dict, args: Optional[dict] = None, **overrides) -> DJEPAConfig:
    """The DJEPAConfig of an official state dict (prefixes already stripped)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    sd, args = state_dict, dict(args or {})
    need = ["class_emb.weight", "z_proj.weight", "encoder_pos_embed_learned", "decoder_embed.weight",
            "decoder_pos_embed_learned", "diffloss.net.input_proj.weight", "diffloss.net.final_layer.linear.weight"]
    need += ["buffer"] if source == "djepa" else ["diffusion_pos_embed_learned"]
    missing = [k for k in need if k not in sd]
    if missing:
        hint = ""
        if source == "djepa" and "diffusion_pos_embed_learned" in sd and "buffer" not in sd:
            hint = " (it looks like a MAR checkpoint: use source 'mar')"
        elif source == "mar" and "buffer" in sd:
            hint = " (it looks like a D-JEPA checkpoint: use source 'djepa')"
        raise ValueError(f"not an official {source} state dict: no {_names(missing)}{hint}")
    num_classes, D = sd["class_emb.weight"].shape
    token_channels = sd["z_proj.weight"].shape[1]
    Dp = sd["decoder_embed.weight"].shape[0]
    if source == "djepa":
        class_tokens = sd["buffer"].shape[1]
        seq_len = sd["encoder_pos_embed_learned"].shape[1]
    else:
        seq_len = sd["diffusion_pos_embed_learned"].shape[1]
        class_tokens = sd["encoder_pos_embed_learned"].shape[1] - seq_len
    depth, pred_depth = _count(sd, "encoder_blocks"), _count(sd, "decoder_blocks")
    if depth < 1 or pred_depth < 1:
        raise ValueError("not an official state dict: no encoder_blocks.0.* / decoder_blocks.0.* keys")
    width = sd["diffloss.net.input_proj.weight"].shape[0]
    out = sd["diffloss.net.final_layer.linear.weight"].shape[0]
    if out == 2 * token_channels:
        loss = "diffusion"
    elif out == token_channels and overrides.get("loss") == "flow":
        loss = "flow"
    else:
        raise ValueError(f"the denoising head outputs {out} channels for {token_channels}-channel tokens: only the "
                         "Gaussian diffusion head (2x, learned sigma) converts as verified; an official "
                         "flow-matching head needs loss='flow' (its flow_match.py could not be read, so its "
                         "time convention is not checked)")
    q_norm = "encoder_blocks.0.attn.q_norm.weight" in sd
    qk_norm = ("layer" if "encoder_blocks.0.attn.q_norm.bias" in sd else "rms") if q_norm else "none"
    model_name = str(args.get("model", ""))
    heads = _heads(D, model_name)
    pred_heads = _heads(Dp, model_name) if Dp != D else heads
    if "num_heads" in overrides:
        heads = overrides["num_heads"]
        pred_heads = overrides.get("decoder_num_heads", heads if Dp == D else pred_heads)
    if heads is None or pred_heads is None:
        raise ValueError(f"cannot tell the head count of a {D}-wide model from its weights: pass num_heads=")
    jepa = "jepaloss.net.fc1.weight" in sd
    is_djepa = source == "djepa"
    cfg = dict(
        seq_len=seq_len, token_channels=token_channels, num_classes=num_classes, arch=source,
        embed_dim=D, depth=depth, num_heads=heads,
        decoder_embed_dim=None if Dp == D else Dp, decoder_depth=None if pred_depth == depth else pred_depth,
        decoder_num_heads=None if pred_heads == heads else pred_heads,
        mlp_ratio=sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] / D,
        qkv_bias="encoder_blocks.0.attn.qkv.bias" in sd, qk_norm=qk_norm,
        attn_dropout=float(args.get("attn_dropout", 0.1)), proj_dropout=float(args.get("proj_dropout", 0.1)),
        class_tokens=class_tokens, label_drop_prob=float(args.get("label_drop_prob", 0.1)),
        loss=loss, diffloss_depth=_count(sd, "diffloss.net.res_blocks"), diffloss_width=width,
        diffusion_batch_mul=int(args.get("diffusion_batch_mul", 4)),
        num_sampling_steps=str(args.get("num_sampling_steps", "100")),
        diffusion_pos_embed="diffusion_pos_embed_learned" in sd,
        temperature=float(args.get("temperature", 0.95 if is_djepa else 1.0)),
        jepa_weight=(float(args.get("jepa_weight") or 1.0) if jepa else 0.0),
        diffusion_weight=float(args.get("diffusion_weight", 1.0)),
        mask_ratio_min=float(args.get("mask_ratio_min", 0.7)),
        ema_decay=float(args.get("ema_rate", 0.9999)),
        ema_schedule="official" if is_djepa else "constant",
    )
    if jepa:
        cfg["jepa_hidden_ratio"] = sd["jepaloss.net.fc1.weight"].shape[0] / Dp
    if loss == "flow" and args.get("time_shifting_factor") not in (None, 1.0):
        cfg["flow_time_shift"] = float(args["time_shifting_factor"])
    cfg.update(overrides)
    try:
        return DJEPAConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"official {source} checkpoint: {exc}") from None


def matching_preset(config: DJEPAConfig) -> Optional[str]:
    """The djepa preset with exactly this architecture (tiny, B/L/H, mar-B/L/H), or None."""
    from djepa.models.presets import PRESETS

    arch = ("arch", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "diffloss_depth",
            "diffloss_width", "seq_len", "token_channels", "class_tokens")
    for name, p in PRESETS.items():
        if all(getattr(p, k) == getattr(config, k) for k in arch):
            return name
    return None


def preset_for(config: DJEPAConfig) -> str:
    """The djepa preset with this architecture (matching_preset), else "B" / "mar-B" (a base the
    architecture's fields then override)."""
    return matching_preset(config) or ("mar-B" if config.arch == "mar" else "B")


# ----------------------------------------------------------------------------- loading
def _load(module, sd: dict, strict: bool, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise ValueError(f"{what} does not fit the model ({'; '.join(parts)}); pass strict=False to load the rest")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{what}: shapes differ from the model's: {', '.join(bad[:_MAX_NAMED])}")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def from_official(source: str, checkpoint_or_state_dict, *, strict: bool = True, trust_pickle: bool = False,
                  **overrides):
    """A `DJEPA` holding an official D-JEPA (`source="djepa"`) or MAR (`"mar"`) model.

    checkpoint_or_state_dict: a path, the checkpoint dict (`model`, `model_ema`, `args`) or a
    state dict (then the EMA starts as a copy of it). strict: every key must match (missing or
    unknown keys raise a ValueError naming them). overrides: DJEPAConfig fields (e.g.
    num_heads=, backend=, temperature=) over what the checkpoint tells.
    """
    from djepa.models.djepa import DJEPA

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    ck = load_official(checkpoint_or_state_dict, trust_pickle=trust_pickle)
    config = official_config(source, ck.model, ck.args, **overrides)
    model = DJEPA(config)
    _load(model.net, ck.model, strict, f"the official {source} model")
    if ck.model_ema is not None:
        _load(model.ema.module, ck.model_ema, strict, f"the official {source} EMA model")
    else:
        model.ema.copy_from(model.net)
    return model
