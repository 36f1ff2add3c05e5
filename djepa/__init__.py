"""djepa: kernel-backed PyTorch library for D-JEPA.

Submodules load on first use, so `import djepa` stays cheap:
`djepa.ops` (kernels behind one API), `djepa.nn` (drop-in modules), `djepa.diffusion`,
`djepa.models`, `djepa.data`, `djepa.backends`, `djepa.patch` (kernels into MAR / D-JEPA code).
"""
import importlib

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("djepa")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("backends", "ops", "nn", "diffusion", "models", "data", "kernels", "cli", "patch")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"djepa.{name}")
    raise AttributeError(f"module 'djepa' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
