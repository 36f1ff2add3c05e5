"""djepa.patch on model objects of the official code: the reference classes of test_official
(independent re-implementations with the official names and shapes) are patched in place; their
weights (the Parameter objects themselves) and their outputs must stay the same."""
import copy
import types

import pytest
import torch
from torch import nn

from djepa.nn import Block, DenoisingMLP, MaskedAttention, RMSNorm
from djepa.ops.ema import ema_update_reference
from djepa.patch import fused_update_ema, patch_attention, patch_denoising_mlp, patch_ema, patch_model
from djepa.testing import assert_close_to_reference
from test_official import (C, D, DD, HEADS, STEPS, W, RefAttention, RefBlock, RefDiffLoss, RefMAR, RefDJEPA,
                           data, ref_pair, seed_all)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_random_(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name or "_ln" in name) and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def params_of(module):
    return [(n, id(p)) for n, p in module.named_parameters()]


# ============================================================ the denoising MLP
def test_patch_denoising_mlp_keeps_weights_and_outputs():
    dl = small_random_(RefDiffLoss(C, D, W, DD, STEPS), 1)
    ref32 = copy.deepcopy(dl)
    ref64 = copy.deepcopy(dl).double()
    before = params_of(dl)
    report = patch_denoising_mlp(dl, backend="eager")
    assert ("net", "RefSimpleMLPAdaLN", "DenoisingMLP") in report.replaced
    assert ("sample", "RefDiffLoss.sample", "djepa.diffusion.sample") in report.replaced
    assert isinstance(dl.net, DenoisingMLP) and params_of(dl) == before
    assert "DenoisingMLP" in str(report)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(11, C, generator=g), torch.randn(11, D, generator=g)
    t = torch.randint(0, 1000, (11,), generator=g)
    assert_close_to_reference(dl.net(x, t, c), ref32.net(x, t, c), ref64.net(x.double(), t, c.double()),
                              what="forward")
    xx, cc = torch.cat([x[:5], x[:5]]), torch.cat([c[:5], c[5:10]])
    assert_close_to_reference(dl.net.forward_with_cfg(xx, t[:10], cc, 2.5),
                              ref32.net.forward_with_cfg(xx, t[:10], cc, 2.5),
                              ref64.net.forward_with_cfg(xx.double(), t[:10], cc.double(), 2.5), what="forward_with_cfg")
    # training loss (t, then noise, from the same seed) and its gradients
    mask = (torch.rand(11, generator=g) < 0.6).float()
    losses = []
    for m in (dl, ref32, ref64):
        seed_all(3)
        dt = next(m.parameters()).dtype
        loss = m(x.to(dt), c.to(dt), mask.to(dt))
        loss.backward()
        losses.append(loss)
    assert_close_to_reference(losses[0].detach(), losses[1].detach(), losses[2].detach(), what="loss")
    for (name, a), b, r in zip(dl.named_parameters(), ref32.parameters(), ref64.parameters()):
        assert_close_to_reference(a.grad, b.grad, r.grad, atol=1e-6, what=f"grad {name}")
    # sampling: the fused loop, with the noise drawn as the original draws it
    samples = {}
    for cfg in (1.0, 2.0):
        z = c if cfg == 1.0 else torch.cat([c[:5], c[5:10]])
        outs = []
        for m in (dl, ref32, ref64):
            seed_all(4)
            outs.append(m.sample(z.to(next(m.parameters()).dtype), 0.95, cfg))
        rows = 5 if cfg != 1.0 else 11
        assert_close_to_reference(outs[0][:rows], outs[1][:rows], outs[2][:rows], atol=1e-5, what=f"sample cfg {cfg}")
        samples[cfg] = outs
    seed_all(5)  # another seed, other tokens: the check above can fail
    assert (dl.sample(c, 0.95) - samples[1.0][2]).abs().max() > 1e-3
    # D-JEPA's keyword call
    seed_all(4)
    kw = dl.sample(z, temperature=0.95, cfg_scale=2.0, time_shifting_factor=1.0)
    torch.testing.assert_close(kw, samples[2.0][0])


def test_patch_denoising_mlp_on_a_bare_mlp_and_bad_modules():
    dl = small_random_(RefDiffLoss(C, D, W, DD, STEPS), 1)
    report = patch_denoising_mlp(dl.net)
    assert isinstance(report.module, DenoisingMLP) and report.replaced[0][0] == ""
    assert report.module.input_proj is dl.net.input_proj
    odd = small_random_(RefDiffLoss(C, D, W, DD, STEPS), 1)
    odd.net.res_blocks[1].in_ln = nn.LayerNorm(W, elementwise_affine=False)
    report = patch_denoising_mlp(odd)
    assert not report.replaced and "res_blocks.1" in report.skipped[0][1]
    assert patch_denoising_mlp(nn.Linear(3, 3)).replaced == []


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_patched_head_on_triton(triton_device, cfg):
    dl = small_random_(RefDiffLoss(C, D, W, DD, "3"), 6)
    ref32, ref64 = copy.deepcopy(dl), copy.deepcopy(dl).double()
    patch_denoising_mlp(dl, backend="triton")
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, D, generator=g)
    outs = []
    for m in (dl, ref32, ref64):
        seed_all(8)
        outs.append(m.sample(z.to(next(m.parameters()).dtype), 0.9, cfg))
    rows = 3 if cfg != 1.0 else 6
    assert_close_to_reference(outs[0][:rows], outs[1][:rows], outs[2][:rows], atol=1e-5, what="triton sample")


# ============================================================ attention and blocks
class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        return x


def test_patch_attention_replaces_blocks_and_keeps_outputs():
    torch.manual_seed(0)
    model = small_random_(nn.Sequential(RefBlock(D, HEADS, True), RefBlock(D, HEADS, True)), 3, std=0.3).eval()
    ref32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    before = params_of(model)
    report = patch_attention(model, backend="eager")
    assert report.replaced == [("0", "RefBlock", "Block"), ("1", "RefBlock", "Block")]
    assert all(isinstance(b, Block) and isinstance(b.attn, MaskedAttention) for b in model)
    assert params_of(model) == before and isinstance(model[0].attn.q_norm, type(ref32[0].attn.q_norm))
    x = torch.randn(3, 7, D)
    assert_close_to_reference(model(x), ref32(x), ref64(x.double()), what="blocks")
    # key masks now work: keys past 5 hidden == the reference on the first 5 tokens
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, :5] = True
    blk, rb32, rb64 = model[0], ref32[0], ref64[0]
    assert_close_to_reference(blk(x, mask)[:, :5], rb32(x[:, :5]), rb64(x[:, :5].double()), what="key_mask")
    # the official D-JEPA calls
    torch.testing.assert_close(blk(x, freqs_cis=None), blk(x))
    torch.testing.assert_close(blk(x, None, None, None), blk(x))
    with pytest.raises(ValueError, match="freqs_cis"):
        blk(x, freqs_cis=torch.ones(1))


def test_patch_attention_leaves_what_it_cannot_take():
    block = RefBlock(D, HEADS, False)
    block.drop_path1 = DropPath(0.1)
    odd = RefBlock(D, HEADS, False)
    odd.attn.norm = nn.LayerNorm(D)  # timm's scale_norm
    model = nn.Sequential(block, odd)
    ref = copy.deepcopy(model)
    report = patch_attention(model)
    assert report.replaced == [("0.attn", "RefAttention", "MaskedAttention")]
    assert any(p == "0" and "drop_path1" in why for p, why in report.skipped)
    assert any(p == "1.attn" and "scale_norm" in why for p, why in report.skipped)
    assert type(model[0]) is RefBlock and isinstance(model[0].attn, MaskedAttention)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].attn(x, attn_mask=None), ref[0].attn(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key_mask"):
        model[0].attn(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    root = patch_attention(RefBlock(D, HEADS, True))
    assert isinstance(root.module, Block) and root.replaced == [("", "RefBlock", "Block")]


class ScaledAttention(RefAttention):
    """A timm Attention with its own softmax scale (timm's qk_scale / a custom head)."""

    def __init__(self, *args, scale, **kw):
        super().__init__(*args, **kw)
        self.scale = scale

    def forward(self, x):
        B, N, Dm = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q).to(x.dtype), self.k_norm(k).to(x.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(B, N, Dm))


class LayerScale(nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        self.gamma = nn.Parameter(0.5 + torch.rand(dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x * self.gamma


def test_patched_blocks_keep_the_attention_scale_and_both_layer_scales():
    block = small_random_(RefBlock(D, HEADS, True), 11, std=0.3).eval()
    block.attn = small_random_(ScaledAttention(D, HEADS, True, scale=0.9), 12, std=0.3).eval()
    block.ls1, block.ls2 = LayerScale(D, 1), LayerScale(D, 2)
    ref32, ref64 = copy.deepcopy(block), copy.deepcopy(block).double()
    patched = patch_attention(block, backend="eager").module
    assert patched.attn.scale == 0.9 and patched.ls1 is block.ls1 and patched.ls2 is block.ls2
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(13))
    assert_close_to_reference(patched(x), ref32(x), ref64(x.double()), what="scaled block")


@pytest.mark.parametrize("where", ["drop_path1", "drop_path2", "drop_path"])
def test_a_block_with_stochastic_depth_on_either_branch_keeps_its_own_forward(where):
    block = RefBlock(D, HEADS, False)
    setattr(block, where, DropPath(0.1))
    report = patch_attention(nn.Sequential(block))
    assert any(p == "0" and where in why for p, why in report.skipped), report.skipped
    assert report.replaced == [("0.attn", "RefAttention", "MaskedAttention")]


def test_the_report_says_where_each_attention_runs_in_training(triton_device):
    """Per replaced block/attention: the backend of a training step, with its attention dropout
    (passed through, no eager fallback), or why an explicit backend cannot serve it."""
    model = nn.Sequential(RefBlock(D, HEADS, True, drop=0.1), RefBlock(D, HEADS, False)).to(triton_device)
    report = patch_attention(model, backend="triton")
    dtype = str(model[0].attn.qkv.weight.dtype).replace("torch.", "")
    assert report.training == {
        "0": f"attention on triton (attention dropout 0.1, {dtype} on {triton_device})",
        "1": f"attention on triton (no attention dropout, {dtype} on {triton_device})",
    }
    assert str(report).splitlines()[1] == (f"  0: RefBlock -> Block; in training: attention on triton "
                                           f"(attention dropout 0.1, {dtype} on {triton_device})")
    assert model[0].attn.attn_drop.p == 0.1 and model[0].attn.training_backend() == "triton"
    # an explicit backend that cannot serve the case says so in the report (the step would raise)
    cpu = patch_attention(nn.Sequential(RefBlock(D, HEADS, True, drop=0.1)), backend="cuda")
    assert cpu.training["0"].startswith("fails: masked_attention: backend='cuda' cannot serve this call")
    loose = patch_attention(RefAttention(D, HEADS, False, 0.2))
    assert loose.training[""] == "attention on eager (attention dropout 0.2, float32 on cpu)"
    merged = patch_model(nn.Sequential(RefBlock(D, HEADS, True, drop=0.1)))
    assert merged.training == {"0": "attention on eager (attention dropout 0.1, float32 on cpu)"}


def test_patched_attention_on_triton(triton_device):
    model = small_random_(RefBlock(D, HEADS, True), 9, std=0.3).eval()
    ref32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    patched = patch_attention(model, backend="triton").module
    x = torch.randn(2, 9, D)
    assert_close_to_reference(patched(x), ref32(x), ref64(x.double()), what="triton block")


def test_rms_qk_norm_under_autocast_keeps_one_dtype():
    """RMSNorm's float32 weight promotes bf16 q/k; the attention casts them back to v's dtype
    (before, masked_attention refused q/k/v of two dtypes)."""
    blk = Block(D, HEADS, qkv_bias=True, qk_norm=True, attn_norm_layer=RMSNorm).eval()
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    assert torch.isfinite(y.float()).all()
    ref = blk(x)
    assert (y.float() - ref).abs().max() < 0.2


# ============================================================ whole models
@pytest.mark.parametrize("cls", [RefMAR, RefDJEPA])
def test_patch_model_on_a_whole_official_model(cls):
    online, _ = ref_pair(cls, seed=2)
    online.train()
    ref32, ref64 = copy.deepcopy(online), copy.deepcopy(online).double()
    before = params_of(online)
    report = patch_model(online, backend="eager")
    kinds = [new for _, _, new in report.replaced]
    assert kinds.count("Block") == 4 and kinds.count("DenoisingMLP") == 1 and "djepa.diffusion.sample" in kinds
    assert params_of(online) == before
    x, labels = data(4, B=3)
    losses = []
    for m in (online, ref32, ref64):
        xx = x.to(next(m.parameters()).dtype)
        seed_all(6)
        if cls is RefMAR:
            losses.append(m(xx, labels)[0])
        else:
            losses.append(m(xx, labels, torch.zeros(3, 16, D, dtype=xx.dtype))[0])
    assert_close_to_reference(losses[0].detach(), losses[1].detach(), losses[2].detach(), what="loss")
    for m in (online, ref32, ref64):
        m.eval()
    toks = []
    for m in (online, ref32, ref64):
        seed_all(7)
        toks.append(m.sample_tokens(labels[:2], num_iter=3, cfg=2.0, temperature=0.95))
    assert_close_to_reference(toks[0], toks[1], toks[2], atol=1e-5, what="sample_tokens")


# ============================================================ EMA
def _loop_update(target_params, source_params, rate=0.99):
    for t, s in zip(target_params, source_params):
        t.detach().mul_(rate).add_(s, alpha=1 - rate)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_patch_ema_lists_and_modules(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_device")
    engine = types.ModuleType("engine_mar")
    engine.update_ema = _loop_update
    report = patch_ema(engine, backend=backend)
    assert report.replaced == [("engine_mar.update_ema", "_loop_update(target_params, source_params, rate)",
                                "djepa.patch.fused_update_ema")]
    assert engine._djepa_original_update_ema is _loop_update
    src = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    ema = copy.deepcopy(src)  # D-JEPA's EMA model: parameters still require grad
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    # MAR: lists of tensors
    ema_list = [p.detach().clone() for p in ema.parameters()]
    low = [p.clone() for p in ema_list]
    want = ema_update_reference(ema_list, list(src.parameters()), 0.999)
    _loop_update(low, list(src.parameters()), 0.999)
    engine.update_ema(ema_list, list(src.parameters()), rate=0.999)
    for got, lo, w in zip(ema_list, low, want):
        assert_close_to_reference(got, lo, w, atol=1e-7, what="ema list")
    # D-JEPA: two modules
    low = copy.deepcopy(ema)
    want = ema_update_reference(list(ema.parameters()), list(src.parameters()), 0.9)
    _loop_update(list(low.parameters()), list(src.parameters()), 0.9)
    engine.update_ema(ema, src, 0.9)
    for got, lo, w in zip(ema.parameters(), low.parameters(), want):
        assert_close_to_reference(got.detach(), lo.detach(), w, atol=1e-7, what="ema module")
    assert patch_ema(engine).skipped
    with pytest.raises(ValueError, match="no function"):
        patch_ema(types.SimpleNamespace(), name="update_ema")
    with pytest.raises(ValueError, match="target tensors"):
        fused_update_ema(ema_list[:2], list(src.parameters()))
    with pytest.raises(TypeError):
        fused_update_ema(torch.zeros(3), torch.zeros(3))
