"""``load_dataset``: parse a data set spec, read it into memory, resolve augmentation, compute statistics.

All data sets are held in memory as uint8 tensors N×C×H×W (train and test), which suits the small
sets this CLI targets (Fashion-MNIST: 47 MB; CIFAR: 184 MB). Batches come from ``Datasets.loader``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stp_fast.data import sources
from stp_fast.data.loader import ImageLoader
from stp_fast.data.sources import DatasetError

DATASET_HELP = """\
digits             scikit-learn's bundled 8×8 grey digits, 10 classes, 1437 train / 360 test (default)
npz:PATH           .npz with x_train, y_train, x_test, y_test; uint8 images N×H×W or N×H×W×C
cifar10:DIR        CIFAR-10 python pickles (DIR = cifar-10-batches-py or its parent)
cifar100:DIR       CIFAR-100 python pickles, fine labels (DIR = cifar-100-python or its parent)
imagefolder:DIR    DIR/train/<class>/*.png|jpg... and DIR/val/<class>/ (or test/); resized to
                   --image-size (default 64: shorter side, then a central crop), held in memory
The path may also be given separately (--data PATH / data=PATH) after a bare kind, e.g. npz."""

KINDS = ("digits", "npz", "cifar10", "cifar100", "imagefolder")
AUGMENT_CHOICES = ("auto", "none", "crop", "crop+flip")
# "auto": flips only where mirror images are still the same class (not digits, not MNIST-like npz).
_AUTO_POLICY = {
    "digits": "crop",
    "npz": "crop",
    "cifar10": "crop+flip",
    "cifar100": "crop+flip",
    "imagefolder": "crop+flip",
}
IMAGEFOLDER_DEFAULT_SIZE = 64
_SPLITS = ("train", "test", "calib")


@dataclass(eq=False)
class Datasets:
    """Train and test images of one data set, held in memory, with their metadata.

    Attributes:
        name: e.g. ``"digits"``, ``"npz:fashion_mnist.npz"``, ``"cifar10"``, ``"imagefolder:flowers"``.
        num_classes, in_chans: label count and image channels.
        input_size: (C, H, W) of the batches the model sees.
        mean, std: per-channel statistics of the training images scaled to [0, 1]; batches are
            normalised with them.
        train_size, test_size: image counts (train after ``train_limit``).
        augment: the resolved policy, ``"none"``, ``"crop"`` or ``"crop+flip"``.
        crop_pad: zero padding of the random crop (``max(1, H // 8)``: 1 for digits, 4 for 32×32).
        flip: whether the policy flips horizontally.
        x_train, y_train, x_test, y_test: uint8 (N, C, H, W) images and int64 (N,) labels.
    """

    name: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    augment: str
    crop_pad: int
    flip: bool
    x_train: Tensor = field(repr=False)
    y_train: Tensor = field(repr=False)
    x_test: Tensor = field(repr=False)
    y_test: Tensor = field(repr=False)

    def meta(self) -> dict[str, Any]:
        """The metadata (no tensors) as a JSON-ready dict, e.g. for reports."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def loader(
        self,
        split: str,
        batch_size: int = 64,
        *,
        shuffle: bool | None = None,
        augment: bool | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        device: torch.device | str | None = None,
    ) -> ImageLoader:
        """A loader over one split for one epoch.

        Args:
            split: ``"train"`` (defaults: shuffle, augment, drop_last), ``"test"`` (no shuffle, no
                augmentation, keep the last batch) or ``"calib"`` — the training images without
                augmentation, for BN recalibration or held-out scoring (defaults: shuffle so that any
                first k batches mix the classes, no augmentation, keep the last batch).
            batch_size: images per batch and rank.
            shuffle, augment, drop_last: override the split's defaults; ``augment=True`` applies
                this data set's policy (``self.augment``).
            seed, epoch: the order and augmentation are a function of this pair only.
            rank, world_size: DDP shard (disjoint, equal size; the remainder is dropped).
            device: where batches are augmented, normalised and returned (default CPU).
        Returns:
            An ``ImageLoader``: iterable of ``(x float32 (B, C, H, W), y int64 (B,))``, with ``len()``.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {', '.join(_SPLITS)}; got {split!r}")
        train = split == "train"
        shuffle = split != "test" if shuffle is None else shuffle
        augment = train if augment is None else augment
        drop_last = train if drop_last is None else drop_last
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        return ImageSource(self, x, y, device).loader(batch_size, shuffle=shuffle, augment=augment, seed=seed,
                                                      epoch=epoch, rank=rank, world_size=world_size,
                                                      drop_last=drop_last)  # fmt: skip


    def source(self, split: str, device: torch.device | str | None = None) -> ImageSource:
        """``"train"`` or ``"test"`` images as a trainer data source (:class:`ImageSource`)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        return ImageSource(self, x, y, device)


class ImageSource:
    """A subset of one data set's images in the form ``STPTrainer`` reads (``stp_fast.train.sources``):
    ``len()``, ``subset(indices)`` and ``loader(batch_size, shuffle=, augment=, seed=, epoch=, rank=,
    world_size=, drop_last=)`` -- no shuffling, augmentation or dropping unless asked."""

    def __init__(self, ds: Datasets, images: Tensor, labels: Tensor, device: torch.device | str | None = None) -> None:
        self.ds, self.images, self.labels, self.device = ds, images, labels, device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Tensor) -> ImageSource:
        return ImageSource(self.ds, self.images[indices], self.labels[indices], self.device)

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> ImageLoader:  # fmt: skip
        ds = self.ds
        return ImageLoader(self.images, self.labels, batch_size=batch_size, mean=ds.mean, std=ds.std, shuffle=shuffle,
                           pad=ds.crop_pad if augment and ds.augment.startswith("crop") else 0,
                           flip=bool(augment and ds.flip), seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                           drop_last=drop_last, device=self.device)  # fmt: skip


def _parse_spec(spec: str, data: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset must be a non-empty string; got {spec!r}. Known forms:\n{DATASET_HELP}")
    kind, _, inline = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ValueError(f"unknown dataset {spec!r}; known forms:\n{DATASET_HELP}")
    path = inline.strip() or None
    if data is not None and str(data).strip():
        if kind == "digits":
            raise ValueError(f"dataset 'digits' is bundled with scikit-learn and takes no data path; got data={data!r}")
        if path is not None and Path(path) != Path(data):
            raise ValueError(f"dataset {spec!r} names a path and data={str(data)!r} names another; give one")
        path = str(data)
    if kind == "digits":
        if path is not None:
            raise ValueError(f"dataset 'digits' takes no path; got {spec!r}")
        return kind, None
    if path is None:
        raise ValueError(f"dataset {kind!r} needs a path: {kind}:PATH, or data=PATH (--data PATH)")
    return kind, Path(path).expanduser()


def _resolve_augment(augment: str, kind: str, height: int) -> tuple[str, int, bool]:
    if not isinstance(augment, str) or augment.strip().lower() not in AUGMENT_CHOICES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}; got {augment!r}")
    name = augment.strip().lower()
    name = _AUTO_POLICY[kind] if name == "auto" else name
    pad = max(1, height // 8) if name.startswith("crop") else 0
    return name, pad, name == "crop+flip"


def _resize(x: Tensor, size: int, chunk: int = 1024) -> Tensor:
    """uint8 images (N, C, H, W): shorter side to ``size`` (bilinear, antialiased), then a central crop."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        r = torch.nn.functional.interpolate(
            x[i : i + chunk].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )
        out[i : i + chunk] = r[..., top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) scaled to [0, 1].

    Accumulated in float64 over chunks, so memory stays small for large sets. A constant channel
    gets std 1 (instead of 0) so normalising never divides by zero."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        v = x[i : i + chunk].to(torch.float64).div_(255.0)
        s += v.sum(dim=(0, 2, 3))
        s2 += v.square_().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")
    return value


def load_dataset(
    spec: str,
    data: str | os.PathLike[str] | None = None,
    *,
    augment: str = "auto",
    train_limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> Datasets:
    """Read a data set into memory.

    Args:
        spec: ``"digits"``, ``"npz:PATH"``, ``"cifar10:DIR"``, ``"cifar100:DIR"``, ``"imagefolder:DIR"``,
            or a bare kind (``"npz"``) with the path in ``data`` (see ``DATASET_HELP``).
        data: the path, when ``spec`` is a bare kind (the CLI's ``--data``).
        augment: ``"auto"`` (digits and npz: crop; cifar and imagefolder: crop+flip), ``"none"``,
            ``"crop"`` or ``"crop+flip"``. The crop pads ``max(1, H // 8)`` zero pixels on each side.
        train_limit: keep only the first N images of a permutation (seeded by ``seed``) of the
            training set; None keeps all (so does N ≥ the set's size).
        image_size: square side of the images. For imagefolder the decode size (default 64); for
            the others a resize of the stored images (shorter side, then a central crop; default:
            keep the stored size).
        seed: seeds the ``train_limit`` subset only. The digits train/test split is fixed (seed 0).
    Returns:
        A ``Datasets`` with uint8 tensors and metadata; draw batches with ``.loader(split, ...)``.
    Raises:
        ValueError: unknown spec, or a bad argument (the message names it).
        DatasetError: a missing path or a file or folder not in the expected layout.
    """
    kind, path = _parse_spec(spec, data)
    train_limit = _positive_int(train_limit, "train_limit")
    image_size = _positive_int(image_size, "image_size")
    _resolve_augment(augment, kind, 8)  # validate before any (slow) read
    if kind == "digits":
        raw, name = sources.read_digits(), "digits"
    elif kind == "npz":
        raw, name = sources.read_npz(path), f"npz:{path.name}"
    elif kind in ("cifar10", "cifar100"):
        raw, name = sources.read_cifar(path, 10 if kind == "cifar10" else 100), kind
    else:
        size = image_size or IMAGEFOLDER_DEFAULT_SIZE
        raw, name = sources.read_imagefolder(path, size), f"imagefolder:{path.resolve().name}"
    x_train, y_train, x_test = raw.x_train, raw.y_train, raw.x_test
    if image_size is not None:
        x_train, x_test = _resize(x_train, image_size), _resize(x_test, image_size)
    if train_limit is not None and train_limit < x_train.shape[0]:
        keep = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))[:train_limit]
        x_train, y_train = x_train[keep].contiguous(), y_train[keep]
    policy, pad, flip = _resolve_augment(augment, kind, x_train.shape[2])
    mean, std = channel_stats(x_train)
    c, h, w = x_train.shape[1:]
    return Datasets(
        name=name,
        num_classes=raw.num_classes,
        in_chans=c,
        input_size=(c, h, w),
        mean=mean,
        std=std,
        train_size=x_train.shape[0],
        test_size=x_test.shape[0],
        augment=policy,
        crop_pad=pad,
        flip=flip,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=raw.y_test,
    )


__all__ = ["AUGMENT_CHOICES", "DATASET_HELP", "DatasetError", "Datasets", "channel_stats", "load_dataset"]
