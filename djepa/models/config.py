"""DJEPAConfig: every hyper-parameter of a D-JEPA model, as one serialisable dataclass."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from djepa.backends import BACKENDS

LOSSES = ("diffusion", "flow")
ARCHS = ("djepa", "mar")
QK_NORMS = ("rms", "layer", "none")
EMA_SCHEDULES = ("constant", "official")
# Fields added with the official-compatible layout, and the values a config written before
# them (holding every other field, as to_dict wrote it) meant.
_NEW_FIELDS = ("arch", "diffusion_pos_embed", "temperature", "ema_schedule", "ema_ramp_steps")
_LEGACY_DEFAULTS = {"diffusion_pos_embed": True, "temperature": 1.0}


@dataclass
class DJEPAConfig:
    """Hyper-parameters of `djepa.models.DJEPA`.

    The context encoder and the feature predictor share width/depth/heads (as in every official
    D-JEPA preset); `decoder_*` fields override the predictor's when set.

    arch: "djepa" (official D-JEPA: a learned buffer of class tokens, positional embeddings over
      the image tokens only) or "mar" (MAR: the class tokens are the class embedding, the
      positional embeddings cover them too; no JEPA head, so jepa_weight must be 0).
    qk_norm: "rms" (official D-JEPA, RMSNorm with a weight), "layer" (LayerNorm with bias, what
      djepa used before) or "none" (MAR); True/False mean "rms"/"none".
    diffusion_pos_embed: a learned positional embedding added to the denoiser's conditions
      (MAR has one, official D-JEPA does not).
    temperature: the default sampling temperature (official D-JEPA 0.95, MAR 1.0).
    ema_schedule: "constant" (ema_decay every step) or "official" (D-JEPA's
      `ema_sched.adjust_ema_decay`: min(ema_decay + (1 - ema_decay) * step / ema_ramp_steps,
      0.9999), ema_ramp_steps the run's length; None: no ramp).
    """

    # tokens
    seq_len: int = 256
    token_channels: int = 16
    num_classes: int = 1000
    arch: str = "djepa"
    # encoder (= predictor unless decoder_* are set)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: str = "rms"
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    # class tokens: a learned buffer of `class_tokens` tokens plus the class embedding
    class_tokens: int = 64
    label_drop_prob: float = 0.1
    # denoising head
    loss: str = "diffusion"
    diffloss_depth: int = 6
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4
    num_sampling_steps: str = "100"
    flow_time_shift: Optional[float] = None
    diffusion_pos_embed: bool = False
    temperature: float = 0.95
    # JEPA head and loss weights
    jepa_hidden_ratio: float = 4.0
    jepa_beta: float = 2.0
    jepa_weight: float = 1.0
    diffusion_weight: float = 1.0
    # masking
    mask_ratio_min: float = 0.7
    mask_ratio_per_sample: bool = False
    # EMA target (the whole model)
    ema_decay: float = 0.9999
    ema_schedule: str = "constant"
    ema_ramp_steps: Optional[int] = None
    # execution
    backend: Optional[str] = None
    grad_checkpointing: bool = False

    def __post_init__(self):
        _int = ("seq_len", "token_channels", "num_classes", "embed_dim", "depth", "num_heads",
                "class_tokens", "diffloss_depth", "diffloss_width", "diffusion_batch_mul")
        for name in _int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"DJEPAConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"DJEPAConfig.{name} must be >= 1, got {value}")
        for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DJEPAConfig.{name} must be None or an int >= 1, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DJEPAConfig: embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pred_embed_dim % self.pred_num_heads:
            raise ValueError(
                f"DJEPAConfig: decoder width {self.pred_embed_dim} is not divisible by its {self.pred_num_heads} heads")
        if isinstance(self.qk_norm, bool):
            self.qk_norm = "rms" if self.qk_norm else "none"
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"DJEPAConfig.qk_norm must be one of {QK_NORMS} (or a bool), got {self.qk_norm!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"DJEPAConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "mar" and self.jepa_weight != 0:
            raise ValueError("DJEPAConfig: arch='mar' has no JEPA head; set jepa_weight=0")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise ValueError(f"DJEPAConfig.ema_schedule must be one of {EMA_SCHEDULES}, got {self.ema_schedule!r}")
        steps = self.ema_ramp_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"DJEPAConfig.ema_ramp_steps must be None or an int >= 1, got {steps!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"DJEPAConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
        for name in ("qkv_bias", "diffusion_pos_embed", "mask_ratio_per_sample", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DJEPAConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"DJEPAConfig.{name} must lie in [0, 1), got {value!r}")
        for name in ("mlp_ratio", "jepa_hidden_ratio", "jepa_beta"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise ValueError(f"DJEPAConfig.{name} must be > 0, got {value!r}")
        for name in ("jepa_weight", "diffusion_weight"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"DJEPAConfig.{name} must be >= 0, got {value!r}")
        if not _is_real(self.mask_ratio_min) or not 0.0 < self.mask_ratio_min <= 1.0:
            raise ValueError(f"DJEPAConfig.mask_ratio_min must lie in (0, 1], got {self.mask_ratio_min!r}")
        if not _is_real(self.ema_decay) or not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"DJEPAConfig.ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"DJEPAConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        steps = self.num_sampling_steps
        if isinstance(steps, int) and not isinstance(steps, bool):
            steps = str(steps)
        if not isinstance(steps, str) or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"DJEPAConfig.num_sampling_steps must be a positive integer (or its string), got {steps!r}")
        self.num_sampling_steps = steps
        if self.flow_time_shift is not None and (not _is_real(self.flow_time_shift) or self.flow_time_shift <= 0):
            raise ValueError(f"DJEPAConfig.flow_time_shift must be None or > 0, got {self.flow_time_shift!r}")
        if self.backend is not None:
            if not isinstance(self.backend, str) or self.backend.lower() not in BACKENDS:
                raise ValueError(f"DJEPAConfig.backend must be None or one of {BACKENDS}, got {self.backend!r}")
            self.backend = self.backend.lower()

    @property
    def pred_embed_dim(self) -> int:
        return self.decoder_embed_dim or self.embed_dim

    @property
    def pred_depth(self) -> int:
        return self.decoder_depth or self.depth

    @property
    def pred_num_heads(self) -> int:
        return self.decoder_num_heads or self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DJEPAConfig":
        """The config of a dict (`to_dict`'s). A dict written before the official-compatible
        layout (every field but the new ones) keeps its meaning: qk_norm True was LayerNorm,
        the diffusion positional embedding was there and the default temperature was 1."""
        if not isinstance(d, dict):
            raise TypeError(f"DJEPAConfig.from_dict needs a dict, got {type(d).__name__}")
        old = {f.name for f in dataclasses.fields(cls)} - set(_NEW_FIELDS)
        if set(d) == old:
            d = {**_LEGACY_DEFAULTS, **d}
            if isinstance(d.get("qk_norm"), bool):
                d["qk_norm"] = "layer" if d["qk_norm"] else "none"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DJEPAConfig.from_dict: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> "DJEPAConfig":
        """A copy with some fields changed (unknown names raise ValueError)."""
        d = self.to_dict()
        d.update(overrides)
        return DJEPAConfig.from_dict(d)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


ConfigLike = Union[DJEPAConfig, dict]
