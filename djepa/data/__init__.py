"""Data sets for djepa: the embedded digits, image folders and cached VAE latents.

`build_dataset(spec, split)` picks one from a command-line style spec:
`"digits"`, `"folder:PATH"`, `"latents:PATH"`, or a bare path (a folder of class
subfolders, a latents file, or a folder holding `latents.npy`).
"""
import os

from djepa.data.common import DataError, TensorImages, check_labels, split_indices
from djepa.data.digits import Digits, load_digits_arrays
from djepa.data.folder import ImageFolder
from djepa.data.latents import Latents

__all__ = [
    "DataError",
    "Digits",
    "ImageFolder",
    "Latents",
    "TensorImages",
    "build_dataset",
    "check_labels",
    "pixel_scale",
    "load_digits_arrays",
    "split_indices",
]


def build_dataset(spec: str, split: str = "train", progress: bool = False, **options):
    """The data set named by `spec`. `options`: `image_size`/`channels` (folders),
    `num_classes`/`scale` (latents); options that do not apply to the kind are ignored.
    `progress`: progress bars while an image folder's files are checked."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data spec must be a non-empty string, got {spec!r}")
    kind, _, path = spec.partition(":")
    if spec == "digits":
        return Digits(split=split)
    if kind == "folder" and path:
        return ImageFolder(path, split=split, image_size=options.get("image_size"), channels=options.get("channels"),
                           progress=progress)
    if kind == "latents" and path:
        return Latents(path, split=split, num_classes=options.get("num_classes"), scale=options.get("scale", 1.0))
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "latents.npy")):
            return build_dataset("latents:" + spec, split, progress, **options)
        return build_dataset("folder:" + spec, split, progress, **options)
    if spec.endswith((".npy", ".npz", ".safetensors")):
        return build_dataset("latents:" + spec, split, progress, **options)
    if not os.path.exists(spec):
        raise DataError(f"unknown data {spec!r}: use 'digits', folder:PATH, latents:PATH or an existing path")
    raise DataError(f"cannot tell what kind of data {spec!r} is: use folder:PATH or latents:PATH")


def pixel_scale(description: dict):
    """`(to_pixels, pixel_range)` for the data set a checkpoint describes (its `describe()`):
    a function from model scale to the data set's own scale, and that scale's (lo, hi) or None."""
    name = description.get("name")
    if name == "digits":
        d = Digits.__new__(Digits)
        return d.to_pixels, Digits.pixel_range
    if name == "folder":
        return ImageFolder.to_pixels.__get__(ImageFolder.__new__(ImageFolder)), ImageFolder.pixel_range
    if name == "latents":
        scale = float(description.get("scale", 1.0))
        return (lambda x: x.float() / scale), None
    return (lambda x: x.float()), None
