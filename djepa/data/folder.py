"""An image folder: one subfolder per class (`root/<class>/<image>`), read with Pillow.

Class indices follow the sorted subfolder names. Images are resized to one size (the first
image's, unless `image_size` is given), converted to grey (1 channel) or RGB (3), and scaled
from 0..255 to [-1, 1]. Every file's header is checked when the data set is built, so an
unreadable file is reported before training starts.
"""
import os

import numpy as np
import torch

from djepa.data.common import DataError, split_indices

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _header(path):
    """(mode, size) of an image from its header, or why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def _decode(path):
    """None when the whole image decodes, else why not (truncated data, a bad chunk, ...)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        return str(exc) or type(exc).__name__
    return None


def _each(paths, fn, progress, desc):
    """[fn(path) for path in paths] on a few threads (Pillow decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(fn, paths, chunksize=64), total=len(paths), desc=desc, unit="file",
                         disable=not progress, leave=False))


class ImageFolder(torch.utils.data.Dataset):
    name = "folder"
    pixel_range = (0.0, 255.0)

    def __init__(self, root, split="all", image_size=None, channels=None, held_out=0.2, seed=0, progress=False):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist or is not a directory")
        try:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        except OSError as exc:
            raise DataError(f"cannot read image folder {root!r}: {exc.strerror or exc}") from None
        files, labels = [], []
        for label, cls in enumerate(classes):
            d = os.path.join(root, cls)
            try:
                names = sorted(os.listdir(d))
            except OSError as exc:
                raise DataError(f"cannot read class folder {d!r}: {exc.strerror or exc}") from None
            for n in names:
                if n.lower().endswith(EXTENSIONS):
                    files.append(os.path.join(d, n))
                    labels.append(label)
        if not files:
            raise DataError(
                f"image folder {root!r} holds no images: expected {root}/<class>/<image> "
                f"with extensions {', '.join(EXTENSIONS)}"
            )
        headers = _each(files, _header, progress, "read image headers")
        modes = {h[0] for h in headers if not isinstance(h, str)}
        first_size = next((h[1] for h in headers if not isinstance(h, str)), None)
        if first_size is None:
            raise DataError(f"image folder {root!r} holds no readable image: unreadable image "
                            f"{files[0]!r}: {headers[0]}")
        if channels is None:
            channels = 1 if modes <= {"1", "L", "I", "I;16", "F"} else 3
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size is None:
            image_size = (first_size[1], first_size[0])
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.root, self.classes = root, classes
        self.num_classes = len(classes)
        self.channels = int(channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        idx = split_indices(len(files), split, held_out, seed)  # over every file: splits stay disjoint
        decoded = _each([files[i] for i in idx], _decode, progress, f"decode {split} images")
        bad = {i: why for i, why in zip(idx, decoded) if why is not None}
        bad.update({i: h for i in idx if isinstance(h := headers[i], str)})
        self.skipped = [(files[i], bad[i]) for i in sorted(bad)]
        idx = [i for i in idx if i not in bad]
        if not idx:
            f, why = self.skipped[0]
            raise DataError(f"image folder {root!r} holds no readable image in its {split} split: "
                            f"unreadable image {f!r}: {why}")
        self.files = [files[i] for i in idx]
        self.labels = torch.tensor([labels[i] for i in idx], dtype=torch.long)
        self.split = split

    @property
    def default_patch_size(self) -> int:
        """The largest power of two that leaves at most 256 tokens and divides the image."""
        h, w = self.image_size
        p = 1
        while (h // p) * (w // p) > 256 and h % (2 * p) == 0 and w % (2 * p) == 0:
            p *= 2
        return p

    def __len__(self):
        return len(self.files)

    def load_pixels(self, i) -> np.ndarray:
        """Image `i` as uint8 `[C, H, W]` in the data set's size."""
        from PIL import Image

        f = self.files[i]
        try:
            with Image.open(f) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if (im.size[1], im.size[0]) != self.image_size:
                    im = im.resize((self.image_size[1], self.image_size[0]), Image.BICUBIC)
                a = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"unreadable image {f!r}: {exc}") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def __getitem__(self, i):
        return self.from_pixels(torch.from_numpy(self.load_pixels(i).copy())), int(self.labels[i])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "classes": self.classes,
        }

    def to_pixels(self, images):
        return ((images.float() + 1.0) * 127.5).clamp(0.0, 255.0)

    def from_pixels(self, pixels):
        return pixels.float() / 127.5 - 1.0
