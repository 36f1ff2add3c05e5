"""D-JEPA's two losses: the JEPA feature loss and the per-token denoising (diffusion/flow) loss."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["JEPAHead", "JEPALoss", "jepa_loss", "masked_mean", "DenoisingHead"]


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(per_token * mask) / sum(mask); 0 when nothing is masked."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


class JEPAHead(nn.Module):
    """Maps predictor features to the encoder's width: Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_ratio: float = 4.0):
        super().__init__()
        hidden = int(in_dim * hidden_ratio)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class JEPALoss(nn.Module):
    """The JEPA loss with its head, laid out as official D-JEPA's `jepaloss` (`net.fc1`,
    `net.norm`, `net.fc2`): forward(z, target, mask) -> (loss, per-token loss [B, L])."""

    def __init__(self, in_dim: int, out_dim: int, hidden_ratio: float = 4.0, beta: float = 2.0):
        super().__init__()
        self.net = JEPAHead(in_dim, out_dim, hidden_ratio)
        self.beta = beta

    def forward(self, z, target, mask):
        return jepa_loss(self.net(z), target, mask, self.beta)


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float = 2.0):
    """SmoothL1(beta) between pred and the detached target, mean over channels, masked mean over
    tokens. Returns (loss, per-token loss [B, L])."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    per_token = F.smooth_l1_loss(pred.to(dtype), target.detach().to(dtype), beta=beta, reduction="none").mean(-1)
    return masked_mean(per_token, mask), per_token


class DenoisingHead(nn.Module):
    """MAR's DiffLoss: a DenoisingMLP conditioned on predictor features z, trained per token.

    loss="diffusion": cosine Gaussian diffusion with 1000 training steps and learned sigma
    (loss = MSE(eps) + VB); sampling with the respaced `num_sampling_steps` schedule through
    `djepa.diffusion.sample`. loss="flow": flow matching (the MLP outputs a velocity; its
    timestep input is t * 1000 so the sinusoidal embedding sees the same range as diffusion).
    """

    def __init__(self, token_channels: int, z_channels: int, width: int, depth: int, loss: str = "diffusion",
                 num_sampling_steps: str = "100", flow_time_shift: Optional[float] = None,
                 grad_checkpointing: bool = False, backend: Optional[str] = None):
        super().__init__()
        from djepa.nn import DenoisingMLP

        self.kind = loss
        self.token_channels = token_channels
        self.num_sampling_steps = int(num_sampling_steps)
        self.backend = backend
        out = 2 * token_channels if loss == "diffusion" else token_channels
        self.net = DenoisingMLP(token_channels, width, out, z_channels, depth,
                                grad_checkpointing=grad_checkpointing, backend=backend)
        if loss == "diffusion":
            from djepa.diffusion import create_diffusion

            self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        else:
            from djepa.diffusion import FlowMatching

            self.flow = FlowMatching(time_shift=flow_time_shift)

    def _flow_model(self, x, t, c):
        return self.net(x, t * 1000.0, c)

    def _flow_model_cfg(self, x, t, c, cfg_scale):
        return self.net.forward_with_cfg(x, t * 1000.0, c, cfg_scale)

    def per_token_loss(self, target, z, generator=None, t=None, noise=None):
        """Loss of every row: target [M, C], z [M, z_channels] -> [M].

        `t` / `noise` fix the timesteps and noise (else drawn from `generator`: t first, then the
        noise, as MAR's DiffLoss draws them; the noise in float32 whatever the model's dtype)."""
        rows = target.shape[0]
        gen_device = generator.device if generator is not None else target.device
        if t is None:
            if self.kind == "diffusion":
                t = torch.randint(0, self.train_diffusion.num_timesteps, (rows,), generator=generator,
                                  device=gen_device)
            else:
                t = torch.rand(rows, generator=generator, device=gen_device, dtype=torch.float32)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=gen_device, dtype=torch.float32)
        noise = noise.to(device=target.device, dtype=target.dtype)
        if self.kind == "diffusion":
            t = t.to(target.device)
            return self.train_diffusion.training_losses(self.net, target, t, dict(c=z), noise=noise)["loss"]
        t = t.to(device=target.device, dtype=target.dtype)
        return self.flow.training_losses(self._flow_model, target, dict(c=z), noise=noise, t=t)["loss"]

    @torch.no_grad()
    def sample(self, z, temperature=1.0, cfg_scale=1.0, generator=None, noise=None, step_noise=None,
               solver=None, steps=None, eta=0.0):
        """Tokens [M, C] for conditions z [M, z] (cfg_scale == 1), or for z = [cond; uncond]
        ([2M, z], cfg_scale != 1) the M guided tokens of the conditional half.

        solver None: the official loop (MAR's DDPM, or Euler for flow) with `steps` (default:
        num_sampling_steps), as MAR draws its noise. A named solver (djepa.diffusion.solvers:
        "ddpm", "ddim" with `eta`, "dpm++2m"; flow: "euler", "heun", "midpoint") runs djepa's loop,
        which embeds the conditions once and keeps the per-step time embeddings across calls.

        Diffusion noise, unless given (x_T `noise` [M, C], `step_noise` [steps, M, C]), is drawn
        from `generator` as MAR's p_sample_loop draws it: x_T, then one draw per step of the whole
        carried batch ([2M, C] with CFG, of which the conditional half is used); a named solver
        draws x_T [M, C] and, if it injects step noise, one [M, C] per step. Flow: x0 = `noise`
        [M, C] (else drawn from `generator`), times `temperature`, then the solver's steps."""
        cfg = float(cfg_scale) != 1.0
        rows = z.shape[0] // 2 if cfg else z.shape[0]
        steps = self.num_sampling_steps if steps is None else steps
        gen_device = generator.device if generator is not None else z.device
        C = self.token_channels
        if self.kind == "diffusion":
            from djepa.diffusion import sample

            backend = "auto" if self.backend is None else self.backend
            if solver is not None:
                from djepa.diffusion.solvers import gaussian_plan

                if noise is None:
                    noise = torch.randn(rows, C, generator=generator, device=gen_device, dtype=torch.float32)
                if step_noise is None and gaussian_plan(solver, steps, eta).stochastic:
                    step_noise = torch.randn(steps, rows, C, generator=generator, device=gen_device,
                                             dtype=torch.float32)
                out = sample(self.net, z, steps=steps, temperature=temperature, cfg_scale=cfg_scale,
                             noise=noise.to(z.device), step_noise=None if step_noise is None else step_noise.to(z.device),
                             backend=backend, solver=solver, eta=eta)
                return out[:rows]
            if noise is None:
                noise = torch.randn(rows, C, generator=generator, device=gen_device, dtype=torch.float32)
            if step_noise is None:
                step_noise = torch.stack([
                    torch.randn(z.shape[0], C, generator=generator, device=gen_device, dtype=torch.float32)[:rows]
                    for _ in range(steps)])
            out = sample(self.net, z, steps=steps, temperature=temperature, cfg_scale=cfg_scale,
                         noise=noise.to(z.device), step_noise=step_noise.to(z.device), backend=backend)
        else:
            if eta:
                raise ValueError(f"eta is DDIM's noise level; a flow head takes none (got eta={eta})")
            if noise is None:
                noise = torch.randn(rows, C, generator=generator, device=gen_device, dtype=torch.float32)
            noise = noise.to(z.device)
            if solver is not None:
                return self._sample_flow(z, noise, steps, solver, temperature, cfg_scale)
            if cfg:
                out = self.flow.sample(self._flow_model_cfg, (2 * rows, C), steps,
                                       model_kwargs=dict(c=z, cfg_scale=cfg_scale),
                                       noise=torch.cat([noise, noise]), temperature=temperature)
            else:
                out = self.flow.sample(self._flow_model, (rows, C), steps,
                                       model_kwargs=dict(c=z), noise=noise, temperature=temperature)
        return out[:rows]

    def _sample_flow(self, z, noise, steps, solver, temperature, cfg_scale):
        """The flow head's loop with the conditions embedded once and the time embeddings of
        every evaluation time from a table kept across calls (the velocity is the same function
        of (x, t, z) as in training: the MLP sees t * 1000)."""
        from djepa.diffusion.sampler import head_output, time_table
        from djepa.diffusion.solvers import check_solver, flow_times

        check_solver("flow", solver)
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        cfg = float(cfg_scale) != 1.0
        rows, C = noise.shape
        dtype = self.net.input_proj.weight.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        _, evals = flow_times(solver, int(steps), self.flow.shift)
        times = sorted({t for ts in evals for t in ts})
        # the MLP's time input, as the official loop computes it: float32(t) * 1000 in float32
        inputs = tuple(float(torch.tensor(t, dtype=work) * 1000.0) for t in times)
        table = time_table(self.net, inputs)
        row = {t: i for i, t in enumerate(times)}
        c_emb = self.net.cond_embed(z)

        def velocity(x, t):
            xin = x.to(dtype)
            if cfg:
                xin = torch.cat([xin, xin])
            i = row[t]
            v = head_output(self.net, xin, table[i:i + 1], c_emb).to(work)
            if cfg:
                v = v[rows:] + cfg_scale * (v[:rows] - v[rows:])
            return v

        x = noise.to(work) * temperature
        return self.flow.integrate(velocity, x, int(steps), solver)
