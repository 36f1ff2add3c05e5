"""How good a trained D-JEPA is, judged with scikit-learn on held-out data.

- Linear probe: logistic regression on the EMA encoder's features (train split -> held-out
  accuracy), mean-pooled and all tokens concatenated, beside the same probe on raw pixels.
- Sample accuracy: a classifier (an MLP) trained on the real training images judges
  class-conditional samples; the fraction judged as the class they were drawn for.
- Fréchet distance between real held-out images and samples in that classifier's hidden
  feature space (the digits' analogue of FID), beside the same distance between the real
  training and held-out images as its floor.
"""
from typing import Optional

import numpy as np

import torch


# ----------------------------------------------------------------------------- statistics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` and of `b`:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] arrays of equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two rows in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)
    return max(fd, 0.0)


def linear_probe(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Held-out accuracy of a standardised logistic regression fitted on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, random_state=seed))
    clf.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    return float(clf.score(np.asarray(test_x, dtype=np.float64), np.asarray(test_y)))


class Judge:
    """A small MLP classifier of real images (flattened) whose hidden layer is the feature
    space of the Fréchet distance."""

    def __init__(self, train_x, train_y, hidden: int = 128, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, alpha=1e-3,
                                 random_state=seed)
        self.clf.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))

    def predict(self, x) -> np.ndarray:
        return self.clf.predict(np.asarray(x, dtype=np.float64))

    def accuracy(self, x, y) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())

    def features(self, x) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)


class SampleJudge:
    """The sample side of `evaluate`: a `Judge` trained on the real training images, and the
    held-out images in its feature space. `score(samples, labels)` gives the sample accuracy
    (overall and per class) and the Fréchet distance of the samples to the held-out images."""

    def __init__(self, train_set, test_set, seed: int = 0):
        train_x, train_y = _all(train_set)
        test_x, test_y = _all(test_set)
        self.dataset = train_set
        self.num_classes = train_set.num_classes
        train_flat = _flat(train_set, train_x)
        self.test_flat, self.test_y = _flat(test_set, test_x), test_y.numpy()
        self.judge = Judge(train_flat, train_y.numpy(), seed=seed)
        self.train_features = self.judge.features(train_flat)
        self.test_features = self.judge.features(self.test_flat)

    def real_accuracy(self) -> float:
        """The judge's accuracy on the real held-out images."""
        return self.judge.accuracy(self.test_flat, self.test_y)

    def floor(self) -> float:
        """Fréchet distance between the real training and held-out images."""
        return frechet_distance(self.test_features, self.train_features)

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict:
        if not torch.isfinite(samples).all():
            raise ValueError("the model produced non-finite samples")
        flat = _flat(self.dataset, samples)
        pred = self.judge.predict(flat)
        y = np.asarray(labels)
        return {"sample_accuracy": float((pred == y).mean()),
                "sample_accuracy_per_class": [float((pred[y == c] == c).mean()) for c in range(self.num_classes)],
                "frechet_samples_vs_heldout": frechet_distance(self.test_features, self.judge.features(flat))}


# ----------------------------------------------------------------------------- model side
def _flat(dataset, images: torch.Tensor) -> np.ndarray:
    """Model-scale images in the data set's valid range (pixels clamped), flattened."""
    return dataset.from_pixels(dataset.to_pixels(images)).reshape(len(images), -1).cpu().numpy()


def _all(dataset):
    if hasattr(dataset, "images"):
        return dataset.images, dataset.labels
    xs = [dataset[i][0] for i in range(len(dataset))]
    return torch.stack(xs), dataset.labels


@torch.no_grad()
def encode_features(model, tokenizer, images: torch.Tensor, batch_size: int = 256, use_ema: bool = True,
                    pool: str = "mean"):
    """The model's features of model-scale images, as numpy: `[N, embed_dim]` mean-pooled, or
    `[N, seq_len * embed_dim]` with `pool="tokens"`."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        tokens = tokenizer.encode(images[i:i + batch_size].to(device))
        out.append(model.features(tokens, use_ema=use_ema, pool=pool).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def generate(model, tokenizer, labels: torch.Tensor, image_size, *, num_iter: int, cfg: float = 1.0,
             cfg_schedule: str = "linear", temperature: Optional[float] = None, seed: int = 0,
             batch_size: int = 256, use_ema: bool = True, progress: bool = False,
             sampler: Optional[dict] = None, stats=None) -> torch.Tensor:
    """Model-scale images `[N, C, H, W]` (CPU) drawn for `labels`, in batches. `sampler`: the
    keyword arguments of DJEPA.sample's faster options (solver, head_steps, eta, anneal,
    min_head_steps, feature_reuse, fast); `stats`: a djepa.models.sampler.SamplingStats that
    every batch adds to."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="sample", unit="batch"):
        lab = labels[i:i + batch_size].to(device)
        tokens = model.sample(lab, num_iter=num_iter, cfg_scale=cfg, cfg_schedule=cfg_schedule,
                              temperature=temperature, generator=generator, use_ema=use_ema,
                              stats=stats, **(sampler or {}))
        out.append(tokenizer.decode(tokens.float(), image_size=tuple(image_size)).cpu())
    return torch.cat(out)


def sampler_settings(model, sampler: Optional[dict] = None) -> dict:
    """The head solver, steps, annealing and reuse that `sampler` (DJEPA.sample's keyword
    arguments) resolves to for `model`, as a dict (solver None = the official loop)."""
    from djepa.models.sampler import SamplerOptions, resolve_options

    sampler = dict(sampler or {})
    fast = bool(sampler.pop("fast", False))
    options = resolve_options(model.config.loss, fast, **sampler) if (fast or sampler) else SamplerOptions()
    steps = getattr(model.config, "num_sampling_steps", None)
    return dict(options.as_dict(), fast=fast, official=options.official,
                head_steps_default=None if steps is None else int(steps))


def timed_generate(model, tokenizer, labels, image_size, **kw):
    """`generate`, plus (wall seconds it took, the SamplingStats as a dict). The dict also holds
    `cpu_seconds`, the process's CPU time over the same span (all its threads): on a shared CPU
    it tells a setting's cost better than wall time, which counts the waits for other jobs."""
    import time

    from djepa.models.sampler import SamplingStats

    stats = SamplingStats()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    images = generate(model, tokenizer, labels, image_size, stats=stats, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return images, seconds, dict(stats.as_dict(), cpu_seconds=time.process_time() - cpu_start)


def evaluate(model, tokenizer, train_set, test_set, *, n_per_class: int = 50, num_iter: int = 16,
             cfg: float = 1.0, cfg_schedule: str = "linear", temperature: Optional[float] = None, seed: int = 0,
             batch_size: int = 256, progress: bool = False, sampler: Optional[dict] = None) -> dict:
    """All the numbers of `djepa eval` as a dict (accuracies in [0, 1]). temperature None: the
    model's (recorded as the value used). `sampler`: DJEPA.sample's faster options (see
    `generate`); the settings they resolve to, the sampling seconds and the passes and head
    evaluations are recorded too."""
    if temperature is None:
        temperature = model.config.temperature
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be >= 2 (the Fréchet distance needs a covariance), got {n_per_class}")
    train_x, train_y = _all(train_set)
    test_x, test_y = _all(test_set)
    train_y, test_y = train_y.numpy(), test_y.numpy()
    res = {}
    for key, pool in (("probe_features", "mean"), ("probe_token_features", "tokens")):
        feat_train = encode_features(model, tokenizer, train_x, batch_size, pool=pool)
        feat_test = encode_features(model, tokenizer, test_x, batch_size, pool=pool)
        res[key] = linear_probe(feat_train, train_y, feat_test, test_y, seed)
    res["probe_pixels"] = linear_probe(_flat(train_set, train_x), train_y, _flat(test_set, test_x), test_y, seed)
    judge = SampleJudge(train_set, test_set, seed=seed)
    res["judge_accuracy_real"] = judge.real_accuracy()
    labels = torch.arange(train_set.num_classes).repeat_interleave(n_per_class)
    samples, seconds, stats = timed_generate(model, tokenizer, labels, train_set.image_size, num_iter=num_iter,
                                             cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, seed=seed,
                                             batch_size=batch_size, progress=progress, sampler=sampler)
    res.update(judge.score(samples, labels))
    res["frechet_train_vs_heldout"] = judge.floor()
    res.update(n_samples=len(labels), n_per_class=n_per_class, num_iter=num_iter, cfg=cfg,
               cfg_schedule=cfg_schedule, temperature=temperature, seed=seed,
               n_train=len(train_y), n_heldout=len(test_y), sampler=sampler_settings(model, sampler),
               sampling_seconds=seconds, sampling_stats=stats)
    return res


def _sampler_label(settings) -> str:
    if not settings or settings.get("official"):
        return "official sampler"
    parts = [settings.get("solver") or "official solver"]
    if settings.get("head_steps"):
        parts.append(f"{settings['head_steps']} steps")
    if settings.get("anneal", "none") != "none":
        parts.append(f"{settings['anneal']} annealing")
    if settings.get("feature_reuse") is not None:
        parts.append(f"reuse {settings['feature_reuse']:g}")
    if settings.get("cfg_refresh", 1) > 1:
        parts.append(f"cfg refresh {settings['cfg_refresh']}")
    return ("--fast: " if settings.get("fast") else "") + ", ".join(parts)


def format_table(res: dict) -> str:
    """A plain-text table of the headline numbers of `evaluate`."""
    rows = [
        ("linear probe, EMA encoder features, mean-pooled", f"{100 * res['probe_features']:.1f}%"),
        ("linear probe, EMA encoder features, all tokens", f"{100 * res['probe_token_features']:.1f}%"),
        ("linear probe, raw pixels", f"{100 * res['probe_pixels']:.1f}%"),
        ("judge classifier on real held-out images", f"{100 * res['judge_accuracy_real']:.1f}%"),
        (f"samples judged as their class ({res['n_samples']} samples, cfg {res['cfg']:g})",
         f"{100 * res['sample_accuracy']:.1f}%"),
        ("Fréchet distance, samples vs held-out (judge features)", f"{res['frechet_samples_vs_heldout']:.3f}"),
        ("Fréchet distance, real train vs held-out (floor)", f"{res['frechet_train_vs_heldout']:.3f}"),
    ]
    if "sampling_seconds" in res:
        rows.append(("sampling seconds (" + _sampler_label(res.get("sampler")) + ")", f"{res['sampling_seconds']:.1f}"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 7}"]
    lines += [f"{name:<{w}}  {value}" for name, value in rows]
    per = res.get("sample_accuracy_per_class")
    if per:
        lines.append("per-class sample accuracy: " + " ".join(f"{c}:{100 * a:.0f}%" for c, a in enumerate(per)))
    return "\n".join(lines)

