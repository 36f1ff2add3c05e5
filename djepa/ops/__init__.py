"""Kernel-backed ops. Each `djepa/ops/<op>.py` holds the eager reference, the dispatch between
`cuda` (djepa._C), `triton` (djepa.kernels) and `eager`, autograd and the torch.library op."""
from djepa._lazy import lazy_exports

_EXPORTS = {
    "ema_update_": "ema",
    "ema_update_reference": "ema",
    "masked_attention": "attention",
    "masked_attention_reference": "attention",
    "adaln_block": "denoise",
    "adaln_block_reference": "denoise",
    "denoise_step": "denoise",
    "denoise_step_reference": "denoise",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
