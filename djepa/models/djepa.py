"""The D-JEPA model: context encoder, feature predictor, JEPA + denoising losses, EMA target."""
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from djepa.models import masking
from djepa.models.config import DJEPAConfig
from djepa.models.losses import DenoisingHead, JEPALoss, masked_mean

__all__ = ["DJEPA", "DJEPANet"]

_norm = partial(nn.LayerNorm, eps=1e-6)
# State-dict names that changed; old djepa checkpoints still load (their config keeps its meaning,
# see DJEPAConfig.from_dict).
_LEGACY_PREFIXES = {"jepa_head.": "jepaloss.net."}


def _rename_legacy_keys(module, state_dict, prefix, *args):
    for old, new in _LEGACY_PREFIXES.items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            value = state_dict.pop(key)
            if module.jepaloss is not None:  # a head the model no longer has (jepa_weight 0) is dropped
                state_dict[prefix + new + key[len(prefix + old):]] = value


class DJEPANet(nn.Module):
    """The online network (everything the optimizer trains); `DJEPA` holds it and its EMA.

    Parameter names follow the official D-JEPA code where it has the same piece.
    """

    def __init__(self, config: DJEPAConfig):
        super().__init__()
        from djepa.nn import Block, RMSNorm

        c = self.config = config
        D, Dp, L, T = c.embed_dim, c.pred_embed_dim, c.seq_len, c.class_tokens
        mar = c.arch == "mar"
        # MAR's positional embeddings also cover the class tokens; D-JEPA's learned buffer holds them.
        P = T + L if mar else L
        self.class_emb = nn.Embedding(c.num_classes, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.buffer = None if mar else nn.Parameter(torch.zeros(1, T, D))
        # context encoder
        self.z_proj = nn.Linear(c.token_channels, D)
        self.z_proj_ln = _norm(D)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P, D))
        qk_layer = partial(RMSNorm, eps=1e-6) if c.qk_norm == "rms" else _norm
        block = partial(Block, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm != "none",
                        proj_drop=c.proj_dropout, attn_drop=c.attn_dropout, norm_layer=_norm,
                        attn_norm_layer=qk_layer, backend=c.backend)
        self.encoder_blocks = nn.ModuleList([block(D, c.num_heads) for _ in range(c.depth)])
        self.encoder_norm = _norm(D)
        # feature predictor
        self.decoder_embed = nn.Linear(D, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, P, Dp))
        self.decoder_blocks = nn.ModuleList([block(Dp, c.pred_num_heads) for _ in range(c.pred_depth)])
        self.decoder_norm = _norm(Dp)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dp)) if c.diffusion_pos_embed else None
        self._init_trunk()
        # heads (their own initialisation, as in the official code)
        self.diffloss = DenoisingHead(c.token_channels, Dp, c.diffloss_width, c.diffloss_depth, loss=c.loss,
                                      num_sampling_steps=c.num_sampling_steps, flow_time_shift=c.flow_time_shift,
                                      grad_checkpointing=c.grad_checkpointing, backend=c.backend)
        # official D-JEPA builds the JEPA head only when its loss is on
        self.jepaloss = JEPALoss(Dp, D, c.jepa_hidden_ratio, c.jepa_beta) if c.jepa_weight > 0 else None
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    @property
    def jepa_head(self):
        """The JEPA head (`jepaloss.net`), None without a JEPA loss."""
        return None if self.jepaloss is None else self.jepaloss.net

    def _init_trunk(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    # --- pieces ----------------------------------------------------------------------------
    def class_embedding(self, labels: torch.Tensor, drop: bool = False, generator=None) -> torch.Tensor:
        """Class embeddings [B, D]; with `drop`, each label becomes the fake class with
        probability label_drop_prob (classifier-free guidance training)."""
        emb = self.class_emb(labels)
        if drop and self.config.label_drop_prob > 0:
            gen_device = generator.device if generator is not None else labels.device
            u = torch.rand(labels.shape[0], generator=generator, device=gen_device).to(labels.device)
            dropped = (u < self.config.label_drop_prob).unsqueeze(-1)
            emb = torch.where(dropped, self.fake_latent.to(emb.dtype), emb)
        return emb

    def unconditional_embedding(self, batch: int) -> torch.Tensor:
        return self.fake_latent.expand(batch, -1)

    def _run(self, blocks, x, key_mask):
        for blk in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, key_mask, use_reentrant=False)
            else:
                x = blk(x, key_mask)
        return x

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor, runner=None):
        """Context encoder on the class tokens + visible tokens (mask False).

        Returns (x [B, T + V, D] after encoder_norm, index [B, V], valid [B, V]) with T the
        number of class tokens; V is the largest visible count, shorter samples are padded and
        excluded as keys through the attention's key_mask. `runner(blocks, x, key_mask,
        positions)` replaces the plain run of the blocks (the sampler's feature cache);
        positions [B, T + V] number each row (class tokens 0..T-1, sequence position p as T + p).
        """
        T = self.config.class_tokens
        pos = self.encoder_pos_embed_learned
        if self.buffer is None:  # MAR: the class embedding at every class token, plus their positions
            x = self.z_proj(tokens) + pos[:, T:]
            buffer = class_embedding.unsqueeze(1) + pos[:, :T]
        else:
            x = self.z_proj(tokens) + pos
            buffer = self.buffer + class_embedding.unsqueeze(1)
        visible, index, valid = masking.gather_visible(x, mask)
        buffer = buffer.to(visible.dtype)
        x = torch.cat([buffer, visible], dim=1)
        x = self.z_proj_ln(x)
        key_mask = None
        if torch.compiler.is_compiling() or not bool(valid.all()):  # compiled: no host read
            key_mask = torch.cat([valid.new_ones(valid.shape[0], T), valid], dim=1)
        if runner is None:
            x = self._run(self.encoder_blocks, x, key_mask)
        else:
            B = x.shape[0]
            positions = torch.cat([torch.arange(T, device=x.device).expand(B, T), index + T], dim=1)
            x = runner(self.encoder_blocks, x, key_mask, positions)
        return self.encoder_norm(x), index, valid

    def predict(self, encoded: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, runner=None,
                need: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feature predictor over class tokens + the full sequence (mask token where masked).

        Returns z [B, L, Dp] (decoder_norm output, class tokens dropped). `runner` as in
        `encode`; with it, `need` [B, L] bool names the rows the caller reads (the runner may
        leave the others uncomputed)."""
        T, L = self.config.class_tokens, self.config.seq_len
        x = self.decoder_embed(encoded)
        seq = masking.scatter_visible(x[:, T:], index, valid, L, self.mask_token.reshape(-1))
        pos = self.decoder_pos_embed_learned
        if self.buffer is None:  # MAR: positions for the class tokens too
            head, seq = x[:, :T] + pos[:, :T], seq + pos[:, T:]
        else:
            head, seq = x[:, :T], seq + pos
        x = torch.cat([head, seq], dim=1)
        if runner is None:
            x = self._run(self.decoder_blocks, x, None)
        else:
            B = x.shape[0]
            positions = torch.arange(T + L, device=x.device).expand(B, T + L)
            slots = None if need is None else torch.cat([need.new_zeros(B, T), need], dim=1)
            x = runner(self.decoder_blocks, x, None, positions, need=slots)
        return self.decoder_norm(x)[:, T:]

    def diffusion_condition(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's conditions for predictor features z [B, L, Dp] (MAR adds its
        diffusion positional embedding; official D-JEPA uses z as is)."""
        if self.diffusion_pos_embed_learned is None:
            return z
        return z + self.diffusion_pos_embed_learned

    def target_features(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The encoder's normed features of every token (no mask, no label drop): [B, L, D]."""
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        x, _, _ = self.encode(tokens, mask, self.class_embedding(labels))
        return x[:, self.config.class_tokens:]


class DJEPA(nn.Module):
    """D-JEPA: a MAR-style masked encoder/predictor over tokens, trained with a per-token
    denoising loss plus a JEPA loss against the EMA model's encoder features.

    `self.net` holds the trained networks, `self.ema` (a `djepa.nn.EMA`) its moving average:
    the JEPA target, and by default the model used by `sample` and `features`. Call
    `update_ema()` after every optimizer step; give the optimizer `trainable_parameters()`.
    """

    def __init__(self, config: DJEPAConfig):
        super().__init__()
        if isinstance(config, dict):
            config = DJEPAConfig.from_dict(config)
        if not isinstance(config, DJEPAConfig):
            raise TypeError(f"DJEPA needs a DJEPAConfig (or its dict), got {type(config).__name__}")
        self.config = config
        self.net = DJEPANet(config)
        from djepa.nn import EMA

        ema_backend = None if config.backend is None else ("eager" if config.backend == "eager" else "auto")
        schedule = None
        if config.ema_schedule == "official":
            from djepa.models.ema_schedule import official_ema_schedule

            schedule = official_ema_schedule(config.ema_decay, config.ema_ramp_steps)
        self.ema = EMA(self.net, decay=config.ema_decay, schedule=schedule, backend=ema_backend)

    # --- bookkeeping -----------------------------------------------------------------------
    def trainable_parameters(self):
        """The parameters the optimizer trains (the online network; never the EMA copy)."""
        return [p for p in self.net.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        """Trainable parameters, counted as the official code counts them (EMA copy excluded)."""
        return sum(p.numel() for p in self.trainable_parameters())

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step of the target model towards the online network."""
        self.ema.update(self.net)

    # --- input checks ----------------------------------------------------------------------
    def _check_tokens(self, tokens, name="tokens"):
        c = self.config
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        if not tokens.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tokens.dtype}")
        if tokens.dim() != 3 or tokens.shape[1] != c.seq_len or tokens.shape[2] != c.token_channels:
            raise ValueError(f"{name} must be [B, {c.seq_len}, {c.token_channels}] (seq_len, token_channels of "
                             f"the config), got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            raise ValueError(f"{name}: empty batch")

    def _check_labels(self, labels, batch=None):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"labels has {labels.shape[0]} entries for a batch of {batch}")
        if labels.numel() == 0:
            raise ValueError("labels: empty batch")
        n = self.config.num_classes
        if torch.compiler.is_compiling():  # no host read in a compiled graph: checked on the device
            torch._assert_async(((labels >= 0) & (labels < n)).all(), f"labels must lie in [0, {n})")
            return labels.long()
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"labels must lie in [0, {n}), got values in [{lo}, {hi}]")
        return labels.long()

    def _device(self):
        return self.net.z_proj.weight.device

    # --- training --------------------------------------------------------------------------
    def make_mask(self, batch: int, generator=None) -> torch.Tensor:
        """A training mask [B, seq_len] bool (True = masked) drawn as configured; `generator`: a
        torch.Generator, or a numpy random source for the official draws (see `masking`)."""
        c = self.config
        return masking.training_mask(batch, c.seq_len, c.mask_ratio_min, c.mask_ratio_per_sample,
                                     generator=generator, device=self._device())

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None,
                mask: Optional[torch.Tensor] = None, order_generator=None) -> dict:
        """Training losses on a batch of tokens [B, seq_len, token_channels] with labels [B].

        Returns {"loss": diffusion_weight * diffusion + jepa_weight * jepa (differentiable),
        "diffusion": ..., "jepa": ... (detached)}. `mask` ([B, seq_len] bool, True = masked)
        replaces the drawn mask; `generator` makes masks, label drops and noise reproducible.
        `order_generator` (`numpy.random`, a RandomState or Generator) draws the mask instead,
        as the official code does. Draw order (official): orders, mask ratio, label drop,
        diffusion t, diffusion noise.
        """
        out = self.compute_losses(tokens, labels, generator=generator, mask=mask, order_generator=order_generator)
        return {"loss": out["loss"], "diffusion": out["diffusion"].detach(), "jepa": out["jepa"].detach()}

    def compute_losses(self, tokens, labels, generator=None, mask=None, diffusion_t=None, diffusion_noise=None,
                       order_generator=None):
        """`forward` with everything exposed: also the mask, the per-token losses
        ("diffusion_per_token" [mul, B, L], "jepa_per_token" [B, L]) and z. `diffusion_t` /
        `diffusion_noise` ([mul * B * L] / [mul * B * L, C], row r*B*L + b*L + l is repeat r
        of token (b, l)) fix the denoising loss's randomness."""
        c = self.config
        self._check_tokens(tokens)
        B, L, C = tokens.shape
        labels = self._check_labels(labels, B)
        if mask is None:
            mask = self.make_mask(B, generator if order_generator is None else order_generator)
        else:
            if not isinstance(mask, torch.Tensor) or mask.shape != (B, L):
                raise ValueError(f"mask must be a [B, seq_len] = [{B}, {L}] tensor")
            mask = mask.to(device=tokens.device, dtype=torch.bool)
        net = self.net
        class_embedding = net.class_embedding(labels, drop=self.training, generator=generator)
        encoded, index, valid = net.encode(tokens, mask, class_embedding)
        z = net.predict(encoded, index, valid)

        # denoising loss on the masked tokens, each repeated diffusion_batch_mul times
        mul = c.diffusion_batch_mul
        zd = net.diffusion_condition(z).reshape(B * L, -1).repeat(mul, 1)
        target = tokens.detach().reshape(B * L, C).repeat(mul, 1)
        per_row = net.diffloss.per_token_loss(target, zd, generator=generator, t=diffusion_t, noise=diffusion_noise)
        per_row = per_row.reshape(mul, B, L)
        diffusion = masked_mean(per_row, mask.unsqueeze(0).expand(mul, B, L))

        # JEPA loss against the EMA encoder's normed features of all tokens
        if net.jepaloss is not None:
            with torch.no_grad():
                ema_net = self.ema.module
                ema_dtype = ema_net.z_proj.weight.dtype
                target_x = ema_net.target_features(tokens.detach().to(ema_dtype), labels)
            jepa, jepa_per_token = net.jepaloss(z, target_x, mask)
        else:
            jepa = diffusion.new_zeros(())
            jepa_per_token = torch.zeros(B, L, device=tokens.device)
        loss = c.diffusion_weight * diffusion + c.jepa_weight * jepa
        return {"loss": loss, "diffusion": diffusion, "jepa": jepa, "mask": mask, "z": z,
                "diffusion_per_token": per_row, "jepa_per_token": jepa_per_token}

    # --- inference -------------------------------------------------------------------------
    def _inference_net(self, use_ema: bool):
        return self.ema.module if use_ema else self.net

    def sample(self, labels: torch.Tensor, num_iter: int = 64, cfg_scale: float = 1.0, cfg_schedule: str = "linear",
               temperature: Optional[float] = None, generator: Optional[torch.Generator] = None,
               progress: bool = False, use_ema: bool = True, callback=None, order_generator=None, *,
               solver: Optional[str] = None, head_steps: Optional[int] = None, eta: Optional[float] = None,
               anneal: Optional[str] = None, min_head_steps: Optional[int] = None,
               feature_reuse: Optional[float] = None, cfg_refresh: Optional[int] = None, fast: bool = False,
               stats=None) -> torch.Tensor:
        """MAR's masked-autoregressive sampler: tokens [B, seq_len, token_channels] for labels [B].

        `num_iter` iterations (1 <= num_iter <= seq_len) unmask tokens in a random order on a
        cosine schedule; each iteration runs encoder + predictor and draws the tokens it unmasks
        with the denoising head's full loop. `cfg_scale` != 1 guides with the fake class
        (doubled batch), `cfg_schedule` "linear" (ramps from 1 as tokens are revealed) or
        "constant". `temperature` (default: the config's, official D-JEPA 0.95) scales the
        denoiser's noise (diffusion: each step's noise; flow: the initial noise). `callback(step, tokens, predicted_mask)` is called after every iteration.
        The orders come from `generator`, or from `order_generator` (numpy, as the official code
        draws them); the noise from `generator` (None: torch's default generator).

        Faster sampling (opt-in; the defaults are the official procedure, bit for bit):
        `solver` the head's solver (diffusion: "ddpm", "ddim", "dpm++2m"; flow: "euler", "heun",
        "midpoint"; see djepa.diffusion.solvers, also for what temperature scales), `head_steps`
        its steps (default: the config's num_sampling_steps), `eta` DDIM's noise level,
        `anneal` ("none", "linear", "cosine") lowers the head's steps as tokens become known, down
        to `min_head_steps`; `feature_reuse` (a tolerance >= 0) reuses encoder/predictor features
        of tokens that moved less than that since the last iteration (djepa.models.feature_cache);
        `cfg_refresh` n > 1 runs CFG's unconditional encoder/predictor half every n-th iteration
        and reuses its guidance residual in between (LazyMAR's condition cache).
        `fast=True` starts from the measured fast setting (djepa.models.sampler.FAST); arguments
        given explicitly replace its fields. `stats` (a djepa.models.sampler.SamplingStats) is
        filled with the passes and head evaluations made.
        """
        from djepa.models.sampler import resolve_options, sample_tokens

        labels = self._check_labels(labels)
        options = resolve_options(self.config.loss, fast, solver=solver, head_steps=head_steps, eta=eta,
                                  anneal=anneal, min_head_steps=min_head_steps, feature_reuse=feature_reuse,
                                  cfg_refresh=cfg_refresh)
        net = self._inference_net(use_ema)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                return sample_tokens(net, labels.to(self._device()), num_iter=num_iter, cfg_scale=cfg_scale,
                                     cfg_schedule=cfg_schedule, temperature=temperature, generator=generator,
                                     progress=progress, callback=callback, order_generator=order_generator,
                                     options=options, stats=stats)
        finally:
            net.train(was_training)

    def features(self, tokens: torch.Tensor, use_ema: bool = True, pool: str = "mean") -> torch.Tensor:
        """Representations from the encoder's normed output on the whole (unmasked) sequence,
        conditioned on the fake (unconditional) class. `pool="mean"`: the mean over tokens,
        [B, embed_dim]; `pool="tokens"`: every token's features, flattened, [B, seq_len * embed_dim]."""
        if pool not in ("mean", "tokens"):
            raise ValueError(f"features: pool must be 'mean' or 'tokens', got {pool!r}")
        self._check_tokens(tokens)
        net = self._inference_net(use_ema)
        B = tokens.shape[0]
        mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not use_ema):
            x, _, _ = net.encode(tokens.to(net.z_proj.weight.dtype), mask, net.unconditional_embedding(B))
        x = x[:, self.config.class_tokens:]
        return x.mean(dim=1) if pool == "mean" else x.flatten(1)

    def extra_repr(self) -> str:
        c = self.config
        return (f"seq_len={c.seq_len}, token_channels={c.token_channels}, embed_dim={c.embed_dim}, "
                f"depth={c.depth}, loss={c.loss!r}")
