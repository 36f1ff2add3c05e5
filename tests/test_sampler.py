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


# ------------------------------------------------------------------ the defaults, pinned
def test_defaults_reproduce_the_samples_recorded_before_the_fast_samplers():
    """The default procedure (no sampler option given) draws what main drew before the fast
    samplers existed (tests/sampler_defaults.npz, on fixed seeds: diffusion and flow heads, CFG
    linear and constant, numpy orders, the 100-step DDPM head loop). Bit for bit where the file
    was recorded (same torch, CPU capability and CPU model); elsewhere to float32 rounding."""
    import numpy as np

    import sampler_defaults

    ref = np.load(sampler_defaults.FILE)
    same_env = str(ref["environment"]) == sampler_defaults.environment()
    for name, fn in sampler_defaults.cases().items():
        out = fn().detach().float().numpy()
        assert out.shape == ref[name].shape, name
        if same_env:
            assert np.array_equal(out, ref[name]), (name, np.abs(out - ref[name]).max())
        else:
            scale = max(1.0, float(np.abs(ref[name]).max()))
            np.testing.assert_allclose(out, ref[name], rtol=0, atol=1e-4 * scale, err_msg=name)


# ------------------------------------------------------------------ faster sampling
def _small(loss, steps, seed=1):
    import sampler_defaults

    return sampler_defaults.small_model(loss, seed, num_sampling_steps=steps)


def test_named_official_solvers_equal_the_official_loops():
    """solver="euler" / "ddpm" run djepa's loop (conditions embedded once, time tables kept):
    the official loop's values, to rounding (flow: the whole sampler; diffusion: the head on
    the same x_T and step noise)."""
    model = _small("flow", "12")
    kw = dict(num_iter=4, cfg_scale=2.5, generator=None)
    a = model.sample(LABELS, **dict(kw, generator=gen(3)))
    b = model.sample(LABELS, solver="euler", **dict(kw, generator=gen(3)))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    head = _small("diffusion", "10").net.diffloss
    z = torch.randn(6, head.net.z_channels, generator=gen(4))
    noise = dict(noise=torch.randn(3, 4, generator=gen(5)), step_noise=torch.randn(10, 3, 4, generator=gen(6)))
    for cfg in (1.0, 2.0):
        zz = z if cfg != 1.0 else z[:3]
        official = head.sample(zz, temperature=0.9, cfg_scale=cfg, **noise)
        named = head.sample(zz, temperature=0.9, cfg_scale=cfg, solver="ddpm", **noise)
        torch.testing.assert_close(named, official, rtol=1e-4, atol=1e-4 * official.abs().max().item())


def test_stats_count_what_was_computed():
    """SamplingStats against hooks on the modules: head evaluations and their rows (the head's
    input projection runs once per evaluation), encoder/predictor passes and block rows."""
    from djepa.diffusion.solvers import evaluations
    from djepa.models.sampler import SamplingStats

    for loss, steps, opts in (("flow", "6", {}), ("flow", "6", dict(solver="heun", head_steps=3)),
                              ("diffusion", "5", {}), ("diffusion", "5", dict(solver="dpm++2m", head_steps=4))):
        model = _small(loss, steps)
        net = model.ema.module
        seen = {"head": [], "enc": [], "dec": []}
        hooks = [net.diffloss.net.input_proj.register_forward_hook(lambda m, i, o: seen["head"].append(i[0].shape[0])),
                 net.encoder_blocks[0].register_forward_hook(lambda m, i, o: seen["enc"].append(i[0].shape[:2])),
                 net.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen["dec"].append(i[0].shape[:2]))]
        st = SamplingStats()
        model.sample(LABELS, num_iter=5, cfg_scale=2.0, generator=gen(1), stats=st, **opts)
        for h in hooks:
            h.remove()
        n = opts.get("head_steps", int(steps))
        assert st.iterations == st.encoder_passes == st.predictor_passes == len(seen["enc"]) == 5
        assert st.head_steps == [n] * 5 and st.head_calls == 5
        assert st.head_evaluations == len(seen["head"]) == 5 * evaluations(opts.get("solver", "ddpm"), n)
        assert st.head_rows == sum(seen["head"])
        c = model.config
        assert st.encoder_rows == sum(b * s for b, s in seen["enc"]) * c.depth
        assert st.predictor_rows == sum(b * s for b, s in seen["dec"]) * c.depth


def test_annealing_lowers_the_head_steps_on_its_schedule():
    from djepa.diffusion.solvers import anneal_steps
    from djepa.models import masking
    from djepa.models.sampler import SamplingStats

    model = _small("flow", "12")
    L = model.config.seq_len
    for schedule in ("linear", "cosine"):
        st = SamplingStats()
        model.sample(LABELS, num_iter=6, generator=gen(2), stats=st, solver="heun", head_steps=10,
                     anneal=schedule, min_head_steps=2)
        known, expect = 0, []
        for _, n in masking.mask_len_schedule(L, 6):
            expect.append(anneal_steps(10, known / L, schedule, 2))
            known += n
        assert st.head_steps == expect and expect[0] == 10 and expect[-1] < 10


def test_feature_reuse_is_exact_at_zero_and_skips_tokens_above():
    """feature_reuse=0 reuses nothing: the official trunk's values to rounding (only the
    predictor's last block is restricted to the rows the head reads, fewer rows); a tolerance
    reuses tokens and stays close for a small one."""
    from djepa.models.sampler import SamplingStats

    model = _small("flow", "6")
    kw = dict(num_iter=8, cfg_scale=2.0, solver="euler")
    ref_stats, zero_stats, tol_stats = SamplingStats(), SamplingStats(), SamplingStats()
    ref = model.sample(LABELS, generator=gen(7), stats=ref_stats, **kw)
    zero = model.sample(LABELS, generator=gen(7), stats=zero_stats, feature_reuse=0.0, **kw)
    torch.testing.assert_close(zero, ref, rtol=1e-5, atol=1e-5)
    assert zero_stats.reused_tokens == 0 and zero_stats.encoder_rows == ref_stats.encoder_rows
    # the predictor's last block: only the rows the head reads (every token once, both CFG halves)
    depth, L = model.config.pred_depth, model.config.seq_len
    assert zero_stats.predictor_rows == ref_stats.predictor_rows * (depth - 1) // depth + 2 * len(LABELS) * L
    loose = model.sample(LABELS, generator=gen(7), stats=tol_stats, feature_reuse=0.5, **kw)
    assert tol_stats.reused_tokens > 0 and tol_stats.encoder_rows < ref_stats.encoder_rows
    assert torch.isfinite(loose).all() and not torch.equal(loose, ref)


def test_feature_cache_block_rows_is_the_block():
    """block_rows (queries for some rows, keys over all) equals the Block on those rows."""
    from djepa.models.feature_cache import block_rows

    model = _small("flow", "4")
    blk = model.net.encoder_blocks[0].eval()
    h = torch.randn(3, 7, model.config.embed_dim, generator=gen(8))
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[1, 5:] = False
    rows = torch.tensor([[0, 3], [6, 2], [1, 1]])
    full = blk(h, key_mask)
    torch.testing.assert_close(block_rows(blk, h, rows, key_mask), torch.gather(full, 1, rows[..., None].expand(-1, -1, h.shape[2])),
                               rtol=1e-5, atol=1e-5)


def test_guidance_one_runs_the_conditional_half_only(monkeypatch):
    """An iteration whose guidance scale is exactly 1 runs encoder, predictor and head on the
    conditional half: a schedule at 1 everywhere gives the unguided sample, bit for bit."""
    from djepa.models import sampler
    from djepa.models.sampler import SamplingStats

    model = _small("flow", "4")
    plain_stats, st = SamplingStats(), SamplingStats()
    plain = model.sample(LABELS, num_iter=4, generator=gen(9), stats=plain_stats)
    monkeypatch.setattr(sampler, "_cfg_iter", lambda *a: 1.0)
    guided = model.sample(LABELS, num_iter=4, cfg_scale=3.0, generator=gen(9), stats=st)
    assert torch.equal(guided, plain) and st.uncond_skipped == 4 and plain_stats.uncond_skipped == 0
    for field in ("head_rows", "encoder_rows", "predictor_rows"):
        assert getattr(st, field) == getattr(plain_stats, field), field


def test_cfg_refresh_caches_the_unconditional_half(monkeypatch):
    """cfg_refresh=n runs the unconditional trunk half on every n-th iteration; in between the
    head gets cond + the cached guidance residual. With the fake class equal to the class, the
    residual is 0 and the guided sample is the plain one; the stats count the cached halves."""
    from djepa.models.sampler import SamplingStats

    model = _small("flow", "4")
    kw = dict(num_iter=6, cfg_scale=3.0, solver="euler")
    st = SamplingStats()
    out = model.sample(LABELS, generator=gen(3), stats=st, cfg_refresh=3, **kw)
    assert st.uncond_cached == 4 and torch.isfinite(out).all()  # iterations 1, 2, 4, 5
    full = SamplingStats()
    ref = model.sample(LABELS, generator=gen(3), stats=full, **kw)
    assert st.encoder_rows < full.encoder_rows and st.head_rows == full.head_rows
    assert not torch.equal(out, ref)
    # the feature cache at 0 is exact, so its predictor rows must cover every row the residual is read at
    zero = model.sample(LABELS, generator=gen(3), cfg_refresh=3, feature_reuse=0.0, **kw)
    torch.testing.assert_close(zero, out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for net in (model.net, model.ema.module):
            net.fake_latent.copy_(net.class_emb.weight[3:4])
    labels = torch.tensor([3, 3])
    plain = model.sample(labels, generator=gen(4), num_iter=6, solver="euler")
    for reuse in (None, 0.0):
        cached = model.sample(labels, generator=gen(4), cfg_refresh=2, feature_reuse=reuse, **kw)
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


def test_fast_options_resolve_and_bad_ones_are_refused():
    from djepa.models.sampler import FAST, SamplingStats, resolve_options

    assert resolve_options("flow", fast=True) == FAST["flow"]
    assert resolve_options("flow", fast=True, head_steps=5).head_steps == 5
    assert resolve_options("diffusion").official and not FAST["diffusion"].official
    model = _small("flow", "6")
    st = SamplingStats()
    model.sample(LABELS, num_iter=4, fast=True, generator=gen(1), stats=st)
    assert st.head_steps == [FAST["flow"].head_steps] * 4
    assert st.uncond_cached == 0  # cfg_scale 1: no unconditional half to cache
    bad = [(dict(solver="ddim"), "solver must be one of"), (dict(eta=0.5), "eta"),
           (dict(solver="heun", eta=0.5), "eta"), (dict(anneal="exp"), "anneal"),
           (dict(head_steps=0), "head_steps"), (dict(head_steps=4, min_head_steps=5), "min_head_steps"),
           (dict(feature_reuse=-1.0), "feature_reuse"), (dict(feature_reuse=float("nan")), "feature_reuse"),
           (dict(cfg_refresh=0), "cfg_refresh")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            model.sample(LABELS, num_iter=2, **kw)
    dmodel = _small("diffusion", "4")
    with pytest.raises(ValueError, match="solver must be one of"):
        dmodel.sample(LABELS, num_iter=2, solver="heun")


# ------------------------------------------------------------------ the fused loop and its graph
@pytest.mark.parametrize("solver,eta,cfg_scale", [("ddim", 0.0, 2.5), ("ddim", 0.6, 1.0), ("dpm++2m", 0.0, 2.5)])
def test_new_solvers_on_the_fused_loop_and_its_graph(triton_device, monkeypatch, solver, eta, cfg_scale):
    """DDIM and DPM-Solver++ through the fused steps (Triton kernels; on the CPU, under the
    interpreter), captured as a graph (the CPU stand-in of the CUDA graph, under the capture
    guard), equal the eager plan loop (float32); a second call with new conditions, noise and
    scale replays the graph and equals the ungraphed fused loop exactly."""
    from test_denoise import _RerunCapture

    from djepa.diffusion import sample, sampler
    from djepa.nn import DenoisingMLP

    g = torch.Generator().manual_seed(31)
    torch.manual_seed(31)
    mlp = DenoisingMLP(4, 32, 8, 6, 2)
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    mlp = mlp.to(triton_device)
    B, steps = 3, 3
    stochastic = solver == "ddim" and eta > 0
    monkeypatch.setattr(sampler, "_GRAPH_DEVICE_TYPES", (triton_device.type,))
    monkeypatch.setattr(sampler, "_CAPTURE", _RerunCapture)
    monkeypatch.setattr(sampler, "_GRAPHS", type(sampler._GRAPHS)())
    _RerunCapture.made.clear()

    def inputs(scale):
        z = torch.randn(2 * B if cfg_scale != 1 else B, 6, generator=g).to(triton_device)
        sn = torch.randn(steps, B, 4, generator=g).to(triton_device) if stochastic else None
        return z, dict(steps=steps, temperature=0.9, cfg_scale=scale, noise=torch.randn(B, 4, generator=g).to(triton_device),
                       step_noise=sn, solver=solver, eta=eta)

    z, kw = inputs(cfg_scale)
    graphed = sample(mlp, z, backend="triton", **kw)
    eager = sample(mlp, z, backend="eager", **kw)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=2e-4 * max(1.0, eager.abs().max().item()))
    z, kw = inputs(cfg_scale + 1.0 if cfg_scale != 1 else 1.0)
    torch.testing.assert_close(sample(mlp, z, backend="triton", **kw),
                               sample(mlp, z, backend="triton", cuda_graph=False, **kw), rtol=0, atol=0)
    assert len(_RerunCapture.made) == 1


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from djepa.cli import main

    out = tmp_path_factory.mktemp("sampling") / "run"
    small = ["--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2", "--set", "diffloss_depth=1",
             "--set", "diffloss_width=32", "--set", "num_sampling_steps=12", "--set", "class_tokens=2"]
    assert main(["train", "--out", str(out), "--steps", "2", "--batch-size", "8", "--no-progress", *small]) == 0
    return out


def test_cli_sample_report_and_fast_flags(small_run, tmp_path, capsys):
    """`djepa sample` writes its JSON report beside the npz (settings, sampling seconds, passes
    and head evaluations); --fast and the solver flags reach the sampler; a flag the model's head
    cannot take is one line and exit status 2."""
    import json

    from djepa.cli import main
    from djepa.models.sampler import FAST

    base = ["sample", "--ckpt", str(small_run), "--labels", "1,3", "--n", "2", "--num-iter", "4", "--cfg", "2.0",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert "head evaluations" in capsys.readouterr().out
    official = json.load(open(tmp_path / "a.json"))
    assert official["settings"]["sampler"]["official"] and official["settings"]["n_samples"] == 4
    assert official["sampling_seconds"] > 0
    counts = official["counts"]
    assert counts["encoder_passes"] == counts["predictor_passes"] == 4
    assert counts["head_evaluations"] == 4 * 12 and counts["head_steps"] == [12] * 4
    assert main(base + ["--fast", "--head-steps", "3", "--out", str(tmp_path / "b.png")]) == 0
    fast = json.load(open(tmp_path / "b.json"))
    s = fast["settings"]["sampler"]
    assert s["fast"] and s["solver"] == FAST["flow"].solver and s["head_steps"] == 3
    assert s["cfg_refresh"] == FAST["flow"].cfg_refresh and fast["counts"]["uncond_cached"] > 0
    assert fast["counts"]["head_steps"][0] == 3 and fast["counts"]["head_evaluations"] < counts["head_evaluations"]
    assert main(base + ["--solver", "midpoint", "--head-steps", "3", "--out", str(tmp_path / "c.png")]) == 0
    assert json.load(open(tmp_path / "c.json"))["counts"]["head_evaluations"] == 4 * 6
    capsys.readouterr()
    for flags, match in ((["--solver", "ddim"], "solver must be one of"), (["--eta", "0.5"], "eta"),
                         (["--head-steps", "0"], "--head-steps"), (["--feature-reuse", "-1"], "--feature-reuse")):
        assert main(base + flags + ["--out", str(tmp_path / "d.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_cli_eval_passes_the_sampler_flags_and_evaluate_records_them(small_run, monkeypatch):
    """`djepa eval --fast --head-steps 5` hands evaluate() the sampler options (its probes take
    minutes, so it is stopped there); timed_generate and sampler_settings are what evaluate
    records: seconds, the SamplingStats and the resolved settings."""
    import djepa.evaluate
    from djepa.cli import main
    from djepa.evaluate import sampler_settings, timed_generate
    from djepa.models.sampler import FAST
    from djepa.train import load_checkpoint, make_tokenizer

    class Stop(Exception):
        pass

    seen = {}

    def spy(*args, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(djepa.evaluate, "evaluate", spy)
    with pytest.raises(Stop):
        main(["eval", "--ckpt", str(small_run), "--num-iter", "2", "--fast", "--head-steps", "5", "--no-progress"])
    assert seen["sampler"] == {"fast": True, "head_steps": 5}
    model, state = load_checkpoint(str(small_run))
    tok = make_tokenizer(state["data"]["channels"], state["data"]["patch_size"])
    images, seconds, stats = timed_generate(model, tok, torch.tensor([0, 1]), state["data"]["image_size"],
                                            num_iter=2, sampler=seen["sampler"])
    assert images.shape == (2, 1, 8, 8) and seconds > 0 and stats["head_steps"][0] == 5
    assert 0 < stats["cpu_seconds"] < 60
    settings = sampler_settings(model, seen["sampler"])
    assert settings["fast"] and settings["solver"] == FAST["flow"].solver and settings["head_steps"] == 5
    assert sampler_settings(model)["official"]
