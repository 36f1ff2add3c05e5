"""Official D-JEPA and MAR models in djepa: from_official, the random draw order, the EMA
schedule, legacy djepa checkpoints, and `djepa convert`.

The reference models below are independent re-implementations, written here from the papers and
from what reading the official code taught (parameter names and shapes, RMSNorm q/k norms,
where each positional embedding goes, the order of the random draws); none of their code is
copied. They use djepa.diffusion's GaussianDiffusion for the diffusion formulas (checked
against the formulas on their own in test_diffusion.py) but draw t and the noise themselves, in
the official order.
"""
import argparse
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from djepa.diffusion import create_diffusion
from djepa.models import DJEPAConfig, PRESETS, build, from_official, load_official, official_config
from djepa.models import masking
from djepa.models.official import official_ema_schedule, preset_for
from djepa.testing import assert_close_to_reference

# The tiny architecture every reference test uses: 4x4 latents of 16 channels, 4 class tokens.
L, C, K, T = 16, 16, 5, 4
D, DEPTH, HEADS, W, DD = 32, 2, 2, 32, 2
STEPS = "6"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ============================================================ the reference models
class RefRMSNorm(nn.Module):
    """D-JEPA's q/k norm: x / rms(x) (in float32) times a weight, no bias."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def ref_layernorm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class RefAttention(nn.Module):
    def __init__(self, dim, heads, qk_norm, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RefRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RefRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, Dm = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q).to(x.dtype), self.k_norm(k).to(x.dtype)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, Dm)))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden, out=None, norm=None, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, out or dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm, mlp_ratio=4.0, drop=0.0):
        super().__init__()
        self.norm1 = ref_layernorm(dim)
        self.attn = RefAttention(dim, heads, qk_norm, drop, drop)
        self.ls1 = nn.Identity()
        self.norm2 = ref_layernorm(dim)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefTimestepEmbedder(nn.Module):
    def __init__(self, width, freq=256):
        super().__init__()
        self.frequency_embedding_size = freq
        self.mlp = nn.Sequential(nn.Linear(freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        dt = self.mlp[0].weight.dtype
        k = torch.arange(self.frequency_embedding_size // 2, dtype=dt)
        angles = t.to(dt)[:, None] * torch.exp(-math.log(10000.0) * k / (self.frequency_embedding_size // 2))[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class RefResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class RefFinalLayer(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class RefSimpleMLPAdaLN(nn.Module):
    def __init__(self, in_ch, width, out_ch, z_ch, depth):
        super().__init__()
        self.in_channels = in_ch
        self.grad_checkpointing = False
        self.time_embed = RefTimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_ch, width)
        self.input_proj = nn.Linear(in_ch, width)
        self.res_blocks = nn.ModuleList([RefResBlock(width) for _ in range(depth)])
        self.final_layer = RefFinalLayer(width, out_ch)

    def forward(self, x, t, c):
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for blk in self.res_blocks:
            h = blk(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        # both halves run on the first half of x; eps (first in_channels) is guided, the rest kept
        first = x[: len(x) // 2]
        out = self.forward(torch.cat([first, first]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        e_c, e_u = eps.chunk(2)
        g = e_u + cfg_scale * (e_c - e_u)
        return torch.cat([torch.cat([g, g]), rest], dim=1)


def ref_randn(shape, like):
    """The official code's noise: torch's default generator, float32 (its latents' dtype)."""
    return torch.randn(shape, dtype=torch.float32).to(like.dtype)


class RefDiffLoss(nn.Module):
    def __init__(self, channels, z_ch, width, depth, steps):
        super().__init__()
        self.in_channels = channels
        self.net = RefSimpleMLPAdaLN(channels, width, 2 * channels, z_ch, depth)
        self.train_diffusion = create_diffusion("", noise_schedule="cosine")
        self.gen_diffusion = create_diffusion(steps, noise_schedule="cosine")

    def forward(self, target, z, mask):
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],))  # t first ...
        noise = ref_randn(target.shape, target)  # ... then the noise
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]
        return (loss * mask).sum() / mask.sum()

    def sample(self, z, temperature=1.0, cfg=1.0):
        guided = cfg != 1.0
        rows = len(z) // 2 if guided else len(z)
        x = ref_randn((rows, self.in_channels), z)
        if guided:
            x = torch.cat([x, x])
        fn = (lambda x_, t_, c: self.net.forward_with_cfg(x_, t_, c, cfg)) if guided else self.net.forward
        d = self.gen_diffusion
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((len(x),), i, dtype=torch.long)
            out = d.p_mean_variance(fn, x, t, dict(c=z))
            noise = ref_randn(x.shape, x)
            x = out["mean"] + float(i != 0) * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return x


def ref_orders(bsz, seq_len):
    """Official generation orders: numpy's global shuffle of range(seq_len), one per sample."""
    rows = []
    for _ in range(bsz):
        perm = np.arange(seq_len)
        np.random.shuffle(perm)
        rows.append(perm)
    return torch.from_numpy(np.stack(rows)).long()


def ref_mask_ratio(ratio_min=0.7):
    stats = pytest.importorskip("scipy.stats")
    return stats.truncnorm((ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25).rvs(1)[0]


def ref_mask(orders, count):
    mask = torch.zeros(orders.shape, dtype=torch.float32)
    return mask.scatter(1, orders[:, :count], 1.0)


class _RefMasked(nn.Module):
    """What D-JEPA and MAR share: masking and the sampler."""

    seq_len, buffer_size = L, T

    def random_masking(self, bsz):
        orders = ref_orders(bsz, self.seq_len)
        count = int(np.ceil(self.seq_len * ref_mask_ratio()))
        return ref_mask(orders, count)

    @torch.no_grad()
    def sample_tokens(self, labels, num_iter, cfg=1.0, cfg_schedule="linear", temperature=1.0):
        bsz = len(labels)
        orders = ref_orders(bsz, self.seq_len)
        dtype = self.z_proj.weight.dtype
        mask = torch.ones(bsz, self.seq_len, dtype=dtype)
        tokens = torch.zeros(bsz, self.seq_len, C, dtype=dtype)
        for step in range(num_iter):
            cond = self.class_emb(labels)
            x_in, m_in = tokens, mask
            if cfg != 1.0:
                cond = torch.cat([cond, self.fake_latent.expand(bsz, -1)])
                x_in, m_in = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            z = self.decoder_forward(self.encoder_forward(x_in, m_in, cond, drop=False), m_in)
            ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
            keep_masked = max(1, min(int(mask[0].sum().item()) - 1, math.floor(self.seq_len * ratio)))
            mask_next = ref_mask(orders, keep_masked).to(dtype)
            pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
            if cfg_schedule == "linear":
                scale = 1 + (cfg - 1) * (self.seq_len - keep_masked) / self.seq_len
            else:
                scale = cfg
            rows = torch.cat([pred, pred]) if cfg != 1.0 else pred
            new = self.diffloss.sample(z[rows], temperature, scale if cfg != 1.0 else 1.0)
            tokens = tokens.clone()
            tokens[pred] = new[: int(pred.sum())].to(dtype)
            mask = mask_next
        return tokens


class RefDJEPA(_RefMasked):
    """Official D-JEPA: learned buffer + class embedding, positions over image tokens only,
    RMSNorm q/k, no diffusion positional embedding, JEPA head `jepaloss.net`."""

    def __init__(self, drop=0.0, label_drop_prob=0.1, batch_mul=2):
        super().__init__()
        self.label_drop_prob, self.batch_mul = label_drop_prob, batch_mul
        self.class_emb = nn.Embedding(K, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.buffer = nn.Parameter(torch.zeros(1, T, D))
        self.z_proj = nn.Linear(C, D)
        self.z_proj_ln = ref_layernorm(D)
        self.encoder_blocks = nn.ModuleList([RefBlock(D, HEADS, True, drop=drop) for _ in range(DEPTH)])
        self.encoder_norm = ref_layernorm(D)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_blocks = nn.ModuleList([RefBlock(D, HEADS, True, drop=drop) for _ in range(DEPTH)])
        self.decoder_norm = ref_layernorm(D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.diffloss = RefDiffLoss(C, D, W, DD, STEPS)
        self.jepaloss = nn.Module()
        self.jepaloss.net = RefMlp(D, 4 * D, D, norm=ref_layernorm)

    def encoder_forward(self, x, mask, cond, drop=True):
        bsz = len(x)
        h = self.z_proj(x) + self.encoder_pos_embed_learned
        h = torch.cat([(self.buffer + cond.unsqueeze(1)).to(h.dtype), h], dim=1)
        keep = torch.cat([torch.ones(bsz, T, dtype=torch.bool), mask == 0], dim=1)
        h = self.z_proj_ln(h[keep].view(bsz, -1, D))
        for blk in self.encoder_blocks:
            h = blk(h)
        return self.encoder_norm(h)

    def decoder_forward(self, h, mask):
        bsz = len(h)
        h = self.decoder_embed(h)
        keep = torch.cat([torch.ones(bsz, T, dtype=torch.bool), mask == 0], dim=1)
        full = self.mask_token.to(h.dtype).expand(bsz, T + L, -1).clone()
        full[keep] = h.reshape(-1, h.shape[-1])
        full = torch.cat([full[:, :T], full[:, T:] + self.decoder_pos_embed_learned], dim=1)
        for blk in self.decoder_blocks:
            full = blk(full)
        return self.decoder_norm(full)[:, T:]

    def class_embedding(self, labels):
        emb = self.class_emb(labels)
        if self.training:
            drop = (torch.rand(len(labels)) < self.label_drop_prob).unsqueeze(-1).to(emb.dtype)
            emb = drop * self.fake_latent + (1 - drop) * emb
        return emb

    def ema_features(self, x, labels):
        with torch.no_grad():
            return self.encoder_forward(x, torch.zeros(x.shape[:2]), self.class_emb(labels))[:, T:]

    def forward(self, x, labels, ema_x):
        mask = self.random_masking(len(x))
        cond = self.class_embedding(labels)
        z = self.decoder_forward(self.encoder_forward(x, mask, cond), mask)
        m = self.batch_mul
        rows = mask.reshape(-1).repeat(m).to(x.dtype)
        diff = self.diffloss(x.reshape(-1, C).repeat(m, 1), z.reshape(-1, D).repeat(m, 1), rows)
        per = F.smooth_l1_loss(self.jepaloss.net(z), ema_x.detach(), beta=2.0, reduction="none").mean(-1)
        jepa = (per * mask.to(x.dtype)).sum() / mask.sum()
        return diff, jepa, mask


class RefMAR(_RefMasked):
    """MAR: the class embedding at every buffer position, positional embeddings over buffer +
    image tokens, plain timm blocks, a diffusion positional embedding, no JEPA head."""

    def __init__(self, drop=0.0, label_drop_prob=0.1, batch_mul=2):
        super().__init__()
        self.label_drop_prob, self.batch_mul = label_drop_prob, batch_mul
        self.class_emb = nn.Embedding(K, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.z_proj = nn.Linear(C, D)
        self.z_proj_ln = ref_layernorm(D)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, T + L, D))
        self.encoder_blocks = nn.ModuleList([RefBlock(D, HEADS, False, drop=drop) for _ in range(DEPTH)])
        self.encoder_norm = ref_layernorm(D)
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, T + L, D))
        self.decoder_blocks = nn.ModuleList([RefBlock(D, HEADS, False, drop=drop) for _ in range(DEPTH)])
        self.decoder_norm = ref_layernorm(D)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.diffloss = RefDiffLoss(C, D, W, DD, STEPS)

    def encoder_forward(self, x, mask, cond, drop=True):
        bsz = len(x)
        h = self.z_proj(x)
        if drop and self.training:  # MAR drops labels inside its encoder
            dropped = (torch.rand(bsz) < self.label_drop_prob).unsqueeze(-1).to(cond.dtype)
            cond = dropped * self.fake_latent + (1 - dropped) * cond
        h = torch.cat([cond.unsqueeze(1).expand(bsz, T, D).to(h.dtype), h], dim=1) + self.encoder_pos_embed_learned
        h = self.z_proj_ln(h)
        keep = torch.cat([torch.ones(bsz, T, dtype=torch.bool), mask == 0], dim=1)
        h = h[keep].view(bsz, -1, D)
        for blk in self.encoder_blocks:
            h = blk(h)
        return self.encoder_norm(h)

    def decoder_forward(self, h, mask):
        bsz = len(h)
        h = self.decoder_embed(h)
        keep = torch.cat([torch.ones(bsz, T, dtype=torch.bool), mask == 0], dim=1)
        full = self.mask_token.to(h.dtype).expand(bsz, T + L, -1).clone()
        full[keep] = h.reshape(-1, h.shape[-1])
        full = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            full = blk(full)
        return self.decoder_norm(full)[:, T:] + self.diffusion_pos_embed_learned

    def forward(self, x, labels):
        mask = self.random_masking(len(x))
        z = self.decoder_forward(self.encoder_forward(x, mask, self.class_emb(labels)), mask)
        m = self.batch_mul
        rows = mask.reshape(-1).repeat(m).to(x.dtype)
        return self.diffloss(x.reshape(-1, C).repeat(m, 1), z.reshape(-1, D).repeat(m, 1), rows), mask


def randomize_(module, seed):
    """Random weights everywhere (no zero-initialised layer left), norm weights around 1; the
    denoiser's small enough that a sampled token stays bounded (eps errors grow by up to
    1 / sqrt(alpha_bar) along the reverse loop)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name or "_ln" in name) and name.endswith("weight") else 0.0
            std = 0.05 if name.startswith("diffloss.") else 0.3
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def ref_pair(cls, seed=0, **kw):
    """(reference fp32 online, fp32 EMA): two independently random models."""
    return randomize_(cls(**kw), seed), randomize_(cls(**kw), seed + 100)


def checkpoint_of(online, ema, args=None):
    ck = {"model": online.state_dict(), "model_ema": ema.state_dict(), "epoch": 3}
    if args is not None:
        ck["args"] = args
    return ck


def djepa_of(source, online, ema, **kw):
    overrides = dict(num_heads=HEADS, num_sampling_steps=STEPS, diffusion_batch_mul=2, attn_dropout=0.0,
                     proj_dropout=0.0, backend="eager")
    overrides.update(kw)
    return from_official(source, checkpoint_of(online, ema), **overrides)


def data(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, C, generator=g), torch.randint(0, K, (B,), generator=g)


def seed_all(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


# ============================================================ architecture and names
@pytest.mark.parametrize("preset,total,encoder,denoising", [
    ("B", 212_017_440, 85_056_000, 35_749_920),
    ("L", 687_421_984, 302_312_448, 72_230_432),
    ("H", 1_426_730_784, 629_683_200, 151_206_944)])
def test_presets_have_the_official_parameter_counts(preset, total, encoder, denoising):
    """The counts in the official djepa_base/large/huge docstrings, exactly: encoder, decoder and
    denoiser match; the total differs only by the two learned positional embeddings (256 x width
    each), which those docstring totals leave out."""
    with torch.device("meta"):
        model = build(preset)
    c = model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.net.encoder_blocks) == encoder == count(model.net.decoder_blocks)
    assert count(model.net.diffloss) == denoising
    assert model.num_parameters() - 2 * c.seq_len * c.embed_dim == total
    assert c.qk_norm == "rms" and not c.diffusion_pos_embed and c.temperature == 0.95
    assert model.net.encoder_blocks[0].attn.q_norm.__class__.__name__ == "RMSNorm"
    assert "encoder_blocks.0.attn.q_norm.bias" not in model.net.state_dict()


def test_djepa_state_dict_is_the_official_one_key_for_key():
    online, ema = ref_pair(RefDJEPA)
    model = djepa_of("djepa", online, ema)
    assert list(model.net.state_dict()) == list(online.state_dict())
    for k, v in online.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k
        assert torch.equal(model.ema.module.state_dict()[k], ema.state_dict()[k]), k
    assert model.config.arch == "djepa" and model.config.jepa_weight == 1.0
    assert model.config.ema_schedule == "official"


def test_mar_state_dict_is_the_official_one_key_for_key():
    online, ema = ref_pair(RefMAR)
    model = djepa_of("mar", online, ema)
    assert list(model.net.state_dict()) == list(online.state_dict())
    c = model.config
    assert (c.arch, c.qk_norm, c.diffusion_pos_embed, c.jepa_weight, c.class_tokens, c.temperature) == \
        ("mar", "none", True, 0.0, T, 1.0)
    assert model.net.jepaloss is None and model.net.buffer is None


def ref_encode_decode(ref, x, labels, mask):
    cond = ref.class_emb(labels)
    h = ref.encoder_forward(x.to(cond.dtype), mask.to(cond.dtype), cond, drop=False)
    return h, ref.decoder_forward(h, mask.to(cond.dtype))


def djepa_encode_decode(net, x, labels, mask):
    h, index, valid = net.encode(x, mask.bool(), net.class_emb(labels))
    return h, net.diffusion_condition(net.predict(h, index, valid))


@pytest.mark.parametrize("source", ["djepa", "mar"])
def test_encoder_and_predictor_match_the_reference(source):
    cls = RefDJEPA if source == "djepa" else RefMAR
    online, ema = ref_pair(cls, seed=3)
    online.eval()
    model = djepa_of(source, online, ema).eval()
    ref64 = copy.deepcopy(online).double()
    x, labels = data(1)
    seed_all(5)
    mask = online.random_masking(len(x))
    with torch.no_grad():
        fast = djepa_encode_decode(model.net, x, labels, mask)
        low = ref_encode_decode(online, x, labels, mask)
        ref = ref_encode_decode(ref64, x.double(), labels, mask)
    for what, f, lo, r in zip(("encoder", "predictor"), fast, low, ref):
        assert_close_to_reference(f, lo, r, atol=1e-5, what=f"{source} {what}")
        assert (f - r).abs().max() < 1e-3  # and not trivially: the rule's bound is small here


def test_layer_qk_norm_is_not_the_official_model():
    """The check above can fail: the same weights with LayerNorm q/k (djepa before) differ."""
    online, ema = ref_pair(RefDJEPA, seed=3)
    online.eval()
    sd = {k: v for k, v in online.state_dict().items()}
    for k in [k for k in sd if k.endswith(("q_norm.weight", "k_norm.weight"))]:
        sd[k.replace("weight", "bias")] = torch.zeros_like(sd[k])
    model = from_official("djepa", sd, num_heads=HEADS, num_sampling_steps=STEPS, backend="eager").eval()
    assert model.config.qk_norm == "layer"
    x, labels = data(1)
    seed_all(5)
    mask = online.random_masking(len(x))
    with torch.no_grad():
        h, _ = djepa_encode_decode(model.net, x, labels, mask)
        ref_h, _ = ref_encode_decode(online, x, labels, mask)
    assert (h - ref_h).abs().max() > 1e-2


@pytest.mark.parametrize("source", ["djepa", "mar"])
def test_training_losses_match_with_the_same_seed(source):
    """Same numpy and torch seeds -> same orders, mask ratio, label drops, t and noise, so the
    losses agree within the tolerance rule (training mode, label drop on)."""
    cls = RefDJEPA if source == "djepa" else RefMAR
    online, ema = ref_pair(cls, seed=7, label_drop_prob=0.5)
    model = djepa_of(source, online, ema, label_drop_prob=0.5).train()
    online.train()
    ema.eval()
    ref64, ema64 = copy.deepcopy(online).double(), copy.deepcopy(ema).double()
    x, labels = data(2, B=4)

    def reference(net, ema_net, xx):
        if source == "djepa":
            ema_x = ema_net.ema_features(xx, labels)
            seed_all(11)
            diff, jepa, mask = net(xx, labels, ema_x)
            return diff, jepa, mask
        seed_all(11)
        diff, mask = net(xx, labels)
        return diff, torch.zeros(()), mask

    d32, j32, mask32 = reference(online, ema, x)
    d64, j64, mask64 = reference(ref64, ema64, x.double())
    seed_all(11)
    out = model.compute_losses(x, labels, order_generator=np.random)
    assert torch.equal(out["mask"], mask32.bool()) and torch.equal(mask32, mask64)
    assert_close_to_reference(out["diffusion"].detach(), d32.detach(), d64.detach(), atol=1e-6, what="diffusion")
    if source == "djepa":
        assert_close_to_reference(out["jepa"].detach(), j32.detach(), j64.detach(), atol=1e-6, what="jepa")
    # with another seed the draws differ, and so does the loss: the check can fail
    seed_all(12)
    other = model.compute_losses(x, labels, order_generator=np.random)
    assert abs(other["diffusion"].item() - d32.item()) > 1e-3


@pytest.mark.parametrize("source", ["djepa", "mar"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampled_tokens_match_with_the_same_seed(source, cfg):
    cls = RefDJEPA if source == "djepa" else RefMAR
    online, ema = ref_pair(cls, seed=9)
    model = djepa_of(source, online, ema)
    ema.eval()
    ema64 = copy.deepcopy(ema).double()
    _, labels = data(3, B=2)
    kw = dict(num_iter=4, cfg=cfg, cfg_schedule="linear", temperature=0.95)
    seed_all(21)
    ref32 = ema.sample_tokens(labels, **kw)
    seed_all(21)
    ref64 = ema64.sample_tokens(labels, **kw)
    seed_all(21)
    fast = model.sample(labels, num_iter=4, cfg_scale=cfg, cfg_schedule="linear", temperature=0.95,
                        order_generator=np.random)  # EMA weights, noise from torch's default generator
    assert_close_to_reference(fast, ref32, ref64, atol=1e-5, what=f"{source} tokens cfg {cfg}")
    assert (fast - ref64).abs().max() < 1e-2 * max(1.0, ref64.abs().max().item())
    seed_all(22)
    other = model.sample(labels, num_iter=4, cfg_scale=cfg, temperature=0.95, order_generator=np.random)
    assert (other - ref64).abs().max() > 1e-2


# ============================================================ draws, defaults, schedules
def test_numpy_orders_and_mask_ratio_are_the_official_draws():
    stats = pytest.importorskip("scipy.stats")
    law = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    for seed in range(20):
        np.random.seed(seed)
        want_orders = ref_orders(3, 256)
        want_ratio = law.rvs(1)[0]
        np.random.seed(seed)
        got_orders = masking.sample_orders(3, 256, np.random)
        got_ratio = masking.sample_mask_ratio(1, 0.7, np.random)[0].item()
        assert torch.equal(got_orders, want_orders)
        assert got_ratio == pytest.approx(want_ratio, rel=1e-12, abs=1e-12)
        np.random.seed(seed)
        mask = masking.training_mask(3, 256, 0.7, False, np.random)
        np.random.seed(seed)
        want = ref_mask(ref_orders(3, 256), int(np.ceil(256 * law.rvs(1)[0])))
        assert torch.equal(mask, want.bool())
    rs = np.random.RandomState(4)
    a = masking.sample_orders(2, 16, rs)
    b = masking.sample_orders(2, 16, np.random.RandomState(4))
    assert torch.equal(a, b) and sorted(a[0].tolist()) == list(range(16))
    assert masking.sample_orders(2, 16, np.random.default_rng(1)).shape == (2, 16)


def test_diffusion_loss_draws_t_before_the_noise():
    model = build("tiny", loss="diffusion", backend="eager")
    head = model.net.diffloss
    target, z = torch.randn(6, 4), torch.randn(6, model.config.pred_embed_dim)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(6, 4, generator=g)
    want = head.per_token_loss(target, z, t=t, noise=noise)
    got = head.per_token_loss(target, z, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampling_temperature_defaults_to_the_config(monkeypatch):
    model = build("tiny", loss="diffusion", backend="eager", temperature=0.5)
    seen = []
    real = model.ema.module.diffloss.sample

    def spy(z, temperature=1.0, **kw):
        seen.append(temperature)
        return real(z, temperature=temperature, **kw)

    monkeypatch.setattr(model.ema.module.diffloss, "sample", spy)
    model.sample(torch.tensor([1, 2]), num_iter=2, generator=torch.Generator().manual_seed(0))
    model.sample(torch.tensor([1]), num_iter=1, temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert seen == [0.5, 0.5, 0.9]
    assert DJEPAConfig().temperature == 0.95 and PRESETS["mar-B"].temperature == 1.0


def test_official_ema_schedule():
    s = official_ema_schedule(0.999, ramp_steps=1000)
    # min(e / epochs * (1 - rate) + rate, 0.9999) with e / epochs = step / ramp_steps
    for step in (0, 1, 10, 500, 899, 900, 901, 1000, 5000):
        want = min(step / 1000 * (1.0 - 0.999) + 0.999, 0.9999)
        assert s(step) == want
    assert official_ema_schedule(0.9999)(10 ** 9) == 0.9999 and official_ema_schedule(0.99999)(0) == 0.9999
    with pytest.raises(ValueError, match="ramp_steps"):
        official_ema_schedule(0.999, ramp_steps=0)
    model = build("tiny", ema_decay=0.5, ema_schedule="official", ema_ramp_steps=4, backend="eager")
    decays = []
    for _ in range(6):
        decays.append(model.ema.decay)
        model.update_ema()
    assert decays == [min(k / 4 * 0.5 + 0.5, 0.9999) for k in range(6)]
    with pytest.raises(ValueError, match="ema_schedule"):
        DJEPAConfig(ema_schedule="cosine")


def test_config_qk_norm_values():
    assert DJEPAConfig(qk_norm=True).qk_norm == "rms" and DJEPAConfig(qk_norm=False).qk_norm == "none"
    with pytest.raises(ValueError, match="qk_norm"):
        DJEPAConfig(qk_norm="batch")
    with pytest.raises(ValueError, match="jepa_weight=0"):
        DJEPAConfig(arch="mar")
    with pytest.raises(ValueError, match="arch"):
        DJEPAConfig(arch="vit")
    layer = build("tiny", qk_norm="layer")
    assert isinstance(layer.net.encoder_blocks[0].attn.q_norm, nn.LayerNorm)
    none = build("tiny", qk_norm="none")
    assert isinstance(none.net.encoder_blocks[0].attn.q_norm, nn.Identity)


def test_legacy_djepa_checkpoints_keep_their_meaning():
    """A config and state dict written before this layout (qk_norm True = LayerNorm, a diffusion
    positional embedding, `jepa_head.*`) load into the same model they were."""
    legacy = build("tiny", qk_norm="layer", diffusion_pos_embed=True, temperature=1.0).config.to_dict()
    for k in ("arch", "diffusion_pos_embed", "temperature", "ema_schedule", "ema_ramp_steps"):
        legacy.pop(k)
    legacy["qk_norm"] = True
    cfg = DJEPAConfig.from_dict(legacy)
    assert (cfg.qk_norm, cfg.diffusion_pos_embed, cfg.temperature, cfg.arch) == ("layer", True, 1.0, "djepa")
    # a partial dict is not mistaken for an old config
    assert DJEPAConfig.from_dict({"depth": 1}).qk_norm == "rms"
    model = build("tiny", **cfg.to_dict())
    sd = {k.replace("jepaloss.net.", "jepa_head."): v.clone() + 1.0 for k, v in model.state_dict().items()}
    assert any(k.startswith("net.jepa_head.") for k in sd) and any(k.startswith("ema.module.jepa_head.") for k in sd)
    fresh = build("tiny", **cfg.to_dict())
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh.net.jepaloss.net.fc1.weight, model.net.jepaloss.net.fc1.weight + 1.0)
    torch.testing.assert_close(fresh.ema.module.jepaloss.net.fc2.bias, model.ema.module.jepaloss.net.fc2.bias + 1.0)


# ============================================================ formats and errors
def test_checkpoint_files_prefixes_args_and_safetensors(tmp_path):
    online, ema = ref_pair(RefDJEPA, seed=1)
    compiled = {"_orig_mod." + k: v for k, v in online.state_dict().items()}
    args = argparse.Namespace(model="djepa_tiny", attn_dropout=0.0, proj_dropout=0.0, num_sampling_steps=STEPS,
                              diffusion_batch_mul=2, temperature=0.94, ema_rate=0.9999, jepa_weight=1.0,
                              precision=torch.bfloat16)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": compiled, "model_ema": ema.state_dict(), "args": args, "epoch": 9}, path)
    model = from_official("djepa", str(path), num_heads=HEADS, backend="eager")
    assert model.config.temperature == 0.94 and model.config.num_sampling_steps == STEPS
    assert torch.equal(model.net.z_proj.weight, online.z_proj.weight)
    assert torch.equal(model.ema.module.z_proj.weight, ema.z_proj.weight)
    # a plain state dict (safetensors): the EMA starts as the online weights
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in online.state_dict().items()}, str(st))
    plain = from_official("djepa", str(st), num_heads=HEADS)
    assert torch.equal(plain.ema.module.z_proj.weight, online.z_proj.weight)
    ck = load_official(str(path))
    assert ck.args["model"] == "djepa_tiny" and "z_proj.weight" in ck.model
    # heads from the official model name
    big = official_config("djepa", {**ck.model}, {"model": "djepa_large"})
    assert big.num_heads == 16


# What djepa assumes for a checkpoint whose `args` lack a field or that carries none: the
# published training settings (the models' constructor defaults; diffusion_batch_mul 4 as in the
# MAR/D-JEPA training commands and model classes, where main_mar.py's argparse says 1).
OFFICIAL_DEFAULTS = dict(attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1, diffusion_batch_mul=4,
                         num_sampling_steps="100", mask_ratio_min=0.7, ema_decay=0.9999, diffusion_weight=1.0)
SOURCE_DEFAULTS = {"djepa": dict(temperature=0.95, ema_schedule="official"),
                   "mar": dict(temperature=1.0, ema_schedule="constant")}


@pytest.mark.parametrize("source", ["djepa", "mar"])
@pytest.mark.parametrize("args", [None, {}, {"model": "x_tiny"}], ids=["no-args", "empty-args", "args-model-only"])
def test_fields_a_checkpoint_lacks_take_the_official_defaults(source, args):
    online, ema = ref_pair(RefDJEPA if source == "djepa" else RefMAR, seed=2)
    cfg = from_official(source, checkpoint_of(online, ema, args), num_heads=HEADS).config
    want = dict(OFFICIAL_DEFAULTS, **SOURCE_DEFAULTS[source])
    assert {k: getattr(cfg, k) for k in want} == want
    # and every field the args do carry wins over the default
    given = dict(attn_dropout=0.25, proj_dropout=0.2, label_drop_prob=0.3, diffusion_batch_mul=3,
                 num_sampling_steps="7", mask_ratio_min=0.6, ema_rate=0.99, diffusion_weight=2.0, temperature=0.8)
    cfg = from_official(source, checkpoint_of(online, ema, argparse.Namespace(**given)), num_heads=HEADS).config
    assert (cfg.attn_dropout, cfg.proj_dropout, cfg.label_drop_prob, cfg.diffusion_batch_mul, cfg.num_sampling_steps,
            cfg.mask_ratio_min, cfg.ema_decay, cfg.diffusion_weight, cfg.temperature) == (
        0.25, 0.2, 0.3, 3, "7", 0.6, 0.99, 2.0, 0.8)


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module.",
                                    "module.module."])
def test_every_wrapper_prefix_combination_loads_the_same_weights(prefix):
    """torch.compile (`_orig_mod.`), DDP (`module.`) and both, in either nesting order."""
    online, ema = ref_pair(RefDJEPA, seed=3)
    ck = {"model": {prefix + k: v for k, v in online.state_dict().items()},
          "model_ema": {prefix + k: v for k, v in ema.state_dict().items()}}
    model = from_official("djepa", ck, num_heads=HEADS)
    for name, ref in online.state_dict().items():
        assert torch.equal(model.net.state_dict()[name], ref), name
    assert torch.equal(model.ema.module.z_proj.weight, ema.z_proj.weight)


def test_errors_are_one_line_and_name_the_keys(tmp_path):
    online, ema = ref_pair(RefDJEPA)
    sd = online.state_dict()
    kw = dict(num_heads=HEADS)
    broken = {k: v for k, v in sd.items() if k != "encoder_norm.weight"}
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as exc:
        from_official("djepa", broken, **kw)
    msg = str(exc.value)
    assert "\n" not in msg and "encoder_norm.weight" in msg and "extra.weight" in msg and "strict=False" in msg
    loose = from_official("djepa", broken, strict=False, **kw)
    assert torch.equal(loose.net.z_proj.weight, online.z_proj.weight)
    bad_shape = dict(sd)
    bad_shape["encoder_norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shapes differ.*encoder_norm.weight"):
        from_official("djepa", bad_shape, **kw)
    mar_online, _ = ref_pair(RefMAR)
    with pytest.raises(ValueError, match="use source 'mar'"):
        from_official("djepa", mar_online.state_dict(), **kw)
    with pytest.raises(ValueError, match="use source 'djepa'"):
        from_official("mar", sd, **kw)
    with pytest.raises(ValueError, match="source must be"):
        from_official("maskgit", sd)
    with pytest.raises(ValueError, match="num_heads"):
        from_official("djepa", sd)
    flow = dict(sd)
    flow["diffloss.net.final_layer.linear.weight"] = sd["diffloss.net.final_layer.linear.weight"][:C]
    flow["diffloss.net.final_layer.linear.bias"] = sd["diffloss.net.final_layer.linear.bias"][:C]
    with pytest.raises(ValueError, match="flow"):
        from_official("djepa", flow, **kw)
    assert from_official("djepa", flow, loss="flow", **kw).config.loss == "flow"
    with pytest.raises(ValueError, match="does not exist"):
        from_official("djepa", str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="not a state dict|a dict"):
        from_official("djepa", [1, 2])
    # a pickle with foreign objects is refused unless trusted
    path = tmp_path / "odd.pth"
    torch.save({"model": sd, "args": {"f": _Foreign()}}, path)
    with pytest.raises(ValueError, match="trust_pickle"):
        from_official("djepa", str(path), **kw)
    assert from_official("djepa", str(path), trust_pickle=True, **kw).config.embed_dim == D
    # random bytes or a truncated checkpoint: said so, and no advice to trust the file
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 4)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:300])
    for bad in (junk, cut):
        with pytest.raises(ValueError) as err:
            from_official("djepa", str(bad), **kw)
        assert "trust_pickle" not in str(err.value) and ("not a PyTorch checkpoint" in str(err.value)
                                                         or "damaged" in str(err.value)), str(err.value)


class _Foreign:
    pass


def test_preset_for_finds_the_official_sizes():
    for name in ("B", "L", "H", "mar-B", "mar-L", "mar-H"):
        assert preset_for(PRESETS[name]) == name
    assert preset_for(PRESETS["tiny"]) == "tiny" and preset_for(PRESETS["tiny"].replace(depth=3)) == "B"


# ============================================================ the command line
def _cli(capsys, *argv):
    """(exit status, stdout, stderr) of `djepa argv`, run in this process (eager backend)."""
    from djepa.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_convert_then_sample_resume_and_eval_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DJEPA_BACKEND", "eager")
    online, ema = ref_pair(RefDJEPA, seed=4)
    args = argparse.Namespace(model="djepa_tiny", num_sampling_steps=STEPS, diffusion_batch_mul=2,
                              attn_dropout=0.0, proj_dropout=0.0)
    ck = tmp_path / "official.pth"
    torch.save({"model": {"_orig_mod." + k: v for k, v in online.state_dict().items()},
                "model_ema": ema.state_dict(), "args": args}, ck)
    g = torch.Generator().manual_seed(0)
    latents = tmp_path / "lat.npz"
    np.savez(latents, latents=(torch.randn(40, C, 4, 4, generator=g) * 4).numpy(),
             labels=(torch.arange(40) % K).numpy())
    out = tmp_path / "conv"
    rc, so, err = _cli(capsys, "convert", "--from", "djepa", str(ck), "--out", str(out), "--num-heads", str(HEADS),
                       "--data", f"latents:{latents}", "--latent-scale", "0.25", "--batch-size", "8", "--steps", "2")
    assert rc == 0, err
    assert "step-0000000" in so
    state = json.load(open(out / "step-0000000" / "state.json"))
    assert state["preset"] == "B" and state["config"]["qk_norm"] == "rms" and state["data"]["patch_size"] == 1
    assert state["converted_from"]["source"] == "djepa"
    # the folder holds the official weights
    from djepa.train import load_checkpoint

    model, _ = load_checkpoint(str(out))
    assert torch.equal(model.net.decoder_norm.weight, online.decoder_norm.weight)
    assert torch.equal(model.ema.module.decoder_norm.weight, ema.decoder_norm.weight)
    rc, so, err = _cli(capsys, "sample", "--ckpt", str(out), "--labels", "0-1", "--n", "1", "--num-iter", "2",
                       "--cfg", "1.5", "--out", str(tmp_path / "s.png"), "--no-progress")
    assert rc == 0, err
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (2, C, 4, 4) and np.isfinite(z["images"]).all()
    rc, so, err = _cli(capsys, "train", "--resume", str(out), "--out", str(tmp_path / "more"), "--steps", "2",
                       "--ckpt-every", "2", "--no-progress")
    assert rc == 0, err
    assert os.path.isdir(tmp_path / "more" / "step-0000002")
    rc, so, err = _cli(capsys, "eval", "--ckpt", str(out), "--n-per-class", "2", "--num-iter", "2", "--cfg", "1.0",
                       "--out", str(tmp_path / "eval.json"), "--no-progress")
    assert rc == 0, err
    assert "probe_features" in json.load(open(tmp_path / "eval.json"))


def test_convert_speaks_in_flags_labels_honestly_and_resume_asks_for_data(tmp_path, capsys, monkeypatch):
    """The head-count error names --num-heads; a model of no preset size is not called "preset
    B"; a run converted without --data asks for it on --resume, and takes it; a folder passed as
    the checkpoint is named a folder, with the checkpoint files in it."""
    monkeypatch.setenv("DJEPA_BACKEND", "eager")
    online, ema = ref_pair(RefDJEPA, seed=5)
    ck = tmp_path / "official.pth"
    torch.save({"model": online.state_dict(), "model_ema": ema.state_dict()}, ck)
    rc, _, err = _cli(capsys, "convert", "--from", "djepa", str(ck), "--out", str(tmp_path / "x"))
    assert rc == 2 and err.count("\n") == 1 and "pass --num-heads N" in err and "num_heads=" not in err, err
    out = tmp_path / "conv"
    rc, so, err = _cli(capsys, "convert", "--from", "djepa", str(ck), "--out", str(out), "--num-heads", str(HEADS),
                       "--batch-size", "8", "--steps", "2")
    assert rc == 0, err
    assert ", as preset B" not in so and f"a {D}-wide, " in so and "of no preset size (recorded as preset B" in so, so
    assert "will ask for --data" in so
    rc, _, err = _cli(capsys, "train", "--resume", str(out), "--out", str(tmp_path / "more"), "--steps", "2",
                      "--no-progress")
    assert rc == 2 and err.count("\n") == 1 and "pass --data latents:PATH" in err and "NOT-RECORDED" not in err, err
    g = torch.Generator().manual_seed(0)
    latents = tmp_path / "lat.npz"
    np.savez(latents, latents=(torch.randn(16, C, 4, 4, generator=g) * 4).numpy(),
             labels=(torch.arange(16) % K).numpy())
    rc, _, err = _cli(capsys, "train", "--resume", str(out), "--out", str(tmp_path / "more"), "--steps", "1",
                      "--data", f"latents:{latents}", "--no-progress")
    assert rc == 0, err
    state = json.load(open(tmp_path / "more" / "step-0000001" / "state.json"))
    assert state["settings"]["data"] == f"latents:{latents}"
    with pytest.raises(ValueError, match=r"is a folder: pass the checkpoint file itself .*official\.pth"):
        from_official("djepa", str(tmp_path), num_heads=HEADS)
    with pytest.raises(ValueError, match="holds no .pth/.pt/.safetensors file"):
        from_official("djepa", str(tmp_path / "more"), num_heads=HEADS)


def test_convert_errors_are_one_line(tmp_path, capsys):
    rc, _, err = _cli(capsys, "convert", "--from", "djepa", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    mar, _ = ref_pair(RefMAR)
    ck = tmp_path / "mar.pth"
    torch.save({"model": mar.state_dict()}, ck)
    rc, _, err = _cli(capsys, "convert", "--from", "djepa", str(ck), "--out", str(tmp_path / "o"), "--num-heads", "2")
    assert rc == 2 and err.count("\n") == 1 and "use source 'mar'" in err
    rc, _, err = _cli(capsys, "convert", "--from", "mar", str(ck), "--out", str(tmp_path / "o"), "--num-heads", "2")
    assert rc == 0, err
    state = json.load(open(tmp_path / "o" / "step-0000000" / "state.json"))
    assert state["preset"] == "mar-B" and state["config"]["arch"] == "mar"
    assert state["converted_from"]["ema"] is False
    rc, _, err = _cli(capsys, "convert", "--from", "mar", str(ck), "--out", str(tmp_path / "o"), "--num-heads", "2")
    assert rc == 2 and err.count("\n") == 1 and "already holds" in err
