"""A tiny learnable image set for trainer tests (fast on 2 cores)."""

import torch
from torch.utils.data import TensorDataset


def synthetic(n: int = 240, classes: int = 3, size: int = 8, seed: int = 1) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    x[:, 0, :, :] += (y.float() - 1).view(-1, 1, 1)  # class = brightness: learnable in a few steps
    split = n * 5 // 6
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])
