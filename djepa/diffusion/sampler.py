"""The diffusion head's sampling loop: `cond_embed(z)` and the time-embedding table once per
loop, then `steps` fused reverse steps of the chosen solver (djepa.diffusion.solvers: MAR's
DDPM by default, DDIM, DPM-Solver++ 2M); on a GPU the whole loop is one CUDA graph, replayed.

CFG layout (MAR): with cfg_scale != 1, z is the doubled batch [cond; uncond] (M = 2B rows).
Only the conditional half of the state is carried (MAR runs the uncond half of x too but never
uses it: forward_with_cfg feeds the first half of x to both halves), and the result is
returned as [x; x] with M rows, so MAR's caller can keep `tokens.chunk(2)[0]`.

Noise order (for reproducibility): x_T = randn(B, C) first, then one randn(B, C) per step
taken, all from `generator` (the last step's is drawn but unused); this is the order
GaussianDiffusion.p_sample_loop draws in, so without CFG the eager sampler reproduces it. A
deterministic solver (DDIM with eta 0, DPM-Solver++) draws x_T only, and scales it by the
temperature (see djepa.diffusion.solvers).
"""
import contextlib
import functools
import math
from collections import OrderedDict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from djepa.diffusion import solvers
from djepa.diffusion.gaussian import _check_sampling_scalar
from djepa.ops import _dispatch
from djepa.ops import denoise as _d


def _check(mlp, z, steps, temperature, cfg_scale):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if steps > 1000:
        raise ValueError(f"steps must be <= 1000 (the training schedule's length), got {steps}")
    temperature = _check_sampling_scalar("temperature", temperature)
    cfg_scale = _check_sampling_scalar("cfg_scale", cfg_scale)
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != mlp.z_channels:
        raise ValueError(f"z must be [M, {mlp.z_channels}] (z_channels), got {tuple(getattr(z, 'shape', ()))}")
    cfg = cfg_scale != 1.0
    if cfg and z.shape[0] % 2:
        raise ValueError(f"with cfg_scale != 1, z must be [cond; uncond] with an even number of rows, got {z.shape[0]}")
    return temperature, cfg_scale, cfg


def _draw_noise(shape, steps, generator, device, noise, step_noise, stochastic=True):
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {list(shape)} (x_T of the carried rows), got {list(noise.shape)}")
    if not stochastic:
        if step_noise is not None:
            raise ValueError("step_noise: this solver injects no noise after x_T (DDIM with eta 0, DPM-Solver++)")
        return noise, None
    if step_noise is None:
        step_noise = torch.stack([torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                                  for _ in range(steps)])
    elif tuple(step_noise.shape) != (steps,) + shape:
        raise ValueError(f"step_noise must be {[steps, *shape]}, got {list(step_noise.shape)}")
    return noise, step_noise


def _timesteps(diffusion, device):
    """The respaced steps' original timesteps on `device`: a host-to-device copy, so made before
    any capture and handed to the loop."""
    return torch.as_tensor(diffusion.timestep_map, device=device, dtype=torch.long)


def _eager_loop(mlp, z, x, step_noise, diffusion, cfg_scale, temperature):
    """The official loop (MAR's p_sample steps through the diffusion's own formulas)."""
    c_emb = mlp.cond_embed(z)
    x = x.to(torch.float64 if _d._param_dtype(mlp) == torch.float64 else torch.float32)
    for k, i in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        x = _d.denoise_step_reference(mlp, x, c_emb, diffusion, i, step_noise[k].to(x.dtype), cfg_scale, temperature)
    return x


def time_table(mlp, timesteps):
    """mlp.time_embed of each of `timesteps` (a tuple of numbers): [len, W] in the MLP's dtype,
    kept on the MLP and reused by every loop with the same steps until its weights change (a
    masked-autoregressive sampler runs the same steps at every iteration)."""
    params = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in mlp.time_embed.parameters())
    cache = getattr(mlp, "_djepa_time_tables", None)
    if cache is None or cache[0] != params:
        cache = (params, {})
        mlp._djepa_time_tables = cache
    key = tuple(timesteps)
    table = cache[1].get(key)
    if table is None:
        dtype = torch.long if all(isinstance(t, int) for t in key) else torch.float32
        t = torch.as_tensor(key, dtype=dtype, device=params[0][3])
        table = cache[1][key] = mlp.time_embed(t).contiguous()
        while len(cache[1]) > 64:
            cache[1].pop(next(iter(cache[1])))
    return table


def head_output(mlp, xin, temb, c_emb):
    """The head's output for inputs xin [M, C], one time embedding temb [1, W] (or [M, W]) and
    embedded conditions c_emb = mlp.cond_embed(z) [M, W]: mlp.forward without re-embedding."""
    h = mlp.input_proj(xin)
    y = c_emb + temb
    for block in mlp.res_blocks:
        h = block(h, y)
    return mlp.final_layer(h, y)


def _eager_plan_loop(mlp, z, x, step_noise, plan, cfg, cfg_scale, temperature):
    """A solver's plan in torch ops (every solver but the official DDPM loop, off the fused path)."""
    dt = torch.float64 if _d._param_dtype(mlp) == torch.float64 else torch.float32
    c_emb = mlp.cond_embed(z)
    table = time_table(mlp, plan.diffusion.timestep_map)
    B, C = x.shape

    def model(x, i):
        xin = x.to(_d._param_dtype(mlp))
        if cfg:
            xin = torch.cat([xin, xin])
        out = head_output(mlp, xin, table[i:i + 1], c_emb).to(dt)
        e = out[:B, :C]
        if cfg:
            e = out[B:, :C] + cfg_scale * (e - out[B:, :C])
        return e, out[:B, C:2 * C] if out.shape[1] >= 2 * C else None

    return solvers.solve_gaussian(plan, x.to(dt), model, temperature, step_noise)


def _fused_loop(run, mlp, pk, z, x_T, step_noise, timesteps, plan, cfg, cfg_scale, temperature, only=None):
    """The loop of fused steps; `only` (step indices) restricts it for warm-up. Every tensor it
    reads is an argument (made before a capture): it creates none from host data. A step with
    `combine` (DPM-Solver++) has the fused update write y = x0 to a buffer, then mixes the state
    with elementwise ops and refreshes the MLP input itself."""
    c_emb = mlp.cond_embed(z).contiguous()
    temb = mlp.time_embed(timesteps).contiguous()
    B = x_T.shape[0]
    x = x_T.clone()
    xin = x.to(c_emb.dtype, copy=True)
    if cfg:
        xin = torch.cat([xin, xin])
    nxt = torch.empty_like(xin)
    y = y_prev = None
    for k, st in enumerate(plan.steps):
        if only is not None and k not in only:
            continue
        noise = step_noise[k] if step_noise is not None else None
        if st.combine is None:
            _d._fused_step(run, pk, x, xin, c_emb, temb[st.index], noise, st.coefs(temperature), cfg, cfg_scale,
                           x, nxt)
            xin, nxt = nxt, xin
            continue
        if y is None:
            y, y_prev = torch.empty_like(x), torch.zeros_like(x)
        _d._fused_step(run, pk, x, xin, c_emb, temb[st.index], None, st.coefs(temperature), cfg, cfg_scale, y, None)
        a, b, c = st.combine
        x.mul_(a).add_(y, alpha=b)
        if c:
            x.add_(y_prev, alpha=c)
        y, y_prev = y_prev, y
        xin[:B].copy_(x)
        if cfg:
            xin[B:].copy_(x)
    assert x.shape[0] == B
    return x


_FORBIDDEN_IN_CAPTURE = {
    "lift_fresh": "a tensor made from Python data (a host-to-device copy)",
    "_local_scalar_dense": "a device value read on the host (.item(), bool(), int(): a sync)",
    "nonzero": "an output whose shape depends on device data (a sync)",
    "masked_select": "an output whose shape depends on device data (a sync)",
    "_unique2": "an output whose shape depends on device data (a sync)",
    "unique_consecutive": "an output whose shape depends on device data (a sync)",
}


def _same_device(a, b):
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class _CaptureGuardDispatch(TorchDispatchMode):
    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _FORBIDDEN_IN_CAPTURE:
            raise RuntimeError(f"{func} inside the CUDA-graph capture: {_FORBIDDEN_IN_CAPTURE[name]}")
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            dev = a.device if isinstance(a, torch.Tensor) else a if isinstance(a, torch.device) else None
            if dev is not None and not _same_device(dev, self.device):
                raise RuntimeError(f"{func} inside the CUDA-graph capture on {self.device} touches {dev} "
                                   "(a copy between devices, or a host value baked into the graph)")
        return func(*args, **kwargs)


class _CaptureGuardFunction(TorchFunctionMode):
    _HOST_READS = {"tolist", "numpy", "cpu", "item"}

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self._HOST_READS and args and isinstance(args[0], torch.Tensor) and \
                _same_device(args[0].device, self.device):
            raise RuntimeError(f"Tensor.{name}() inside the CUDA-graph capture: a device value read on the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def capture_guard(device):
    """Refuse, while a CUDA graph of work on `device` is captured, what a graph cannot hold:
    tensors made from Python data, host reads of device values and syncs, shapes that depend on
    device data, and tensors of another device (each raises a RuntimeError naming the op). On a
    GPU the capture itself would fail or bake stale values; under this guard the same loop run
    on the CPU fails the same way, so tests can check the captured code without a GPU."""
    device = torch.device(device)

    def no_sync(*args, **kwargs):
        raise RuntimeError("torch.cuda.synchronize() inside the CUDA-graph capture")

    sync = torch.cuda.synchronize
    torch.cuda.synchronize = no_sync
    try:
        with _CaptureGuardFunction(device), _CaptureGuardDispatch(device):
            yield
    finally:
        torch.cuda.synchronize = sync


class _CudaGraphCapture:
    """The loop as a torch.cuda.CUDAGraph: warm-up on a side stream, capture under the guard."""

    def __init__(self, device):
        self.device = device
        self.graph = None

    def warmup(self, fn):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile / autotune every kernel outside the capture
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), capture_guard(self.device):
            return fn()

    def replay(self):
        self.graph.replay()


# Where sample() captures its loop, and how (tests put a CPU stand-in of the capture here).
_GRAPH_DEVICE_TYPES = ("cuda",)
_CAPTURE = _CudaGraphCapture


class _Graph:
    """The loop of one (weights, shapes, solver, steps, temperature, backend), captured once. Its
    inputs, the CFG scale included, are static device tensors that each call refills, so the
    graph serves every call of its key (MAR's linear CFG schedule: a new scale per iteration)."""

    def __init__(self, run, mlp, z, x_T, step_noise, plan, cfg, temperature):
        self.pk = _d.packed(mlp)
        self.z, self.x_T = z.clone(), x_T.clone()
        self.noise = None if step_noise is None else step_noise.clone()
        self.cfg_scale = _d._cfg_scale_tensor(1.0, z.device)
        self.timesteps = _timesteps(plan.diffusion, z.device)
        loop = functools.partial(_fused_loop, run, mlp, self.pk, self.z, self.x_T, self.noise, self.timesteps,
                                 plan, cfg, self.cfg_scale, temperature)
        self.capture = _CAPTURE(z.device)
        self.capture.warmup(functools.partial(loop, only={0, len(plan.steps) - 1}))
        self.out = self.capture.capture(loop)

    def __call__(self, z, x_T, step_noise, cfg_scale):
        self.z.copy_(z)
        self.x_T.copy_(x_T)
        if self.noise is not None:
            self.noise.copy_(step_noise)
        self.cfg_scale.fill_(cfg_scale)
        self.capture.replay()
        return self.out.clone()


_GRAPHS = OrderedDict()
# MAR's 64 iterations over 256 tokens predict 1..7 tokens per sample: 7 shapes, one graph each;
# annealed head steps multiply that by the step counts an annealing schedule visits.
_MAX_GRAPHS = 32


def _graph_key(mlp, z, B, steps, cfg, temperature, backend, solver="ddpm", eta=0.0):
    """What a captured loop depends on; the CFG scale is not in it (a device tensor, refilled)."""
    params = tuple((p.data_ptr(), p._version) for p in mlp.parameters())
    return (id(mlp), params, tuple(z.shape), z.dtype, str(z.device), B, steps, cfg, temperature, backend,
            solver, eta)


@torch.no_grad()
def sample(mlp, z, steps=100, temperature=1.0, cfg_scale=1.0, generator=None, backend="auto",
           noise=None, step_noise=None, cuda_graph=True, solver="ddpm", eta=0.0):
    """Sample tokens [M, in_channels] float32 from the diffusion head `mlp` (a DenoisingMLP)
    conditioned on z [M, z_channels], with the cosine schedule respaced to `steps` steps.

    solver: "ddpm" (MAR's loop, the default), "ddim" (with `eta` in [0, 1]) or "dpm++2m"; see
    djepa.diffusion.solvers for each one's step and what temperature scales.
    noise: x_T [B, C] (B = M, or M/2 with CFG); step_noise: [steps, B, C], the noise of each
    step taken (only for solvers that inject noise at every step); both default to draws from
    `generator` (see the module docstring).
    z must have the MLP's dtype; under autocast it is cast to it and the loop runs without autocast.
    backend: "auto" | "cuda" | "triton" | "eager" (fused steps on the first two). On a GPU
    with a fused backend and cuda_graph=True, the loop is captured once per (model weights,
    shapes, solver, steps, temperature, backend) and replayed; the CFG scale is read on the
    device at each replay, so every scale shares the graph.
    """
    temperature, cfg_scale, cfg = _check(mlp, z, steps, temperature, cfg_scale)
    solver, eta = solvers.check_solver("diffusion", solver, eta)
    if z.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(z.device.type):
        # The loop runs in the MLP's own dtype: conditions follow its weights, autocast is off.
        with torch.autocast(z.device.type, enabled=False):
            return sample(mlp, z.to(_d._param_dtype(mlp)) if z.is_floating_point() else z, steps,
                          temperature, cfg_scale, generator, backend, noise, step_noise, cuda_graph, solver, eta)
    if z.dtype != _d._param_dtype(mlp):
        raise TypeError(f"z has dtype {z.dtype}, the MLP {_d._param_dtype(mlp)}")
    M = z.shape[0]
    B = M // 2 if cfg else M
    C = mlp.in_channels
    plan = solvers.gaussian_plan(solver, steps, eta, mlp.out_channels == 2 * C)
    diffusion = plan.diffusion
    x_T, step_noise = _draw_noise((B, C), steps, generator, z.device, noise, step_noise, plan.stochastic)
    if x_T.device != z.device or (step_noise is not None and step_noise.device != z.device):
        raise ValueError(f"noise and step_noise must be on {z.device}")
    if not plan.stochastic and temperature != 1.0:
        x_T = x_T * temperature  # a deterministic solver: temperature scales x_T
    probe = x_T.float() if _d._param_dtype(mlp) != torch.float64 else x_T.double()
    cuda_reason, triton_reason = _d._step_reasons(mlp, probe, diffusion)
    chosen = _dispatch.select_backend("denoise_step", backend, z.device,
                                      cuda_reason=cuda_reason, triton_reason=triton_reason)
    if (chosen == "eager" or B == 0) and solver == "ddpm":
        x = _eager_loop(mlp, z, x_T, step_noise, diffusion, cfg_scale, temperature)
    elif chosen == "eager" or B == 0:
        x = _eager_plan_loop(mlp, z, x_T, step_noise, plan, cfg, cfg_scale, temperature)
    else:
        run = _d._runner(chosen, z.device)
        x_T = x_T.float().contiguous()
        step_noise = None if step_noise is None else step_noise.float().contiguous()
        if z.device.type in _GRAPH_DEVICE_TYPES and cuda_graph:
            key = _graph_key(mlp, z, B, steps, cfg, temperature, chosen, solver, eta)
            graph = _GRAPHS.pop(key, None)
            if graph is None:
                while len(_GRAPHS) >= _MAX_GRAPHS:
                    _GRAPHS.popitem(last=False)
                graph = _Graph(run, mlp, z.contiguous(), x_T, step_noise, plan, cfg, temperature)
            _GRAPHS[key] = graph
            x = graph(z, x_T, step_noise, cfg_scale)
        else:
            x = _fused_loop(run, mlp, _d.packed(mlp), z.contiguous(), x_T, step_noise, _timesteps(diffusion, z.device),
                            plan, cfg, _d._cfg_scale_tensor(cfg_scale, z.device), temperature)
    return torch.cat([x, x]) if cfg else x
