"""Checkpoints: written atomically (temporary file, fsync, rename), loaded with ``weights_only=True``.

A run's checkpoint is a plain dict of tensors and Python primitives::

    {"format": "stp_fast.checkpoint", "version": 1, "kind": "stp" | "dense",
     "model": name, "model_kwargs": {...}, "num_classes": int, "in_chans": int,
     "data": {"name", "train_size", "test_size", "num_classes", "input_size", "mean", "std", "hash"},
     "epoch": completed epochs, "state_dict": ..., ... trainer state ...}

``data`` identifies the data set the run trained on, so ``--resume`` refuses to continue a run on
another one (checkpoints written before it existed resume unchecked).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = "stp_fast.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model it is loaded into."""


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` such that ``path`` always holds either the old or the new file
    (a temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`write_bytes_atomic`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(path, buf.getvalue())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode())


def load(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Load an stp_fast checkpoint (``weights_only=True``); CheckpointError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {unreadable_reason(path, exc)}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an stp_fast checkpoint (expected a dict with format={FORMAT!r}; "
                              "`stp-fast train` and `stp-fast prune` write them)")  # fmt: skip
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {data['version']}; "
                              f"this stp_fast reads <= {VERSION}")
    return data


def unreadable_reason(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load`` failed, in one short line: its own messages run to several lines of
    ``weights_only`` advice and zip-reader internals that do not help a user with a broken file."""
    text = str(exc)
    if not zipfile.is_zipfile(path):
        return "not a file torch.save wrote (corrupt, truncated, or another kind of file)"
    if "Weights only load failed" in text:
        return "it holds Python objects other than tensors and plain values, which weights_only loading refuses"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "the archive is corrupt or truncated"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def check_model(data: dict, path: str | os.PathLike, model: str, num_classes: int, in_chans: int) -> None:
    """CheckpointError unless checkpoint ``data`` holds weights of this model/classes/channels."""
    want = {"model": model, "num_classes": num_classes, "in_chans": in_chans}
    have = {k: data.get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k}={have[k]!r} (expected {want[k]!r})" for k in want if have[k] != want[k])
        raise CheckpointError(f"checkpoint {str(path)!r} is of another model: {diff}")


def load_weights(net: torch.nn.Module, data: dict, path: str | os.PathLike) -> None:
    """Load ``data['state_dict']`` into ``net`` strictly; CheckpointError naming the mismatches."""
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has no state_dict")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model ({'; '.join(parts)})")  # fmt: skip
    net.load_state_dict(state)


def identity(net: torch.nn.Module) -> dict:
    """What a checkpoint records of the model it holds (checked when it is loaded)."""
    return {"model": getattr(net, "model_name", type(net).__name__), "model_kwargs": getattr(net, "model_kwargs", {}),
            "num_classes": getattr(net, "num_classes", None), "in_chans": getattr(net, "in_chans", None)}  # fmt: skip


def check_identity(data: dict, path: str | os.PathLike, net: torch.nn.Module) -> None:
    """CheckpointError unless ``data`` was written for ``net``'s model, classes and channels."""
    check_model(data, path, **{k: v for k, v in identity(net).items() if k != "model_kwargs"})


def data_identity(train, val) -> dict:
    """What a checkpoint records of the data a run trains on (``train``/``val``: trainer sources).

    The name, sizes, class count, input size and normalisation (``mean``/``std``: ``stp-fast eval``
    feeds the model its images normalised as in training), and a short hash of the labels and of a
    sample of pixels: another npz with the same classes and channels, or another ``--train-limit``,
    differs in the hash or the sizes.  Sources of ``stp_fast.data`` hash every label and 64 images of
    each split; other sources (a user's torch Dataset, whose transforms may be random) the labels of
    64 samples."""
    digest = hashlib.sha256()
    input_size = None
    for src in (train, val):
        n = len(src)
        pick = torch.linspace(0, n - 1, min(n, 64)).round().long() if n else torch.zeros(0, dtype=torch.long)
        images, labels = getattr(src, "images", None), getattr(src, "labels", None)
        if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
            digest.update(labels.cpu().to(torch.int64).numpy().tobytes())
            digest.update(images[pick].cpu().contiguous().numpy().tobytes())
            shape = tuple(images.shape[1:])
        elif n:
            x, y = next(iter(src.subset(pick).loader(len(pick))))
            try:  # labels that are not integers (a user's targets) only go unhashed
                digest.update(torch.as_tensor(y).to(torch.int64).cpu().numpy().tobytes())
            except (TypeError, ValueError, RuntimeError):
                pass
            shape = tuple(getattr(x, "shape", (0,))[1:])
        else:
            shape = ()
        input_size = input_size or [int(s) for s in shape]
    ds = getattr(train, "ds", None)  # stp_fast.data.Datasets
    name = ds.name if ds is not None else type(getattr(train, "dataset", train)).__name__
    norm = {"mean": list(ds.mean), "std": list(ds.std)} if ds is not None else {"mean": None, "std": None}
    return {"name": name, "train_size": len(train), "test_size": len(val),
            "num_classes": getattr(ds, "num_classes", None), "input_size": input_size, **norm,
            "hash": digest.hexdigest()[:16]}  # fmt: skip


def check_data(data: dict, path: str | os.PathLike, now: dict | None) -> None:
    """CheckpointError unless checkpoint ``data`` was trained on the data set ``now`` identifies
    (:func:`data_identity`); a checkpoint without that record (older) passes."""
    saved = data.get("data")
    if now is None or not isinstance(saved, dict):
        return
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        plain = [k for k in diff if k not in ("mean", "std", "hash")]  # sizes, classes, names: say which
        parts = "; ".join(f"{k} {saved.get(k)!r} there, {now[k]!r} now" for k in plain) or "other labels or images"
        raise CheckpointError(f"cannot resume {str(path)!r}: it was trained on another data set ({parts})")


def run_state(net: torch.nn.Module, config, *, epoch: int, optimizer, scheduler, history: list, wall_s: float,
              data_id: dict | None = None, **extra) -> dict:  # fmt: skip
    """The checkpoint of a training run after ``epoch`` finished epochs (plus trainer-specific ``extra``);
    ``data_id`` is the :func:`data_identity` of its data set."""
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"format": FORMAT, "version": VERSION, "kind": config.method, **identity(net), "data": data_id,
            "epoch": epoch, "config": config.to_dict(), "state_dict": net.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "history": history, "wall_s": wall_s,
            **extra}  # fmt: skip


def restore_run(path: Path, net: torch.nn.Module, config, optimizer, scheduler, *, require: str | None = None,
                data_id: dict | None = None) -> dict:  # fmt: skip
    """Load the run checkpoint at ``path`` into ``net``/``optimizer``/``scheduler`` and the torch RNGs,
    after checking it is of this model, of the same config (``device`` may differ) and, with ``data_id``
    (:func:`data_identity`), of the same data set, and, with ``require``, that it holds that trainer's
    state.  Returns the checkpoint dict."""
    data = load(path)
    check_identity(data, path, net)
    check_data(data, path, data_id)
    saved = {k: v for k, v in data["config"].items() if k != "device"}
    now = {k: v for k, v in config.to_dict().items() if k != "device"}
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        k = diff[0]
        raise CheckpointError(f"cannot resume {str(path)!r}: its config differs in {diff} "
                              f"(e.g. {k}={saved.get(k)!r} there, {now[k]!r} now)")  # fmt: skip
    if require is not None and data.get(require) is None:
        raise CheckpointError(f"cannot resume {str(path)!r}: it holds no {require!r} state "
                              f"(it was written by method {data.get('kind')!r})")  # fmt: skip
    load_weights(net, data, path)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    torch.set_rng_state(data["torch_rng"])
    cuda_rng = data.get("cuda_rng")
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    return data
