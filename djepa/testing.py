"""Checks used by djepa's tests, public so that code building on djepa can use the same rule."""
import torch


def max_abs_err(a, b) -> float:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.numel() == 0:
        return 0.0
    return (a64 - b64).abs().max().item()


def assert_close_to_reference(fast, lowp, ref, atol=1e-6, what="output"):
    """The tolerance rule of docs/design.md: max|fast - ref| <= 2 * max|eager_lowp - ref| + atol.

    `ref` is the eager path in float64 (or float32 upcast on a GPU), `lowp` the eager path in
    the fast path's dtype. Non-finite values in `fast` (e.g. poisoned, unwritten outputs) fail.
    """
    if fast.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}")
    fast64 = fast.detach().double().cpu()
    if not torch.isfinite(fast64).all():
        bad = (~torch.isfinite(fast64)).sum().item()
        raise AssertionError(f"{what}: {bad} non-finite values (unwritten or poisoned elements?)")
    err = max_abs_err(fast, ref)
    base = max_abs_err(lowp, ref)
    bound = 2 * base + atol
    if not err <= bound:
        raise AssertionError(f"{what}: max|fast-ref|={err:.3e} > 2*{base:.3e} + {atol:.1e} = {bound:.3e}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN so that elements a kernel fails to write are caught."""
    return t.fill_(float("nan"))
