"""D-JEPA: the model (encoder, EMA target, predictor, losses), its sampler, presets, tokenizers."""
from djepa._lazy import lazy_exports

_EXPORTS = {
    "DJEPAConfig": "config",
    "DJEPA": "djepa",
    "DJEPANet": "djepa",
    "PRESETS": "presets",
    "build": "presets",
    "get_config": "presets",
    "Patchifier": "tokenizers",
    "VAETokenizer": "tokenizers",
    "sample_tokens": "sampler",
    "from_official": "official",
    "load_official": "official",
    "official_config": "official",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
