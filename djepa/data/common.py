"""What every djepa data set shares: the error type, the held-out split and the image metadata.

A data set yields `(image, label)` with `image` a float tensor `[C, H, W]` in the model's scale
(pixels in [-1, 1], latents multiplied by their scale factor) and `label` a Python int in
`[0, num_classes)`. The trainer turns images into tokens with `Patchifier(patch_size, C)`.
"""
import numpy as np
import torch


class DataError(ValueError):
    """A data set that cannot be used: missing, empty, unreadable, or with bad labels."""


def split_indices(n: int, split: str, held_out: float = 0.2, seed: int = 0) -> np.ndarray:
    """Indices of `split` ("train", "test" or "all") in a fixed-seed permutation of range(n)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if split == "all":
        return np.arange(n)
    perm = np.random.RandomState(seed).permutation(n)
    n_test = max(1, int(round(n * held_out)))
    if n - n_test < 1:
        raise DataError(f"{n} items are too few to hold {held_out:.0%} out")
    return np.sort(perm[:n_test] if split == "test" else perm[n_test:])


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise DataError unless every label is an integer in [0, num_classes)."""
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be one-dimensional, got shape {tuple(labels.shape)}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError(f"{where}: labels must be integers")
    if not labels.size:
        return
    negative = labels[labels < 0]
    if negative.size:
        raise DataError(f"{where}: labels must be class indices 0, 1, 2, ...: {negative.size} of {labels.size} "
                        f"labels are negative (e.g. {_examples(negative)})")
    high = labels[labels >= num_classes]
    if high.size:
        raise DataError(f"{where}: labels are out of range for {num_classes} classes: {high.size} of "
                        f"{labels.size} labels are >= {num_classes} (e.g. {_examples(high)})")


def _examples(values, n=5) -> str:
    """A few distinct values, as text."""
    seen = sorted({int(v) for v in np.unique(values)[:n]})
    return ", ".join(str(v) for v in seen)


class TensorImages(torch.utils.data.Dataset):
    """An in-memory data set: `images [N, C, H, W]` (model scale) and `labels [N]`.

    Subclasses set `pixel_range` (the data set's own scale, for saving samples) and implement
    `to_pixels` / `from_pixels`.
    """

    name = "tensor"
    default_patch_size = 1

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if images.ndim != 4:
            raise DataError(f"{self.name}: images must be [N, C, H, W], got {tuple(images.shape)}")
        if len(images) == 0:
            raise DataError(f"{self.name}: the data set is empty")
        check_labels(labels.numpy(), num_classes, self.name)
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.num_classes = int(num_classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self):
        return tuple(self.images.shape[2:])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def get_batch(self, indices: torch.Tensor):
        """A whole batch at once (no per-item collate): `(images [B, C, H, W], labels [B])`."""
        return self.images[indices], self.labels[indices]

    def describe(self) -> dict:
        """What a checkpoint records about the data it was trained on."""
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
        }

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Model scale -> the data set's own scale."""
        return images

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The data set's own scale -> model scale."""
        return pixels
