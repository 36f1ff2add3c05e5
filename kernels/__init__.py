"""djepa's Triton kernels, one file per op (ema.py, attention.py, denoise.py); the dispatch
between them, djepa._C and eager lives in djepa.ops.

This folder sits at the top of the source tree, beside csrc/ (the CUDA kernels), and is
installed as the subpackage `djepa.kernels` (setup.py maps it): import `djepa.kernels.attention`,
not `kernels.attention`. Under TRITON_INTERPRET=1 (set before triton is imported) every kernel
runs on CPU tensors."""
from djepa.backends import interpreter_enabled

from . import _interpreter_compat

if interpreter_enabled():
    _interpreter_compat.apply()
