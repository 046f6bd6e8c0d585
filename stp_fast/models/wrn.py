"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), ``wrn28_10`` by default: plain PyTorch definitions,
made elastic by ``stp_fast.convert``.

Layout: a 3x3 stem conv to 16 channels, three groups ``block1..block3`` of ``(depth - 4) / 6``
pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) at widths ``16 * widen_factor * (1, 2, 4)``
and strides (1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier; no dropout.
A block whose shape changes has a 1x1 conv shortcut applied, as in the reference implementations, to
the *pre-activated* input ``relu(bn1(x))``; other blocks add ``x`` itself.  Module names follow the
widely used PyTorch port (``conv1``, ``block{i}.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1``, ``fc``; RobustBench's WideResNet), so its dense state dicts load with ``load_state_dict``.

What the engine finds (``net.report()``):
* depth: every block with an identity shortcut is skippable; a group keeps a prefix of its blocks and
  never drops its first (which holds the shortcut conv when the width changes);
* width: the inner channels of every block (group ``block{i}.layer.{j}.conv1``: conv1 out / bn2 / conv2
  in) and, with ``prune_residual=True``, the stem output (group ``conv1``) and the residual stream of
  every group as one coupled group (its conv2 outputs and shortcut conv, read by the BN-ReLU and convs of
  its later blocks and of the next group's first block, or by the final BN and classifier).  A group
  whose first block has no shortcut conv (widen_factor 1) shares the previous stream's group.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS
from stp_fast.models.base import make_supernet


class PreActBlock(nn.Module):
    """Pre-activation basic block (the reference implementation's ``BasicBlock``, dropout off)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = None  # the name used by the reference implementation's state dicts
        if stride != 1 or c_in != c_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """One group of blocks (the reference implementation's container: ``block{i}.layer``)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """The plain CIFAR Wide ResNet; see the module docstring."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        for i in range(1, 4):
            stride = 1 if i == 1 else 2
            blocks = [PreActBlock(widths[i - 1] if j == 0 else widths[i], widths[i], stride if j == 0 else 1)
                      for j in range(n)]  # fmt: skip
            self.add_module(f"block{i}", NetworkBlock(blocks))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn1(out)))
        return self.fc(out.flatten(1))


def wrn28_10(num_classes: int, in_chans: int = 3, *, depth: int = 28, widen_factor: int = 10,
             prune_residual: bool = False, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1,
             input_size: Sequence[int] | None = None):  # fmt: skip
    """WRN-28-10 supernet (keywords: depth, widen_factor, prune_residual, width_ratios, divisor, input_size =
    (C, H, W), default (in_chans, 32, 32))."""
    model = WideResNet(depth, widen_factor, num_classes, in_chans)
    return make_supernet(model, tuple(input_size or (in_chans, 32, 32)), prune_residual=prune_residual,
                         width_ratios=width_ratios, divisor=divisor)  # fmt: skip
