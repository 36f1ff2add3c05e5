"""DenoisingMLP: MAR's SimpleMLPAdaLN (same parameter names, shapes, init and math) whose
residual blocks run through the fused djepa.ops.adaln_block."""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from djepa.ops.denoise import adaln_block


def timestep_embedding(t, dim, max_period=10000, dtype=torch.float32):
    """MAR/DiT sinusoid: [cos(t * f_k), sin(t * f_k)], f_k = max_period ** (-k / (dim // 2)).
    Computed in float32 (float64 when `dtype` is float64) and returned in `dtype`."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work, device=t.device) / half)
    args = t[:, None].to(work) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size, dtype=self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, channels, backend=None):
        super().__init__()
        self.backend = backend
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        return adaln_block(x, self.adaLN_modulation(y), self.in_ln.weight, self.in_ln.bias,
                           self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight, self.mlp[2].bias,
                           eps=self.in_ln.eps, backend=self.backend)


class FinalLayer(nn.Module):
    def __init__(self, model_channels, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DenoisingMLP(nn.Module):
    """Per-token AdaLN residual MLP (MAR's SimpleMLPAdaLN).

    forward(x [M, in_channels], t [M] timesteps, c [M, z_channels]) -> [M, out_channels].
    `backend` ("auto" | "cuda" | "triton" | "eager" | None = DJEPA_BACKEND) is used by the
    residual blocks and by djepa.diffusion.sample.
    """

    def __init__(self, in_channels, model_channels, out_channels, z_channels, num_res_blocks,
                 grad_checkpointing=False, backend=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("model_channels", model_channels),
                        ("out_channels", out_channels), ("z_channels", z_channels),
                        ("num_res_blocks", num_res_blocks)):
            if not isinstance(v, int) or v < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self._backend = backend
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels, backend) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = value
        for block in self.res_blocks:
            block.backend = value

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _check(self, x, t, c):
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [M, {self.in_channels}], got {tuple(x.shape)}")
        if c.ndim != 2 or c.shape[1] != self.z_channels:
            raise ValueError(f"c must be [M, {self.z_channels}], got {tuple(c.shape)}")
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError("t must be a 1-D tensor of timesteps")
        if not (x.shape[0] == t.shape[0] == c.shape[0]):
            raise ValueError(f"x, t and c disagree on the number of tokens: {x.shape[0]}, {t.shape[0]}, {c.shape[0]}")

    def forward(self, x, t, c):
        self._check(x, t, c)
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """MAR semantics: rows [0, M/2) are conditional, [M/2, M) unconditional; both halves
        run on the first half of x; eps (the first in_channels outputs) is mixed as
        uncond + cfg_scale * (cond - uncond) and copied to both halves; the rest is kept."""
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even number of rows, got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = torch.split(eps, eps.shape[0] // 2, dim=0)
        half_eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
