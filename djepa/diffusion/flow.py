"""Flow matching as D-JEPA's variant uses it: x_t = t*x1 + (1-t)*x0 (x0 noise, x1 data),
velocity target x1 - x0, t ~ U(0, 1), MSE; Euler sampling over linspace(0, 1, steps + 1)
with an optional time shift t -> t / (t + s - s*t), or Heun / midpoint steps over the same grid
(djepa.diffusion.solvers). Sampling `temperature` scales the initial noise x0 (as flow samplers
do: tau < 1 starts nearer the mean, sharper samples)."""
import math

import torch


class FlowMatching:
    def __init__(self, time_shift=None):
        if time_shift is not None and (not math.isfinite(float(time_shift)) or float(time_shift) <= 0):
            raise ValueError(f"time_shift must be a positive number or None, got {time_shift!r}")
        self.time_shift = None if time_shift is None else float(time_shift)

    def shift(self, t):
        if self.time_shift is None:
            return t
        s = self.time_shift
        return t / (t + s - s * t)

    def training_losses(self, model, x1, model_kwargs=None, noise=None, t=None):
        """{"loss": mean((model(x_t, t) - (x1 - x0))**2) per row}; model(x, t [M] float, **kw)."""
        if noise is None:
            noise = torch.randn_like(x1)
        elif noise.shape != x1.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x1.shape)}")
        if t is None:
            t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
        elif t.ndim != 1 or t.shape[0] != x1.shape[0]:
            raise ValueError(f"t must be a 1-D tensor with one value per row of x1 ({x1.shape[0]})")
        tb = t.to(x1.dtype).reshape((-1,) + (1,) * (x1.ndim - 1))
        xt = tb * x1 + (1 - tb) * noise
        v = model(xt, t, **(model_kwargs or {}))
        if v.shape != x1.shape:
            raise ValueError(f"the model returned {tuple(v.shape)}, expected {tuple(x1.shape)}")
        loss = (v - (x1 - noise)) ** 2
        return {"loss": loss.mean(dim=tuple(range(1, loss.ndim))) if loss.ndim > 1 else loss}

    @torch.no_grad()
    def sample(self, model, shape, steps, model_kwargs=None, noise=None, generator=None,
               device=None, dtype=torch.float32, temperature=1.0, solver="euler"):
        """From t=0 (noise * temperature) to t=1 in `steps` steps over shifted
        linspace(0, 1, steps+1): Euler (official), or "heun" / "midpoint" (two evaluations a step)."""
        from djepa.diffusion.solvers import check_solver

        check_solver("flow", solver)
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if noise is None:
            if device is None:
                device = generator.device if generator is not None else torch.device("cpu")
            x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        else:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            x = noise
        if temperature != 1.0:
            x = x * temperature
        if solver != "euler":
            def velocity(x, t):
                return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), **(model_kwargs or {}))
            return self.integrate(velocity, x, steps, solver)
        ts = self.shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64))
        for i in range(steps):
            t = torch.full((x.shape[0],), float(ts[i]), device=x.device, dtype=x.dtype)
            x = x + float(ts[i + 1] - ts[i]) * model(x, t, **(model_kwargs or {}))
        return x

    def integrate(self, velocity, x, steps, solver):
        """x at t = 1 from x at t = 0 by `solver` over the shifted grid; velocity(x, t: float)."""
        from djepa.diffusion.solvers import flow_times

        grid, _ = flow_times(solver, steps, self.shift)
        for i in range(steps):
            t0, t1 = grid[i], grid[i + 1]
            h = t1 - t0
            d1 = velocity(x, t0)
            if solver == "euler":
                x = x + h * d1
            elif solver == "heun":
                d2 = velocity(x + h * d1, t1)
                x = x + (0.5 * h) * (d1 + d2)
            else:
                x = x + h * velocity(x + (0.5 * h) * d1, 0.5 * (t0 + t1))
        return x
