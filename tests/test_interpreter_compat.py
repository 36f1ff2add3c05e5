"""kernels/_interpreter_compat: Triton's interpreter before 3.7 under NumPy 2.4+ (the GPU image's
pair: triton 3.6, numpy 2.5.2). CI has a fixed Triton, so the wrapper is checked on stand-ins of
both interpreter layouts; the real one is exercised by every Triton test with a loaded loop bound."""
import operator
import types

import numpy as np
import pytest

from djepa.backends import interpreter_enabled
from djepa.kernels import _interpreter_compat as compat


@pytest.mark.parametrize("version, expected", [
    ("3.6.0", True),
    ("3.3.1", True),
    ("3.6.0+git4f5e6a7", True),
    ("3.7.0rc1", False),
    ("3.7.0", False),
    ("3.10.0", False),
])
def test_needed_before_triton_3_7(version, expected):
    assert compat.needed(version) is expected


class _Handle:
    def __init__(self, data):
        self.data = data


def _strict_int(data):  # NumPy 2.4's rule, whatever NumPy this machine has
    if data.ndim:
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
    return int(data)


class _Scope:  # the layout of Triton 3.6+'s _LangPatchScope
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            setattr(obj, name, original)


def _fake_interpreter(with_scope):
    def old(tensor):
        tensor.__index__ = lambda self: _strict_int(self.handle.data)

    def new(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: _strict_int(self.handle.data))

    return types.SimpleNamespace(_patch_lang_tensor=new if with_scope else old)


@pytest.mark.parametrize("with_scope", [False, True], ids=["triton<3.6", "triton3.6"])
def test_patched_interpreter_indexes_a_1_element_scalar(with_scope):
    interpreter = _fake_interpreter(with_scope)
    tensor = type("tensor", (), {})
    value = tensor()
    value.handle = _Handle(np.array([7], dtype=np.int32))
    first = _Scope()

    interpreter._patch_lang_tensor(tensor, *((first,) if with_scope else ()))
    with pytest.raises(TypeError, match="0-dimensional"):
        operator.index(value)  # the unpatched interpreter's failure
    first.restore()

    assert compat.patch_interpreter(interpreter) is True
    assert compat.patch_interpreter(interpreter) is False  # once only
    scope = _Scope() if with_scope else None
    interpreter._patch_lang_tensor(tensor, *((scope,) if with_scope else ()))
    assert operator.index(value) == 7
    assert list(range(0, value, 3)) == [0, 3, 6]
    if with_scope:  # the scope puts the interpreter's own attribute back, then the original
        scope.restore()
        assert not callable(getattr(tensor, "__index__", None))


def test_apply_fixes_this_interpreter_only_where_needed():
    triton = pytest.importorskip("triton")
    import triton.runtime.interpreter as interpreter

    patched = getattr(interpreter._patch_lang_tensor, "_djepa_index_fix", False)
    if compat.needed(triton.__version__):
        if not interpreter_enabled():
            pytest.skip("TRITON_INTERPRET is not 1: djepa.kernels leaves the interpreter alone")
        assert patched  # djepa.kernels applied it on import
        assert compat.apply() is False
    else:
        assert not patched
        assert compat.apply() is False
