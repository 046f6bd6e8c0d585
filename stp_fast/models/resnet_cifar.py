"""CIFAR-style ResNets (resnet20, resnet56): plain PyTorch definitions, made elastic by ``stp_fast.convert``.

Layout (He et al. 2016, CIFAR variant): a 3x3 stem, three stages of BasicBlocks at widths
(16, 32, 64) -- or ``widths`` -- and strides (1, 2, 2), global average pooling and a linear
classifier.  Blocks that change shape use a 1x1 conv + BN projection shortcut ("option B").

What the engine finds (``net.report()``):
* depth: every block with an identity shortcut is skippable; a stage keeps a prefix of its blocks
  and never drops its first;
* width: the inner channels of every block (group ``stages.{i}.{j}.conv1``) and, with
  ``prune_residual=True``, each stage's residual stream as one coupled group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS
from stp_fast.models.base import make_supernet


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + (x if self.downsample is None else self.downsample(x)))


class ResNetCifar(nn.Module):
    """The plain CIFAR ResNet (``blocks`` BasicBlocks per stage)."""

    def __init__(self, blocks: int, num_classes: int, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(widths[0]))
        self.stem.add_module("relu", nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        c_prev = widths[0]
        for i, c in enumerate(widths):
            self.stages.append(nn.ModuleList(BasicBlock(c_prev if j == 0 else c, c, 2 if (j == 0 and i > 0) else 1)
                                             for j in range(blocks)))  # fmt: skip
            c_prev = c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet(blocks: int, num_classes: int, in_chans: int, *, widths: Sequence[int] = (16, 32, 64),
            prune_residual: bool = False, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1,
            input_size: Sequence[int] | None = None):  # fmt: skip
    model = ResNetCifar(blocks, num_classes, in_chans, widths)
    return make_supernet(model, tuple(input_size or (in_chans, 32, 32)), prune_residual=prune_residual,
                         width_ratios=width_ratios, divisor=divisor)  # fmt: skip


def resnet20(num_classes: int, in_chans: int = 3, **kw):
    return _resnet(3, num_classes, in_chans, **kw)


def resnet56(num_classes: int, in_chans: int = 3, **kw):
    return _resnet(9, num_classes, in_chans, **kw)
