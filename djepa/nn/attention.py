"""timm-compatible attention, MLP and pre-norm ViT block with a per-sample key mask.

Parameter names and shapes match timm's ``Attention``, ``Mlp`` and ``Block`` (``qkv``,
``q_norm``, ``k_norm``, ``proj``; ``fc1``, ``fc2``; ``norm1``, ``attn``, ``norm2``, ``mlp``,
``ls1``/``ls2`` when layer scale is on), so timm / MAR / D-JEPA state dicts load with
``strict=True``. D-JEPA's official blocks normalise q and k with ``RMSNorm`` (weight only):
pass ``attn_norm_layer=RMSNorm`` to ``Block``.
"""
from functools import partial

import torch
from torch import nn

from djepa.ops.attention import choose_backend, masked_attention

__all__ = ["MaskedAttention", "Mlp", "Block", "LayerScale", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, ``x / sqrt(mean(x^2) + eps) * weight`` (no bias),
    computed in float32 and returned in the input's dtype (D-JEPA's q/k norm)."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return y
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight

    def extra_repr(self):
        return f"{self.weight.shape[0] if self.weight is not None else ''}, eps={self.eps}"


class MaskedAttention(nn.Module):
    """Multi-head self-attention where each sample attends only to its visible tokens.

    ``forward(x, key_mask=None)``: x ``[B, N, dim]``; key_mask bool ``[B, N]`` (True = may be
    attended, None = all). Every token (query) gets an output; a sample with no visible token
    gets zeros from the attention (see ``djepa.ops.masked_attention``).

    In training mode ``attn_drop`` is the dropout of the attention probabilities, applied inside
    the kernels (``masked_attention(dropout_p=attn_drop)``) on the backend ``backend`` names, as in
    evaluation: an explicit backend that cannot serve a case raises, it never falls back. See
    ``training_backend()`` for the backend a training step runs on.

    ``norm_layer`` builds ``q_norm``/``k_norm`` when ``qk_norm`` is on; their outputs are cast
    back to the dtype of v (a norm may promote, e.g. under autocast), as D-JEPA does.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0, proj_drop=0.0,
                 norm_layer=nn.LayerNorm, backend=None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MaskedAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, key_mask=None):
        if x.dim() != 3:
            raise ValueError(f"MaskedAttention: x must be [B, N, dim], got shape {tuple(x.shape)}")
        B, N, C = x.shape
        # [3, B, H, N, hd] views of the fused projection: last dim contiguous, no copy.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        p = float(self.attn_drop.p) if self.training else 0.0
        x = masked_attention(q, k, v, key_mask, dropout_p=p, scale=self.scale, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)

    def training_backend(self, device=None, dtype=None) -> str:
        """The backend this attention runs on in a training step (with its attn_drop), for
        activations on `device` in `dtype` (default: those of the qkv weight). Raises ValueError,
        as the step would, when an explicit backend cannot serve that case."""
        weight = self.qkv.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        return choose_backend(self.backend, device, dtype, self.head_dim, train=True,
                              dropout_p=float(self.attn_drop.p))


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 bias=True, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class LayerScale(nn.Module):
    """timm's LayerScale: x * gamma (parameter name ``gamma``)."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x), key_mask)``, then ``x + mlp(norm2(x))``.

    ``norm_layer`` defaults to LayerNorm with eps 1e-6 (MAR / D-JEPA); timm's own default is
    ``nn.LayerNorm`` (eps 1e-5): pass it to match timm. ``attn_norm_layer`` builds the q/k
    norms (default: ``norm_layer``, as timm; D-JEPA: ``RMSNorm``). ``init_values`` turns on
    LayerScale (``ls1``/``ls2``) as in timm.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_drop=0.0,
                 attn_drop=0.0, init_values=None, act_layer=nn.GELU,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), backend=None, attn_norm_layer=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = MaskedAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                    attn_drop=attn_drop, proj_drop=proj_drop,
                                    norm_layer=attn_norm_layer or norm_layer, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, key_mask=None):
        x = x + self.ls1(self.attn(self.norm1(x), key_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))
