"""The curated planted bugs of tools/mutate.py: each one exact snippet of one file, replaced.

Keep each mutation small and realistic (a swapped weight, an off-by-one, a dropped term, a
wrong constant), name the tests that cover its file, and say what it breaks. A survivor that
is behaviour-preserving gets `equivalent="why"`; any other survivor needs a new test.
"""
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    find: str
    replace: str
    tests: Tuple[str, ...]
    what: str
    equivalent: Optional[str] = None


def M(name, file, find, replace, tests, what, equivalent=None):
    return Mutation(name, file, find, replace, tuple(tests.split()), what, equivalent)


MUTATIONS = [
    # --- EMA -------------------------------------------------------------------------------
    M("ema-eager-mixed-swap", "djepa/ops/ema.py",
      "e.copy_(e.float().mul_(decay).add_(x.float(), alpha=1.0 - decay))",
      "e.copy_(e.float().mul_(1.0 - decay).add_(x.float(), alpha=decay))",
      "tests/test_ema.py", "eager low-precision/mixed path swaps the two weights"),
    # --- diffusion -------------------------------------------------------------------------
    M("diffusion-posterior-coef2", "djepa/diffusion/gaussian.py",
      "self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)",
      "self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(betas) / (1.0 - self.alphas_cumprod)",
      "tests/test_diffusion.py", "posterior mean coefficient of x_t uses beta instead of alpha"),
    M("diffusion-cdf-constant", "djepa/diffusion/gaussian.py",
      "(x + 0.044715 * x.pow(3))", "(x + 0.04715 * x.pow(3))",
      "tests/test_diffusion.py", "IDDPM's tanh approximation of the normal CDF"),
    M("diffusion-kl-bits", "djepa/diffusion/gaussian.py",
      "kl = mean_flat(normal_kl(true_mean, true_log_var, out[\"mean\"], out[\"log_variance\"])) / math.log(2.0)",
      "kl = mean_flat(normal_kl(true_mean, true_log_var, out[\"mean\"], out[\"log_variance\"]))",
      "tests/test_diffusion.py", "VB term in nats instead of bits"),
    # --- sampler ---------------------------------------------------------------------------
    M("sampler-linear-cfg-inverted", "djepa/models/sampler.py",
      "cfg_iter = 1.0 + (cfg_scale - 1.0) * (L - mask_len) / L",
      "cfg_iter = 1.0 + (cfg_scale - 1.0) * mask_len / L",
      "tests/test_sampler.py", "linear CFG schedule ramps the wrong way"),
    # --- evaluation ------------------------------------------------------------------------
    M("fd-half-cross-term", "djepa/evaluate.py",
      "+ np.trace(s_a) + np.trace(s_b) - 2 * cross)", "+ np.trace(s_a) + np.trace(s_b) - cross)",
      "tests/test_cli.py tests/test_evaluate.py", "Fréchet distance's cross term halved"),
]
