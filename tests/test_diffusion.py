"""djepa.diffusion checked against the formulas (written out here, independently of the code):
the cosine schedule, respacing, the posterior q(x_{t-1} | x_t, x_0) derived from the joint
Gaussian, learned-range variance, the MSE + VB training loss, and flow matching's Euler loop."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from djepa.diffusion import FlowMatching, create_diffusion, get_named_beta_schedule, space_timesteps

T = 1000


def _cosine_abar(t):
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


# ------------------------------------------------------------------------------- schedules
def test_cosine_betas_follow_iddpm():
    i = np.arange(T, dtype=np.float64)
    expected = np.minimum(1 - _cosine_abar((i + 1) / T) / _cosine_abar(i / T), 0.999)
    betas = get_named_beta_schedule("cosine", T)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999 and np.all(np.diff(betas) > 0)
    # alpha_bar(t) of the discrete chain = the continuous schedule normalised by alpha_bar(0)
    np.testing.assert_allclose(np.cumprod(1 - betas)[:-1], _cosine_abar((i[:-1] + 1) / T) / _cosine_abar(0.0),
                               rtol=1e-9)


def test_linear_betas():
    np.testing.assert_allclose(get_named_beta_schedule("linear", T), np.linspace(1e-4, 0.02, T), rtol=1e-12)


@pytest.mark.parametrize("count", [1, 2, 50, 100, 250, 1000])
def test_space_timesteps_one_section(count):
    stride = 0 if count == 1 else (T - 1) / (count - 1)
    expected = {round(k * stride) for k in range(count)}
    kept = space_timesteps(T, str(count))
    assert kept == expected and len(kept) == count
    if count > 1:
        assert min(kept) == 0 and max(kept) == T - 1


def test_space_timesteps_sections():
    # "10,20": 10 steps from [0, 500), 20 from [500, 1000), each section's ends included
    kept = space_timesteps(T, "10,20")
    first = {round(k * 499 / 9) for k in range(10)}
    second = {500 + round(k * 499 / 19) for k in range(20)}
    assert kept == first | second


@pytest.mark.parametrize("n", [50, 100, 250, 1000])
def test_respaced_betas_and_timestep_map(n):
    """MAR's create_diffusion(str(n)): kept steps t_k = round(k (T-1)/(n-1)); new betas
    1 - abar[t_k] / abar[t_{k-1}] (abar[t_{-1}] = 1); the model sees the original t_k."""
    abar = np.cumprod(1 - get_named_beta_schedule("cosine", T))
    kept = sorted({round(k * (T - 1) / (n - 1)) for k in range(n)})
    prev = np.append(1.0, abar[kept][:-1])
    d = create_diffusion(str(n))
    assert d.timestep_map == kept
    np.testing.assert_allclose(d.betas, 1 - abar[kept] / prev, rtol=1e-12, atol=1e-15)
    if n == T:
        np.testing.assert_allclose(d.betas, get_named_beta_schedule("cosine", T), rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(d.model_timesteps(torch.tensor([0, n // 2, n - 1])).numpy(),
                                  [kept[0], kept[n // 2], kept[n - 1]])
    # the default (empty) respacing keeps the whole training schedule
    assert create_diffusion("").timestep_map == list(range(T))


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=T))
def test_respacing_keeps_alpha_bar_at_the_kept_steps(n):
    d = create_diffusion(str(n))
    abar = np.cumprod(1 - get_named_beta_schedule("cosine", T))
    assert d.num_timesteps == n and len(d.timestep_map) == n
    assert d.timestep_map == sorted(space_timesteps(T, str(n)))
    np.testing.assert_allclose(d.alphas_cumprod, abar[d.timestep_map], rtol=1e-7)  # abar_T ~ 2e-9: rounding
    assert np.all((d.betas > 0) & (d.betas <= 1))


# ------------------------------------------------------------------------ posterior, q, p
@pytest.mark.parametrize("steps", ["1000", "100", "7"])
def test_posterior_is_the_gaussian_conditional_of_the_joint(steps):
    """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) e1,  x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e2:
    E[x_{t-1} | x_t, x0] and Var[x_{t-1} | x_t, x0] by Gaussian conditioning."""
    d = create_diffusion(steps)
    abar = d.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    beta = d.betas
    alpha = 1 - beta
    cov = np.sqrt(alpha) * (1 - abar_prev)            # Cov(x_{t-1}, x_t | x0)
    var_t = 1 - abar                                   # Var(x_t | x0)
    gain = cov / var_t
    # mean = sqrt(abar_prev) x0 + gain (x_t - sqrt(abar) x0) = coef1 x0 + coef2 x_t
    np.testing.assert_allclose(d.posterior_mean_coef2, gain, rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef1, np.sqrt(abar_prev) - gain * np.sqrt(abar), rtol=1e-8,
                               atol=1e-12)
    np.testing.assert_allclose(d.posterior_variance, (1 - abar_prev) - cov ** 2 / var_t, rtol=1e-8, atol=1e-15)
    # log variance: clipped at t = 0 (where the variance is 0) to the value at t = 1
    if d.num_timesteps > 1:
        assert d.posterior_variance[0] == 0
        np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
        assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]))


def test_q_sample_and_p_mean_variance_from_the_formulas():
    d = create_diffusion("50")
    g = torch.Generator().manual_seed(0)
    M, C = 6, 3
    x0 = torch.randn(M, C, generator=g, dtype=torch.float64)
    noise = torch.randn(M, C, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 20, 48, 49])
    abar = torch.as_tensor(d.alphas_cumprod)[t][:, None]
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-12, atol=1e-12)

    eps = torch.randn(M, C, generator=g, dtype=torch.float64)
    v = torch.rand(M, C, generator=g, dtype=torch.float64) * 2 - 1
    out = d.p_mean_variance_from_output(torch.cat([eps, v], 1), xt, t)
    pred_x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(out["pred_xstart"], pred_x0, rtol=1e-9, atol=1e-9)
    c1 = torch.as_tensor(d.posterior_mean_coef1)[t][:, None]
    c2 = torch.as_tensor(d.posterior_mean_coef2)[t][:, None]
    torch.testing.assert_close(out["mean"], c1 * pred_x0 + c2 * xt, rtol=1e-9, atol=1e-9)
    frac = (v + 1) / 2
    max_log = torch.log(torch.as_tensor(d.betas))[t][:, None]
    min_log = torch.as_tensor(d.posterior_log_variance_clipped)[t][:, None]
    torch.testing.assert_close(out["log_variance"], frac * max_log + (1 - frac) * min_log)

    # the fused step's scalars give the same mean: coef_x * x - coef_eps * eps
    for row, i in enumerate(t.tolist()):
        coef_x, coef_eps, lo, hi, noise_scale = d.step_coefficients(i, temperature=0.7)
        torch.testing.assert_close(coef_x * xt[row] - coef_eps * eps[row], out["mean"][row], rtol=1e-9, atol=1e-9)
        assert (lo, hi) == pytest.approx((float(min_log[row, 0]), float(max_log[row, 0])))
        assert noise_scale == (0.0 if i == 0 else 0.7)


def test_p_sample_loop_without_noise_is_the_product_of_the_step_coefficients():
    """eps = 0 and temperature 0: every step is x <- coef_x(i) x, so x_0 = prod_i coef_x(i) x_T."""
    d = create_diffusion("20")
    x_T = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    x0 = d.p_sample_loop(model, x_T.shape, noise=x_T, temperature=0.0)
    factor = np.prod([d.step_coefficients(i)[0] for i in range(d.num_timesteps)])
    torch.testing.assert_close(x0, factor * x_T, rtol=1e-9, atol=1e-12)


def _toy_model(timesteps_seen):
    """eps = 0.3 x + 1e-3 t, v = tanh(x + 1e-3 t) (in [-1, 1]) with t the timestep the model is given."""
    def model(x, t):
        timesteps_seen.append(t.clone())
        tt = t.to(x.dtype)[:, None] * 1e-3
        return torch.cat([0.3 * x + tt, torch.tanh(x + tt)], 1)
    return model


def test_p_sample_loop_against_a_hand_written_loop():
    """Reverse loop from the formulas: the model sees the original timesteps, x_{i-1} =
    mean + exp(logvar / 2) * temperature * noise_k (no noise at i = 0), step k draws step_noise[k]."""
    n, M, C, temp = 10, 5, 3, 0.8
    d = create_diffusion(str(n))
    g = torch.Generator().manual_seed(6)
    x_T = torch.randn(M, C, generator=g, dtype=torch.float64)
    step_noise = torch.randn(n, M, C, generator=g, dtype=torch.float64)
    seen = []
    got = d.p_sample_loop(_toy_model(seen), (M, C), noise=x_T, step_noise=step_noise, temperature=temp)
    assert [int(t[0]) for t in seen] == d.timestep_map[::-1] and all((t == t[0]).all() for t in seen)

    abar = d.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    x = x_T.clone()
    for k, i in enumerate(range(n - 1, -1, -1)):
        out = _toy_model([])(x, torch.full((M,), d.timestep_map[i]))
        eps, v = out[:, :C], out[:, C:]
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        mean = (d.betas[i] * math.sqrt(abar_prev[i]) * x0
                + (1 - abar_prev[i]) * math.sqrt(1 - d.betas[i]) * x) / (1 - abar[i])
        post_var = d.betas[i] * (1 - abar_prev[i]) / (1 - abar[i])
        min_log = math.log(post_var if i > 0 else d.betas[1] * (1 - abar[0]) / (1 - abar[1]))
        logvar = (v + 1) / 2 * math.log(d.betas[i]) + (1 - v) / 2 * min_log
        x = mean + (torch.exp(0.5 * logvar) * temp * step_noise[k] if i > 0 else 0)
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)
    # the last step adds no noise: changing its noise changes nothing, the one before does
    sn = step_noise.clone()
    sn[-1] += 1.0
    torch.testing.assert_close(d.p_sample_loop(_toy_model([]), (M, C), noise=x_T, step_noise=sn, temperature=temp),
                               got, rtol=0, atol=0)
    sn[-2] += 1.0
    assert not torch.allclose(d.p_sample_loop(_toy_model([]), (M, C), noise=x_T, step_noise=sn,
                                              temperature=temp), got)


def test_fixed_large_variance_without_learned_sigma():
    """learn_sigma=False (IDDPM's fixed-large): log variance log(beta_t), with beta_0 replaced by
    the posterior variance at t = 1; the model outputs C channels; the VB term is zero."""
    d = create_diffusion("20", learn_sigma=False)
    post1 = d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1])
    x = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 19])
    out = d.p_mean_variance_from_output(torch.zeros_like(x), x, t)
    expected = torch.log(torch.tensor([post1, d.betas[1], d.betas[19]], dtype=torch.float64))
    torch.testing.assert_close(out["log_variance"], expected[:, None].expand(3, 2))
    terms = d.training_losses(lambda xt, ts: torch.zeros_like(xt), x, t, noise=torch.ones_like(x))
    assert terms["vb"].abs().max() == 0
    torch.testing.assert_close(terms["loss"], torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------ training loss
def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (torch.exp(lv1) + (m1 - m2) ** 2) / torch.exp(lv2) - 1)


def test_training_loss_is_mse_plus_vb_in_bits():
    d = create_diffusion("")  # the 1000-step training schedule
    g = torch.Generator().manual_seed(2)
    M, C = 5, 4
    x0 = torch.rand(M, C, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(M, C, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 999])
    out = torch.randn(M, 2 * C, generator=g, dtype=torch.float64).clamp(-1, 1)
    terms = d.training_losses(lambda x, ts: out, x0, t, noise=noise)
    eps, v = out[:, :C], out[:, C:]
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(1))

    xt = d.q_sample(x0, t, noise)
    abar = torch.as_tensor(d.alphas_cumprod)[t][:, None]
    abar_prev = torch.as_tensor(np.append(1.0, d.alphas_cumprod[:-1]))[t][:, None]
    beta = torch.as_tensor(d.betas)[t][:, None]
    true_mean = (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * xt) / (1 - abar)
    true_lv = torch.as_tensor(d.posterior_log_variance_clipped)[t][:, None].expand(M, C)
    pred_x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
    model_mean = (beta * abar_prev.sqrt() * pred_x0 + (1 - abar_prev) * (1 - beta).sqrt() * xt) / (1 - abar)
    frac = (v + 1) / 2
    model_lv = frac * beta.log() + (1 - frac) * true_lv
    kl_bits = _normal_kl(true_mean, true_lv, model_mean, model_lv).mean(1) / math.log(2)
    torch.testing.assert_close(terms["vb"][1:], kl_bits[1:], rtol=1e-8, atol=1e-10)
    # t = 0: negative log-likelihood of x0 under the Gaussian discretised to 256 bins (exact CDF here;
    # the code uses IDDPM's tanh approximation of it, so compare loosely)
    std = torch.exp(0.5 * model_lv[0])
    cdf = lambda z: torch.special.ndtr(z)  # noqa: E731
    hi = torch.where(x0[0] > 0.999, torch.ones_like(std), cdf((x0[0] + 1 / 255 - model_mean[0]) / std))
    lo = torch.where(x0[0] < -0.999, torch.zeros_like(std), cdf((x0[0] - 1 / 255 - model_mean[0]) / std))
    nll_bits = -(torch.log(hi - lo)).mean() / math.log(2)
    assert float(terms["vb"][0]) == pytest.approx(float(nll_bits), rel=2e-2)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def _tanh_cdf(z):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def test_t0_term_is_the_discretized_gaussian_nll_with_iddpm_cdf():
    """At t = 0 the VB term is -log P(bin of x0) in bits under N(model mean, model variance):
    bins of width 2/255 around x0, the outer bins open at -1 and 1, CDF by IDDPM's tanh formula."""
    d = create_diffusion("")
    g = torch.Generator().manual_seed(7)
    C = 6
    x0 = torch.tensor([[-1.0, 1.0, 0.0, 0.3, -0.5, 0.999]], dtype=torch.float64)
    noise = torch.randn(1, C, generator=g, dtype=torch.float64)
    out = torch.cat([torch.randn(1, C, generator=g, dtype=torch.float64), torch.rand(1, C, generator=g) * 2 - 1], 1)
    t = torch.tensor([0])
    vb = d.training_losses(lambda x, ts: out, x0, t, noise=noise)["vb"]
    b0 = d.betas[0]
    xt = math.sqrt(1 - b0) * x0 + math.sqrt(b0) * noise
    eps, v = out[:, :C], out[:, C:]
    pred_x0 = (xt - math.sqrt(b0) * eps) / math.sqrt(1 - b0)
    mean = pred_x0  # at t = 0: coef1 = 1, coef2 = 0 (abar_prev = 1)
    min_log = math.log(d.betas[1] * b0 / (1 - d.alphas_cumprod[1]))
    logvar = (v + 1) / 2 * math.log(b0) + (1 - v) / 2 * min_log
    inv_std = torch.exp(-0.5 * logvar)
    upper = _tanh_cdf(inv_std * (x0 - mean + 1 / 255))
    lower = _tanh_cdf(inv_std * (x0 - mean - 1 / 255))
    p = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    nll_bits = -torch.log(p.clamp(min=1e-12)).mean(1) / math.log(2)
    torch.testing.assert_close(vb, nll_bits, rtol=1e-9, atol=1e-9)


def test_vb_term_trains_only_the_variance():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, generator=g, dtype=torch.float64)
    out = torch.randn(4, 6, generator=g, dtype=torch.float64).clamp(-1, 1).requires_grad_()
    d.training_losses(lambda x, ts: out, x0, torch.tensor([3, 30, 300, 900]))["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


# ------------------------------------------------------------------------------ flow matching
def test_flow_matching_path_and_velocity_target():
    fm = FlowMatching()
    g = torch.Generator().manual_seed(4)
    x1, x0 = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    t = torch.rand(8, generator=g)
    seen = {}

    def model(xt, tt):
        seen["xt"], seen["t"] = xt, tt
        return x1 - x0  # the exact velocity of the linear path

    loss = fm.training_losses(model, x1, noise=x0, t=t)["loss"]
    torch.testing.assert_close(seen["xt"], t[:, None] * x1 + (1 - t[:, None]) * x0)
    assert torch.equal(seen["t"], t) and loss.abs().max() == 0
    wrong = fm.training_losses(lambda xt, tt: torch.zeros_like(xt), x1, noise=x0, t=t)["loss"]
    torch.testing.assert_close(wrong, ((x1 - x0) ** 2).mean(1))


@pytest.mark.parametrize("shift", [None, 3.0])
def test_flow_euler_on_a_known_linear_field(shift):
    """v(x, t) = a * x: Euler over the (shifted) grid t_0..t_N gives x_N = prod (1 + a dt_i) x_0."""
    fm = FlowMatching(time_shift=shift)
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    steps = 16
    grid = np.linspace(0, 1, steps + 1)
    if shift is not None:
        grid = grid / (grid + shift - shift * grid)
    factor = torch.as_tensor(np.prod([1 + a.numpy() * (grid[i + 1] - grid[i]) for i in range(steps)], axis=0))
    x = fm.sample(lambda x, t: a * x, x0.shape, steps, noise=x0)
    torch.testing.assert_close(x, factor * x0, rtol=1e-10, atol=1e-12)
    # and towards the ODE's solution exp(a) x_0 as the steps grow
    fine = fm.sample(lambda x, t: a * x, x0.shape, 4000, noise=x0)
    torch.testing.assert_close(fine, torch.exp(a) * x0, rtol=2e-3, atol=1e-6)


def test_time_shift_formula():
    fm = FlowMatching(time_shift=3.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(fm.shift(t), t / (t + 3 - 3 * t))
    assert float(fm.shift(torch.tensor(0.5))) == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(ValueError, match=">= 1"):
        get_named_beta_schedule("cosine", 0)
    with pytest.raises(ValueError, match="schedule"):
        get_named_beta_schedule("sqrt", 10)
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="comma-separated"):
        space_timesteps(10, "ten")
    with pytest.raises(ValueError, match=">= 1 step"):
        space_timesteps(10, [3, 0])
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatching(time_shift=-1.0)
    with pytest.raises(ValueError, match="steps"):
        FlowMatching().sample(lambda x, t: x, (2, 2), 0)
    with pytest.raises(ValueError, match="noise"):
        FlowMatching().training_losses(lambda x, t: x, torch.zeros(2, 2), noise=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="model returned"):
        FlowMatching().training_losses(lambda x, t: x[:, :1], torch.zeros(2, 2))
    d = create_diffusion("10")
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            d.p_sample_loop(lambda x, t: torch.cat([x, x], 1), (2, 2), temperature=bad)
    with pytest.raises(ValueError, match="timesteps"):
        d.training_losses(lambda x, t: torch.cat([x, x], 1), torch.zeros(2, 2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected"):
        d.training_losses(lambda x, t: x, torch.zeros(2, 2), torch.tensor([0, 1]))


def test_sampler_bad_input():
    """djepa.diffusion.sample refuses bad steps / temperature / cfg_scale before any work."""
    from djepa.diffusion import sample
    from djepa.nn import DenoisingMLP

    mlp = DenoisingMLP(2, 8, 4, 3, 1)
    z = torch.randn(4, 3)
    for steps in (0, -3, 1001, 2.5, True, "10"):
        with pytest.raises(ValueError, match="steps"):
            sample(mlp, z, steps=steps, backend="eager")
    for name in ("temperature", "cfg_scale"):
        for bad in (float("nan"), float("inf"), -0.5):
            with pytest.raises(ValueError, match=name):
                sample(mlp, z, steps=2, backend="eager", **{name: bad})
    # the edges that are allowed: one step, temperature 0 (deterministic), cfg 1 with odd rows
    a = sample(mlp, torch.randn(3, 3), steps=1, temperature=0.0, backend="eager",
               generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 2) and torch.isfinite(a).all()


def test_flow_temperature_scales_the_initial_noise():
    """On v(x, t) = a * x the Euler result is linear in x_0: temperature tau gives tau times the
    tau = 1 result; tau = 0 starts (and stays) at 0; a bad tau is refused."""
    fm = FlowMatching()
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    factor = torch.as_tensor(np.prod([1 + a.numpy() / 8] * 8, axis=0))
    for tau in (1.0, 0.1, 0.0):
        x = fm.sample(lambda x, t: a * x, x0.shape, 8, noise=x0, temperature=tau)
        torch.testing.assert_close(x, factor * tau * x0, rtol=1e-12, atol=1e-15)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            fm.sample(lambda x, t: a * x, x0.shape, 8, noise=x0, temperature=bad)


# ------------------------------------------------------------------------------ head solvers
# Gaussian data x0 ~ N(mu, s^2) per channel: the exact eps is known in closed form, and the
# probability-flow ODE keeps the standardised value z = (x_t - sqrt(abar_t) mu) / sqrt(v_t),
# v_t = abar_t s^2 + 1 - abar_t, of every sample. The solvers end on the data prediction at the
# last kept step t_0 = 0 (abar_0 < 1): E[x0 | x_0] = mu + sqrt(abar_0) s^2 z / sqrt(v_0).
# Independent of djepa's plan arithmetic.
_MU = torch.tensor([0.7, -1.2, 0.1], dtype=torch.float64)
_S = torch.tensor([0.5, 1.3, 0.25], dtype=torch.float64)


def _abar_full():
    return np.cumprod(1 - get_named_beta_schedule("cosine", T))


def _exact_eps(plan, v=-1.0):
    """model(x, i) for the solvers: the exact eps of Gaussian data at the step's original t."""
    abar_full = _abar_full()

    def model(x, i):
        ab = abar_full[plan.diffusion.timestep_map[i]]
        eps = math.sqrt(1 - ab) * (x - math.sqrt(ab) * _MU) / (ab * _S ** 2 + 1 - ab)
        return eps, torch.full_like(x, v)
    return model


def _pf_ode_end(plan, x_T):
    abar = _abar_full()
    ab, ab0 = abar[plan.diffusion.timestep_map[-1]], abar[plan.diffusion.timestep_map[0]]
    z = (x_T - math.sqrt(ab) * _MU) / torch.sqrt(ab * _S ** 2 + 1 - ab)
    return _MU + math.sqrt(ab0) * _S ** 2 * z / torch.sqrt(ab0 * _S ** 2 + 1 - ab0)


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpm++2m", 2)])
def test_deterministic_gaussian_solvers_converge_to_the_probability_flow_solution(solver, order):
    """DDIM (eta 0) is first order, DPM-Solver++(2M) second order: doubling the steps halves /
    quarters the error against the closed-form ODE solution; and both reach it."""
    from djepa.diffusion.solvers import gaussian_plan, solve_gaussian

    x_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errs = []
    for n in (40, 80, 160):
        plan = gaussian_plan(solver, n)
        assert not plan.stochastic and len(plan.steps) == n
        x = solve_gaussian(plan, x_T, _exact_eps(plan))
        errs.append((x - _pf_ode_end(plan, x_T)).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(2 ** order * 0.85 < r < 2 ** order * 1.4 for r in ratios), (errs, ratios)
    assert errs[-1] < (0.04 if order == 1 else 0.006)


def test_first_order_dpm_solver_is_ddim_and_ddim_eta1_is_ddpm_with_the_posterior_variance():
    """Two identities from the formulas: DPM-Solver++'s first-order step is DDIM's (its first
    step, and a 2-step plan is first order throughout); DDIM with eta = 1 is MAR's DDPM step when
    the model's variance value is -1 (posterior variance), noise for noise."""
    from djepa.diffusion.solvers import gaussian_plan, solve_gaussian

    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=g)
    ddim2, dpm2 = gaussian_plan("ddim", 2), gaussian_plan("dpm++2m", 2)
    torch.testing.assert_close(solve_gaussian(dpm2, x_T, _exact_eps(dpm2)),
                               solve_gaussian(ddim2, x_T, _exact_eps(ddim2)), rtol=1e-9, atol=1e-9)
    n = 12
    step_noise = torch.randn(n, 16, 3, dtype=torch.float64, generator=g)
    ddim1, ddpm = gaussian_plan("ddim", n, 1.0), gaussian_plan("ddpm", n)
    assert ddim1.stochastic and ddim1.steps[-1].noisy is False
    a = solve_gaussian(ddim1, x_T, _exact_eps(ddim1), temperature=0.9, step_noise=step_noise)
    b = solve_gaussian(ddpm, x_T, _exact_eps(ddpm, v=-1.0), temperature=0.9, step_noise=step_noise)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # and the DDPM plan is GaussianDiffusion.p_sample_loop (MAR's loop) on the same model and noise
    d = create_diffusion(str(n))
    abar_full = _abar_full()

    def model(x, t):
        ab = torch.as_tensor(abar_full)[t][:, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * _MU) / (ab * _S ** 2 + 1 - ab)
        return torch.cat([eps, torch.tanh(x)], 1)

    loop = d.p_sample_loop(model, x_T.shape, noise=x_T, step_noise=step_noise, temperature=0.9)
    mine = solve_gaussian(ddpm, x_T, lambda x, i: (model(x, torch.full((16,), d.timestep_map[i]))[:, :3],
                                                   torch.tanh(x)), temperature=0.9, step_noise=step_noise)
    torch.testing.assert_close(mine, loop, rtol=1e-9, atol=1e-9)


def test_gaussian_solvers_sample_the_data_distribution_in_the_limit():
    """Gaussian data, exact eps: the DDPM loop and DDIM (eta 0.5) over the whole 1000-step chain,
    and the deterministic DPM-Solver++ at 100 steps, give samples with the data's mean and
    standard deviation (Monte Carlo, 4000 draws: within 4 standard errors / 5%). (MAR's 100-step
    DDPM loop itself is 6% narrow on the s = 0.25 channel: its posterior variance at 100 steps.)"""
    from djepa.diffusion.solvers import gaussian_plan, solve_gaussian

    g = torch.Generator().manual_seed(2)
    n_draws = 4000
    for solver, steps, eta in (("ddpm", 1000, 0.0), ("ddim", 1000, 0.5), ("dpm++2m", 100, 0.0)):
        plan = gaussian_plan(solver, steps, eta)
        x_T = torch.randn(n_draws, 3, dtype=torch.float64, generator=g)
        noise = torch.randn(steps, n_draws, 3, dtype=torch.float64, generator=g) if plan.stochastic else None
        x = solve_gaussian(plan, x_T, _exact_eps(plan), step_noise=noise)
        assert ((x.mean(0) - _MU).abs() / _S < 4 / math.sqrt(n_draws)).all(), (solver, x.mean(0))
        assert ((x.std(0) / _S - 1).abs() < 0.05).all(), (solver, x.std(0))


def test_deterministic_solvers_scale_x_T_by_the_temperature():
    """Temperature scales x_T for deterministic solvers (DDIM eta 0, DPM-Solver++) and the
    step noise for stochastic ones; `sample` does so for a real head (eager, float64)."""
    from djepa.diffusion import sample
    from djepa.nn import DenoisingMLP

    torch.manual_seed(3)
    mlp = DenoisingMLP(2, 16, 4, 5, 1).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(4, 5, dtype=torch.float64)
    x_T = torch.randn(4, 2, dtype=torch.float64)
    for solver in ("ddim", "dpm++2m"):
        cold = sample(mlp, z, steps=6, temperature=0.5, noise=x_T.float(), solver=solver, backend="eager")
        same = sample(mlp, z, steps=6, temperature=1.0, noise=0.5 * x_T.float(), solver=solver, backend="eager")
        torch.testing.assert_close(cold, same, rtol=0, atol=0)
        assert not torch.allclose(cold, sample(mlp, z, steps=6, noise=x_T.float(), solver=solver, backend="eager"))
        with pytest.raises(ValueError, match="injects no noise"):
            sample(mlp, z, steps=6, noise=x_T.float(), step_noise=torch.zeros(6, 4, 2), solver=solver,
                   backend="eager")
    # DDIM with eta > 0 keeps x_T and scales the step noise
    kw = dict(steps=6, noise=x_T.float(), step_noise=torch.randn(6, 4, 2), solver="ddim", eta=0.7, backend="eager")
    zero = sample(mlp, z, temperature=0.0, **kw)
    torch.testing.assert_close(zero, sample(mlp, z, steps=6, noise=x_T.float(), solver="ddim", backend="eager")
                               * 0 + zero)
    assert not torch.allclose(zero, sample(mlp, z, temperature=1.0, **kw))


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_flow_solvers_converge_to_the_exact_transport(solver, order):
    """Flow matching on Gaussian data: the exact velocity E[x1 - x0 | x_t] gives the transport
    x0 -> mu + s x0; Euler is first order, Heun and midpoint at least second order (midpoint is
    third order on this field)."""
    def velocity(x, t):
        var = t * t * _S ** 2 + (1 - t) ** 2
        return _MU + (x - t * _MU) * (t * _S ** 2 - (1 - t)) / var

    fm = FlowMatching()
    x0 = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errs = [(fm.integrate(velocity, x0, n, solver) - (_MU + _S * x0)).abs().max().item() for n in (8, 16, 32)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(2 ** order * 0.8 < r for r in ratios) and (order > 1 or max(ratios) < 2.6), (errs, ratios)
    # FlowMatching.sample with the solver, on a model taking tensors of t, is the same loop
    model = lambda x, t: velocity(x, float(t[0]))  # noqa: E731
    torch.testing.assert_close(fm.sample(model, x0.shape, 8, noise=x0, solver=solver),
                               fm.integrate(velocity, x0, 8, solver), rtol=1e-12, atol=1e-12)


def test_flow_solver_steps_written_out():
    """Heun and midpoint on v(x, t) = a x + t, two steps, against the formulas."""
    a = 0.7
    v = lambda x, t: a * x + t  # noqa: E731
    x = torch.tensor([1.5], dtype=torch.float64)
    fm = FlowMatching()
    heun, mid = x.clone(), x.clone()
    for t0 in (0.0, 0.5):
        h = 0.5
        d1 = v(heun, t0)
        heun = heun + h / 2 * (d1 + v(heun + h * d1, t0 + h))
        mid = mid + h * v(mid + h / 2 * v(mid, t0), t0 + h / 2)
    torch.testing.assert_close(fm.integrate(v, x, 2, "heun"), heun)
    torch.testing.assert_close(fm.integrate(v, x, 2, "midpoint"), mid)


def test_solver_arguments_and_costs():
    from djepa.diffusion.solvers import anneal_steps, check_solver, evaluations, gaussian_plan

    assert [evaluations(s, 10) for s in ("ddpm", "ddim", "dpm++2m", "euler", "heun", "midpoint")] == \
        [10, 10, 10, 10, 20, 20]
    with pytest.raises(ValueError, match="solver must be one of"):
        check_solver("diffusion", "heun")
    with pytest.raises(ValueError, match="solver must be one of"):
        check_solver("flow", "ddim")
    with pytest.raises(ValueError, match="eta"):
        check_solver("diffusion", "dpm++2m", 0.5)
    with pytest.raises(ValueError, match="eta"):
        check_solver("diffusion", "ddim", 1.5)
    assert gaussian_plan("ddim", 10) is gaussian_plan("ddim", 10)  # cached per arguments
    # annealing: from `steps` at the start down to the floor, monotone, on the documented formulas
    lin = [anneal_steps(20, f / 16, "linear", 4) for f in range(16)]
    assert lin[0] == 20 and lin == sorted(lin, reverse=True) and min(lin) >= 4
    assert lin[8] == round(20 - 16 * 0.5)
    cos = [anneal_steps(20, f / 16, "cosine", 4) for f in range(16)]
    assert cos[0] == 20 and cos[8] == round(4 + 16 * math.cos(math.pi / 4))
    assert anneal_steps(20, 0.9, "none") == 20 and anneal_steps(20, 1.0, "linear") == 5  # floor 20 // 4
    with pytest.raises(ValueError, match="anneal"):
        anneal_steps(20, 0.5, "exp")
