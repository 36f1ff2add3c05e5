"""Triton kernels (installed as djepa.kernels). One file per op; the dispatch lives in djepa.ops.

Under TRITON_INTERPRET=1 (set before triton is imported) every kernel runs on CPU tensors."""
