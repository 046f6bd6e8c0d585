"""ImageNet ResNet-50 (torchvision layout) as an elastic supernet.

Layout (He et al. 2016; torchvision "v1.5": the stride sits on the 3x3 conv): a 7x7/2 stem conv + BN +
ReLU + 3x3/2 max-pool, four stages ``layer1..layer4`` of Bottleneck blocks (1x1 -> 3x3 -> 1x1,
expansion 4) with (3, 4, 6, 3) blocks, planes (64, 128, 256, 512) and strides (1, 2, 2, 2); the first
block of every stage has a 1x1 conv + BN projection (``downsample``); global average pooling and a
linear classifier.  Module names are torchvision's, so a torchvision ResNet-50 state dict loads with
``load_state_dict`` (and so does ``extract(net, net.space.full()).state_dict()``, into either).
``width_mult`` scales every width (e.g. 1/8 for tests); ``layers`` sets the blocks per stage.

Elastic dimensions (stages numbered 1..4 like ``layer1..layer4``, blocks from 0 like ``layer1.0``):
* depth: blocks kept per stage (a prefix; the first block, which holds the projection, stays);
* width: per block ``l{i}.b{j}.mid1`` (conv1 out / conv2 in) and ``l{i}.b{j}.mid2`` (conv2 out /
  conv3 in); when ``prune_residual=True`` also the stem output ``stem`` (conv1/bn1, read by the
  first block of layer1) and the residual stream of every stage as one coupled group ``l{i}.res``
  (the stage's conv3/bn3 outputs and projection, read by its later blocks and by the next stage's
  first block or the classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.counting import conv_macs, linear_macs, norm_ops
from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS, Arch, Space
from stp_fast.models.base import Supernet, l1_order, map_distinct
from stp_fast.nn import elastic
from stp_fast.nn.plain import PlainBuilder, slice_bn, slice_conv, slice_linear
from stp_fast.ops.masked_conv2d import conv_out_size

PLANES = (64, 128, 256, 512)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (parameters only; the supernet runs it through ``stp_fast.nn.elastic``)."""

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


class ResNetImageNet(Supernet):
    """Elastic ImageNet ResNet with Bottleneck blocks; see the module docstring."""

    cpu_channels_last = True

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000, in_chans: int = 3, *,
                 width_mult: float = 1.0, prune_residual: bool = False,
                 width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1,
                 input_size: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        planes = [max(1, round(p * width_mult)) for p in PLANES]
        self.num_classes, self.in_chans, self.prune_residual = num_classes, in_chans, prune_residual
        # widths of the streams between stages: 0 = stem output, i = output of layer i
        self.stream_widths = (planes[0], *(p * Bottleneck.expansion for p in planes))
        self.conv1 = nn.Conv2d(in_chans, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (n, p) in enumerate(zip(layers, planes), 1):
            c_in, stride = self.stream_widths[i - 1], 1 if i == 1 else 2
            blocks = [Bottleneck(c_in if j == 0 else 4 * p, p, stride if j == 0 else 1, j == 0) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.stream_widths[-1], num_classes)
        self._init_weights()
        self.space = Space(
            max_depth=tuple(int(n) for n in layers), groups=self._groups(), group_block=self._group_blocks(),
            macs_fn=self._macs, params_fn=self._params, input_size=tuple(input_size or (in_chans, 224, 224)),
            width_ratios=tuple(width_ratios), divisor=divisor,
        )  # fmt: skip

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _groups(self) -> dict[str, int]:
        """Channel groups in network order: stream groups (if pruned) then each block's mid1/mid2."""
        groups = {"stem": self.stream_widths[0]} if self.prune_residual else {}
        for i, stage in enumerate(self.stages, 1):
            if self.prune_residual:
                groups[f"l{i}.res"] = self.stream_widths[i]
            for j, block in enumerate(stage):
                groups[f"l{i}.b{j}.mid1"] = groups[f"l{i}.b{j}.mid2"] = block.conv1.out_channels
        return groups

    def _group_blocks(self) -> dict[str, tuple[int, int]]:
        return {f"l{i}.b{j}.{k}": (i - 1, j) for i, stage in enumerate(self.stages, 1)
                for j in range(len(stage)) for k in ("mid1", "mid2")}  # fmt: skip

    # ------------------------------------------------------------------ widths of an arch
    def _res(self, arch: Arch, stream: int) -> int:
        """Kept width of stream ``stream`` (0: stem output, i: output of layer i)."""
        if not self.prune_residual:
            return self.stream_widths[stream]
        return arch.widths["stem" if stream == 0 else f"l{stream}.res"]

    def _block_plan(self, arch: Arch):
        """(stage 1..4, block, module, in width, mid1, mid2, out width) of every kept block."""
        for i, stage in enumerate(self.stages, 1):
            for j in range(arch.depth[i - 1]):
                w = arch.widths
                c_in = self._res(arch, i - 1 if j == 0 else i)
                yield i, j, stage[j], c_in, w[f"l{i}.b{j}.mid1"], w[f"l{i}.b{j}.mid2"], self._res(arch, i)

    # ------------------------------------------------------------------ batched forward
    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        archs, owner = self._check_archs(x, archs)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"forward: x has {x.shape[1]} channels but the network takes {self.in_chans}")
        n = len(archs)
        x = self._layout(x)
        hs = elastic.conv_bn(self.conv1, self.bn1, [x] * n, [self._res(a, 0) for a in archs], relu=True,
                             stats=owner)  # fmt: skip
        hs = map_distinct(lambda h: F.max_pool2d(h, 3, 2, 1), hs)
        hs = self._run_blocks(self.stages, hs, archs, owner, self._block_many, first=1)
        pooled = [h.mean((2, 3)) for h in hs]
        return elastic.linear(self.fc, pooled, [self.num_classes] * n)

    def _block_many(self, block: Bottleneck, xs: list[Tensor], archs: list[Arch], i: int, j: int,
                    stats: int | None) -> list[Tensor]:  # fmt: skip
        """Block ``layer{i}.{j}`` for every arch in ``archs`` (inputs ``xs``)."""
        mid1 = [a.widths[f"l{i}.b{j}.mid1"] for a in archs]
        mid2 = [a.widths[f"l{i}.b{j}.mid2"] for a in archs]
        outs = [self._res(a, i) for a in archs]
        h = elastic.conv_bn(block.conv1, block.bn1, xs, mid1, relu=True, stats=stats)
        h = elastic.conv_bn(block.conv2, block.bn2, h, mid2, relu=True, stats=stats)
        h = elastic.conv_bn(block.conv3, block.bn3, h, outs, relu=False, stats=stats)
        if block.downsample is not None:
            xs = elastic.conv_bn(block.downsample[0], block.downsample[1], xs, outs, relu=False, stats=stats)
        return [torch.add(y, skip).relu_() for y, skip in zip(h, xs)]  # in place: one tensor less per block

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> torch.fx.GraphModule:
        arch = self.space.validate(arch)
        b = PlainBuilder()
        h = b.input("x")
        r0 = self._res(arch, 0)
        h = b.module("conv1", slice_conv(self.conv1, r0, self.in_chans), h)
        h = b.module("bn1", slice_bn(self.bn1, r0), h)
        h = b.module("relu", nn.ReLU(), h)
        h = b.module("maxpool", nn.MaxPool2d(3, 2, 1), h)
        for i, j, block, c_in, mid1, mid2, out in self._block_plan(arch):
            h = _extract_block(b, f"layer{i}.{j}", block, h, c_in, mid1, mid2, out)
        h = b.module("avgpool", nn.AdaptiveAvgPool2d(1), h)
        h = b.function(torch.flatten, h, 1)
        h = b.module("fc", slice_linear(self.fc, self.num_classes, self._res(arch, 4)), h)
        return b.build(h, class_name="PrunedResNet")

    # ------------------------------------------------------------------ cost
    def _macs(self, arch: Arch, input_size: tuple[int, ...]) -> int:
        _, hh, ww = input_size
        r0 = self._res(arch, 0)
        hh, ww = (conv_out_size(v, 7, 2, 3, 1) for v in (hh, ww))
        total = conv_macs(self.in_chans, r0, 7, (hh, ww)) + norm_ops(r0 * hh * ww) + 2 * r0 * hh * ww  # relu, pool
        hh, ww = (conv_out_size(v, 3, 2, 1, 1) for v in (hh, ww))
        for _i, _j, block, c_in, mid1, mid2, out in self._block_plan(arch):
            total += conv_macs(c_in, mid1, 1, (hh, ww)) + norm_ops(mid1 * hh * ww) + mid1 * hh * ww
            hh, ww = (conv_out_size(v, 3, block.stride, 1, 1) for v in (hh, ww))
            px = hh * ww
            total += conv_macs(mid1, mid2, 3, (hh, ww)) + norm_ops(mid2 * px) + mid2 * px
            total += conv_macs(mid2, out, 1, (hh, ww)) + norm_ops(out * px) + out * px
            if block.downsample is not None:
                total += conv_macs(c_in, out, 1, (hh, ww)) + norm_ops(out * px)
        last = self._res(arch, 4)
        return total + last * hh * ww + linear_macs(1, last, self.num_classes)

    def _params(self, arch: Arch) -> int:
        r0 = self._res(arch, 0)
        total = self.in_chans * r0 * 49 + 2 * r0
        for _i, _j, block, c_in, mid1, mid2, out in self._block_plan(arch):
            total += c_in * mid1 + 2 * mid1 + mid1 * mid2 * 9 + 2 * mid2 + mid2 * out + 2 * out
            if block.downsample is not None:
                total += c_in * out + 2 * out
        last = self._res(arch, 4)
        return total + last * self.num_classes + self.num_classes

    # ------------------------------------------------------------------ importance sort
    @torch.no_grad()
    def sort_channels(self) -> None:
        """One-time importance sort: order every prunable group's channels by descending L1 norm of
        its producing filters, permuting producers, their BN and all consumers consistently, so that
        keeping a prefix keeps the most important channels.  The network function is unchanged."""
        for stage in self.stages:
            for block in stage:
                for conv, bn, nxt in ((block.conv1, block.bn1, block.conv2), (block.conv2, block.bn2, block.conv3)):
                    order = l1_order(conv.weight)
                    _permute_out(conv, bn, order)
                    nxt.weight.copy_(nxt.weight[:, order])
        if self.prune_residual:
            for s in range(5):
                self._sort_stream(s)

    def _sort_stream(self, s: int) -> None:
        """Sort stream ``s`` (0: stem output, i: output of layer i) by the summed L1 of its producers."""
        if s == 0:
            producers = [(self.conv1, self.bn1)]
        else:
            stage = self.stages[s - 1]
            producers = [(blk.conv3, blk.bn3) for blk in stage] + [tuple(stage[0].downsample)]
        consumers = [blk.conv1 for blk in self.stages[s - 1][1:]] if s > 0 else []
        if s < 4:
            head = self.stages[s][0]
            consumers += [head.conv1, head.downsample[0]]
        else:
            consumers.append(self.fc)
        order = sum(conv.weight.abs().flatten(1).sum(1) for conv, _ in producers).argsort(descending=True)
        for conv, bn in producers:
            _permute_out(conv, bn, order)
        for layer in consumers:
            layer.weight.copy_(layer.weight[:, order])


def _extract_block(b: PlainBuilder, p: str, block: Bottleneck, h, c_in: int, mid1: int, mid2: int, out: int):
    """Append the plain modules of Bottleneck ``p`` with the given widths; returns its output node."""
    y = b.module(f"{p}.conv1", slice_conv(block.conv1, mid1, c_in), h)
    y = b.module(f"{p}.bn1", slice_bn(block.bn1, mid1), y)
    y = b.module(f"{p}.relu1", nn.ReLU(), y)
    y = b.module(f"{p}.conv2", slice_conv(block.conv2, mid2, mid1), y)
    y = b.module(f"{p}.bn2", slice_bn(block.bn2, mid2), y)
    y = b.module(f"{p}.relu2", nn.ReLU(), y)
    y = b.module(f"{p}.conv3", slice_conv(block.conv3, out, mid2), y)
    y = b.module(f"{p}.bn3", slice_bn(block.bn3, out), y)
    if block.downsample is not None:
        h = b.module(f"{p}.downsample.0", slice_conv(block.downsample[0], out, c_in), h)
        h = b.module(f"{p}.downsample.1", slice_bn(block.downsample[1], out), h)
    return b.module(f"{p}.relu3", nn.ReLU(), b.function(torch.add, y, h))


def _permute_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, order: Tensor) -> None:
    conv.weight.copy_(conv.weight[order])
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[order])


def resnet50(num_classes: int, in_chans: int = 3, **kw) -> ResNetImageNet:
    """ResNet-50 supernet (torchvision layout; keywords: width_mult, layers, prune_residual, width_ratios,
    divisor, input_size)."""
    return ResNetImageNet(kw.pop("layers", (3, 4, 6, 3)), num_classes, in_chans, **kw)
