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
