"""MAR's masked-autoregressive sampler on the tiny D-JEPA preset."""
import math

import pytest
import torch

from djepa.models import build, masking


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw):
    """A tiny model whose denoising head depends on its inputs: a fresh head's zero-initialised
    output layers would predict eps = 0 whatever the conditioning, hiding every mistake."""
    kw.setdefault("num_sampling_steps", "3")
    kw.setdefault("loss", "diffusion")
    torch.manual_seed(kw.pop("seed", 0))
    model = build("tiny", **kw).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.net.diffloss.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.ema.copy_from(model.net)
    return model


def gen(seed):
    return torch.Generator().manual_seed(seed)


LABELS = torch.tensor([0, 3, 7])


def test_fills_every_token_once_and_follows_the_cosine_schedule():
    model = tiny()
    L = model.config.seq_len
    num_iter = 5
    seen = []
    out = model.sample(LABELS, num_iter=num_iter, generator=gen(0),
                       callback=lambda step, tokens, pred: seen.append(pred.clone()))
    assert out.shape == (3, L, model.config.token_channels) and torch.isfinite(out).all()
    assert len(seen) == num_iter
    stacked = torch.stack(seen)  # [iter, B, L]
    assert (stacked.sum(0) == 1).all()  # every token predicted exactly once
    # MAR: after iteration s, floor(L * cos(pi/2 * (s+1)/num_iter)) tokens stay masked,
    # clamped to [1, remaining - 1]; the last iteration predicts the rest.
    remaining, expected = L, []
    for s in range(num_iter):
        keep = max(1, min(remaining - 1, math.floor(L * math.cos(math.pi / 2 * (s + 1) / num_iter))))
        n = remaining if s == num_iter - 1 else remaining - keep
        expected.append(n)
        remaining -= n
    assert stacked.sum(2).tolist() == [[n] * 3 for n in expected]
    assert expected == [n for _, n in masking.mask_len_schedule(L, num_iter)]
    # tokens predicted at an iteration are unchanged afterwards
    assert (out != 0).all()


def test_deterministic_for_a_seed():
    model = tiny()
    a = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(1))
    b = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(1))
    c = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_doubled_batch_equals_conditional_path_when_uncond_is_cond():
    """With the fake class equal to the class embedding, the guided eps u + s(c - u) is the
    conditional eps: cfg 3 (doubled batch, both schedules) must reproduce cfg 1."""
    model = tiny(num_classes=10)
    labels = torch.tensor([4, 4])
    with torch.no_grad():
        for net in (model.net, model.ema.module):
            net.fake_latent.copy_(net.class_emb.weight[4:5])
    plain = model.sample(labels, num_iter=4, generator=gen(3))
    for schedule in ("linear", "constant"):
        guided = model.sample(labels, num_iter=4, cfg_scale=3.0, cfg_schedule=schedule, generator=gen(3))
        torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)


def test_cfg_changes_samples_when_uncond_differs():
    model = tiny()
    plain = model.sample(LABELS, num_iter=2, generator=gen(5))
    guided = model.sample(LABELS, num_iter=2, cfg_scale=4.0, generator=gen(5))
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain, atol=1e-4)


def test_uses_ema_weights_by_default():
    model = tiny()
    a = model.sample(LABELS, num_iter=2, generator=gen(6))
    with torch.no_grad():
        model.net.z_proj.weight.add_(1.0)  # only the online network changes
    b = model.sample(LABELS, num_iter=2, generator=gen(6))
    c = model.sample(LABELS, num_iter=2, generator=gen(6), use_ema=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not model.training and not model.net.training


def test_flow_sampler_with_cfg():
    model = tiny(loss="flow")
    out = model.sample(LABELS, num_iter=3, cfg_scale=2.0, generator=gen(7))
    assert out.shape == (3, 16, 4) and torch.isfinite(out).all()


def test_one_iteration_and_seq_len_iterations():
    model = tiny()
    assert torch.isfinite(model.sample(LABELS[:1], num_iter=1, generator=gen(8))).all()
    seen = []
    model.sample(LABELS[:1], num_iter=16, generator=gen(8), callback=lambda s, t, p: seen.append(int(p.sum())))
    assert seen == [1] * 16


def test_bad_arguments():
    model = tiny()
    for bad in (0, -1, 17):
        with pytest.raises(ValueError, match="num_iter"):
            model.sample(LABELS, num_iter=bad)
    with pytest.raises(TypeError, match="num_iter"):
        model.sample(LABELS, num_iter=2.0)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample(LABELS, num_iter=2, cfg_scale=2.0, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="temperature"):
        model.sample(LABELS, num_iter=2, temperature=-1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        model.sample(LABELS, num_iter=2, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        model.sample(torch.tensor([10]), num_iter=2)
    with pytest.raises(TypeError):
        model.sample(torch.tensor([1.0]), num_iter=2)
    with pytest.raises(ValueError):
        model.sample(torch.zeros(2, 2, dtype=torch.long), num_iter=2)
