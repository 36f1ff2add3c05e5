"""djepa.evaluate: the Fréchet distance against closed forms, the linear probe and the sample
accuracy on constructed data whose answers are known."""
import types

import numpy as np

import pytest
import torch

from djepa import evaluate as ev
from djepa.data.common import TensorImages


def _fd_formula(a, b):
    """|mu_a - mu_b|^2 + tr S_a + tr S_b - 2 sum sqrt(eig(S_a S_b)), written independently of
    djepa (the eigenvalues of S_a S_b are those of S_a^1/2 S_b S_a^1/2: real, >= 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.sum(0) / len(a), b.sum(0) / len(b)
    s_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    s_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    eig = np.linalg.eigvals(s_a @ s_b)
    cross = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # a shift moves only the mean: FD = |shift|^2
    assert ev.frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-9)
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # b = k a: S_b = k^2 S_a, so FD = (1 - k)^2 (|mu_a|^2 + tr S_a)
    k = 3.0
    tr = np.trace(np.cov(a, rowvar=False))
    want = (1 - k) ** 2 * ((a.mean(0) ** 2).sum() + tr)
    assert ev.frechet_distance(a, k * a) == pytest.approx(want, rel=1e-9)
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x, y = rng.standard_normal((300, 1)), 2.0 + 0.5 * rng.standard_normal((200, 1))
    want = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert ev.frechet_distance(x, y) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_matches_an_independent_formula():
    rng = np.random.default_rng(1)
    for n, d in ((50, 3), (200, 8), (30, 12)):
        a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        b = 0.3 + rng.standard_normal((n + 7, d)) @ rng.standard_normal((d, d))
        want = _fd_formula(a, b)
        assert ev.frechet_distance(a, b) == pytest.approx(want, rel=1e-7, abs=1e-9)
        assert ev.frechet_distance(b, a) == pytest.approx(want, rel=1e-7, abs=1e-9)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="equal D"):
        ev.frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="two rows"):
        ev.frechet_distance(np.zeros((1, 2)), np.zeros((4, 2)))


def _clusters(n_per_class, centres, noise, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + noise * rng.standard_normal((n_per_class, len(c))) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return x, y


def test_linear_probe_scores_the_held_out_rows():
    centres = [np.array([4.0, 0.0, 0.0]), np.array([0.0, 4.0, 0.0]), np.array([0.0, 0.0, 4.0])]
    train_x, train_y = _clusters(30, centres, 0.3, seed=2)
    test_x, test_y = _clusters(10, centres, 0.3, seed=3)
    assert ev.linear_probe(train_x, train_y, test_x, test_y) == 1.0
    # the held-out labels of the first class are wrong: exactly that third is missed
    wrong = test_y.copy()
    wrong[test_y == 0] = 1
    assert ev.linear_probe(train_x, train_y, test_x, wrong) == pytest.approx(2 / 3)
    # a probe fitted to shuffled training labels, scored on the true ones: not better than chance + noise
    shuffled = np.random.default_rng(4).permutation(train_y)
    assert ev.linear_probe(train_x, shuffled, test_x, test_y) < 0.7


class _Images(TensorImages):
    name = "clusters"


def _image_set(n_per_class, seed):
    """3 classes of 1x4x4 images: a bright pixel in a class's own place, a little noise."""
    g = torch.Generator().manual_seed(seed)
    images = 0.05 * torch.randn(3 * n_per_class, 1, 4, 4, generator=g) - 0.5
    labels = torch.arange(3).repeat_interleave(n_per_class)
    for c in range(3):
        images[labels == c, 0, c, c] = 0.9
    return _Images(images.clamp(-1, 1), labels, num_classes=3)


def test_judge_accuracy_and_features():
    train, test = _image_set(40, 5), _image_set(10, 6)
    flat = lambda s: s.images.reshape(len(s), -1).numpy()  # noqa: E731
    judge = ev.Judge(flat(train), train.labels.numpy(), hidden=16)
    assert judge.accuracy(flat(test), test.labels.numpy()) == 1.0
    assert judge.accuracy(flat(test), (test.labels.numpy() + 1) % 3) == 0.0
    # the hidden layer by hand: relu(x W + b)
    w, b = judge.clf.coefs_[0], judge.clf.intercepts_[0]
    x = flat(test)
    assert np.array_equal(judge.features(x), np.maximum(x @ w + b, 0.0))


def test_evaluate_sample_accuracy_and_frechet_on_known_samples(monkeypatch):
    """`generate` stands in for the model: for class 1 it returns images of class 2, for the
    others held-out images of their own class. The judge is perfect on this data, so the
    sample accuracy is 2/3 (per class 1, 0, 1)."""
    train, test = _image_set(40, 7), _image_set(10, 8)
    n = 4
    seen = {}

    def generate(model, tokenizer, labels, image_size, **kw):
        seen.update(kw, labels=labels.clone())
        out = []
        for i, c in enumerate(labels.tolist()):
            pool = test.images[test.labels == (2 if c == 1 else c)]
            out.append(pool[i % len(pool)])
        return torch.stack(out)

    monkeypatch.setattr(ev, "generate", generate)
    monkeypatch.setattr(ev, "encode_features",
                        lambda model, tok, images, bs, pool="mean": images.reshape(len(images), -1).numpy())
    model = types.SimpleNamespace(config=types.SimpleNamespace(temperature=0.9))
    res = ev.evaluate(model, None, train, test, n_per_class=n, num_iter=3, cfg=2.5, seed=1)
    assert torch.equal(seen["labels"], torch.arange(3).repeat_interleave(n))
    assert seen["cfg"] == 2.5 and seen["num_iter"] == 3 and seen["seed"] == 1
    # no temperature given: the model's is used and recorded (not None)
    assert seen["temperature"] == 0.9 and res["temperature"] == 0.9
    assert res["judge_accuracy_real"] == 1.0
    assert res["sample_accuracy"] == pytest.approx(2 / 3)
    assert res["sample_accuracy_per_class"] == [1.0, 0.0, 1.0]
    assert res["probe_pixels"] == 1.0 and res["probe_features"] == 1.0
    assert res["n_samples"] == 3 * n and res["n_per_class"] == n
    # both distances are the Fréchet distances (value-tested above) of the judge's features
    judge = ev.Judge(train.images.reshape(len(train), -1).numpy(), train.labels.numpy(), seed=1)
    test_f = judge.features(test.images.reshape(len(test), -1).numpy())
    train_f = judge.features(train.images.reshape(len(train), -1).numpy())
    samples = generate(None, None, torch.arange(3).repeat_interleave(n), None)
    sample_f = judge.features(samples.reshape(len(samples), -1).numpy())
    assert res["frechet_train_vs_heldout"] == pytest.approx(ev.frechet_distance(test_f, train_f), rel=1e-9)
    assert res["frechet_samples_vs_heldout"] == pytest.approx(ev.frechet_distance(test_f, sample_f), rel=1e-9)
    assert res["frechet_samples_vs_heldout"] > res["frechet_train_vs_heldout"]
    table = ev.format_table(res)
    assert "66.7%" in table and "1:0%" in table
