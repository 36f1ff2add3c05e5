"""Gaussian diffusion (cosine, respacing, learned sigma), flow matching and the fused sampler."""
from djepa._lazy import lazy_exports

_EXPORTS = {
    "GaussianDiffusion": "gaussian",
    "create_diffusion": "gaussian",
    "space_timesteps": "gaussian",
    "get_named_beta_schedule": "gaussian",
    "normal_kl": "gaussian",
    "discretized_gaussian_log_likelihood": "gaussian",
    "FlowMatching": "flow",
    "sample": "sampler",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
