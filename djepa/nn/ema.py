"""EMA of a model, kept in one flat float32 buffer so that each update is one fused pass."""
import copy
import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from djepa.ops.ema import ema_update_


def constant(decay: float) -> Callable[[int], float]:
    """The D-JEPA schedule: the same decay every step (0.9999 there)."""
    _check(decay)

    def schedule(step):
        return decay

    schedule.as_tensor = lambda num_updates: decay
    return schedule


def linear_ramp(start: float = 0.996, end: float = 1.0, steps: int = 1) -> Callable[[int], float]:
    """The I-JEPA schedule: decay rises linearly from `start` to `end` over `steps` updates."""
    _check(start)
    _check(end)
    if steps < 1:
        raise ValueError(f"linear_ramp: steps must be >= 1, got {steps}")

    def schedule(step):
        return start + (end - start) * min(step, steps) / steps

    schedule.as_tensor = lambda num_updates: start + (end - start) * num_updates.clamp(max=steps).float() / steps
    return schedule


def _check(decay):
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay!r}")


class EMA(nn.Module):
    """Exponential moving average of `model`.

    `.module` is a frozen copy (no grads, eval mode) usable as a JEPA target encoder. Its float
    parameters are float32 views into one flat buffer, so `update(model)` is one multi-tensor
    kernel pass: `ema = decay * ema + (1 - decay) * param`.

    decay: the constant decay (used when `schedule` is None).
    schedule: "constant", "linear" (I-JEPA: 0.996 -> 1.0 over `ramp_steps`), or a callable
      mapping the number of updates done so far to a decay. A callable with an `as_tensor`
      attribute (num_updates tensor -> decay as a float or 0-dim tensor, as the built-in
      schedules and djepa.models.official_ema_schedule have) keeps `update` free of host reads
      under torch.compile; without one, a compiled update reads the count on the host (a graph
      break).
    average_buffers: average float buffers too (default: copy every buffer).
    backend: passed to djepa.ops.ema_update_ (None: DJEPA_BACKEND, else auto).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        schedule: Optional[Union[str, Callable[[int], float]]] = None,
        *,
        ramp_steps: int = 1,
        average_buffers: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        _check(decay)
        if schedule is None or schedule == "constant":
            schedule = constant(decay)
        elif schedule == "linear":
            schedule = linear_ramp(0.996, 1.0, ramp_steps)
        elif not callable(schedule):
            raise ValueError(f"EMA: schedule must be None, 'constant', 'linear' or a callable, got {schedule!r}")
        self.schedule = schedule
        self.average_buffers = average_buffers
        self.backend = backend
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self._param_names = [n for n, p in self.module.named_parameters() if p.is_floating_point()]
        total = sum(p.numel() for n, p in self.module.named_parameters() if p.is_floating_point())
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        flat = torch.empty(total, dtype=torch.float32, device=device)
        offset = 0
        for name in self._param_names:
            p = self.module.get_parameter(name)
            flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            offset += p.numel()
        self.register_buffer("flat", flat, persistent=False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self._bind_views()

    def _bind_views(self):
        """Point every float parameter of `.module` at its slice of the flat buffer."""
        offset = 0
        self._targets = []
        for name in self._param_names:
            p = self.module.get_parameter(name)
            p.data = self.flat[offset : offset + p.numel()].view(p.shape)
            # The parameters themselves are updated (not the views), so that their version
            # counters move and caches keyed on them (packed weights, CUDA graphs) see the update.
            self._targets.append(p)
            offset += p.numel()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.flat.dtype != torch.float32:
            self.flat = self.flat.float()
        self._bind_views()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.module.eval()
        return self

    @property
    def decay(self) -> float:
        """The decay the next update will use."""
        return float(self.schedule(int(self.num_updates.item())))

    def _sources(self, model):
        named = dict(model.named_parameters())
        missing = [n for n in self._param_names if n not in named]
        if missing:
            raise ValueError(f"EMA.update: the model has no parameter(s) {missing[:5]} of the EMA copy")
        return [named[n].detach() for n in self._param_names]

    def _scheduled_decay(self):
        # Compiled: the decay as a tensor computed from the update count on its device (no host
        # read, no recompile as the count grows); eager: the schedule's Python float.
        as_tensor = getattr(self.schedule, "as_tensor", None)
        if as_tensor is not None and torch.compiler.is_compiling():
            return as_tensor(self.num_updates)
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, decay: Optional[Union[float, torch.Tensor]] = None):
        """One EMA step towards `model` (decay from the schedule unless given). Compiles without
        a graph break for the built-in schedules (see `schedule`)."""
        sources = self._sources(model)
        if decay is None:
            decay = self._scheduled_decay()
        ema_update_(self._targets, sources, decay, backend=self.backend)
        own_buffers = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            target = own_buffers.get(name)
            if target is None:
                continue
            if self.average_buffers and buf.is_floating_point() and target.is_floating_point():
                d = float(decay) if not isinstance(decay, torch.Tensor) else decay
                target.mul_(d).add_(buf.to(target.dtype) * (1 - d))
            else:
                target.copy_(buf)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: nn.Module):
        """Set the EMA to the model's current weights (decay 0)."""
        self.update(model, decay=0.0)
        self.num_updates.zero_()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
