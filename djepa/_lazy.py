"""Lazy attribute export for package __init__ files (one import per public name, on demand)."""
import importlib


def lazy_exports(package: str, exports: dict):
    """Return (__getattr__, __dir__) that import `exports[name]` (a submodule) on first access."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
