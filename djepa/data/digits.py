"""scikit-learn's bundled handwritten digits (8x8 grey, 1797 images, 10 classes, values 0..16).

No download: the data ship inside scikit-learn. Split train/held-out with a fixed seed.
"""
import numpy as np
import torch

from djepa.data.common import TensorImages, split_indices

PIXEL_MAX = 16.0
HELD_OUT = 0.2
SPLIT_SEED = 0


def load_digits_arrays(split: str = "train", held_out: float = HELD_OUT, seed: int = SPLIT_SEED):
    """`(pixels float32 [N, 8, 8] in 0..16, labels int64 [N])` of one split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = split_indices(len(d.target), split, held_out, seed)
    return d.images[idx].astype(np.float32), d.target[idx].astype(np.int64)


class Digits(TensorImages):
    """The digits as images `[1, 8, 8]` scaled to [-1, 1]; `to_pixels` maps back to 0..16."""

    name = "digits"
    default_patch_size = 2
    pixel_range = (0.0, PIXEL_MAX)

    def __init__(self, split: str = "train", held_out: float = HELD_OUT, seed: int = SPLIT_SEED):
        pixels, labels = load_digits_arrays(split, held_out, seed)
        self.split = split
        images = self.from_pixels(torch.from_numpy(pixels)[:, None])
        super().__init__(images, torch.from_numpy(labels), num_classes=10)

    def to_pixels(self, images):
        return ((images.float() + 1.0) * (PIXEL_MAX / 2)).clamp(0.0, PIXEL_MAX)

    def from_pixels(self, pixels):
        return pixels.float() * (2.0 / PIXEL_MAX) - 1.0
