"""Evaluation helpers: top-1 accuracy, and the KD score of a candidate against the dense model."""

from __future__ import annotations

import torch
from torch import nn

from stp_fast.train.losses import kd_loss
from stp_fast.train.sources import Source


@torch.no_grad()
def evaluate(model: nn.Module, source: Source, device: torch.device | str = "cpu", *, batch_size: int = 256) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode on every image of ``source``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in source.loader(batch_size):
            pred = model(x.to(device)).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the data source yielded no images")
    return correct / total


@torch.no_grad()
def kd_score(model: nn.Module, teacher: nn.Module, source: Source, device: torch.device | str = "cpu", *,
             temperature: float = 1.0, batch_size: int = 256) -> tuple[float, float]:  # fmt: skip
    """(mean KL of ``model`` to ``teacher`` per image, top-1 of ``model``), both in eval mode."""
    model.eval()
    teacher.eval()
    kd_sum = 0.0
    correct = total = 0
    for x, y in source.loader(batch_size):
        x = x.to(device)
        z = model(x)
        kd_sum += float(kd_loss(z, teacher(x), temperature)) * y.numel()
        correct += int((z.argmax(-1).cpu() == y).sum())
        total += y.numel()
    if total == 0:
        raise ValueError("kd_score: the data source yielded no images")
    return kd_sum / total, correct / total


@torch.no_grad()
def kd_score_batches(model: nn.Module, teacher: nn.Module, batches, device: torch.device | str = "cpu", *,
                     temperature: float = 1.0, forward=None) -> tuple[float, float | None]:  # fmt: skip
    """Like :func:`kd_score` for any iterable of image batches or (images, labels) pairs: (mean KL of
    ``model`` to ``teacher`` per image, top-1 of ``model`` or None without labels), both in eval mode.
    ``forward(model, x)`` overrides the call."""
    call = forward or (lambda m, x: m(x))
    model.eval()
    teacher.eval()
    kd_sum, correct, total, labelled = 0.0, 0, 0, True
    for batch in batches:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
        x = x.to(device)
        z = call(model, x)
        kd_sum += float(kd_loss(z, call(teacher, x), temperature)) * x.shape[0]
        total += x.shape[0]
        if y is None or not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32):
            labelled = False
        else:
            correct += int((z.argmax(-1).cpu() == y.cpu()).sum())
    if total == 0:
        raise ValueError("kd_score_batches: the batches held no images")
    return kd_sum / total, (correct / total if labelled else None)
