"""stp_fast.data: readers of every layout, loader determinism and sharding, augmentation, errors."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stp_fast.data import (
    DATASET_HELP,
    DatasetError,
    Datasets,
    ImageLoader,
    augment_batch,
    channel_stats,
    load_dataset,
)

SHARED_FASHION = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fashion_mnist.npz"


@pytest.fixture(scope="module")
def digits() -> Datasets:
    return load_dataset("digits")


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _write_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def _rand_images(rng, n, *shape):
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- digits


def test_digits_shapes_classes_split(digits):
    assert digits.name == "digits"
    assert (digits.num_classes, digits.in_chans, digits.input_size) == (10, 1, (1, 8, 8))
    assert (digits.train_size, digits.test_size) == (1437, 360)
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_train.dtype == torch.uint8
    assert digits.x_test.shape == (360, 1, 8, 8) and digits.y_test.dtype == torch.int64
    assert int(digits.x_train.max()) == 255 and int(digits.x_train.min()) == 0
    assert set(digits.y_train.tolist()) == set(range(10)) and set(digits.y_test.tolist()) == set(range(10))
    assert (digits.augment, digits.crop_pad, digits.flip) == ("crop", 1, False)


def test_digits_split_is_fixed(digits):
    again = load_dataset("digits", seed=123)  # the run seed does not move the split
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    # train and test are disjoint parts of the 1797 images: every image appears exactly once overall
    from sklearn.datasets import load_digits

    total = torch.cat([digits.x_train, digits.x_test]).flatten(1).float().sum(1).sort().values
    ref = torch.from_numpy(np.rint(load_digits().images * 255 / 16)).flatten(1).float().sum(1).sort().values
    assert torch.equal(total, ref)


def test_meta_is_json_ready(digits):
    import json

    meta = json.loads(json.dumps(digits.meta()))
    assert meta["input_size"] == [1, 8, 8] and meta["train_size"] == 1437 and "x_train" not in meta


# ----------------------------------------------------------------------------------------------- npz


def test_npz_nhw_and_both_spec_forms(tmp_path):
    rng = np.random.default_rng(0)
    xtr, xte = _rand_images(rng, 20, 6, 5), _rand_images(rng, 7, 6, 5)
    ytr, yte = np.arange(20) % 4, np.arange(7) % 3
    p = _write_npz(tmp_path / "small.npz", xtr, ytr, xte, yte)
    a = load_dataset(f"npz:{p}")
    b = load_dataset("npz", data=p)
    assert a.name == b.name == "npz:small.npz"
    assert (a.num_classes, a.in_chans, a.input_size, a.train_size, a.test_size) == (4, 1, (1, 6, 5), 20, 7)
    assert torch.equal(a.x_train[:, 0], torch.from_numpy(xtr)) and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_test, torch.from_numpy(yte).long())
    assert (a.augment, a.crop_pad, a.flip) == ("crop", 1, False)


def test_npz_nhwc(tmp_path):
    rng = np.random.default_rng(1)
    xtr, xte = _rand_images(rng, 16, 16, 16, 3), _rand_images(rng, 4, 16, 16, 3)
    p = _write_npz(tmp_path / "rgb.npz", xtr, np.arange(16) % 5, xte, np.array([0, 1, 2, 4]))
    ds = load_dataset(f"npz:{p}")
    assert (ds.in_chans, ds.input_size, ds.num_classes, ds.crop_pad) == (3, (3, 16, 16), 5, 2)
    assert torch.equal(ds.x_train, torch.from_numpy(xtr).permute(0, 3, 1, 2))
    x, y = next(iter(ds.loader("test", batch_size=3)))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2]


@pytest.mark.skipif(not SHARED_FASHION.is_file(), reason=f"{SHARED_FASHION} not present (not part of the repo)")
def test_fashion_mnist_smoke():
    ds = load_dataset(f"npz:{SHARED_FASHION}", train_limit=1000)
    assert (ds.name, ds.num_classes, ds.input_size) == ("npz:fashion_mnist.npz", 10, (1, 28, 28))
    assert (ds.train_size, ds.test_size, ds.crop_pad) == (1000, 10000, 3)
    loader = ds.loader("train", batch_size=128)
    batches = _batches(loader)
    assert len(batches) == len(loader) == 7 and batches[0][0].shape == (128, 1, 28, 28)


# ----------------------------------------------------------------------------------------------- cifar


def _write_cifar(root: Path, kind: str, rng, n_per_file: int = 4) -> dict:
    folder, files, key, classes = {
        "cifar10": ("cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[kind]
    (root / folder).mkdir(parents=True)
    written = {}
    train_labels: list[int] = []
    for name in files:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        if name.startswith("test"):  # only classes that have training images (others are refused)
            labels = [int(v) for v in rng.choice(train_labels, size=n_per_file)]
        else:
            labels = [int(v) for v in rng.integers(0, classes, size=n_per_file)]
            train_labels += labels
        d = {b"data": data, key: labels, b"batch_label": b"synthetic"}
        if kind == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        with open(root / folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_both_dir_forms(tmp_path, kind):
    written = _write_cifar(tmp_path, kind, np.random.default_rng(2))
    folder = tmp_path / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    parent, inner = load_dataset(f"{kind}:{tmp_path}"), load_dataset(kind, data=str(folder))
    n_train = 20 if kind == "cifar10" else 4
    for ds in (parent, inner):
        assert (ds.name, ds.num_classes, ds.input_size) == (kind, 10 if kind == "cifar10" else 100, (3, 32, 32))
        assert (ds.train_size, ds.test_size) == (n_train, 4)
        assert (ds.augment, ds.crop_pad, ds.flip) == ("crop+flip", 4, True)
    test_data, test_labels = written["test_batch" if kind == "cifar10" else "test"]
    assert torch.equal(parent.x_test, torch.from_numpy(test_data).reshape(4, 3, 32, 32))
    assert parent.y_test.tolist() == test_labels and torch.equal(parent.x_train, inner.x_train)


# ----------------------------------------------------------------------------------------------- imagefolder


def _write_imagefolder(root: Path, mode: str = "RGB", size=(14, 10)) -> None:
    from PIL import Image

    colors = {"cat": (200, 10, 10), "dog": (10, 200, 10), "eel": (10, 10, 200)}
    for split, n in (("train", 3), ("val", 1)):
        for cls, color in colors.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", size, color)
                (img.convert(mode) if mode != "RGB" else img).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_rgb(tmp_path):
    _write_imagefolder(tmp_path)
    ds = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert (ds.num_classes, ds.input_size, ds.train_size, ds.test_size) == (3, (3, 8, 8), 9, 3)
    assert (ds.augment, ds.crop_pad, ds.flip) == ("crop+flip", 1, True)
    assert ds.name == f"imagefolder:{tmp_path.name}"
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.y_test.tolist() == [0, 1, 2]
    # solid colours survive the resize and crop exactly
    assert ds.x_test[0, :, 4, 4].tolist() == [200, 10, 10] and ds.x_test[2, :, 0, 0].tolist() == [10, 10, 200]


def test_imagefolder_grey_default_size_and_test_dir(tmp_path):
    _write_imagefolder(tmp_path, mode="L", size=(70, 90))
    (tmp_path / "val").rename(tmp_path / "test")
    ds = load_dataset("imagefolder", data=tmp_path)
    assert (ds.in_chans, ds.input_size, ds.crop_pad) == (1, (1, 64, 64), 8)


# ----------------------------------------------------------------------------------------------- loader


def test_normalisation_train_stats(tmp_path):
    rng = np.random.default_rng(3)
    xtr = np.stack([rng.integers(0, 60, (50, 9, 9)), rng.integers(100, 256, (50, 9, 9))], -1).astype(np.uint8)
    p = _write_npz(tmp_path / "two.npz", xtr, np.zeros(50, np.int64), xtr[:5], np.zeros(5, np.int64))
    ds = load_dataset(f"npz:{p}")
    ref = torch.from_numpy(xtr).double().div(255)
    assert np.allclose(ds.mean, ref.mean((0, 1, 2)).tolist()) and np.allclose(ds.std, ref.std((0, 1, 2), correction=0))
    x = torch.cat([x for x, _ in ds.loader("calib", batch_size=16)]).double()
    assert x.shape == (50, 2, 9, 9)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_channel_stats_constant_channel():
    mean, std = channel_stats(torch.full((4, 1, 3, 3), 51, dtype=torch.uint8))
    assert mean == pytest.approx((0.2,)) and std == (1.0,)


def test_augment_batch_matches_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (6, 3, 7, 9), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 5, (6, 2), generator=g)
    flips = torch.tensor([True, False, True, False, False, True])
    out = augment_batch(x, offsets, flips, pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        r, c = offsets[i].tolist()
        ref = padded[i, :, r : r + 7, c : c + 9]
        assert torch.equal(out[i], ref.flip(-1) if flips[i] else ref)
    assert torch.equal(augment_batch(x, None, flips, 0)[0], x[0].flip(-1))
    assert augment_batch(x, None, None, 0) is x


def test_augmentation_changes_images_keeps_shape_no_flip_for_digits(digits):
    train = digits.loader("train", batch_size=64, seed=1, epoch=2)
    plain = digits.loader("train", batch_size=64, seed=1, epoch=2, augment=False)
    assert (train.pad, train.flip) == (1, False) and (plain.pad, plain.flip) == (0, False)
    (xa, ya), (xp, yp) = next(iter(train)), next(iter(plain))
    assert torch.equal(ya, yp)  # same order: augmentation only changes pixels
    assert xa.shape == xp.shape == (64, 1, 8, 8) and not torch.equal(xa, xp)
    calib = digits.loader("calib", batch_size=64)
    assert (calib.pad, calib.flip, calib.drop_last) == (0, False, False) and len(calib) == 23
    test = digits.loader("test", batch_size=100)
    assert (test.shuffle, test.pad, len(test)) == (False, 0, 4)
    assert torch.equal(torch.cat([y for _, y in test]), digits.y_test)


def test_same_seed_epoch_identical_other_epoch_differs(digits):
    state = torch.get_rng_state()
    a = _batches(digits.loader("train", batch_size=64, seed=7, epoch=3))
    b = _batches(digits.loader("train", batch_size=64, seed=7, epoch=3))
    c = _batches(digits.loader("train", batch_size=64, seed=7, epoch=4))
    d = _batches(digits.loader("train", batch_size=64, seed=8, epoch=3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert len(a) == len(b) == 22 and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )
    ya, yc, yd = (torch.cat([y for _, y in r]) for r in (a, c, d))
    assert not torch.equal(ya, yc) and not torch.equal(ya, yd)


def test_ddp_shards_disjoint_equal():
    n, world = 103, 4
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(n)  # labels identify the samples
    common = dict(batch_size=5, mean=(0.0,), std=(1.0,), shuffle=True, pad=1, seed=4, epoch=1, world_size=world)
    shards = [torch.cat([y for _, y in ImageLoader(images, labels, rank=r, **common)]) for r in range(world)]
    lens = [len(ImageLoader(images, labels, rank=r, **common)) for r in range(world)]
    assert [len(s) for s in shards] == [n // world] * world and lens == [5] * world
    allv = torch.cat(shards)
    assert allv.unique().numel() == allv.numel() == (n // world) * world
    with pytest.raises(ValueError, match="rank"):
        ImageLoader(images, labels, rank=4, **common)


def test_drop_last_len_and_train_limit(digits):
    loader = digits.loader("train", batch_size=100)
    assert len(loader) == 14 == len(_batches(loader))
    assert len(digits.loader("train", batch_size=100, drop_last=False)) == 15
    a = load_dataset("digits", train_limit=50, seed=1)
    b = load_dataset("digits", train_limit=50, seed=1)
    c = load_dataset("digits", train_limit=50, seed=2)
    assert a.train_size == 50 and a.test_size == 360 and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.y_train, c.y_train)
    assert load_dataset("digits", train_limit=10**6).train_size == 1437
    with pytest.raises(ValueError, match="batch_size=64"):
        a.loader("train", batch_size=64)


def test_image_size_resizes_and_scales_pad():
    ds = load_dataset("digits", image_size=16, augment="crop+flip")
    assert ds.input_size == (1, 16, 16) and ds.x_test.shape == (360, 1, 16, 16)
    assert (ds.augment, ds.crop_pad, ds.flip) == ("crop+flip", 2, True)
    assert load_dataset("digits", augment="none").loader("train").pad == 0


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_spec_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as e:
        load_dataset("mnist")
    assert "npz:PATH" in str(e.value) and "imagefolder:DIR" in DATASET_HELP
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("npz")
    with pytest.raises(ValueError, match="takes no"):
        load_dataset("digits", data=str(tmp_path))
    with pytest.raises(ValueError, match="augment must be one of auto, none, crop, crop\\+flip; got 'rotate'"):
        load_dataset("digits", augment="rotate")
    with pytest.raises(ValueError, match="train_limit"):
        load_dataset("digits", train_limit=0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=-3)


def test_bad_split(digits):
    with pytest.raises(ValueError, match="split must be one of train, test, calib; got 'val'"):
        digits.loader("val")


def _npz_error(path: Path, match: str):
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset(f"npz:{path}")
    assert str(path) in str(e.value) and "expected a .npz archive with arrays x_train" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_npz_errors(tmp_path):
    rng = np.random.default_rng(6)
    x, y = _rand_images(rng, 4, 5, 5), np.arange(4)
    _npz_error(tmp_path / "absent.npz", "no such file")
    np.savez(tmp_path / "nox.npz", images=x, y_train=y, x_test=x, y_test=y)
    _npz_error(tmp_path / "nox.npz", "missing array.*x_train")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    _npz_error(tmp_path / "junk.npz", "cannot read")
    _npz_error(_write_npz(tmp_path / "f.npz", x.astype(np.float32), y, x, y), "x_train has dtype float32, not uint8")
    _npz_error(_write_npz(tmp_path / "len.npz", x, y[:3], x, y), "y_train has shape")
    _npz_error(_write_npz(tmp_path / "neg.npz", x, y - 1, x, y), "negative label")
    _npz_error(_write_npz(tmp_path / "fl.npz", x, y.astype(np.float64), x, y), "not an integer")
    _npz_error(_write_npz(tmp_path / "shape.npz", x, y, x[:, :4], y), "x_test images are")
    np.savez(tmp_path / "obj.npz", x_train=np.array([x, "a"], dtype=object), y_train=y, x_test=x, y_test=y)
    _npz_error(tmp_path / "obj.npz", "cannot read")  # object arrays need pickle: refused


def test_npz_labels_are_checked_against_the_classes(tmp_path):
    """One stray label must not build a 1001-class model, and test labels no training image has are
    refused; a declared num_classes allows classes without images."""
    rng = np.random.default_rng(9)
    x, y = _rand_images(rng, 12, 5, 5), np.arange(12) % 4
    stray = y.copy()
    stray[5] = 1000
    _npz_error(_write_npz(tmp_path / "stray.npz", x, stray, x, y), "largest label 1000 implies 1001 classes, but 996 "
               "of them never occur \\(4, 5, 6, 7, 8, ...\\): a stray label")  # fmt: skip
    _npz_error(_write_npz(tmp_path / "unseen.npz", x, y, x, np.where(y == 3, 9, y)), r"class\(es\) that no training "
               r"image has \(9\)")  # fmt: skip
    _npz_error(_write_npz(tmp_path / "unseen3.npz", x, y % 3, x, y), r"no training image has \(3\)")
    ok = load_dataset(f"npz:{_write_npz(tmp_path / 'decl.npz', x, y, x, y, num_classes=np.int64(6))}")
    assert ok.num_classes == 6
    _npz_error(_write_npz(tmp_path / "decl2.npz", x, y, x, y, num_classes=np.int64(3)), "label 3, out of range 0..2")
    _npz_error(_write_npz(tmp_path / "decl3.npz", x, y, x, y, num_classes=np.array([4, 4])), "num_classes must be")


def test_cifar_test_labels_without_training_images_are_refused(tmp_path):
    _write_cifar(tmp_path, "cifar10", np.random.default_rng(10))
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 7]}, f)
    with pytest.raises(DatasetError, match=r"no training image has \(7\)"):
        load_dataset(f"cifar10:{tmp_path}")


def _cifar_error(spec: str, path: Path, match: str):
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset(spec)
    assert str(path) in str(e.value) and "expected cifar-10-batches-py/" in str(e.value)


def test_cifar_errors(tmp_path):
    _cifar_error(f"cifar10:{tmp_path / 'nope'}", tmp_path / "nope", "no such directory")
    _cifar_error(f"cifar10:{tmp_path}", tmp_path, "no test_batch")
    _write_cifar(tmp_path, "cifar10", np.random.default_rng(7))
    folder = tmp_path / "cifar-10-batches-py"
    batch = folder / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    _cifar_error(f"cifar10:{tmp_path}", batch, "cannot unpickle")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    _cifar_error(f"cifar10:{tmp_path}", batch, "label 10, out of range 0..9")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    _cifar_error(f"cifar10:{tmp_path}", batch, "keys b'data' and b'labels'")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.int16), b"labels": [0, 1]}, f)
    _cifar_error(f"cifar10:{tmp_path}", batch, "not uint8")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, f)
    _cifar_error(f"cifar10:{tmp_path}", batch, "3 labels|shape \\(3,\\) but there are 2 images")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_refuses_code(tmp_path):
    _write_cifar(tmp_path, "cifar100", np.random.default_rng(8))
    test_file = tmp_path / "cifar-100-python" / "test"
    with open(test_file, "wb") as f:
        pickle.dump({b"data": _Evil(), b"fine_labels": [0]}, f)
    with pytest.raises(DatasetError, match="refusing to load global") as e:
        load_dataset(f"cifar100:{tmp_path}")
    assert str(test_file) in str(e.value) and "expected cifar-100-python/" in str(e.value)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such directory") as e:
        load_dataset(f"imagefolder:{tmp_path / 'x'}")
    assert "expected DIR/train/<class>/<image>" in str(e.value)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no train/ and val/"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folder holds an image"):
        load_dataset(f"imagefolder:{tmp_path}")
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "val" / "a" / "b.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot read the image") as e:
        load_dataset(f"imagefolder:{tmp_path}")
    assert "broken.png" in str(e.value)


def test_import_is_lean():
    code = "import sys, stp_fast, stp_fast.data; print(sorted(m for m in ('sklearn', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
