import os

import numpy as np
import pytest
import torch

from djepa.data import (DataError, Digits, ImageFolder, Latents, build_dataset, load_digits_arrays,
                        pixel_scale, split_indices)


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    tr, te = Digits("train"), Digits("test")
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert tr.num_classes == 10 and tr.channels == 1 and tr.image_size == (8, 8)
    a, b = split_indices(1797, "train"), split_indices(1797, "test")
    assert not set(a) & set(b) and len(set(a) | set(b)) == 1797
    assert np.array_equal(a, split_indices(1797, "train"))  # fixed seed
    assert not np.array_equal(b, split_indices(1797, "test", seed=1))
    raw = load_digits()
    assert np.array_equal(te.labels.numpy(), raw.target[b])
    # model scale [-1, 1], and back to the data set's 0..16 exactly
    assert tr.images.min() == -1.0 and tr.images.max() == 1.0
    back = te.to_pixels(te.images)[:, 0].numpy()
    np.testing.assert_allclose(back, raw.images[b], atol=1e-5)
    px, lab = load_digits_arrays("test")
    np.testing.assert_array_equal(px, raw.images[b].astype(np.float32))
    img, y = te[3]
    assert img.shape == (1, 8, 8) and y == int(raw.target[b][3])
    xb, yb = te.get_batch(torch.tensor([3, 0]))
    assert torch.equal(xb[0], img) and yb.tolist() == [y, int(raw.target[b][0])]


def test_split_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        split_indices(10, "val")
    with pytest.raises(ValueError, match="held_out"):
        split_indices(10, "train", held_out=1.5)
    with pytest.raises(DataError, match="too few"):
        split_indices(1, "train")


def _write_png(path, array, mode):
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_reads_classes_and_scales(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            arrays[(cls, i)] = a
            _write_png(tmp_path / cls / f"{i}.png", a, "L")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, ignored by extension")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 6 and ds.channels == 1 and ds.image_size == (8, 8)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert y == 1 and x.shape == (1, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_allclose(ds.to_pixels(x)[0].numpy(), arrays[("dog", 1)], atol=1e-4)
    rgb = ImageFolder(tmp_path, channels=3, image_size=4)
    x, _ = rgb[0]
    assert x.shape == (3, 4, 4)
    assert len(ImageFolder(tmp_path, split="test")) + len(ImageFolder(tmp_path, split="train")) == 6
    assert build_dataset(str(tmp_path)).classes == ["cat", "dog"]
    assert isinstance(build_dataset("folder:" + str(tmp_path)), ImageFolder)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageFolder(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="unreadable image .*broken.png"):
        ImageFolder(tmp_path)


def _latents(n=20, c=4, h=2, w=3, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c, h, w)).astype(np.float32), rng.integers(0, classes, n).astype(np.int64)


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npy", "dir"])
def test_latents_formats(tmp_path, fmt):
    lat, lab = _latents()
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "l.safetensors"
        save_file({"latents": lat, "labels": lab}, str(path))
    elif fmt == "npz":
        path = tmp_path / "l.npz"
        np.savez(path, latents=lat, labels=lab)
    elif fmt == "npy":
        path = tmp_path / "train.npy"
        np.save(path, lat)
        np.save(tmp_path / "train_labels.npy", lab)
    else:
        np.save(tmp_path / "latents.npy", lat)
        np.save(tmp_path / "labels.npy", lab)
        path = tmp_path
    ds = build_dataset(str(path), "all", scale=0.5)
    assert isinstance(ds, Latents)
    assert len(ds) == 20 and ds.channels == 4 and ds.image_size == (2, 3)
    assert ds.num_classes == int(lab.max()) + 1
    x, y = ds[7]
    np.testing.assert_allclose(x.numpy(), lat[7] * 0.5)
    assert y == lab[7]
    xb, yb = ds.get_batch(torch.tensor([7, 2]))
    assert torch.equal(xb[0], x) and yb.tolist() == [lab[7], lab[2]]
    np.testing.assert_allclose(ds.to_pixels(x).numpy(), lat[7], rtol=1e-6)
    to_px, rng = pixel_scale(ds.describe())
    assert rng is None and torch.allclose(to_px(x), ds.to_pixels(x))


def test_latents_errors(tmp_path):
    lat, lab = _latents()
    p = tmp_path / "l.npz"
    np.savez(p, latents=lat, labels=lab)
    with pytest.raises(DataError, match="out of range"):
        Latents(p, num_classes=3)
    np.savez(p, latents=lat, labels=-lab - 1)
    with pytest.raises(DataError, match="are negative"):
        Latents(p)
    np.savez(p, latents=lat, labels=lab[:5])
    with pytest.raises(DataError, match="20 latents but 5 labels"):
        Latents(p)
    np.savez(p, latents=lat[:, 0], labels=lab)
    with pytest.raises(DataError, match=r"\[N, C, h, w\]"):
        Latents(p)
    np.savez(p, latents=lat)
    with pytest.raises(DataError, match="lacks labels"):
        Latents(p)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read latents"):
        Latents(tmp_path / "junk.safetensors")
    np.save(tmp_path / "x.npy", lat)
    with pytest.raises(DataError, match="no labels"):
        Latents(tmp_path / "x.npy")


def test_build_dataset_rejects_unknown_specs(tmp_path):
    with pytest.raises(DataError, match="unknown data"):
        build_dataset("mnist")
    with pytest.raises(DataError, match="non-empty"):
        build_dataset("")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell"):
        build_dataset(str(f))


def test_pixel_scale_of_digits_and_folders():
    to_px, rng = pixel_scale({"name": "digits"})
    assert rng == (0.0, 16.0)
    assert to_px(torch.tensor([-1.0, 1.0, 3.0])).tolist() == [0.0, 16.0, 16.0]
    to_px, rng = pixel_scale({"name": "folder"})
    assert rng == (0.0, 255.0) and to_px(torch.tensor([1.0])).item() == 255.0


def _truncated_png(path, rng):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])  # the header reads fine; the pixel data end early


def test_image_folder_decodes_every_file_up_front_and_skips_damaged_ones(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            _write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    _truncated_png(tmp_path / "b" / "2.png", rng)
    whole = ImageFolder(tmp_path, split="all", progress=True)
    assert "decode all images" in capsys.readouterr().err  # the progress bar
    assert [os.path.basename(f) for f, _ in whole.skipped] == ["2.png"] and len(whole) == 9
    assert str(tmp_path / "b" / "2.png") not in whole.files
    for i in range(len(whole)):  # every file left loads
        assert whole[i][0].shape == (1, 32, 32)
    train, test = ImageFolder(tmp_path, split="train"), ImageFolder(tmp_path, split="test")
    assert len(train) + len(test) == 9 and not set(train.files) & set(test.files)
    # nothing readable at all: one clear error
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x").mkdir()
    _truncated_png(tmp_path / "only" / "x" / "t.png", rng)
    with pytest.raises(DataError, match="no readable image.*unreadable image .*t.png"):
        ImageFolder(tmp_path / "only")


def test_negative_latent_labels_are_named(tmp_path):
    lat, lab = _latents(n=600, classes=5)
    lab[:94] = -1 - np.arange(94) % 3
    np.savez(tmp_path / "l.npz", latents=lat, labels=lab)
    with pytest.raises(DataError) as info:
        Latents(tmp_path / "l.npz")
    msg = str(info.value)
    assert "94 of 600 labels are negative" in msg and "-1" in msg and "[0, 1)" not in msg, msg
    lab[:94] = 0
    lab[:7] = 5
    np.savez(tmp_path / "l.npz", latents=lat, labels=lab)
    with pytest.raises(DataError, match=r"7 of 600 labels are >= 5 \(e.g. 5\)"):
        Latents(tmp_path / "l.npz", num_classes=5)
