"""Figures for a run: the loss curve from metrics.jsonl, and a grid of samples."""
import json
import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl file (lines that are not JSON objects are skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    return records


def loss_curve(metrics_path: str, png: str) -> str:
    """Plot total, diffusion and JEPA loss against the step (log scale) into `png`."""
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path!r} holds no metrics yet")
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for key, style in (("loss", "-"), ("diffusion", "--"), ("jepa", ":")):
        ys = [r.get(key) for r in records]
        if all(isinstance(y, (int, float)) for y in ys):
            ax.plot(steps, ys, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the logging window)")
    if all(r.get("loss", 0) > 0 for r in records):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, png)
    plt.close(fig)
    return png


def sample_grid(images, labels, png: str, value_range=(0.0, 1.0), ncol=None, title=None, cmap="gray") -> str:
    """A grid of `images` ([N, C, H, W], C in {1, 3}, values in `value_range`), one row per
    run of equal consecutive labels when `ncol` is None, each row titled with its label.
    `cmap` colours one-channel images ("gray_r" draws high values dark, as the digits' ink)."""
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got {images.shape}")
    if len(images) == 0 or len(labels) != len(images):
        raise ValueError(f"need as many labels as images (>= 1), got {len(labels)} and {len(images)}")
    lo, hi = value_range
    images = np.clip((images - lo) / (hi - lo), 0.0, 1.0)
    if ncol is None:
        rows, start = [], 0
        for i in range(1, len(labels) + 1):
            if i == len(labels) or labels[i] != labels[start]:
                rows.append(list(range(start, i)))
                start = i
    else:
        rows = [list(range(i, min(i + ncol, len(images)))) for i in range(0, len(images), ncol)]
    ncols = max(len(r) for r in rows)
    plt = _pyplot()
    title_h = 0.3 if title else 0.0  # inches above the grid for the title, clear of the row labels
    height = 0.8 * len(rows) + 0.4 + title_h
    fig, axes = plt.subplots(len(rows), ncols, figsize=(max(0.8 * ncols + 0.6, 0.075 * len(title or "")), height),
                             dpi=120, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                img = images[row[c]]
                if img.shape[0] == 1:
                    ax.imshow(img[0], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
        axes[r][0].set_title(str(labels[row[0]]), fontsize=7, loc="left")
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - title_h / height))
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.04 / height, va="top")
    _save(fig, png)
    plt.close(fig)
    return png


def _save(fig, png):
    d = os.path.dirname(os.path.abspath(png))
    tmp = os.path.join(d, "." + os.path.basename(png) + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, png)
