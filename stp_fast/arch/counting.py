"""MACs and parameter counts of plain models, with Torch-Pruning's conventions.

``count_macs`` counts, for one image of ``input_size``: convolution and linear multiply-accumulates
plus one add per output for a bias; BatchNorm/GroupNorm/InstanceNorm 2 ops per element when
affine (else 1); LayerNorm likewise; ReLU-family modules and pooling modules 1 per element.
Functional ops (residual adds, ``torch.relu`` calls) are not counted -- the same rules as
Torch-Pruning's ``count_ops_and_params``, so the two agree on any model built from standard modules
(checked in the tests).  The supernets' analytic ``space.macs(arch)`` uses the same rules and equals
``count_macs(extract(net, arch))`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d,
         nn.AdaptiveAvgPool1d)  # fmt: skip
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def conv_macs(c_in: int, c_out: int, k: int | Sequence[int], out_hw: Sequence[int], groups: int = 1,
              bias: bool = False) -> int:  # fmt: skip
    """MACs of one convolution for one image (k: kernel size or (kh, kw))."""
    kh, kw = (k, k) if isinstance(k, int) else k
    positions = math.prod(out_hw)
    return positions * c_out * (c_in // groups) * kh * kw + (positions * c_out if bias else 0)


def linear_macs(rows: int, f_in: int, f_out: int, bias: bool = True) -> int:
    return rows * f_in * f_out + (f_out if bias else 0)


def norm_ops(numel: int, affine: bool = True) -> int:
    return numel * (2 if affine else 1)


def _module_ops(module: nn.Module, inputs: tuple, output) -> int:
    x = inputs[0] if inputs else None
    if isinstance(module, nn.Conv2d):
        return conv_macs(module.in_channels, module.out_channels, module.kernel_size, output.shape[2:],
                         module.groups, module.bias is not None) * output.shape[0]  # fmt: skip
    if isinstance(module, nn.Linear):
        rows = x.numel() // x.shape[-1]
        return rows * module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    if isinstance(module, _NORM):
        return norm_ops(x.numel(), getattr(module, "affine", True))
    if isinstance(module, nn.LayerNorm):
        return norm_ops(x.numel(), module.elementwise_affine)
    if isinstance(module, _ELEMENTWISE):
        return output.numel()
    if isinstance(module, _POOL):
        return x.numel()
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int]) -> tuple[int, int]:
    """(MACs, parameters) of ``model`` for one input of ``input_size`` = (C, H, W) (or with a batch
    dimension of 1).  See the module docstring for what counts."""
    size = tuple(input_size)
    if len(size) == 3:
        size = (1, *size)
    if size[0] != 1:
        raise ValueError(f"count_macs: input_size must be (C, H, W) or (1, C, H, W), got {tuple(input_size)}")
    total = [0]

    def hook(module, inputs, output):
        total[0] += _module_ops(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        model(torch.zeros(size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total[0], sum(p.numel() for p in model.parameters())
