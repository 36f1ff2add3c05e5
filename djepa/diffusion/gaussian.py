"""Gaussian diffusion as MAR uses it (IDDPM/DiT formulation), written from the formulas.

Cosine noise schedule, eps prediction, learned-range variance, respacing to fewer sampling
steps, training loss MSE(eps) + VB (bits per dimension; the t == 0 term is the discretized
Gaussian decoder NLL, as in DiT/MAR). Rows are tokens: tensors are [M, C] (any trailing shape
works; means are taken over every dimension but the first).
"""
import math

import numpy as np
import torch


def cosine_alpha_bar(t):
    """IDDPM's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2, t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(name, num_diffusion_timesteps):
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r} (expected 'cosine' or 'linear')")


def space_timesteps(num_timesteps, section_counts):
    """Which of the `num_timesteps` original steps a respaced schedule keeps.

    `section_counts`: an int, a string "100" / "10,20,30" (steps per equal section of the
    original schedule) or a list of ints. Within a section the kept steps are evenly strided,
    rounding fractional positions, and include its first and last step.
    """
    if isinstance(section_counts, str):
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r} is not a comma-separated list of ints") from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = list(section_counts)
    if not section_counts or any(int(c) < 1 for c in section_counts):
        raise ValueError(f"every section needs >= 1 step, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretized to 256 bins (nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


class GaussianDiffusion:
    """A (possibly respaced) diffusion over `betas`; `timestep_map[i]` is the original step
    the model is conditioned on at respaced step i (MAR calls the model with it)."""

    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        self.learn_sigma = bool(learn_sigma)
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
        pv1 = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # fixed-large variance (learn_sigma=False), as IDDPM
        self.fixed_large_log_variance = np.log(np.append(pv1, betas[1:]))

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _extract(arr, t, x):
        out = torch.as_tensor(arr, dtype=torch.float64, device=x.device)[t.long()].to(x.dtype)
        return out.reshape(out.shape + (1,) * (x.ndim - 1))

    def _check_t(self, t, x):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be a 1-D tensor with one timestep per row of x ({x.shape[0]})")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps})")

    def model_timesteps(self, t):
        """The timesteps the model sees for respaced steps t (the original schedule's)."""
        return torch.as_tensor(self.timestep_map, device=t.device, dtype=torch.long)[t.long()]

    def step_coefficients(self, i, temperature=1.0):
        """Floats for the fused step at respaced step i (see djepa.ops.denoise's contract):
        (coef_x, coef_eps, min_log, max_log, noise_scale)."""
        c1, c2 = self.posterior_mean_coef1[i], self.posterior_mean_coef2[i]
        coef_x = c1 * self.sqrt_recip_alphas_cumprod[i] + c2
        coef_eps = c1 * self.sqrt_recipm1_alphas_cumprod[i]
        if self.learn_sigma:
            min_log, max_log = self.posterior_log_variance_clipped[i], self.log_betas[i]
        else:
            min_log = max_log = self.fixed_large_log_variance[i]
        return float(coef_x), float(coef_eps), float(min_log), float(max_log), float(temperature if i > 0 else 0.0)

    # --- forward process -----------------------------------------------------------------
    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    # --- reverse process -----------------------------------------------------------------
    def _split_output(self, model_output, x):
        C = x.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if model_output.shape[0] != x.shape[0] or model_output.shape[1] != expected:
            raise ValueError(f"the model returned {tuple(model_output.shape)}, expected "
                             f"[{x.shape[0]}, {expected}] (learn_sigma={self.learn_sigma})")
        if self.learn_sigma:
            return model_output[:, :C], model_output[:, C:]
        return model_output, None

    def p_mean_variance_from_output(self, model_output, x, t):
        eps, var_values = self._split_output(model_output, x)
        if self.learn_sigma:
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            log_variance = self._extract(self.fixed_large_log_variance, t, x).expand_as(x)
        pred_xstart = (self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x
                       - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x) * eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model, x, t, model_kwargs=None):
        self._check_t(t, x)
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x, t)

    def p_sample(self, model, x, t, model_kwargs=None, temperature=1.0, noise=None, generator=None):
        out = self.p_mean_variance(model, x, t, model_kwargs)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, model_kwargs=None, temperature=1.0,
                      generator=None, progress=False, step_noise=None, device=None, dtype=torch.float32):
        """Sample x_0 by the full reverse loop (MAR semantics: temperature scales the noise,
        none at the last step). `noise` is x_T; `step_noise[k]` (optional) is the noise of
        the k-th step taken (k = 0 at t = T-1); otherwise both come from `generator`."""
        _check_sampling_scalar("temperature", temperature)
        if noise is not None:
            x = noise
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}")
        else:
            if device is None:
                device = generator.device if generator is not None else torch.device("cpu")
            x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        if step_noise is not None and (step_noise.shape[0] != self.num_timesteps
                                       or tuple(step_noise.shape[1:]) != tuple(shape)):
            raise ValueError(f"step_noise must be [{self.num_timesteps}, {', '.join(map(str, shape))}]")
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for k, i in enumerate(indices):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                n = None if step_noise is None else step_noise[k]
                x = self.p_sample(model, x, t, model_kwargs, temperature, noise=n, generator=generator)["sample"]
        return x

    # --- training ------------------------------------------------------------------------
    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """{"loss": mse + vb, "mse", "vb"} per row; the VB term trains only the variance
        (the eps half is detached inside it), as IDDPM/MAR."""
        self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, var_values = self._split_output(model_output, x_t)
        terms = {}
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            terms["vb"] = torch.zeros(x_start.shape[0], device=x_start.device, dtype=x_start.dtype)
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms


def _check_sampling_scalar(name, value):
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def create_diffusion(timestep_respacing="", noise_schedule="cosine", learn_sigma=True, diffusion_steps=1000):
    """MAR's create_diffusion: "" (or None) keeps all `diffusion_steps`; "100" / 100 / "a,b"
    respaces. The respaced betas are 1 - abar_i / abar_prev over the kept steps."""
    betas = get_named_beta_schedule(noise_schedule, int(diffusion_steps))
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [int(diffusion_steps)]
    use = space_timesteps(int(diffusion_steps), timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - betas)
    last, new_betas, timestep_map = 1.0, [], []
    for i, acp in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - acp / last)
            last = acp
            timestep_map.append(i)
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma, timestep_map=timestep_map)
