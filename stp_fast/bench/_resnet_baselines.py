"""The two plain-PyTorch baselines of the STP step benchmark (SPEC section 7), for the ResNet supernets
(the CIFAR layout of resnet20/56 and torchvision's of resnet50), written with ``F.conv2d`` /
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
from stp_fast.dropin import elastic
from stp_fast.dropin.supernet import ConvertedNet


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


def _count(module: nn.Module, which: str, widths: dict) -> int:
    """Channels ``arch`` keeps of ``module``'s output (``"out"``) or input (``"in"``) dimension."""
    return elastic._kept(module, which, widths).count


def _layer(conv: nn.Conv2d, bn: nn.BatchNorm2d, widths: dict, relu: bool) -> Layer:
    return Layer(conv, bn, _count(conv, "in", widths), _count(conv, "out", widths), relu)


def _layout(net: ConvertedNet, arch: Arch) -> tuple[Layer, bool, list[Block], int]:
    """(stem layer, stem max-pool?, every block of the ResNet, classifier input width) for ``arch``: the
    CIFAR layout (``stem.conv``/``stem.bn``, ``stages``) or torchvision's (``conv1``/``bn1``, ``layer1..4``),
    with the channel counts the converted net keeps for ``arch``."""
    check_supported(net)
    m, widths = net.model, arch.widths
    cifar = hasattr(m, "stem")
    stem = _layer(m.stem.conv, m.stem.bn, widths, True) if cifar else _layer(m.conv1, m.bn1, widths, True)
    position = {blk: (s, j) for s, st in enumerate(net.depth_stages) for j, blk in enumerate(st.blocks)}
    blocks = []
    for name, blk in m.named_modules():
        if not (hasattr(blk, "conv1") and hasattr(blk, "conv2") and hasattr(blk, "downsample")):
            continue
        pairs = [(blk.conv1, blk.bn1), (blk.conv2, blk.bn2)] + ([(blk.conv3, blk.bn3)] if hasattr(blk, "conv3") else [])
        body = tuple(_layer(c, b, widths, k < len(pairs) - 1) for k, (c, b) in enumerate(pairs))
        short = None if blk.downsample is None else _layer(blk.downsample[0], blk.downsample[1], widths, False)
        s, j = position.get(name, (None, 0))
        blocks.append(Block(s is None or j < arch.depth[s], body, short))
    return stem, not cifar, blocks, _count(m.fc, "in", widths)


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


def sliced_forward(net: ConvertedNet, x: Tensor, arch: Arch, owner: bool) -> Tensor:
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

    def __init__(self, net: ConvertedNet, arch: Arch, x: Tensor) -> None:
        self.stem, self.pool, self.blocks, _ = _layout(net, arch)
        self.stem_mask = next(_masks([self.stem], x))
        self.body_masks = [list(_masks(b.body, x)) for b in self.blocks]
        self.short_masks = [next(_masks([b.shortcut], x)) if b.shortcut else None for b in self.blocks]


def masked_forward(net: ConvertedNet, x: Tensor, plan: MaskedPlan, owner: bool) -> Tensor:
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


def check_supported(net) -> None:
    m = getattr(net, "model", None)
    if not isinstance(net, ConvertedNet) or not (hasattr(m, "stem") or hasattr(m, "layer1")) or not hasattr(m, "fc"):
        raise TypeError(f"the step benchmark's baselines cover the ResNet supernets, not {type(m).__name__}")
