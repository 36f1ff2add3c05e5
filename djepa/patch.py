"""Swap djepa's kernels into model objects of the official MAR / D-JEPA code (or any timm-style
model), in place, keeping their weights (the very Parameter objects, so optimizers, EMA lists and
state dicts stay valid) and their outputs:

    report = djepa.patch.patch_model(model)          # both of the next two
    djepa.patch.patch_denoising_mlp(model)           # SimpleMLPAdaLN -> djepa.nn.DenoisingMLP
    djepa.patch.patch_attention(model)               # timm Attention/Block -> MaskedAttention/Block
    djepa.patch.patch_ema(engine_mar)                # its update_ema -> one fused multi-tensor pass
    print(report)

Each returns a `PatchReport`: what was replaced (module path, old class, new class), what was
left alone, and why, and for each replaced attention the backend it runs on in a training step
(with its attention dropout, on the device and dtype of its weights at patch time).
"""
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from djepa.nn import Block as _Block
from djepa.nn import MaskedAttention as _MaskedAttention

__all__ = ["PatchReport", "PatchedBlock", "PatchedMaskedAttention", "patch_model", "patch_denoising_mlp",
           "patch_attention", "patch_ema", "fused_update_ema", "training_attention"]


@dataclass
class PatchReport:
    replaced: list = field(default_factory=list)  # (path, old class name, new class name)
    skipped: list = field(default_factory=list)  # (path, reason)
    module: Optional[nn.Module] = None  # the new module when the object passed in was itself replaced
    training: dict = field(default_factory=dict)  # path -> how its attention runs in a training step

    def extend(self, other: "PatchReport") -> "PatchReport":
        self.replaced += other.replaced
        self.skipped += other.skipped
        self.training.update(other.training)
        return self

    def __str__(self) -> str:
        def line(p, a, b):
            note = f"; in training: {self.training[p]}" if p in self.training else ""
            return f"  {p or '<root>'}: {a} -> {b}{note}"

        lines = [f"replaced {len(self.replaced)}:"] + [line(*r) for r in self.replaced]
        if self.skipped:
            lines += [f"left {len(self.skipped)}:"] + [f"  {p or '<root>'}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def _root(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the real module


def _set(root, path, new):
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _bare(cls):
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    return obj


def _install(root, report, path, old, new, new_name):
    """Put `new` at `path` in root (the object passed in itself: report.module) and report it."""
    if path:
        _set(root, path, new)
    else:
        report.module = new
    report.replaced.append((path, type(old).__name__, new_name))


def training_attention(attn) -> str:
    """How a djepa MaskedAttention runs in a training step: its backend (with the dropout, on the
    device and dtype of its weights now), or why its explicit backend cannot serve it."""
    weight = attn.qkv.weight
    p = float(attn.attn_drop.p)
    where = f"{str(weight.dtype).replace('torch.', '')} on {weight.device}"
    drop = f"attention dropout {p:g}" if p > 0 else "no attention dropout"
    try:
        backend = attn.training_backend()
    except ValueError as exc:
        return f"fails: {exc} ({drop}, {where})"
    return f"attention on {backend} ({drop}, {where})"


# ----------------------------------------------------------------------------- denoising MLP
def _linear(m, cls=nn.Linear):
    return isinstance(m, cls)


def _adaln_problem(m) -> Optional[str]:
    """Why `m` is not a SimpleMLPAdaLN djepa can take over (None when it is)."""
    try:
        te, blocks, fl = m.time_embed.mlp, m.res_blocks, m.final_layer
        ok = (_linear(m.input_proj) and _linear(m.cond_embed) and isinstance(te, nn.Sequential) and len(te) == 3
              and _linear(te[0]) and isinstance(te[1], nn.SiLU) and _linear(te[2])
              and _linear(fl.linear) and isinstance(fl.norm_final, nn.LayerNorm)
              and not fl.norm_final.elementwise_affine and _linear(fl.adaLN_modulation[-1]))
    except (AttributeError, TypeError, IndexError):
        return "not a SimpleMLPAdaLN"
    if not ok:
        return "its layers are not SimpleMLPAdaLN's (Linear/SiLU/LayerNorm)"
    if getattr(m.time_embed, "frequency_embedding_size", 256) != 256:
        return "its timestep embedding is not 256-dimensional"
    for i, b in enumerate(blocks):
        try:
            good = (isinstance(b.in_ln, nn.LayerNorm) and b.in_ln.elementwise_affine and b.in_ln.bias is not None
                    and isinstance(b.mlp, nn.Sequential) and len(b.mlp) == 3 and _linear(b.mlp[0])
                    and isinstance(b.mlp[1], nn.SiLU) and _linear(b.mlp[2])
                    and isinstance(b.adaLN_modulation[0], nn.SiLU) and _linear(b.adaLN_modulation[1]))
        except (AttributeError, TypeError, IndexError):
            good = False
        if not good:
            return f"res_blocks.{i} is not an AdaLN residual block (in_ln, mlp, adaLN_modulation)"
    return None


def _to_denoising_mlp(old, backend):
    """A DenoisingMLP made of `old`'s own layers (same Parameter objects)."""
    from djepa.nn import DenoisingMLP
    from djepa.nn.denoise import FinalLayer, ResBlock, TimestepEmbedder

    W = old.input_proj.out_features
    new = _bare(DenoisingMLP)
    new.in_channels = old.input_proj.in_features
    new.model_channels = W
    new.out_channels = old.final_layer.linear.out_features
    new.z_channels = old.cond_embed.in_features
    new.num_res_blocks = len(old.res_blocks)
    new.grad_checkpointing = bool(getattr(old, "grad_checkpointing", False))
    new._backend = backend
    te = _bare(TimestepEmbedder)
    te.frequency_embedding_size = 256
    te.mlp = old.time_embed.mlp
    new.time_embed = te
    new.cond_embed = old.cond_embed
    new.input_proj = old.input_proj
    blocks = []
    for ob in old.res_blocks:
        nb = _bare(ResBlock)
        nb.backend = backend
        nb.in_ln, nb.mlp, nb.adaLN_modulation = ob.in_ln, ob.mlp, ob.adaLN_modulation
        blocks.append(nb)
    new.res_blocks = nn.ModuleList(blocks)
    fl = _bare(FinalLayer)
    fl.norm_final, fl.linear, fl.adaLN_modulation = old.final_layer.norm_final, old.final_layer.linear, \
        old.final_layer.adaLN_modulation
    new.final_layer = fl
    new.train(old.training)
    return new


def _sampler_problem(owner, mlp) -> Optional[str]:
    """Why the fused sampler cannot stand in for `owner.sample` (None when it can)."""
    from djepa.diffusion import create_diffusion

    gd = getattr(owner, "gen_diffusion", None)
    if gd is None or not callable(getattr(owner, "sample", None)):
        return "no gen_diffusion / sample (a flow-matching head?): its forward is fused, its sampler kept"
    if mlp.out_channels != 2 * mlp.in_channels:
        return "the head does not learn sigma: sampler kept"
    steps = int(getattr(gd, "num_timesteps", 0))
    try:
        ours = create_diffusion(str(steps), noise_schedule="cosine")
        same = (list(getattr(gd, "timestep_map")) == list(ours.timestep_map)
                and len(gd.betas) == steps
                and max(abs(float(a) - float(b)) for a, b in zip(gd.betas, ours.betas)) < 1e-12)
    except (AttributeError, TypeError, ValueError):
        same = False
    if not same:
        return "its sampling schedule is not the cosine one respaced to evenly spread steps: sampler kept"
    return None


def _fused_sample(owner, backend):
    """owner.sample(z, temperature, cfg) through djepa.diffusion.sample, drawing noise exactly as
    MAR's DiffLoss.sample does: x_T = randn(rows, C) from torch's default CPU generator, then
    one randn_like(x) per step on z's device (x: the [2*rows, C] carried batch with CFG)."""
    from djepa.diffusion import sample as fused

    def sample(z, temperature=1.0, cfg=1.0, *, cfg_scale=None, **ignored):
        scale = float(cfg if cfg_scale is None else cfg_scale)
        mlp = owner.net
        C = mlp.in_channels
        steps = int(owner.gen_diffusion.num_timesteps)
        rows = z.shape[0] // 2 if scale != 1.0 else z.shape[0]
        x_T = torch.randn(rows, C).to(z.device)
        noise = torch.stack([torch.randn(z.shape[0], C, device=z.device)[:rows] for _ in range(steps)])
        out = fused(mlp, z, steps=steps, temperature=temperature, cfg_scale=scale, noise=x_T, step_noise=noise,
                    backend="auto" if backend is None else backend)
        return out

    return sample


def patch_denoising_mlp(model: nn.Module, backend: Optional[str] = None, sampler: bool = True) -> PatchReport:
    """Replace every SimpleMLPAdaLN in `model` by a `djepa.nn.DenoisingMLP` built from its own
    layers (forward: fused AdaLN blocks). With `sampler`, the `sample` method of the module holding
    it (MAR's DiffLoss / D-JEPA's GaussDiffLoss) runs djepa's fused sampling loop, with the same
    random draws. A bare SimpleMLPAdaLN passed in comes back as `report.module`."""
    from djepa.nn import DenoisingMLP

    root, report = _root(model), PatchReport()
    for path, m in list(root.named_modules()):
        if isinstance(m, DenoisingMLP) or not hasattr(m, "res_blocks") or not hasattr(m, "final_layer"):
            continue
        why = _adaln_problem(m)
        if why:
            report.skipped.append((path, why))
            continue
        new = _to_denoising_mlp(m, backend)
        _install(root, report, path, m, new, "DenoisingMLP")
        if sampler and path:
            parent_path = path.rpartition(".")[0]
            owner = root.get_submodule(parent_path) if parent_path else root
            why = _sampler_problem(owner, new)
            if why:
                report.skipped.append((f"{parent_path}.sample" if parent_path else "sample", why))
            else:
                owner.sample = _fused_sample(owner, backend)
                report.replaced.append((f"{parent_path}.sample" if parent_path else "sample",
                                        f"{type(owner).__name__}.sample", "djepa.diffusion.sample"))
    return report


# ----------------------------------------------------------------------------- attention
def _attention_problem(m) -> Optional[str]:
    try:
        qkv, proj, heads = m.qkv, m.proj, int(m.num_heads)
    except (AttributeError, TypeError):
        return "not a timm-style Attention"
    if not (_linear(qkv) and _linear(proj)) or qkv.out_features != 3 * qkv.in_features:
        return "its qkv / proj are not Linear(dim, 3 dim) / Linear(dim, dim)"
    if qkv.in_features % heads:
        return "its width is not divisible by its head count"
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return "it normalises the attention output (scale_norm), which MaskedAttention does not"
    for name in ("q_norm", "k_norm", "proj_drop"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Module):
            return f"its {name} is not a module"
    return None


class PatchedMaskedAttention(_MaskedAttention):
    """djepa's MaskedAttention over a timm Attention's own layers; also takes timm's
    `attn_mask=None` (dense masks are not supported: use key_mask)."""

    def forward(self, x, key_mask=None, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("djepa's MaskedAttention takes a per-key mask (key_mask [B, N] bool), "
                             "not a dense attn_mask")
        return super().forward(x, key_mask)


class PatchedBlock(_Block):
    """djepa's Block over the original block's own norms, MLP and layer scales; also takes the
    official D-JEPA calls `blk(x, freqs_cis=None)` and `checkpoint(blk, x, None, None, None)`."""

    def forward(self, x, key_mask=None, *unused, freqs_cis=None):
        if freqs_cis is not None or any(u is not None for u in unused):
            raise ValueError("djepa's Block supports no rotary embeddings (freqs_cis) or extra block inputs")
        return super().forward(x, key_mask)


def _to_masked_attention(old, backend):
    new = _bare(PatchedMaskedAttention)
    new.num_heads = int(old.num_heads)
    new.head_dim = old.qkv.in_features // new.num_heads
    new.scale = float(getattr(old, "scale", new.head_dim ** -0.5))
    new.backend = backend
    new.qkv = old.qkv
    new.q_norm = getattr(old, "q_norm", nn.Identity())
    new.k_norm = getattr(old, "k_norm", nn.Identity())
    drop = getattr(old, "attn_drop", 0.0)
    new.attn_drop = drop if isinstance(drop, nn.Dropout) else nn.Dropout(float(drop or 0.0))
    new.proj = old.proj
    new.proj_drop = getattr(old, "proj_drop", nn.Identity())
    new.train(old.training)
    return new


def _block_problem(m) -> Optional[str]:
    if not all(isinstance(getattr(m, n, None), nn.Module) for n in ("norm1", "attn", "norm2", "mlp")):
        return "not a pre-norm ViT block"
    for name in ("drop_path1", "drop_path2", "drop_path"):
        dp = getattr(m, name, None)
        if dp is not None and not isinstance(dp, nn.Identity) and float(getattr(dp, "drop_prob", 1.0)) != 0.0:
            return f"{name} is on (djepa's Block has no stochastic depth): its attention alone is replaced"
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Module):
            return f"its {name} is not a module"
    return None


def patch_attention(model: nn.Module, backend: Optional[str] = None, blocks: bool = True) -> PatchReport:
    """Replace timm-style `Block`s (norm1/attn/norm2/mlp, no stochastic depth) by djepa's `Block`
    and the other timm-style `Attention`s by djepa's `MaskedAttention`, reusing their own layers
    (q/k norms included, e.g. D-JEPA's RMSNorm). Patched blocks take `forward(x, key_mask=None)`."""
    root, report = _root(model), PatchReport()
    done = set()
    for path, m in list(root.named_modules()):
        if any(d == "" or path == d or path.startswith(d + ".") for d in done):
            continue
        if blocks and hasattr(m, "norm1") and hasattr(m, "attn"):
            why = _block_problem(m) or _attention_problem(m.attn)
            if why is None:
                nb = _bare(PatchedBlock)
                nb.norm1 = m.norm1
                nb.attn = _to_masked_attention(m.attn, backend)
                nb.ls1 = getattr(m, "ls1", nn.Identity())
                nb.norm2 = m.norm2
                nb.mlp = m.mlp
                nb.ls2 = getattr(m, "ls2", nn.Identity())
                nb.train(m.training)
                _install(root, report, path, m, nb, "Block")
                report.training[path] = training_attention(nb.attn)
                done.add(path)
                continue
            report.skipped.append((path, why))
        if hasattr(m, "qkv") and hasattr(m, "proj"):
            why = _attention_problem(m)
            if why:
                report.skipped.append((path, why))
                continue
            na = _to_masked_attention(m, backend)
            _install(root, report, path, m, na, "MaskedAttention")
            report.training[path] = training_attention(na)
            done.add(path)
    return report


def patch_model(model: nn.Module, backend: Optional[str] = None) -> PatchReport:
    """`patch_attention` and `patch_denoising_mlp` on one model."""
    return patch_attention(model, backend).extend(patch_denoising_mlp(model, backend))


# ----------------------------------------------------------------------------- EMA
def _tensors(x, what):
    if isinstance(x, nn.Module):
        return [p for p in x.parameters()]
    if isinstance(x, torch.Tensor):
        raise TypeError(f"fused_update_ema: {what} must be a module or a list of tensors, not one tensor")
    return list(x)


@torch.no_grad()
def fused_update_ema(target_params, source_params, rate=0.99, backend: Optional[str] = None) -> None:
    """`targ = rate * targ + (1 - rate) * src` over the whole list in one fused pass (MAR's
    `update_ema(target_params, source_params, rate)` on lists, D-JEPA's on two modules)."""
    targets = _tensors(target_params, "target_params")
    sources = [s.detach() for s in _tensors(source_params, "source_params")]
    if len(targets) != len(sources):
        raise ValueError(f"fused_update_ema: {len(targets)} target tensors but {len(sources)} source tensors")
    from djepa.ops import ema_update_

    ema_update_([t.detach() if t.requires_grad else t for t in targets], sources, rate, backend=backend)


def patch_ema(namespace, name: str = "update_ema", backend: Optional[str] = None) -> PatchReport:
    """Point `namespace.<name>` (e.g. MAR's `engine_mar.update_ema`, D-JEPA's `engine.djepa.update_ema`;
    a module, class or any object) at `fused_update_ema`. The original stays reachable as
    `namespace._djepa_original_<name>`."""
    fn = getattr(namespace, name, None)
    if not callable(fn):
        raise ValueError(f"patch_ema: {getattr(namespace, '__name__', type(namespace).__name__)} has no "
                         f"function {name!r} to replace")
    where = getattr(namespace, "__name__", type(namespace).__name__)
    if getattr(fn, "_djepa_fused", False):
        return PatchReport(skipped=[(f"{where}.{name}", "already the fused update")])
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or C function without a signature
        params = []

    def update_ema(target_params, source_params, rate=0.99):
        fused_update_ema(target_params, source_params, rate, backend=backend)

    update_ema._djepa_fused = True
    update_ema.__doc__ = fused_update_ema.__doc__
    setattr(namespace, f"_djepa_original_{name}", fn)
    setattr(namespace, name, update_ema)
    return PatchReport(replaced=[(f"{where}.{name}", f"{getattr(fn, '__qualname__', name)}({', '.join(params)})",
                                  "djepa.patch.fused_update_ema")])
