"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016) as elastic supernets; ``wrn28_10`` by default.

Layout: a 3x3 stem conv to 16 channels, three groups ``block1..block3`` of ``(depth - 4) / 6``
pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) at widths ``16 * widen_factor * (1, 2, 4)``
and strides (1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier; no dropout.
A block whose shape changes has a 1x1 conv shortcut applied, as in the reference implementations, to
the *pre-activated* input ``relu(bn1(x))``; other blocks add ``x`` itself.  Module names follow the
widely used PyTorch port (``conv1``, ``block{i}.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1``, ``fc``; RobustBench's WideResNet), so its dense state dicts load with ``load_state_dict``.

Elastic dimensions (groups numbered 1..3 like ``block1..block3``, blocks from 0):
* depth: blocks kept per group (a prefix; the first block, which holds the shortcut conv, stays);
* width: the inner channels of every block (``g{i}.b{j}.mid``: conv1 out / bn2 / conv2 in), and, when
  ``prune_residual=True``, the stem output (``stem``) and the residual stream of every group as one
  coupled group ``g{i}.res`` (its conv2 outputs and shortcut conv, read by the BN-ReLU and convs of
  its later blocks and of the next group's first block, or by the final BN and classifier).  A group
  whose first block has no shortcut conv (widen_factor 1) shares the previous stream's group.
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


class PreActBlock(nn.Module):
    """Pre-activation basic block (parameters only; the supernet runs it through ``stp_fast.nn.elastic``)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = None  # the name used by the reference implementation's state dicts
        if stride != 1 or c_in != c_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)


class WideResNet(Supernet):
    """Elastic CIFAR Wide ResNet; see the module docstring."""

    cpu_channels_last = True

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3, *,
                 prune_residual: bool = False, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS,
                 divisor: int = 1, input_size: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        self.num_classes, self.in_chans, self.prune_residual = num_classes, in_chans, prune_residual
        self.stream_widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        for i in range(1, 4):
            c, stride = self.stream_widths[i], 1 if i == 1 else 2
            group = nn.Module()
            group.layer = nn.Sequential(*(PreActBlock(self.stream_widths[i - 1] if j == 0 else c, c,
                                                      stride if j == 0 else 1) for j in range(n)))  # fmt: skip
            self.add_module(f"block{i}", group)
        self.bn1 = nn.BatchNorm2d(self.stream_widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(self.stream_widths[3], num_classes)
        self._init_weights()
        # group name of every stream (0: stem output, i: output of group i); a stream that passes a
        # group's first block unchanged (no shortcut conv) keeps the previous stream's name
        self.stream_names = ["stem"]
        for i, stage in enumerate(self.stages, 1):
            self.stream_names.append(f"g{i}.res" if stage[0].convShortcut is not None else self.stream_names[-1])
        self.space = Space(
            max_depth=(n,) * 3, groups=self._groups(), group_block=self._group_blocks(), macs_fn=self._macs,
            params_fn=self._params, input_size=tuple(input_size or (in_chans, 32, 32)),
            width_ratios=tuple(width_ratios), divisor=divisor,
        )  # fmt: skip

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.block1.layer, self.block2.layer, self.block3.layer]

    def _groups(self) -> dict[str, int]:
        """Channel groups in network order: stream groups (if pruned) then each block's mid."""
        groups = {}
        for i, name in enumerate(self.stream_names):
            if self.prune_residual:
                groups.setdefault(name, self.stream_widths[i])
            for j in range(len(self.stages[i - 1]) if i else 0):
                groups[f"g{i}.b{j}.mid"] = self.stream_widths[i]
        return groups

    def _group_blocks(self) -> dict[str, tuple[int, int]]:
        return {f"g{i}.b{j}.mid": (i - 1, j) for i, stage in enumerate(self.stages, 1) for j in range(len(stage))}

    # ------------------------------------------------------------------ widths of an arch
    def _res(self, arch: Arch, stream: int) -> int:
        """Kept width of stream ``stream`` (0: stem output, i: output of group i)."""
        return arch.widths[self.stream_names[stream]] if self.prune_residual else self.stream_widths[stream]

    def _block_plan(self, arch: Arch):
        """(group 1..3, block, module, in width, mid width, out width) of every kept block."""
        for i, stage in enumerate(self.stages, 1):
            for j in range(arch.depth[i - 1]):
                c_in = self._res(arch, i - 1 if j == 0 else i)
                yield i, j, stage[j], c_in, arch.widths[f"g{i}.b{j}.mid"], self._res(arch, i)

    # ------------------------------------------------------------------ batched forward
    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        archs, owner = self._check_archs(x, archs)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"forward: x has {x.shape[1]} channels but the network takes {self.in_chans}")
        n = len(archs)
        x = self._layout(x)
        hs = elastic.conv(self.conv1, [x] * n, [self._res(a, 0) for a in archs])
        hs = self._run_blocks(self.stages, hs, archs, owner, self._block_many, first=1)
        hs = elastic.batch_norm(self.bn1, hs, relu=True, stats=owner)
        pooled = [h.mean((2, 3)) for h in hs]
        return elastic.linear(self.fc, pooled, [self.num_classes] * n)

    def _block_many(self, block: PreActBlock, xs: list[Tensor], archs: list[Arch], i: int, j: int,
                    stats: int | None) -> list[Tensor]:  # fmt: skip
        """Block ``block{i}.layer.{j}`` for every arch in ``archs`` (inputs ``xs``)."""
        mids = [a.widths[f"g{i}.b{j}.mid"] for a in archs]
        outs = [self._res(a, i) for a in archs]
        act = elastic.batch_norm(block.bn1, xs, relu=True, stats=stats)  # pre-activation of the stream
        h = elastic.conv_bn(block.conv1, block.bn2, act, mids, relu=True, stats=stats)
        h = elastic.conv(block.conv2, h, outs)
        skip = xs if block.convShortcut is None else elastic.conv(block.convShortcut, act, outs)
        return [y + s for y, s in zip(h, skip)]

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> torch.fx.GraphModule:
        arch = self.space.validate(arch)
        b = PlainBuilder()
        h = b.module("conv1", slice_conv(self.conv1, self._res(arch, 0), self.in_chans), b.input("x"))
        for i, j, block, c_in, mid, out in self._block_plan(arch):
            h = _extract_block(b, f"block{i}.layer.{j}", block, h, c_in, mid, out)
        last = self._res(arch, 3)
        h = b.module("bn1", slice_bn(self.bn1, last), h)
        h = b.module("relu", nn.ReLU(), h)
        h = b.module("avgpool", nn.AdaptiveAvgPool2d(1), h)
        h = b.function(torch.flatten, h, 1)
        h = b.module("fc", slice_linear(self.fc, self.num_classes, last), h)
        return b.build(h, class_name="PrunedWideResNet")

    # ------------------------------------------------------------------ cost
    def _macs(self, arch: Arch, input_size: tuple[int, ...]) -> int:
        _, hh, ww = input_size
        total = conv_macs(self.in_chans, self._res(arch, 0), 3, (hh, ww))
        for _i, _j, block, c_in, mid, out in self._block_plan(arch):
            total += norm_ops(c_in * hh * ww) + c_in * hh * ww  # bn1 + relu1 on the block input
            hh, ww = (conv_out_size(v, 3, block.stride, 1, 1) for v in (hh, ww))
            px = hh * ww
            total += conv_macs(c_in, mid, 3, (hh, ww)) + norm_ops(mid * px) + mid * px
            total += conv_macs(mid, out, 3, (hh, ww))
            if block.convShortcut is not None:
                total += conv_macs(c_in, out, 1, (hh, ww))
        last = self._res(arch, 3)
        return total + norm_ops(last * hh * ww) + 2 * last * hh * ww + linear_macs(1, last, self.num_classes)

    def _params(self, arch: Arch) -> int:
        total = self.in_chans * self._res(arch, 0) * 9
        for _i, _j, block, c_in, mid, out in self._block_plan(arch):
            total += 2 * c_in + c_in * mid * 9 + 2 * mid + mid * out * 9
            if block.convShortcut is not None:
                total += c_in * out
        last = self._res(arch, 3)
        return total + 2 * last + last * self.num_classes + self.num_classes

    # ------------------------------------------------------------------ importance sort
    @torch.no_grad()
    def sort_channels(self) -> None:
        """One-time importance sort: order every prunable group's channels by descending L1 norm of
        its producing filters, permuting producers, their BN and all consumers consistently, so that
        keeping a prefix keeps the most important channels.  The network function is unchanged."""
        for stage in self.stages:
            for block in stage:
                order = l1_order(block.conv1.weight)
                block.conv1.weight.copy_(block.conv1.weight[order])
                _permute_bn(block.bn2, order)
                block.conv2.weight.copy_(block.conv2.weight[:, order])
        if self.prune_residual:
            for name in dict.fromkeys(self.stream_names):
                self._sort_stream(name)

    def _sort_stream(self, name: str) -> None:
        """Sort the residual group ``name`` by the summed L1 of its producing convs."""
        producers, bns, consumers = [], [], []
        if self.stream_names[0] == name:
            producers.append(self.conv1)
        for i, stage in enumerate(self.stages, 1):
            for j, block in enumerate(stage):
                if self.stream_names[i - 1 if j == 0 else i] == name:  # the block reads this stream
                    bns.append(block.bn1)
                    consumers += [block.conv1] + ([block.convShortcut] if block.convShortcut is not None else [])
                if self.stream_names[i] == name:  # the block writes it
                    producers += [block.conv2] + ([block.convShortcut] if block.convShortcut is not None else [])
        if self.stream_names[3] == name:
            bns.append(self.bn1)
            consumers.append(self.fc)
        order = sum(conv.weight.abs().flatten(1).sum(1) for conv in producers).argsort(descending=True)
        for conv in producers:
            conv.weight.copy_(conv.weight[order])
        for bn in bns:
            _permute_bn(bn, order)
        for layer in consumers:
            layer.weight.copy_(layer.weight[:, order])


def _extract_block(b: PlainBuilder, p: str, block: PreActBlock, h, c_in: int, mid: int, out: int):
    """Append the plain modules of block ``p`` with the given widths; returns its output node."""
    act = b.module(f"{p}.bn1", slice_bn(block.bn1, c_in), h)
    act = b.module(f"{p}.relu1", nn.ReLU(), act)
    y = b.module(f"{p}.conv1", slice_conv(block.conv1, mid, c_in), act)
    y = b.module(f"{p}.bn2", slice_bn(block.bn2, mid), y)
    y = b.module(f"{p}.relu2", nn.ReLU(), y)
    y = b.module(f"{p}.conv2", slice_conv(block.conv2, out, mid), y)
    if block.convShortcut is not None:
        h = b.module(f"{p}.convShortcut", slice_conv(block.convShortcut, out, c_in), act)
    return b.function(torch.add, y, h)


def _permute_bn(bn: nn.BatchNorm2d, order: Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[order])


def wrn28_10(num_classes: int, in_chans: int = 3, **kw) -> WideResNet:
    """WRN-28-10 supernet (keywords: depth, widen_factor, prune_residual, width_ratios, divisor, input_size)."""
    return WideResNet(kw.pop("depth", 28), kw.pop("widen_factor", 10), num_classes, in_chans, **kw)
