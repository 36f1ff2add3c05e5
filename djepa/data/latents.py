"""Cached VAE latents with labels, for training on real images without running the VAE.

Accepted files:
- `.safetensors` or `.npz` holding `latents [N, C, h, w]` and `labels [N]`;
- `X.npy` holding the latents (memory-mapped), with the labels in `X_labels.npy` beside it,
  or in `labels.npy` in the same folder; a folder holding `latents.npy` and `labels.npy`.

Latents are multiplied by `scale` (MAR's KL-16 VAE: 0.2325) for the model; `to_pixels` undoes
it. Tokens are the latent pixels (patch size 1): `h*w` tokens of `C` channels.
"""
import os

import numpy as np
import torch

from djepa.data.common import DataError, check_labels, split_indices


def _read(path):
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "latents.npy")
    if not os.path.exists(path):
        raise DataError(f"latents file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            d = load_file(path)
        elif path.endswith(".npz"):
            with np.load(path) as z:
                d = {k: z[k] for k in z.files}
        elif path.endswith(".npy"):
            stem = path[: -len(".npy")]
            label_path = stem + "_labels.npy"
            if not os.path.exists(label_path):
                label_path = os.path.join(os.path.dirname(path), "labels.npy")
            if not os.path.exists(label_path):
                raise DataError(f"no labels for {path!r}: expected {stem}_labels.npy or labels.npy beside it")
            d = {"latents": np.load(path, mmap_mode="r"), "labels": np.load(label_path)}
        else:
            raise DataError(f"latents file {path!r}: expected .safetensors, .npz or .npy")
    except DataError:
        raise
    except Exception as exc:  # numpy/safetensors raise assorted types for corrupt files
        raise DataError(f"cannot read latents from {path!r}: {exc}") from None
    missing = {"latents", "labels"} - set(d)
    if missing:
        raise DataError(f"{path!r} lacks {', '.join(sorted(missing))} (it holds {', '.join(sorted(d)) or 'nothing'})")
    return path, d["latents"], np.asarray(d["labels"])


class Latents(torch.utils.data.Dataset):
    name = "latents"
    default_patch_size = 1
    pixel_range = None

    def __init__(self, path, split="all", num_classes=None, scale=1.0, held_out=0.2, seed=0):
        path, latents, labels = _read(path)
        if latents.ndim != 4:
            raise DataError(f"{path!r}: latents must be [N, C, h, w], got shape {tuple(latents.shape)}")
        if len(latents) == 0:
            raise DataError(f"{path!r}: no latents")
        if len(labels) != len(latents):
            raise DataError(f"{path!r}: {len(latents)} latents but {len(labels)} labels")
        check_labels(labels, np.inf, path)  # negatives first, before they decide num_classes
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        check_labels(labels, num_classes, path)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.path, self.scale = path, float(scale)
        self.num_classes = int(num_classes)
        self.channels = int(latents.shape[1])
        self.image_size = tuple(int(s) for s in latents.shape[2:])
        self.index = split_indices(len(latents), split, held_out, seed)
        self._latents, self.labels = latents, torch.from_numpy(labels[self.index].astype(np.int64))
        self.split = split

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self._latents[self.index[i]], dtype=np.float32))
        return self.from_pixels(x), int(self.labels[i])

    def get_batch(self, indices: torch.Tensor):
        rows = self.index[indices.numpy()]
        x = torch.from_numpy(np.array(self._latents[rows], dtype=np.float32))
        return self.from_pixels(x), self.labels[indices]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "scale": self.scale,
        }

    def to_pixels(self, images):
        return images.float() / self.scale

    def from_pixels(self, pixels):
        return pixels.float() * self.scale
