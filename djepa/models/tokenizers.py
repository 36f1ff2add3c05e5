"""Tokenizers: images <-> the [B, seq_len, token_channels] tokens D-JEPA models."""
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Patchifier", "VAETokenizer"]


class Patchifier:
    """Non-overlapping p x p patches of a [B, C, H, W] image, one token per patch.

    Token layout is channel-major within a patch (c, dy, dx), row-major over patches, as
    `F.unfold` (and D-JEPA's patchify) gives. `decode` is the exact inverse.
    """

    def __init__(self, patch_size: int, channels: int):
        for name, value in (("patch_size", patch_size), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Patchifier: {name} must be an int >= 1, got {value!r}")
        self.patch_size = patch_size
        self.channels = channels

    @property
    def token_channels(self) -> int:
        return self.channels * self.patch_size ** 2

    def seq_len(self, image_size) -> int:
        h, w = self._check_size(image_size)
        return (h // self.patch_size) * (w // self.patch_size)

    def _check_size(self, image_size):
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        h, w = (int(v) for v in image_size)
        p = self.patch_size
        if h < p or w < p or h % p or w % p:
            raise ValueError(f"Patchifier: image size {h}x{w} is not a positive multiple of patch_size={p}")
        return h, w

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"Patchifier.encode: images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.shape[1] != self.channels:
            raise ValueError(f"Patchifier.encode: expected {self.channels} channels, got {images.shape[1]}")
        if not images.is_floating_point():
            raise TypeError(f"Patchifier.encode: images must be floating point, got {images.dtype}")
        self._check_size(images.shape[-2:])
        p = self.patch_size
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2).contiguous()

    def decode(self, tokens: torch.Tensor, image_size) -> torch.Tensor:
        h, w = self._check_size(image_size)
        p = self.patch_size
        n = (h // p) * (w // p)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[1:] != (n, self.token_channels):
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"Patchifier.decode: tokens must be [B, {n}, {self.token_channels}] for {h}x{w} "
                             f"images, got {got}")
        return F.fold(tokens.transpose(1, 2), output_size=(h, w), kernel_size=p, stride=p)


class VAETokenizer:
    """Latent tokens from a VAE (MAR/D-JEPA use a KL-16 VAE: 16x16x16 latents, scale 0.2325).

    `vae` is any module with `encode(images)` and `decode(latents)`: diffusers'
    AutoencoderKL (whose outputs carry `.latent_dist` / `.sample`) or a module returning a
    distribution (with `.sample()`/`.mode()`) or a tensor. Build one from local weights with
    `VAETokenizer.from_pretrained(path)`: nothing is ever downloaded.

    encode: images [B, 3, H, W] in [-1, 1] -> tokens [B, h*w, c] = (latent - shift) * scale;
    decode: tokens [B, h*w, c] -> images (latent grid assumed square unless `latent_size` is given).
    """

    def __init__(self, vae, scaling_factor: float = 0.2325, shift: float = 0.0, sample_posterior: bool = True,
                 latent_size: Optional[Sequence[int]] = None):
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise TypeError("VAETokenizer: vae must have encode() and decode() methods")
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift = float(shift)
        self.sample_posterior = sample_posterior
        self.latent_size = None if latent_size is None else tuple(int(v) for v in latent_size)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        """Load diffusers' AutoencoderKL from a local directory (local_files_only: no download)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VAETokenizer.from_pretrained: {path!r} is not a local directory "
                                    "(weights are never downloaded)")
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ImportError("VAETokenizer.from_pretrained needs the `diffusers` package; or pass any module "
                              "with encode/decode to VAETokenizer(vae)") from exc
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
        return cls(vae, **kwargs)

    def _latents_of(self, out, generator=None):
        dist = getattr(out, "latent_dist", out)
        if isinstance(dist, torch.Tensor):
            return dist
        if self.sample_posterior and hasattr(dist, "sample"):
            try:
                return dist.sample(generator=generator)
            except TypeError:
                return dist.sample()
        if hasattr(dist, "mode"):
            return dist.mode()
        raise TypeError(f"VAETokenizer: cannot read latents from {type(out).__name__}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("VAETokenizer.encode: images must be a [B, C, H, W] tensor")
        latents = self._latents_of(self.vae.encode(images), generator)
        b, c, h, w = latents.shape
        tokens = (latents - self.shift) * self.scaling_factor
        return tokens.reshape(b, c, h * w).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise ValueError("VAETokenizer.decode: tokens must be [B, seq_len, channels]")
        b, n, c = tokens.shape
        if self.latent_size is not None:
            h, w = self.latent_size
        else:
            h = w = int(round(n ** 0.5))
        if h * w != n:
            raise ValueError(f"VAETokenizer.decode: {n} tokens do not form a {h}x{w} grid; pass latent_size")
        latents = tokens.transpose(1, 2).reshape(b, c, h, w) / self.scaling_factor + self.shift
        out = self.vae.decode(latents)
        return getattr(out, "sample", out)
