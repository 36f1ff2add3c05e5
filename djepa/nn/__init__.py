"""Drop-in modules built on djepa.ops."""
from djepa._lazy import lazy_exports

_EXPORTS = {
    "EMA": "ema",
    "MaskedAttention": "attention",
    "Mlp": "attention",
    "Block": "attention",
    "RMSNorm": "attention",
    "DenoisingMLP": "denoise",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
