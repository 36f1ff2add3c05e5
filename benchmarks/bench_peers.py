"""The paths a suite times (djepa's and its peers'), each set up by a provider, and peers (SDPA
backends, FlexAttention, torch.compile, ...) that fail skipped, not failed.

`Providers`: one set-up per path, registered by name in the order the suite times them.

A peer's first failure in a session (forward or backward, at compile or at run time) skips that
case with the reason, and the same peer is skipped at once for every later case of the same
key, instead of failing, and compiling again, case after case. djepa's own paths are never run
through this: their failures must fail the run.
"""
import pytest

_failed = {}  # key -> reason of the peer's first failure in this session


class Providers(dict):
    """name -> set-up of one path, in the order they were registered."""

    def register(self, *names):
        """Decorator: register the set-up under each of `names`."""
        def add(setup):
            for name in names:
                self[name] = setup
            return setup
        return add


def _reason(exc):
    if isinstance(exc, pytest.skip.Exception):
        return str(exc.msg if hasattr(exc, "msg") else exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def check(*keys):
    """Skip now if a peer failed before under any of `keys` (tuples, most specific first)."""
    for key in keys:
        if key in _failed:
            pytest.skip(f"{key[0]} failed earlier in this session ({'/'.join(map(str, key[1:]))}): {_failed[key]}")


def run(key, fn, *args, **kwargs):
    """fn(*args, **kwargs), or a skip that remembers why under `key` when it fails (a skip
    raised inside, e.g. "refuses a boolean mask", is remembered too). Out-of-memory is not
    remembered: a smaller case of the same peer may fit."""
    import torch

    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except (Exception, pytest.skip.Exception) as exc:
        _failed[key] = _reason(exc)
        pytest.skip(f"{key[0]}: {_failed[key]}")


def failures():
    return dict(_failed)
