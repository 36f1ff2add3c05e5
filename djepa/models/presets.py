"""Size presets of D-JEPA and `build(preset, **overrides)`."""
from djepa.models.config import DJEPAConfig

# B/L/H follow the official D-JEPA sizes (256 KL-16 latent tokens of 16 channels, 1000 classes).
# "tiny" is for the CPU and the embedded 8x8 digits (2x2 patches of 1 channel: 16 tokens of 4).
# It uses the flow-matching loss: a few hundred CPU steps give recognisable digits, whereas the
# eps-predicting cosine diffusion needs its eps nearly exact at t ~ T (x0 = x_t / sqrt(abar_T)
# with abar_T ~ 2e-9) and samples diverge until trained far longer. Its EMA decay (0.995, a
# half-life of ~140 steps) lets the EMA model, which samples, forget the initialisation within
# the 1000 default steps; 0.999 kept 37% of the random init there.
# "mar-B/L/H" are MAR's architectures (LTH14/mar mar_base/large/huge with the diffusion MLPs of
# its README), so MAR checkpoints convert into djepa; they train without the JEPA loss.
_MAR = dict(arch="mar", qk_norm="none", diffusion_pos_embed=True, jepa_weight=0.0, temperature=1.0)
PRESETS = {
    "tiny": DJEPAConfig(
        seq_len=16, token_channels=4, num_classes=10,
        embed_dim=64, depth=2, num_heads=4,
        attn_dropout=0.0, proj_dropout=0.0,
        class_tokens=4,
        diffloss_depth=2, diffloss_width=128, diffusion_batch_mul=1,
        loss="flow", num_sampling_steps="50",
        ema_decay=0.995,
    ),
    "B": DJEPAConfig(embed_dim=768, depth=12, num_heads=12, diffloss_depth=6, diffloss_width=1024),
    "L": DJEPAConfig(embed_dim=1024, depth=24, num_heads=16, diffloss_depth=8, diffloss_width=1280),
    "H": DJEPAConfig(embed_dim=1280, depth=32, num_heads=16, diffloss_depth=12, diffloss_width=1536),
    "mar-B": DJEPAConfig(embed_dim=768, depth=12, num_heads=12, diffloss_depth=6, diffloss_width=1024, **_MAR),
    "mar-L": DJEPAConfig(embed_dim=1024, depth=16, num_heads=16, diffloss_depth=8, diffloss_width=1280, **_MAR),
    "mar-H": DJEPAConfig(embed_dim=1280, depth=20, num_heads=16, diffloss_depth=12, diffloss_width=1536, **_MAR),
}


def get_config(preset: str, **overrides) -> DJEPAConfig:
    """The preset's config with `overrides` applied (ValueError for an unknown preset or field)."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown D-JEPA preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset].replace(**overrides)


def build(preset: str, **overrides):
    """A fresh `DJEPA` of the preset, with config fields overridden by keyword."""
    from djepa.models.djepa import DJEPA

    return DJEPA(get_config(preset, **overrides))
