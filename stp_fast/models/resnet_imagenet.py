"""ImageNet ResNet-50 (torchvision layout): a plain PyTorch definition, made elastic by ``stp_fast.convert``.

Layout (He et al. 2016; torchvision "v1.5": the stride sits on the 3x3 conv): a 7x7/2 stem conv + BN +
ReLU + 3x3/2 max-pool, four stages ``layer1..layer4`` of Bottleneck blocks (1x1 -> 3x3 -> 1x1,
expansion 4) with (3, 4, 6, 3) blocks, planes (64, 128, 256, 512) and strides (1, 2, 2, 2); the first
block of every stage has a 1x1 conv + BN projection (``downsample``); global average pooling and a
linear classifier.  Module names and the forward are torchvision's, so a torchvision ResNet-50 state
dict loads with ``load_state_dict`` (and so does ``extract(net, net.space.full()).state_dict()``, into
either).  ``width_mult`` scales every width (e.g. 1/8 for tests); ``layers`` sets the blocks per stage.

What the engine finds (``net.report()``):
* depth: every block after a stage's first (identity shortcut) is skippable; a stage keeps a prefix of
  its blocks and never drops its first, which holds the projection;
* width: per block the outputs of ``conv1`` (group ``layer{i}.{j}.conv1``: conv1 out / conv2 in) and of
  ``conv2`` (group ``layer{i}.{j}.conv2``: conv2 out / conv3 in); with ``prune_residual=True`` also the
  stem output (``conv1``/``bn1``, read by ``layer1.0``) and the residual stream of every stage as one
  coupled group (the stage's conv3/bn3 outputs and projection, read by its later blocks and by the next
  stage's first block or the classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS
from stp_fast.models.base import make_supernet

PLANES = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (one in-place ReLU module, applied three times)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetImageNet(nn.Module):
    """The plain ImageNet ResNet with Bottleneck blocks (torchvision's ``ResNet``); see the module docstring."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, in_chans: int = 3, *,
                 width_mult: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        planes = [max(1, round(p * width_mult)) for p in PLANES]
        self.conv1 = nn.Conv2d(in_chans, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = planes[0]
        for i, (n, p) in enumerate(zip(layers, planes), 1):
            stride = 1 if i == 1 else 2
            blocks = [Bottleneck(c_in if j == 0 else 4 * p, p, stride if j == 0 else 1, j == 0) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c_in = 4 * p
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int, in_chans: int = 3, *, layers: Sequence[int] = (3, 4, 6, 3), width_mult: float = 1.0,
             prune_residual: bool = False, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1,
             input_size: Sequence[int] | None = None):  # fmt: skip
    """ResNet-50 supernet (torchvision layout; keywords: width_mult, layers, prune_residual, width_ratios,
    divisor, input_size = (C, H, W), default (in_chans, 224, 224))."""
    model = ResNetImageNet(layers, num_classes, in_chans, width_mult=width_mult)
    return make_supernet(model, tuple(input_size or (in_chans, 224, 224)), prune_residual=prune_residual,
                         width_ratios=width_ratios, divisor=divisor)  # fmt: skip
