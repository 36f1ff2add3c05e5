"""Solvers of the denoising head: how a token goes from noise to a sample, and at what cost.

Gaussian head (eps prediction over the trained 1000-step cosine schedule). `steps` = N keeps N
of the 1000 steps as MAR respaces them (t_{N-1} = 999 > ... > t_0 = 0); i indexes them, the
model sees t_i. With abar_i the kept steps' alpha-bar (abar_{-1} = 1), alpha_i = sqrt(abar_i),
sigma_i = sqrt(1 - abar_i) and x0_i = (x - sigma_i eps) / alpha_i, one step i -> i - 1 is

  "ddpm"    MAR's ancestral step: the posterior mean of x0_i, plus exp(logvar / 2) * tau * noise
            with the learned-range log variance (no noise at i = 0). The official loop.
  "ddim"    x = alpha_{i-1} x0_i + sqrt(1 - abar_{i-1} - s_i^2) eps + s_i * tau * noise,
            s_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i) * (1 - abar_i / abar_{i-1})).
            eta = 1 is the ancestral step with the posterior variance (DDPM with v = -1);
            eta = 0 is deterministic: the first-order solver of the probability-flow ODE.
  "dpm++2m" DPM-Solver++(2M), data prediction, multistep: lambda_i = log(alpha_i / sigma_i),
            h = lambda_{i-1} - lambda_i, r = h_prev / h,
            x = (sigma_{i-1} / sigma_i) x + alpha_{i-1} (1 - e^-h) ((1 + 1/(2r)) x0_i - x0_{i+1} / (2r)).
            First order (= DDIM eta 0) at the first step, and at the last (i = 0 -> abar = 1,
            where sigma = 0): that step returns x0_0.

Each takes N evaluations of the head for N steps. Flow head (velocity v(x, t), t from 0 = noise
to 1 = data over the shifted linspace(0, 1, N + 1) of FlowMatching):

  "euler"    x += dt v(x, t)                                   (official; N evaluations)
  "heun"     x' = x + dt v(x, t); x += dt / 2 (v(x, t) + v(x', t + dt))         (2N)
  "midpoint" x += dt v(x + dt / 2 v(x, t), t + dt / 2)                        (2N)

Temperature tau keeps its meaning where a solver injects noise at every step (ddpm, ddim with
eta > 0: it scales each step's noise, as MAR). The deterministic solvers (ddim with eta = 0,
dpm++2m, and every flow solver) inject noise only at the start: there tau scales x_T (as
FlowMatching does for Euler). CFG is unchanged: the head runs on [cond; uncond] and mixes
eps (or v) as uncond + s (cond - uncond), the variance value taken from the conditional half.
"""
import functools
import math
from typing import NamedTuple, Optional, Tuple

import numpy as np

GAUSSIAN_SOLVERS = ("ddpm", "ddim", "dpm++2m")
FLOW_SOLVERS = ("euler", "heun", "midpoint")
OFFICIAL = {"diffusion": "ddpm", "flow": "euler"}


class GaussianStep(NamedTuple):
    """One step of a Gaussian plan, in the fused update's terms (djepa.ops.denoise's contract):
    y = coef_x * x - coef_eps * eps + exp(logvar / 2) * tau * noise (if noisy), logvar the
    learned-range mix of (min_log, max_log) by the model's variance value; then the new state is
    y, or a * x + b * y + c * y_prev (y_prev: the previous step's y) when `combine` is given."""
    index: int
    coef_x: float
    coef_eps: float
    min_log: float
    max_log: float
    noisy: bool
    combine: Optional[Tuple[float, float, float]] = None

    def coefs(self, temperature):
        """(coef_x, coef_eps, min_log, max_log, noise_scale) for the fused update."""
        return (self.coef_x, self.coef_eps, self.min_log, self.max_log,
                float(temperature) if self.noisy else 0.0)


class GaussianPlan(NamedTuple):
    solver: str
    eta: float
    diffusion: object  # the respaced GaussianDiffusion
    steps: Tuple[GaussianStep, ...]

    @property
    def stochastic(self):
        """Whether the solver injects noise at its steps (ddpm; ddim with eta > 0): then it takes
        step noise and temperature scales it; else temperature scales x_T."""
        return self.solver == "ddpm" or (self.solver == "ddim" and self.eta > 0)


def check_solver(kind, solver, eta=0.0):
    """Validate (solver, eta) for a head of `kind` ("diffusion" or "flow"); returns them."""
    names = GAUSSIAN_SOLVERS if kind == "diffusion" else FLOW_SOLVERS
    if solver not in names:
        raise ValueError(f"solver must be one of {names} for a {kind} head, got {solver!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if float(eta) != 0.0 and solver != "ddim":
        raise ValueError(f"eta is DDIM's noise level; solver {solver!r} takes none (got eta={eta})")
    return solver, float(eta)


def evaluations(solver, steps):
    """Head evaluations (forward passes over the token batch) a solver makes in `steps` steps."""
    return 2 * steps if solver in ("heun", "midpoint") else steps


@functools.lru_cache(maxsize=64)
def _respaced(steps, learn_sigma):
    from djepa.diffusion.gaussian import create_diffusion

    return create_diffusion(timestep_respacing=str(steps), noise_schedule="cosine", learn_sigma=learn_sigma)


@functools.lru_cache(maxsize=128)
def gaussian_plan(solver, steps, eta=0.0, learn_sigma=True):
    """The steps of `solver` over the cosine schedule respaced to `steps` (cached per arguments)."""
    check_solver("diffusion", solver, eta)
    d = _respaced(int(steps), bool(learn_sigma))
    abar = np.asarray(d.alphas_cumprod, dtype=np.float64)
    abar_prev = np.asarray(d.alphas_cumprod_prev, dtype=np.float64)
    out = []
    if solver == "ddpm":
        for i in range(d.num_timesteps - 1, -1, -1):
            coef_x, coef_eps, min_log, max_log, _ = d.step_coefficients(i, 1.0)
            out.append(GaussianStep(i, coef_x, coef_eps, min_log, max_log, i > 0))
        return GaussianPlan(solver, eta, d, tuple(out))
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    alpha_prev, sigma_prev = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
    h_prev = None
    for i in range(d.num_timesteps - 1, -1, -1):
        if solver == "ddim":
            s2 = eta ** 2 * (1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i])
            s2 = max(float(s2), 0.0)
            # x_{i-1} = alpha_prev x0 + sqrt(1 - abar_prev - s^2) eps, x0 = (x - sigma eps) / alpha
            coef_x = alpha_prev[i] / alpha[i]
            coef_eps = alpha_prev[i] * sigma[i] / alpha[i] - math.sqrt(max(1 - abar_prev[i] - s2, 0.0))
            log_var = math.log(s2) if s2 > 0 else 0.0
            out.append(GaussianStep(i, float(coef_x), float(coef_eps), log_var, log_var, s2 > 0))
            continue
        # dpm++2m: the fused update yields y = x0_i; the state is then a * x + b * x0_i + c * x0_{i+1}
        x0 = (float(1 / alpha[i]), float(sigma[i] / alpha[i]), 0.0, 0.0, False)
        if i == 0:  # to abar = 1 (sigma = 0): the data prediction itself
            out.append(GaussianStep(i, *x0))
            continue
        h = math.log(alpha_prev[i] / sigma_prev[i]) - math.log(alpha[i] / sigma[i])
        a = sigma_prev[i] / sigma[i]
        k = alpha_prev[i] - alpha[i] * sigma_prev[i] / sigma[i]  # alpha_{i-1} (1 - e^-h)
        if h_prev is None:
            comb = (float(a), float(k), 0.0)
        else:
            r = h_prev / h
            comb = (float(a), float(k * (1 + 1 / (2 * r))), float(-k / (2 * r)))
        out.append(GaussianStep(i, *x0, combine=comb))
        h_prev = h
    return GaussianPlan(solver, eta, d, tuple(out))


def solve_gaussian(plan, x, model, temperature=1.0, step_noise=None):
    """Run `plan` from x = x_T (already scaled, see the module docstring) in x's dtype.

    model(x, i) -> (eps, v): the (guided) eps prediction at respaced step i and the variance
    value v in [-1, 1] (learned range; None where the plan's steps have a fixed variance).
    step_noise[k]: the noise of the k-th step (only for plans that inject noise)."""
    import torch

    prev = None
    for k, st in enumerate(plan.steps):
        eps, v = model(x, st.index)
        y = st.coef_x * x - st.coef_eps * eps
        if st.noisy and temperature != 0:
            if st.min_log == st.max_log:
                std = math.exp(0.5 * st.min_log)
            else:
                frac = (v + 1) / 2
                std = torch.exp(0.5 * (frac * st.max_log + (1 - frac) * st.min_log))
            y = y + std * temperature * step_noise[k].to(x.dtype)
        if st.combine is None:
            x = y
        else:
            a, b, c = st.combine
            x = a * x + b * y + (c * prev if c else 0.0)
            prev = y
    return x


def flow_times(solver, steps, shift=None):
    """(grid, eval_times): the shifted grid t_0 = 0 < ... < t_N = 1 and, per step, the times at
    which the solver evaluates the velocity."""
    import torch

    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    grid = shift(t) if shift is not None else t
    grid = [float(v) for v in grid]
    evals = []
    for i in range(steps):
        if solver == "euler":
            evals.append((grid[i],))
        elif solver == "heun":
            evals.append((grid[i], grid[i + 1]))
        else:
            evals.append((grid[i], 0.5 * (grid[i] + grid[i + 1])))
    return grid, evals


def anneal_steps(steps, known_fraction, schedule="none", min_steps=None):
    """Head steps for an AR iteration that starts with `known_fraction` of the tokens known.

    "none": `steps` always. "linear": steps - (steps - min) * f. "cosine": min + (steps - min) *
    cos(pi/2 * f) (keeps more steps early, drops fast at the end). Rounded to the nearest int,
    never below `min_steps` (default max(1, steps // 4)). Later tokens are conditioned on most
    of the image and need fewer steps (DiSA's observation)."""
    if schedule == "none":
        return steps
    lo = max(1, steps // 4) if min_steps is None else int(min_steps)
    f = min(max(float(known_fraction), 0.0), 1.0)
    if schedule == "linear":
        n = steps - (steps - lo) * f
    elif schedule == "cosine":
        n = lo + (steps - lo) * math.cos(math.pi / 2 * f)
    else:
        raise ValueError(f"anneal must be 'none', 'linear' or 'cosine', got {schedule!r}")
    return max(lo, min(steps, int(math.floor(n + 0.5))))


ANNEAL_SCHEDULES = ("none", "linear", "cosine")
