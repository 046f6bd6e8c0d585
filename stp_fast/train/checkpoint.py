"""Checkpoints: written atomically (temporary file, fsync, rename), loaded with ``weights_only=True``.

A run's checkpoint is a plain dict of tensors and Python primitives::

    {"format": "stp_fast.checkpoint", "version": 1, "kind": "stp" | "dense",
     "model": name, "model_kwargs": {...}, "num_classes": int, "in_chans": int,
     "epoch": completed epochs, "state_dict": ..., ... trainer state ...}
"""

from __future__ import annotations

import io
import os
import tempfile
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
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an stp_fast checkpoint (expected a dict with format={FORMAT!r}; "
                              "`stp-fast train` and `stp-fast prune` write them)")  # fmt: skip
    if data.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {data['version']}; "
                              f"this stp_fast reads <= {VERSION}")
    return data


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


def run_state(net: torch.nn.Module, config, *, epoch: int, optimizer, scheduler, history: list, wall_s: float,
              **extra) -> dict:  # fmt: skip
    """The checkpoint of a training run after ``epoch`` finished epochs (plus trainer-specific ``extra``)."""
    return {"format": FORMAT, "version": VERSION, "kind": config.method, **identity(net), "epoch": epoch,
            "config": config.to_dict(), "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "history": history,
            "wall_s": wall_s, **extra}  # fmt: skip


def restore_run(path: Path, net: torch.nn.Module, config, optimizer, scheduler, *, require: str | None = None) -> dict:
    """Load the run checkpoint at ``path`` into ``net``/``optimizer``/``scheduler`` and the torch RNG,
    after checking it is of this model and of the same config (``device`` may differ) and, with
    ``require``, that it holds that trainer's state.  Returns the checkpoint dict."""
    data = load(path)
    check_identity(data, path, net)
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
    return data
