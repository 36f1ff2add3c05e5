"""Triton's CPU interpreter before 3.7 under a recent NumPy: the fix, applied where needed.

The interpreter holds a scalar as a 1-element array, and before Triton 3.7 it turns one into a
Python index with int(array). NumPy 2.4 and newer refuse that ("only 0-dimensional arrays can be
converted to Python scalars"; seen with 2.4.0, 2.4.6, 2.5.5; 2.3.5 only warns), so every kernel
whose loop bound is loaded from memory fails under it (the attention kernels' visible-key count).
Triton 3.7 converts int(array.squeeze()), right under any NumPy; `apply` gives the interpreters
before it the same conversion. torch 2.11 pins Triton 3.6 and the GPU machine's image pairs it with
NumPy 2.5.2: without this, no masked attention test runs there under the interpreter.
"""
import functools

from djepa.backends import version_tuple

FIXED_IN = (3, 7)


def needed(triton_version: str) -> bool:
    return version_tuple(triton_version) < FIXED_IN


def _index(self):
    return int(self.handle.data.squeeze())


def patch_interpreter(interpreter) -> bool:
    """Wrap `interpreter._patch_lang_tensor` so that tensors index with int(data.squeeze()).
    Before Triton 3.6 it takes (tensor) and sets attributes for good; from 3.6 it takes (tensor,
    scope) and records them in the scope, which restores them in reverse order. False when
    already patched, or where the interpreter is laid out otherwise."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_djepa_index_fix", False):
        return False

    @functools.wraps(original)
    def _patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is None:
            tensor.__index__ = _index
        else:
            scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor._djepa_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


def apply() -> bool:
    """Fix the interpreter in place where `needed`; True when it patched it now. Without Triton
    there is nothing to fix: the kernel modules' own imports say what is missing."""
    try:
        import triton
    except ImportError:
        return False

    if not needed(triton.__version__):
        return False
    import triton.runtime.interpreter as interpreter

    return patch_interpreter(interpreter)
