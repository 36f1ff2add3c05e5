"""D-JEPA's official EMA decay schedule, for the DJEPA model (`ema_schedule="official"`) and the
official-checkpoint conversion (djepa.models.official re-exports it). It imports nothing of
djepa, so both can use it without importing each other."""
from typing import Optional

__all__ = ["official_ema_schedule"]


def official_ema_schedule(ema_rate: float, ramp_steps: Optional[int] = None, cap: float = 0.9999):
    """D-JEPA's `ema_sched.adjust_ema_decay` as a `djepa.nn.EMA` schedule (update count -> decay):
    `min(step / ramp_steps * (1 - ema_rate) + ema_rate, 0.9999)`, where the official code's
    fractional epoch over its epoch count is step / ramp_steps. `ramp_steps` None: no ramp."""
    if ramp_steps is not None and (isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 1):
        raise ValueError(f"official_ema_schedule: ramp_steps must be None or an int >= 1, got {ramp_steps!r}")
    rate = float(ema_rate)

    def schedule(step: int) -> float:
        decay = rate if ramp_steps is None else step / ramp_steps * (1.0 - rate) + rate
        return min(decay, cap)

    def as_tensor(num_updates):  # the same on the device, for a compiled EMA.update
        if ramp_steps is None:
            return min(rate, cap)
        return (num_updates.double() / ramp_steps * (1.0 - rate) + rate).clamp(max=cap).float()

    schedule.as_tensor = as_tensor
    return schedule
