"""The two plain-PyTorch baselines of the STP step benchmark (SPEC section 7), for the ResNet supernets
(``ResNetCifar``: resnet20/56, ``ResNetImageNet``: resnet50), written with ``F.conv2d`` /
``F.batch_norm`` on the supernet's own parameters, so gradients reach them as in ``forward_many``:

* ``masked``: every arch runs the dense network; after each BN the pruned channels are zeroed by a 0/1
  channel mask (after BN: a zeroed filter still emits BN's beta), and a dropped block's residual branch
  is multiplied by 0 -- every subnet costs the full network's MACs;
* ``sliced``: every arch runs its own pass with prefix views ``w[:out, :in]`` of the weights and
  sliced BN parameters, dropped blocks skipped -- what one writes without stp_fast.

Both compute ``net(x, arch=a)`` in train mode (per-subnet batch statistics; only the full arch
updates the running statistics).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.space import Arch
from stp_fast.models.base import Supernet
from stp_fast.models.resnet_cifar import ResNetCifar
from stp_fast.models.resnet_imagenet import ResNetImageNet


@dataclass(frozen=True)
class Layer:
    """A conv + BN (+ ReLU) keeping ``width`` output channels of ``conv`` (and reading ``c_in``)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    c_in: int
    width: int
    relu: bool


@dataclass(frozen=True)
class Block:
    kept: bool
    body: tuple[Layer, ...]
    shortcut: Layer | None


def _layout(net: Supernet, arch: Arch) -> tuple[Layer, bool, list[Block], int]:
    """(stem layer, stem max-pool?, every block of the supernet, classifier input width) for ``arch``."""
    if isinstance(net, ResNetCifar):
        r0 = net._res(arch, 0)
        stem = Layer(net.stem.conv, net.stem.bn, net.in_chans, r0, True)
        blocks = []
        for i, stage in enumerate(net.stages):
            for j, blk in enumerate(stage):
                c_in, out, mid = net._res(arch, i - 1 if (j == 0 and i > 0) else i), net._res(arch, i), \
                    arch.widths[f"s{i}.b{j}.mid"]  # fmt: skip
                body = (Layer(blk.conv1, blk.bn1, c_in, mid, True), Layer(blk.conv2, blk.bn2, mid, out, False))
                short = None if blk.downsample is None else Layer(*blk.downsample, c_in, out, False)
                blocks.append(Block(j < arch.depth[i], body, short))
        return stem, False, blocks, net._res(arch, len(net.stages) - 1)
    if isinstance(net, ResNetImageNet):
        stem = Layer(net.conv1, net.bn1, net.in_chans, net._res(arch, 0), True)
        blocks = []
        for i, stage in enumerate(net.stages, 1):
            for j, blk in enumerate(stage):
                w = arch.widths
                c_in, out = net._res(arch, i - 1 if j == 0 else i), net._res(arch, i)
                m1, m2 = w[f"l{i}.b{j}.mid1"], w[f"l{i}.b{j}.mid2"]
                body = (Layer(blk.conv1, blk.bn1, c_in, m1, True), Layer(blk.conv2, blk.bn2, m1, m2, True),
                        Layer(blk.conv3, blk.bn3, m2, out, False))  # fmt: skip
                short = None if blk.downsample is None else Layer(*blk.downsample, c_in, out, False)
                blocks.append(Block(j < arch.depth[i - 1], body, short))
        return stem, True, blocks, net._res(arch, 4)
    raise TypeError(f"the step benchmark's baselines cover the ResNet supernets, not {type(net).__name__}")


def _bn(bn: nn.BatchNorm2d, x: Tensor, ch: int, owner: bool) -> Tensor:
    """Train-mode BN of ``x`` over channels ``[:ch]``; only the owner updates the running statistics."""
    rm, rv = (bn.running_mean[:ch], bn.running_var[:ch]) if owner else (None, None)
    return F.batch_norm(x, rm, rv, bn.weight[:ch], bn.bias[:ch], True, bn.momentum or 0.0, bn.eps)


def _sliced_layer(layer: Layer, x: Tensor, owner: bool) -> Tensor:
    c = layer.conv
    y = F.conv2d(x, c.weight[: layer.width, : layer.c_in], None, c.stride, c.padding, c.dilation)
    y = _bn(layer.bn, y, layer.width, owner)
    return F.relu(y) if layer.relu else y


def _masks(layers: Sequence[Layer], x: Tensor) -> Iterator[Tensor | None]:
    for layer in layers:
        full = layer.conv.out_channels
        if layer.width >= full:
            yield None
        else:
            m = x.new_zeros(1, full, 1, 1)
            m[:, : layer.width] = 1
            yield m


def _masked_layer(layer: Layer, x: Tensor, mask: Tensor | None, owner: bool) -> Tensor:
    c = layer.conv
    y = _bn(layer.bn, F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation), c.out_channels, owner)
    if mask is not None:
        y = y * mask
    return F.relu(y) if layer.relu else y


def sliced_forward(net: Supernet, x: Tensor, arch: Arch, owner: bool) -> Tensor:
    """Logits of ``arch``: its own pass with sliced weights, dropped blocks skipped."""
    stem, pool, blocks, last = _layout(net, arch)
    h = _sliced_layer(stem, x, owner)
    if pool:
        h = F.max_pool2d(h, 3, 2, 1)
    for blk in blocks:
        if not blk.kept:
            continue
        y = h
        for layer in blk.body:
            y = _sliced_layer(layer, y, owner)
        skip = h if blk.shortcut is None else _sliced_layer(blk.shortcut, h, owner)
        h = F.relu(y + skip)
    return F.linear(h.mean((2, 3)), net.fc.weight[:, :last], net.fc.bias)


class MaskedPlan:
    """The masks of one arch for :func:`masked_forward`, built once (outside the timed step)."""

    def __init__(self, net: Supernet, arch: Arch, x: Tensor) -> None:
        self.stem, self.pool, self.blocks, _ = _layout(net, arch)
        self.stem_mask = next(_masks([self.stem], x))
        self.body_masks = [list(_masks(b.body, x)) for b in self.blocks]
        self.short_masks = [next(_masks([b.shortcut], x)) if b.shortcut else None for b in self.blocks]


def masked_forward(net: Supernet, x: Tensor, plan: MaskedPlan, owner: bool) -> Tensor:
    """Logits of the plan's arch computed by the dense network with channel masks (full MACs)."""
    h = _masked_layer(plan.stem, x, plan.stem_mask, owner)
    if plan.pool:
        h = F.max_pool2d(h, 3, 2, 1)
    for blk, masks, short_mask in zip(plan.blocks, plan.body_masks, plan.short_masks):
        y = h
        for layer, mask in zip(blk.body, masks):
            y = _masked_layer(layer, y, mask, owner)
        skip = h if blk.shortcut is None else _masked_layer(blk.shortcut, h, short_mask, owner)
        h = F.relu((y if blk.kept else y * 0.0) + skip)
    return F.linear(h.mean((2, 3)), net.fc.weight, net.fc.bias)


def check_supported(net: Supernet) -> None:
    if not isinstance(net, (ResNetCifar, ResNetImageNet)):
        raise TypeError(f"the step benchmark's baselines cover the ResNet supernets, not {type(net).__name__}")
