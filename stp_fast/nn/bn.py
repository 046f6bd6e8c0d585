"""BatchNorm recalibration: re-estimate running statistics from data, with cumulative averages."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, num_images: int = 2000, *, forward=None) -> nn.Module:
    """Recompute every BatchNorm's running mean/var on up to ``num_images`` training images.

    The statistics are cumulative averages over the batches seen (``momentum=None``), the protocol
    of stimulative training (ST++ ``set_running_statistics``) and the only post-processing the
    no-fine-tuning evaluation of STP allows.  The model runs in train mode without gradients and is
    returned in eval mode.  ``loader`` yields tensors or (inputs, targets) pairs; ``forward(model, x)``
    overrides the call (e.g. to run a supernet at one arch).
    """
    if num_images < 1:
        raise ValueError(f"recalibrate_bn: num_images must be >= 1, got {num_images}")
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            x = x[: num_images - seen].to(device)
            if x.shape[0] == 0:
                break
            forward(model, x) if forward is not None else model(x)
            seen += x.shape[0]
            if seen >= num_images:
                break
    finally:
        for m, (momentum, _) in zip(bns, saved):
            m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_bn: the loader yielded no images")
    return model.eval()
