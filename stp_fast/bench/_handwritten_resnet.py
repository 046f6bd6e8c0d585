"""CIFAR-style ResNets (resnet20, resnet56) as elastic supernets.

Layout (He et al. 2016, CIFAR variant): a 3x3 stem, three stages of BasicBlocks at widths
(16, 32, 64) -- or ``widths`` -- and strides (1, 2, 2), global average pooling and a linear
classifier.  Blocks that change shape use a 1x1 conv + BN projection shortcut ("option B").

Elastic dimensions:
* depth: blocks kept per stage (a prefix; the first block, which holds the projection, stays);
* width: the inner channels of every block (group ``s{i}.b{j}.mid``), and, when
  ``prune_residual=True``, the residual stream of every stage as one coupled group ``s{i}.res``
  (stem/projection/second-conv outputs and every consumer's inputs share one prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stp_fast.arch.counting import conv_macs, linear_macs, norm_ops
from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS, Arch, Space
from stp_fast.models.base import Supernet, l1_order
from stp_fast.nn import elastic
from stp_fast.nn.plain import PlainBuilder, slice_bn, slice_conv, slice_linear
from stp_fast.ops.masked_conv2d import conv_out_size


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNetCifar(Supernet):
    """Elastic CIFAR ResNet; see the module docstring."""

    cpu_channels_last = True

    def __init__(self, blocks: int, num_classes: int, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64), *,
                 prune_residual: bool = False, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS,
                 divisor: int = 1, input_size: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.in_chans, self.widths = num_classes, in_chans, tuple(widths)
        self.prune_residual = prune_residual
        self.stem = nn.Module()
        self.stem.conv = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.stem.bn = nn.BatchNorm2d(widths[0])
        self.stages = nn.ModuleList()
        c_prev = widths[0]
        for i, c in enumerate(widths):
            stage = nn.ModuleList(
                BasicBlock(c_prev if j == 0 else c, c, c, 2 if (j == 0 and i > 0) else 1) for j in range(blocks)
            )
            self.stages.append(stage)
            c_prev = c
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        groups, where = {}, {}
        for i, stage in enumerate(self.stages):
            if prune_residual:
                groups[f"s{i}.res"] = widths[i]
            for j in range(len(stage)):
                groups[f"s{i}.b{j}.mid"] = widths[i]
                where[f"s{i}.b{j}.mid"] = (i, j)
        self.space = Space(
            max_depth=(blocks,) * len(widths), groups=groups, group_block=where, macs_fn=self._macs,
            params_fn=self._params, input_size=tuple(input_size or (in_chans, 32, 32)),
            width_ratios=tuple(width_ratios), divisor=divisor,
        )  # fmt: skip

    # ------------------------------------------------------------------ widths of an arch
    def _res(self, arch: Arch, stage: int) -> int:
        return arch.widths[f"s{stage}.res"] if self.prune_residual else self.widths[stage]

    def _block_plan(self, arch: Arch):
        """(stage, block, module, in width, mid width, out width) of every kept block."""
        for i, stage in enumerate(self.stages):
            for j in range(arch.depth[i]):
                c_in = self._res(arch, i - 1 if (j == 0 and i > 0) else i)
                yield i, j, stage[j], c_in, arch.widths[f"s{i}.b{j}.mid"], self._res(arch, i)

    # ------------------------------------------------------------------ batched forward
    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        archs, owner = self._check_archs(x, archs)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"forward: x has {x.shape[1]} channels but the network takes {self.in_chans}")
        n = len(archs)
        x = self._layout(x)
        hs = elastic.conv_bn(self.stem.conv, self.stem.bn, [x] * n, [self._res(a, 0) for a in archs], relu=True,
                             stats=owner)  # fmt: skip
        hs = self._run_blocks(self.stages, hs, archs, owner, self._block_many)
        pooled = [h.mean((2, 3)) for h in hs]
        return elastic.linear(self.fc, pooled, [self.num_classes] * n)

    def _block_many(self, block: BasicBlock, xs: list[Tensor], sub: list[Arch], i: int, j: int,
                    stats: int | None) -> list[Tensor]:  # fmt: skip
        """Block ``stages.{i}.{j}`` for every arch in ``sub`` (inputs ``xs``)."""
        mids = [a.widths[f"s{i}.b{j}.mid"] for a in sub]
        outs = [self._res(a, i) for a in sub]
        h = elastic.conv_bn(block.conv1, block.bn1, xs, mids, relu=True, stats=stats)
        h = elastic.conv_bn(block.conv2, block.bn2, h, outs, relu=False, stats=stats)
        if block.downsample is not None:
            xs = elastic.conv_bn(block.downsample[0], block.downsample[1], xs, outs, relu=False, stats=stats)
        return [torch.add(y, skip).relu_() for y, skip in zip(h, xs)]  # in place: one tensor less per block

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> torch.fx.GraphModule:
        arch = self.space.validate(arch)
        b = PlainBuilder()
        h = b.input("x")
        r0 = self._res(arch, 0)
        h = b.module("stem.conv", slice_conv(self.stem.conv, r0, self.in_chans), h)
        h = b.module("stem.bn", slice_bn(self.stem.bn, r0), h)
        h = b.module("stem.relu", nn.ReLU(), h)
        for i, j, block, c_in, mid, out in self._block_plan(arch):
            p = f"stages.{i}.{j}"
            y = b.module(f"{p}.conv1", slice_conv(block.conv1, mid, c_in), h)
            y = b.module(f"{p}.bn1", slice_bn(block.bn1, mid), y)
            y = b.module(f"{p}.relu1", nn.ReLU(), y)
            y = b.module(f"{p}.conv2", slice_conv(block.conv2, out, mid), y)
            y = b.module(f"{p}.bn2", slice_bn(block.bn2, out), y)
            if block.downsample is not None:
                h = b.module(f"{p}.downsample.0", slice_conv(block.downsample[0], out, c_in), h)
                h = b.module(f"{p}.downsample.1", slice_bn(block.downsample[1], out), h)
            h = b.module(f"{p}.relu2", nn.ReLU(), b.function(torch.add, y, h))
        h = b.module("pool", nn.AdaptiveAvgPool2d(1), h)
        h = b.function(torch.flatten, h, 1)
        h = b.module("fc", slice_linear(self.fc, self.num_classes, self._res(arch, len(self.stages) - 1)), h)
        return b.build(h, class_name=f"PrunedResNetCifar{len(self.stages[0]) * 6 + 2}")

    # ------------------------------------------------------------------ cost
    def _macs(self, arch: Arch, input_size: tuple[int, ...]) -> int:
        _, hh, ww = input_size
        r0 = self._res(arch, 0)
        total = conv_macs(self.in_chans, r0, 3, (hh, ww)) + (norm_ops(r0 * hh * ww) + r0 * hh * ww)
        for _i, _j, block, c_in, mid, out in self._block_plan(arch):
            hh, ww = (conv_out_size(v, 3, block.stride, 1, 1) for v in (hh, ww))
            px = hh * ww
            total += conv_macs(c_in, mid, 3, (hh, ww)) + norm_ops(mid * px) + mid * px
            total += conv_macs(mid, out, 3, (hh, ww)) + norm_ops(out * px) + out * px
            if block.downsample is not None:
                total += conv_macs(c_in, out, 1, (hh, ww)) + norm_ops(out * px)
        last = self._res(arch, len(self.stages) - 1)
        return total + last * hh * ww + linear_macs(1, last, self.num_classes)

    def _params(self, arch: Arch) -> int:
        r0 = self._res(arch, 0)
        total = self.in_chans * r0 * 9 + 2 * r0
        for _i, _j, block, c_in, mid, out in self._block_plan(arch):
            total += c_in * mid * 9 + 2 * mid + mid * out * 9 + 2 * out
            if block.downsample is not None:
                total += c_in * out + 2 * out
        last = self._res(arch, len(self.stages) - 1)
        return total + last * self.num_classes + self.num_classes

    # ------------------------------------------------------------------ importance sort
    @torch.no_grad()
    def sort_channels(self) -> None:
        """One-time importance sort: order every prunable group's channels by descending L1 norm of
        its producing filters, permuting producers, their BN and all consumers consistently, so that
        keeping a prefix keeps the most important channels.  The network function is unchanged."""
        for stage in self.stages:
            for block in stage:
                order = l1_order(block.conv1.weight)
                _permute_out(block.conv1, block.bn1, order)
                block.conv2.weight.copy_(block.conv2.weight[:, order])
        if self.prune_residual:
            for i in range(len(self.stages)):
                self._sort_residual(i)

    def _sort_residual(self, i: int) -> None:
        stage = self.stages[i]
        producers = [(blk.conv2, blk.bn2) for blk in stage]
        head = stage[0].downsample
        producers.append((head[0], head[1]) if head is not None else (self.stem.conv, self.stem.bn))
        score = sum(conv.weight.abs().flatten(1).sum(1) for conv, _ in producers)
        order = score.argsort(descending=True)
        for conv, bn in producers:
            _permute_out(conv, bn, order)
        # blocks reading this stage's stream: all but a later stage's first block (it reads the previous one)
        consumers = [blk.conv1 for j, blk in enumerate(stage) if j > 0 or i == 0]
        if i + 1 < len(self.stages):
            nxt = self.stages[i + 1][0]
            consumers += [nxt.conv1] + ([nxt.downsample[0]] if nxt.downsample is not None else [])
        else:
            self.fc.weight.copy_(self.fc.weight[:, order])
        for conv in consumers:
            conv.weight.copy_(conv.weight[:, order])


def _permute_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, order: Tensor) -> None:
    conv.weight.copy_(conv.weight[order])
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[order])


def resnet20(num_classes: int, in_chans: int = 3, **kw) -> ResNetCifar:
    return ResNetCifar(3, num_classes, in_chans, **kw)


def resnet56(num_classes: int, in_chans: int = 3, **kw) -> ResNetCifar:
    return ResNetCifar(9, num_classes, in_chans, **kw)
