"""Readers for the on-disk data set layouts; each returns uint8 image tensors N×C×H×W and int64 labels.

numpy, scikit-learn, pickle and pillow are imported inside the readers, so importing this module (and
``stp_fast``) stays cheap. Every layout problem — a missing path, a missing array or key, a truncated
or corrupt file, labels out of range, test labels no training image has, classes implied by a stray
label that never occur, mismatched lengths, images that are not uint8 — raises
``DatasetError`` naming the path and the layout that was expected, never a bare KeyError or a pickle
traceback.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

NPZ_LAYOUT = (
    "a .npz archive with arrays x_train, y_train, x_test, y_test: uint8 images N×H×W or N×H×W×C "
    "(C ≤ 4) and integer labels of length N, 0..K-1 with every class in y_train (or a scalar num_classes "
    "K declaring classes that have no image)"
)
CIFAR10_LAYOUT = (
    "cifar-10-batches-py/ with data_batch_1..data_batch_5 and test_batch (python pickles of dicts with "
    "b'data' uint8 N×3072 and b'labels' in 0..9); DIR may be that folder or its parent"
)
CIFAR100_LAYOUT = (
    "cifar-100-python/ with train and test (python pickles of dicts with b'data' uint8 N×3072 and "
    "b'fine_labels' in 0..99); DIR may be that folder or its parent"
)
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (or DIR/test/...), images readable by PIL"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})

# Digits split: a fixed permutation (seed 0, independent of the run's seed) so every run and every
# machine sees the same 1437 training and 360 test images.
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8


class DatasetError(ValueError):
    """A data set file or folder is missing or does not have the expected layout."""


@dataclass
class RawData:
    """Images (uint8, N×C×H×W) and labels (int64, N) of both splits, as read from disk."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def _fail(path: Path | str, problem: str, layout: str) -> DatasetError:
    return DatasetError(f"{path}: {problem}; expected {layout}")


def _check_labels(path: Path | str, y: Any, n: int, what: str, layout: str, num_classes: int | None) -> Tensor:
    """Labels as int64 (N,), checked for shape, integer dtype and range."""
    import numpy as np

    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise _fail(path, f"{what} has shape {y.shape} but there are {n} images", layout)
    if not np.issubdtype(y.dtype, np.integer):
        raise _fail(path, f"{what} has dtype {y.dtype}, not an integer type", layout)
    if n and y.min() < 0:
        raise _fail(path, f"{what} holds a negative label ({int(y.min())})", layout)
    if n and num_classes is not None and y.max() >= num_classes:
        raise _fail(path, f"{what} holds label {int(y.max())}, out of range 0..{num_classes - 1}", layout)
    return torch.from_numpy(y.astype(np.int64))


def _check_classes(path: Path | str, y_train: Tensor, y_test: Tensor, num_classes: int, layout: str, *,
                   declared: bool) -> None:  # fmt: skip
    """The labels against the classes: a test label that no training image has is refused (the model
    could never predict it); with classes only observed (``declared=False``: K = largest label + 1),
    so is a class in 0..K-1 that no training image has -- one stray label (1000 among 0..9) would
    otherwise build a 1001-class model."""
    seen = torch.zeros(num_classes, dtype=torch.bool)
    seen[y_train] = True
    if not declared and not bool(seen.all()):
        absent = (~seen).nonzero().flatten().tolist()
        raise _fail(path, f"y_train's largest label {num_classes - 1} implies {num_classes} classes, but {len(absent)} "
                    f"of them never occur ({_few(absent)}): a stray label? (a scalar num_classes array declares "
                    "classes without images)", layout)  # fmt: skip
    unseen = sorted(set(y_test.unique().tolist()) - set(y_train.unique().tolist()))
    if unseen:
        raise _fail(path, f"the test labels hold {len(unseen)} class(es) that no training image has "
                    f"({_few(unseen)})", layout)  # fmt: skip


def _few(values: list[int], n: int = 5) -> str:
    return ", ".join(map(str, values[:n])) + (", ..." if len(values) > n else "")


def _to_nchw(path: Path | str, x: Any, what: str, layout: str) -> Tensor:
    """uint8 images N×H×W or N×H×W×C as a contiguous uint8 tensor N×C×H×W."""
    import numpy as np

    if x.dtype != np.uint8:
        raise _fail(path, f"{what} has dtype {x.dtype}, not uint8", layout)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and 1 <= x.shape[-1] <= 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise _fail(path, f"{what} has shape {x.shape}", layout)
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise _fail(path, f"{what} is empty (shape {x.shape})", layout)
    return torch.from_numpy(np.ascontiguousarray(x))


def read_digits() -> RawData:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), values 0..16 scaled to 0..255.

    Split 80/20 (1437 train, 360 test) by a fixed permutation drawn with seed 0."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None])
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(x.shape[0] * DIGITS_TRAIN_FRACTION)
    tr, te = perm[:n_train], perm[n_train:]
    return RawData(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], 10)


def read_npz(path: Path) -> RawData:
    """A .npz archive with x_train, y_train, x_test, y_test (loaded with allow_pickle=False)."""
    import numpy as np

    if not path.is_file():
        raise _fail(path, "no such file", NPZ_LAYOUT)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise _fail(
                    path, f"missing array(s) {', '.join(missing)} (found {', '.join(z.files) or 'none'})", NPZ_LAYOUT
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            num_classes = z["num_classes"] if "num_classes" in z.files else None
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(path, f"cannot read the archive ({type(e).__name__}: {e})", NPZ_LAYOUT) from e
    x_train = _to_nchw(path, arrays["x_train"], "x_train", NPZ_LAYOUT)
    x_test = _to_nchw(path, arrays["x_test"], "x_test", NPZ_LAYOUT)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise _fail(
            path,
            f"x_train images are {tuple(x_train.shape[1:])} (C, H, W) but x_test images are {tuple(x_test.shape[1:])}",
            NPZ_LAYOUT,
        )
    declared = _declared_classes(path, num_classes)
    y_train = _check_labels(path, arrays["y_train"], x_train.shape[0], "y_train", NPZ_LAYOUT, declared)
    y_test = _check_labels(path, arrays["y_test"], x_test.shape[0], "y_test", NPZ_LAYOUT, declared)
    k = declared if declared is not None else int(y_train.max()) + 1
    _check_classes(path, y_train, y_test, k, NPZ_LAYOUT, declared=declared is not None)
    return RawData(x_train, y_train, x_test, y_test, k)


def _declared_classes(path: Path, value: Any) -> int | None:
    """The npz's optional ``num_classes`` (a scalar integer >= 1), or None."""
    import numpy as np

    if value is None:
        return None
    v = np.asarray(value)
    if v.ndim != 0 or not np.issubdtype(v.dtype, np.integer) or int(v) < 1:
        raise _fail(path, f"num_classes must be a scalar integer >= 1, got {v.tolist()!r}", NPZ_LAYOUT)
    return int(v)


# Globals a CIFAR pickle may name: numpy array and dtype reconstruction only (and _codecs.encode,
# which protocol-2 pickles written by Python 3 use for bytes). Anything else is refused, so a
# crafted file cannot run code.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core."):  # written by numpy < 2
            module = "numpy._core." + module[len("numpy.core.") :]
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # numpy < 2 has no numpy._core
            return getattr(importlib.import_module(module.replace("numpy._core.", "numpy.core.")), name)


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int, layout: str) -> tuple[Tensor, Tensor]:
    import numpy as np

    if not path.is_file():
        raise _fail(path, "no such file", layout)
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated or corrupt pickles raise many types (EOFError, UnpicklingError, ...)
        raise _fail(path, f"cannot unpickle ({type(e).__name__}: {e})", layout) from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(map(repr, d)) if isinstance(d, dict) else type(d).__name__
        raise _fail(path, f"expected a dict with keys b'data' and {label_key!r}, found {keys}", layout)
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8:
        raise _fail(path, f"b'data' has dtype {x.dtype}, not uint8", layout)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] == 0:
        raise _fail(path, f"b'data' has shape {x.shape}, not N×3072", layout)
    y = _check_labels(path, d[label_key], x.shape[0], repr(label_key), layout, num_classes)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 3, 32, 32))), y


def read_cifar(root: Path, num_classes: int) -> RawData:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (100) in the python-pickle layout, under ``root``
    (the extracted folder or its parent)."""
    if num_classes == 10:
        folder, train_files, test_file, label_key, layout = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            b"labels",
            CIFAR10_LAYOUT,
        )
    elif num_classes == 100:
        folder, train_files, test_file, label_key, layout = (
            "cifar-100-python",
            ["train"],
            "test",
            b"fine_labels",
            CIFAR100_LAYOUT,
        )
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if not root.is_dir():
        raise _fail(root, "no such directory", layout)
    base = root / folder if (root / folder).is_dir() else root
    if not (base / test_file).is_file():
        raise _fail(root, f"no {test_file} in {base}", layout)
    parts = [_read_cifar_batch(base / name, label_key, num_classes, layout) for name in train_files]
    x_test, y_test = _read_cifar_batch(base / test_file, label_key, num_classes, layout)
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    _check_classes(base, y_train, y_test, num_classes, layout, declared=True)
    return RawData(x_train, y_train, x_test, y_test, num_classes)


def _list_images(split_dir: Path) -> dict[str, list[Path]]:
    return {
        c.name: sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for c in sorted(split_dir.iterdir())
        if c.is_dir()
    }


def _load_image(path: Path, mode: str, size: int) -> Any:
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            # Shorter side to `size`, then the central size×size crop.
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR, centering=(0.5, 0.5))
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for unreadable or truncated files
        raise _fail(path, f"cannot read the image ({type(e).__name__}: {e})", IMAGEFOLDER_LAYOUT) from e


def read_imagefolder(root: Path, image_size: int) -> RawData:
    """Images of ``root/train/<class>/`` and ``root/val/<class>/`` (or ``root/test/``), decoded with PIL,
    resized (shorter side to ``image_size``, then a central square crop) and held in memory as uint8.

    Classes are the sorted sub-folder names of ``train/``. Images are grey (1 channel) when every
    image is grey, RGB otherwise. Meant for small folders: everything is decoded once, up front."""
    import numpy as np
    from PIL import Image

    if not root.is_dir():
        raise _fail(root, "no such directory", IMAGEFOLDER_LAYOUT)
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise _fail(root, "no train/ and val/ (or test/) sub-folders", IMAGEFOLDER_LAYOUT)
    train, test = _list_images(train_dir), _list_images(test_dir)
    classes = [c for c, files in train.items() if files]
    if not classes:
        raise _fail(train_dir, "no class folder holds an image", IMAGEFOLDER_LAYOUT)
    unknown = sorted(set(c for c, files in test.items() if files) - set(classes))
    if unknown:
        raise _fail(test_dir, f"class folder(s) {', '.join(unknown)} have no counterpart in train/", IMAGEFOLDER_LAYOUT)
    index = {c: i for i, c in enumerate(classes)}
    splits = [[(p, index[c]) for c in classes for p in files.get(c, [])] for files in (train, test)]
    if not splits[1]:
        raise _fail(test_dir, "holds no image", IMAGEFOLDER_LAYOUT)
    modes = set()
    for p, _ in splits[0] + splits[1]:
        try:
            with Image.open(p) as im:
                modes.add(im.mode)
        except Exception as e:
            raise _fail(p, f"cannot read the image ({type(e).__name__}: {e})", IMAGEFOLDER_LAYOUT) from e
    mode = "L" if modes <= {"1", "L", "LA", "I", "I;16", "F"} else "RGB"
    out = []
    for items in splits:
        x = np.stack([_load_image(p, mode, image_size) for p, _ in items])
        out += [_to_nchw(root, x, "images", IMAGEFOLDER_LAYOUT), torch.tensor([c for _, c in items])]
    return RawData(out[0], out[1], out[2], out[3], len(classes))
