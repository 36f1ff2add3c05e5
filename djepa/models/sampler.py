"""MAR's masked-autoregressive sampler (sample_tokens) over a DJEPANet, and its faster options.

`SamplerOptions()` (every field at its default) is the official procedure, run by the official
code path bit for bit. The other settings are opt-in:

- `solver`, `head_steps`, `eta`: the head's solver and step count (djepa.diffusion.solvers);
- `anneal`, `min_head_steps`: the head's step count falls with the fraction of tokens already
  known when an iteration starts (djepa.diffusion.solvers.anneal_steps);
- `feature_reuse`: a tolerance for reusing encoder / predictor features of tokens that barely
  moved since the previous iteration (djepa.models.feature_cache; 0 reuses nothing);
- `cfg_refresh`: under CFG, the unconditional half of the encoder and predictor runs every
  `cfg_refresh`-th iteration only; in between, the head's unconditional conditions are the
  conditional ones plus the guidance residual (uncond - cond predictor features) of the last
  iteration that ran it (LazyMAR's condition cache). 1 (default) runs it every iteration.

Always (exact, whatever the options): the class embeddings are computed once per call; under CFG
an iteration whose guidance scale is exactly 1 runs the encoder, predictor and head on the
conditional half only (neither official schedule gives exactly 1 when cfg_scale != 1; a callback
schedule may). `FAST` holds the settings `--fast` picks, chosen by measurement (README).
"""
import dataclasses
import math
from typing import List, Optional

import torch

from djepa.models import masking

CFG_SCHEDULES = ("linear", "constant")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How the sampler spends its work; the defaults are the official procedure."""
    solver: Optional[str] = None            # None: the official head loop (ddpm / euler)
    head_steps: Optional[int] = None        # None: the config's num_sampling_steps
    eta: float = 0.0                        # DDIM's noise level
    anneal: str = "none"                    # "none" | "linear" | "cosine"
    min_head_steps: Optional[int] = None    # the annealing floor (default head_steps // 4)
    feature_reuse: Optional[float] = None   # None: off; a tolerance >= 0
    cfg_refresh: int = 1                    # the unconditional trunk half every n-th iteration

    @property
    def official(self) -> bool:
        return self == SamplerOptions()

    def check(self, kind: str, default_steps: int):
        """Validate against a head of `kind` ("diffusion" | "flow"); raise ValueError saying why."""
        from djepa.diffusion.solvers import ANNEAL_SCHEDULES, check_solver

        if self.solver is not None:
            check_solver(kind, self.solver, self.eta)
        elif self.eta:
            raise ValueError(f"eta is DDIM's noise level: give solver='ddim' (got eta={self.eta})")
        for name in ("head_steps", "min_head_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000):
                raise ValueError(f"{name} must be an int in [1, 1000], got {v!r}")
        if self.anneal not in ANNEAL_SCHEDULES:
            raise ValueError(f"anneal must be one of {ANNEAL_SCHEDULES}, got {self.anneal!r}")
        steps = self.head_steps or default_steps
        if self.min_head_steps is not None and self.min_head_steps > steps:
            raise ValueError(f"min_head_steps ({self.min_head_steps}) exceeds the head steps ({steps})")
        if isinstance(self.cfg_refresh, bool) or not isinstance(self.cfg_refresh, int) or self.cfg_refresh < 1:
            raise ValueError(f"cfg_refresh must be an int >= 1, got {self.cfg_refresh!r}")
        if self.feature_reuse is not None:
            tol = self.feature_reuse
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
                raise ValueError(f"feature_reuse must be a finite number >= 0 (a relative tolerance), got {tol!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# What `fast=True` / `--fast` picks, per head kind. Flow: measured on the digits model (README,
# "Fast sampling": the official sampler's judged accuracy and Fréchet distance on four seeds,
# 3.3-3.6x less CPU time). Diffusion: no Gaussian-head model trains to quality on a CPU here, so
# its head setting is the closed-form-tested DPM-Solver++ at a step count its authors report as
# converged for guided sampling (not measured on a trained D-JEPA); the trunk reuse is digits'.
FAST = {
    "flow": SamplerOptions(solver="midpoint", head_steps=4, feature_reuse=0.0, cfg_refresh=3),
    "diffusion": SamplerOptions(solver="dpm++2m", head_steps=25, feature_reuse=0.0, cfg_refresh=3),
}


def resolve_options(kind: str, fast: bool = False, **given) -> SamplerOptions:
    """The options for a head of `kind`: FAST[kind] when `fast` (else the defaults), with every
    field in `given` that is not None replacing it."""
    base = FAST[kind] if fast else SamplerOptions()
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclasses.dataclass
class SamplingStats:
    """What a sample_tokens call computed. *_rows count token rows through a block, summed over
    the blocks and passes (a reused token is not counted in the blocks it skipped);
    head_rows counts token rows through the head, summed over its evaluations. uncond_skipped:
    iterations at guidance 1 (no unconditional half at all); uncond_cached: iterations whose
    unconditional half came from the condition cache (cfg_refresh)."""
    iterations: int = 0
    encoder_passes: int = 0
    predictor_passes: int = 0
    encoder_rows: int = 0
    predictor_rows: int = 0
    head_calls: int = 0
    head_evaluations: int = 0
    head_rows: int = 0
    head_steps: List[int] = dataclasses.field(default_factory=list)
    reused_tokens: int = 0
    uncond_skipped: int = 0
    uncond_cached: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _cfg_iter(cfg_scale, cfg_schedule, L, mask_len):
    """The guidance scale of an iteration that leaves mask_len tokens masked."""
    if cfg_schedule == "linear":
        cfg_iter = 1.0 + (cfg_scale - 1.0) * (L - mask_len) / L
    else:
        cfg_iter = float(cfg_scale)
    return cfg_iter


@torch.no_grad()
def sample_tokens(net, labels: torch.Tensor, num_iter: int = 64, cfg_scale: float = 1.0,
                  cfg_schedule: str = "linear", temperature: Optional[float] = None,
                  generator: Optional[torch.Generator] = None, progress: bool = False, callback=None,
                  order_generator=None, options: Optional[SamplerOptions] = None,
                  stats: Optional[SamplingStats] = None):
    """Generate tokens [B, seq_len, token_channels] for `labels` with the network `net`.

    Per iteration: encoder + predictor on the current tokens; the next mask keeps the first
    mask_len positions of a random per-sample order masked (mask_len on MAR's cosine schedule,
    see `masking.mask_len_schedule`); the tokens in `mask XOR mask_next` are drawn by the
    denoising head. With cfg_scale != 1 the batch is doubled with the fake class and the head
    mixes eps with the scale of the iteration ("linear": 1 + (cfg - 1) * (L - mask_len) / L).
    temperature None: the config's. Orders come from `order_generator` (a numpy random source,
    drawn as the official code does) when given, else from `generator`. `options` (a
    SamplerOptions; None = official) picks the head's solver and steps, step annealing and
    feature reuse; `stats` (a SamplingStats) is filled with what was computed.
    """
    c = net.config
    if temperature is None:
        temperature = c.temperature
    L, C, T = c.seq_len, c.token_channels, c.class_tokens
    _check_args(L, num_iter, cfg_scale, cfg_schedule, temperature)
    options = SamplerOptions() if options is None else options
    options.check(c.loss, int(c.num_sampling_steps))
    if stats is None:
        stats = SamplingStats()
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

    from djepa.diffusion.solvers import OFFICIAL, anneal_steps, evaluations

    base_steps = options.head_steps or int(c.num_sampling_steps)
    solver_name = options.solver or OFFICIAL[c.loss]
    caches = {}  # batch rows -> (encoder cache, predictor cache)
    if options.feature_reuse is not None:
        from djepa.models.feature_cache import FeatureCache

        def cache_for(rows):
            if rows not in caches:
                caches[rows] = (FeatureCache(options.feature_reuse, T + L), FeatureCache(options.feature_reuse, T + L))
            return caches[rows]
    refresh = options.cfg_refresh
    residual = None  # [B, L, Dp]: uncond - cond predictor features at the masked rows of the last refresh

    steps = range(num_iter)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps)
    schedule = masking.mask_len_schedule(L, num_iter)
    remaining = L
    for step in steps:
        mask_len, _ = schedule[step]
        cfg_iter = _cfg_iter(cfg_scale, cfg_schedule, L, mask_len)
        double = cfg and cfg_iter != 1.0
        cached_u = double and refresh > 1 and residual is not None and step % refresh != 0
        stats.uncond_skipped += int(cfg and not double)
        stats.uncond_cached += int(cached_u)
        mask_next = rank < mask_len
        to_pred = mask if step >= num_iter - 1 else mask & ~mask_next
        x_in, m_in, c_in = tokens.to(dtype), mask, cond
        if double and not cached_u:
            x_in, m_in = torch.cat([x_in, x_in]), torch.cat([mask, mask])
        elif cfg:
            c_in = cond[:B]
        if options.feature_reuse is None:
            encoded, index, valid = net.encode(x_in, m_in, c_in)
            z = net.diffusion_condition(net.predict(encoded, index, valid))
            rows_b = x_in.shape[0]
            stats.encoder_rows += rows_b * encoded.shape[1] * len(net.encoder_blocks)
            stats.predictor_rows += rows_b * (T + L) * len(net.decoder_blocks)
        else:
            need = to_pred
            if x_in.shape[0] == 2 * B:  # both halves; every masked row when the residual is kept
                need = torch.cat([mask, mask]) if refresh > 1 else torch.cat([to_pred, to_pred])
            enc_cache, pred_cache = cache_for(x_in.shape[0])
            encoded, index, valid = net.encode(x_in, m_in, c_in, runner=enc_cache)
            z = net.diffusion_condition(net.predict(encoded, index, valid, runner=pred_cache, need=need))
            stats.encoder_rows += enc_cache.rows
            stats.predictor_rows += pred_cache.rows
            stats.reused_tokens += enc_cache.reused + pred_cache.reused
        stats.encoder_passes += 1
        stats.predictor_passes += 1

        rows = to_pred.nonzero(as_tuple=True)
        z_pred = z[rows]
        if cached_u:
            z_pred = torch.cat([z_pred, z_pred + residual[rows]])
        elif double:
            z_pred = torch.cat([z_pred, z[B:][rows]])
            if refresh > 1:
                residual = z[B:] - z[:B]
        else:
            cfg_iter = 1.0
        n_steps = anneal_steps(base_steps, (L - remaining) / L, options.anneal, options.min_head_steps)
        if options.official:
            new = net.diffloss.sample(z_pred, temperature=temperature, cfg_scale=cfg_iter, generator=generator)
        else:
            new = net.diffloss.sample(z_pred, temperature=temperature, cfg_scale=cfg_iter, generator=generator,
                                      solver=options.solver, steps=n_steps, eta=options.eta)
        evals = evaluations(solver_name, n_steps)
        stats.head_calls += 1
        stats.head_steps.append(n_steps)
        stats.head_evaluations += evals
        stats.head_rows += evals * z_pred.shape[0]
        tokens = tokens.clone()
        tokens[rows] = new.to(tokens.dtype)
        remaining -= schedule[step][1]
        mask = mask_next
        stats.iterations += 1
        if callback is not None:
            callback(step, tokens, to_pred)
    return tokens
