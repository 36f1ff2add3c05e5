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
    seen, states = [], []
    out = model.sample(LABELS, num_iter=num_iter, generator=gen(0),
                       callback=lambda step, tokens, pred: (seen.append(pred.clone()), states.append(tokens.clone())))
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
    # tokens predicted at an iteration are unchanged afterwards; the others are still empty
    done = torch.zeros_like(stacked[0])
    for pred, state in zip(seen, states):
        done |= pred
        assert torch.equal(state[done], out[done])
        assert (state[~done] == 0).all() and (state[pred] != 0).all()
    assert torch.equal(states[-1], out)


def test_deterministic_for_a_seed():
    model = tiny()
    a = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(1))
    b = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(1))
    c = model.sample(LABELS, num_iter=3, temperature=0.9, generator=gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def _record_head(model, monkeypatch):
    """Replace the sampling net's diffusion-head sampler with a bounded stand-in that records
    what the sampler gives it: (z, cfg_scale) per iteration. Its tokens depend on the
    conditional half of z only, so a correct CFG wiring reproduces the unguided run."""
    calls = []
    C = model.config.token_channels

    def head(z, temperature=1.0, cfg_scale=1.0, generator=None):
        calls.append((z.detach().double().clone(), float(cfg_scale)))
        n = z.shape[0] // 2 if float(cfg_scale) != 1.0 else z.shape[0]
        return torch.tanh(0.5 * z[:n, :C].float())

    monkeypatch.setattr(model.ema.module.diffloss, "sample", head)
    return calls


def test_cfg_doubles_the_batch_with_the_fake_class_and_follows_the_schedule(monkeypatch):
    """With the fake class equal to the class embedding, the unconditional half the sampler
    builds must equal the conditional half, the conditional half must be the unguided run's z,
    and the scale must follow MAR's schedule: linear 1 + (cfg - 1) (L - mask_len) / L, or
    constant. Checked on bounded values (predictor features), not on float32 luck."""
    model = tiny(num_classes=10)
    L = model.config.seq_len
    labels = torch.tensor([4, 4])
    with torch.no_grad():
        for net in (model.net, model.ema.module):
            net.fake_latent.copy_(net.class_emb.weight[4:5])
    calls = _record_head(model, monkeypatch)
    num_iter, cfg = 4, 3.0
    plain = model.sample(labels, num_iter=num_iter, generator=gen(3))
    plain_calls = list(calls)
    assert [s for _, s in plain_calls] == [1.0] * num_iter
    schedule = masking.mask_len_schedule(L, num_iter)
    for kind in ("linear", "constant"):
        calls.clear()
        guided = model.sample(labels, num_iter=num_iter, cfg_scale=cfg, cfg_schedule=kind, generator=gen(3))
        assert len(calls) == num_iter
        for step, ((z, scale), (z_plain, _)) in enumerate(zip(calls, plain_calls)):
            n = z_plain.shape[0]
            assert z.shape[0] == 2 * n
            torch.testing.assert_close(z[n:], z[:n], rtol=1e-4, atol=1e-4)   # uncond == cond here
            torch.testing.assert_close(z[:n], z_plain, rtol=1e-4, atol=1e-4)  # cond half = unguided z
            mask_len = schedule[step][0]
            expect = 1.0 + (cfg - 1.0) * (L - mask_len) / L if kind == "linear" else cfg
            assert scale == pytest.approx(expect, rel=1e-12), (kind, step, scale, expect)
        torch.testing.assert_close(guided, plain, rtol=1e-4, atol=1e-4)


def test_cfg_head_reproduces_the_conditional_sample_when_uncond_is_cond():
    """The diffusion head's guided loop with z = [c; c] equals its unguided loop on c (float64,
    where the property holds to rounding: eps_u + s (eps_c - eps_u) = eps_c)."""
    model = tiny()
    head = model.net.diffloss.double()
    z = torch.randn(5, model.config.pred_embed_dim, generator=gen(4), dtype=torch.float64)
    steps, C = head.num_sampling_steps, head.token_channels
    noise = dict(noise=torch.randn(5, C, generator=gen(11), dtype=torch.float64),
                 step_noise=torch.randn(steps, 5, C, generator=gen(12), dtype=torch.float64))
    plain = head.sample(z, **noise)
    guided = head.sample(torch.cat([z, z]), cfg_scale=3.0, **noise)
    assert plain.dtype == torch.float64 and guided.shape == plain.shape
    scale = plain.abs().max().item()
    assert (guided - plain).abs().max().item() <= 1e-9 * max(1.0, scale)
    # and guidance does change the sample when the unconditional half differs
    other = head.sample(torch.cat([z, z.flip(0)]), cfg_scale=3.0, **noise)
    assert (other - plain).abs().max().item() > 1e-3 * max(1.0, scale)


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


def _flow_euler(head, z, x0, steps, cfg_scale=1.0):
    """Flow matching's Euler loop written out (float64): v = net(x, 1000 t, c), guided
    v = v_u + s (v_c - v_u) with both halves evaluated at the conditional state."""
    x, n = x0.clone(), x0.shape[0]
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        t = torch.full((n,), t0 * 1000.0, dtype=x.dtype)
        v = head.net(x, t, z[:n])
        if cfg_scale != 1.0:
            v_u = head.net(x, t, z[n:])
            v = v_u + cfg_scale * (v - v_u)
        x = x + (t1 - t0) * v
    return x


def test_flow_head_sampling_values_with_temperature_and_cfg():
    model = tiny(loss="flow")
    head = model.net.diffloss.double()
    steps, C = head.num_sampling_steps, head.token_channels
    z = torch.randn(6, model.config.pred_embed_dim, generator=gen(13), dtype=torch.float64)
    x0 = torch.randn(3, C, generator=gen(14), dtype=torch.float64)
    for tau in (1.0, 0.3):
        plain = head.sample(z[:3], temperature=tau, noise=x0)
        torch.testing.assert_close(plain, _flow_euler(head, z[:3], tau * x0, steps), rtol=1e-10, atol=1e-12)
        guided = head.sample(z, cfg_scale=2.5, temperature=tau, noise=x0)
        want = _flow_euler(head, z, tau * x0, steps, cfg_scale=2.5)
        torch.testing.assert_close(guided, want, rtol=1e-10, atol=1e-12)
        assert (guided - plain).abs().max() > 1e-3  # the unconditional half differs here
    # drawn noise (float32 head): the generator's first randn(M, C), scaled the same way
    head32 = tiny(loss="flow").net.diffloss
    drawn = head32.sample(z[:3].float(), temperature=0.5, generator=gen(15))
    given = head32.sample(z[:3].float(), temperature=0.5, noise=torch.randn(3, C, generator=gen(15)))
    assert torch.equal(drawn, given)


def test_flow_sampler_with_cfg():
    model = tiny(loss="flow")
    out = model.sample(LABELS, num_iter=3, cfg_scale=2.0, generator=gen(7))
    assert out.shape == (3, 16, 4) and torch.isfinite(out).all()
    plain = model.sample(LABELS, num_iter=3, generator=gen(7))
    assert (out - plain).abs().max() > 1e-4
    cold = model.sample(LABELS, num_iter=3, temperature=0.1, generator=gen(7))
    assert (cold - plain).abs().max() > 1e-4  # temperature is not ignored


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
