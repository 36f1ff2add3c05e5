"""MAR's masked-autoregressive sampler (sample_tokens) over a DJEPANet."""
import math
from typing import Optional

import torch

from djepa.models import masking

CFG_SCHEDULES = ("linear", "constant")


def _check_args(seq_len, num_iter, cfg_scale, cfg_schedule, temperature):
    if isinstance(num_iter, bool) or not isinstance(num_iter, int):
        raise TypeError(f"num_iter must be an int, got {num_iter!r}")
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must lie in [1, seq_len={seq_len}], got {num_iter}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@torch.no_grad()
def sample_tokens(net, labels: torch.Tensor, num_iter: int = 64, cfg_scale: float = 1.0,
                  cfg_schedule: str = "linear", temperature: Optional[float] = None,
                  generator: Optional[torch.Generator] = None, progress: bool = False, callback=None,
                  order_generator=None):
    """Generate tokens [B, seq_len, token_channels] for `labels` with the network `net`.

    Per iteration: encoder + predictor on the current tokens; the next mask keeps the first
    mask_len positions of a random per-sample order masked (mask_len on MAR's cosine schedule,
    see `masking.mask_len_schedule`); the tokens in `mask XOR mask_next` are drawn by the
    denoising head. With cfg_scale != 1 the batch is doubled with the fake class and the head
    mixes eps with the scale of the iteration ("linear": 1 + (cfg - 1) * (L - mask_len) / L).
    temperature None: the config's. Orders come from `order_generator` (a numpy random source,
    drawn as the official code does) when given, else from `generator`.
    """
    c = net.config
    if temperature is None:
        temperature = c.temperature
    L, C, T = c.seq_len, c.token_channels, c.class_tokens
    _check_args(L, num_iter, cfg_scale, cfg_schedule, temperature)
    B = labels.shape[0]
    device = net.z_proj.weight.device
    dtype = net.z_proj.weight.dtype
    cfg = float(cfg_scale) != 1.0

    orders = masking.sample_orders(B, L, generator if order_generator is None else order_generator, device)
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(L, device=device).expand(B, L))
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    tokens = torch.zeros(B, L, C, dtype=torch.float32, device=device)

    cond = net.class_embedding(labels)
    if cfg:
        cond = torch.cat([cond, net.unconditional_embedding(B).to(cond.dtype)], dim=0)

    steps = range(num_iter)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    schedule = masking.mask_len_schedule(L, num_iter)
    for step in steps:
        mask_len, _ = schedule[step]
        x_in, m_in = tokens.to(dtype), mask
        if cfg:
            x_in, m_in = torch.cat([x_in, x_in]), torch.cat([mask, mask])
        encoded, index, valid = net.encode(x_in, m_in, cond)
        z = net.diffusion_condition(net.predict(encoded, index, valid))

        mask_next = rank < mask_len
        to_pred = mask if step >= num_iter - 1 else mask & ~mask_next
        rows = to_pred.nonzero(as_tuple=True)
        if cfg_schedule == "linear":
            cfg_iter = 1.0 + (cfg_scale - 1.0) * (L - mask_len) / L
        else:
            cfg_iter = float(cfg_scale)
        z_pred = z[rows]
        if cfg and cfg_iter != 1.0:
            z_pred = torch.cat([z_pred, z[B:][rows]])
        else:
            cfg_iter = 1.0
        new = net.diffloss.sample(z_pred, temperature=temperature, cfg_scale=cfg_iter, generator=generator)
        tokens = tokens.clone()
        tokens[rows] = new.to(tokens.dtype)
        mask = mask_next
        if callback is not None:
            callback(step, tokens, to_pred)
    return tokens
