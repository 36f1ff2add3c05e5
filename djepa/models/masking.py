"""MAR/D-JEPA masking: random orders, truncated-normal mask ratios, visible-token gathering.

Every draw takes a torch.Generator, or a numpy random source (`numpy.random` itself,
a RandomState or a Generator) for the orders and mask ratios: then they are drawn exactly as the
official MAR / D-JEPA code draws them (`shuffle` of range(seq_len) per sample; the mask ratio
by inverting the truncated normal's CDF at `uniform(size=n)`, as scipy's truncnorm.rvs does).
"""
import math

import numpy as np
import torch


def is_numpy_rng(generator) -> bool:
    """True for `numpy.random`, a numpy RandomState or a numpy Generator."""
    return generator is np.random or isinstance(generator, (np.random.RandomState, np.random.Generator))


def sample_orders(batch: int, seq_len: int, generator=None, device=None) -> torch.Tensor:
    """One random permutation of range(seq_len) per sample: [batch, seq_len] long."""
    if is_numpy_rng(generator):
        orders = np.empty((batch, seq_len), dtype=np.int64)
        for b in range(batch):
            order = np.arange(seq_len, dtype=np.int64)
            generator.shuffle(order)
            orders[b] = order
        return torch.from_numpy(orders).to(device)
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(batch, seq_len, generator=generator, device=gen_device)
    return keys.argsort(dim=1).to(device)


def sample_mask_ratio(n: int, ratio_min: float = 0.7, generator=None) -> torch.Tensor:
    """`n` draws (float64, CPU) of the left half of N(1, 0.25^2) truncated to [ratio_min, 1].

    The same law as MAR's `truncnorm((ratio_min - 1) / 0.25, 0, loc=1, scale=0.25)`, drawn by
    inverting the normal CDF.
    """
    if not 0.0 < ratio_min <= 1.0:
        raise ValueError(f"mask ratio_min must lie in (0, 1], got {ratio_min}")
    lo = 0.5 * math.erfc(-((ratio_min - 1.0) / 0.25) / math.sqrt(2.0))  # Phi(a)
    hi = 0.5  # Phi(0)
    if is_numpy_rng(generator):
        u = torch.from_numpy(np.asarray(generator.uniform(size=n), dtype=np.float64))
    else:
        device = generator.device if generator is not None else "cpu"
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu()
    p = lo + (hi - lo) * u
    ratio = 1.0 + 0.25 * torch.special.ndtri(p)
    return ratio.clamp_(ratio_min, 1.0)


def random_mask(orders: torch.Tensor, num_masked: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L] mask (True = masked) hiding the first `num_masked[b]` positions of `orders[b]`."""
    batch, seq_len = orders.shape
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(seq_len, device=orders.device).expand(batch, seq_len))
    return rank < num_masked.to(orders.device).view(-1, 1)


def training_mask(batch: int, seq_len: int, ratio_min: float, per_sample: bool,
                  generator=None, device=None) -> torch.Tensor:
    """The D-JEPA training mask: one truncated-normal ratio per batch (MAR), or one per sample.

    The number of masked tokens is ceil(seq_len * ratio) as in the official code, so it lies in
    [ceil(seq_len * ratio_min), seq_len] (all tokens may be masked: the encoder then sees only
    the class tokens). With a numpy `generator` the draws are the official ones: orders, then
    the ratio (rounded up with no slack, as np.ceil there).
    """
    orders = sample_orders(batch, seq_len, generator, device)
    ratios = sample_mask_ratio(batch if per_sample else 1, ratio_min, generator)
    slack = 0.0 if is_numpy_rng(generator) else 1e-9
    num_masked = torch.ceil(seq_len * ratios - slack).long().clamp_(0, seq_len)
    if not per_sample:
        num_masked = num_masked.expand(batch)
    return random_mask(orders, num_masked)


def gather_visible(x: torch.Tensor, mask: torch.Tensor):
    """Gather the visible (mask False) tokens of each sample to the front, in sequence order.

    Returns (visible [B, V, D], index [B, V] long, valid [B, V] bool) with V the largest visible
    count; rows of a sample with fewer visible tokens are padding (`valid` False, values copied
    from a masked position and never used as keys). When every sample has the same count, all
    entries are valid (MAR's gather). Under torch.compile V is seq_len (no host read, one
    static shape): every masked position is padding.
    """
    batch, seq_len = mask.shape
    counts = (~mask).sum(dim=1)
    if torch.compiler.is_compiling():
        width = seq_len
    else:
        width = int(counts.max().item()) if batch else 0
    index = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    visible = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return visible, index, valid


def scatter_visible(visible: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, seq_len: int,
                    fill: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_visible`: [B, seq_len, D] with visible rows in place and `fill` ([D]) elsewhere."""
    batch, width, dim = visible.shape
    # padding rows go to a scratch position seq_len, dropped afterwards
    target = torch.where(valid, index, torch.full_like(index, seq_len))
    out = fill.to(visible.dtype).view(1, 1, dim).expand(batch, seq_len + 1, dim)
    out = out.scatter(1, target.unsqueeze(-1).expand(-1, -1, dim), visible)
    return out[:, :seq_len]


def mask_len_schedule(seq_len: int, num_iter: int):
    """MAR's sampler schedule: for each iteration, (mask_len, tokens predicted in it).

    mask_len = floor(seq_len * cos(pi/2 * (step+1)/num_iter)) clamped to [1, remaining-1] is
    what MAR's linear CFG schedule uses; the tokens still masked after the iteration are
    mask_len, except after the last iteration, which predicts everything left.
    """
    remaining = seq_len
    schedule = []
    for step in range(num_iter):
        mask_len = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(remaining - 1, mask_len))
        predicted = remaining if step >= num_iter - 1 else remaining - mask_len
        schedule.append((mask_len, predicted))
        remaining -= predicted
    return schedule
