"""MobileNetV3-Large as an elastic supernet.

Layout (Howard et al. 2019, torchvision's ``mobilenet_v3_large`` table): a 3x3/2 stem conv to 16 +
BN + hardswish, 15 inverted-residual blocks (expand 1x1 -> depthwise k x k -> optional SE -> project
1x1; ReLU or hardswish; a residual add when stride 1 and in == out), a 1x1 conv to 960 + BN +
hardswish, global average pooling and the classifier Linear(960, 1280) - hardswish - dropout -
Linear(1280, num_classes).  BN uses eps 1e-3 / momentum 0.01 and the SE squeeze width is
``make_divisible(exp // 4, 8)``, as torchvision.  Module names follow torchvision
(``features.{i}.block.{j}.{0,1}``, ``classifier.{0,3}``), so a torchvision state dict has the keys
of ``extract(net, net.space.full())`` and of the supernet.

Elastic dimensions (issue 4, OFA's MobileNetV3 space):
* width: the expansion width of every block that has an expand conv (group ``b{k}.exp``, k = 1..14):
  the expand conv's outputs, its BN, the depthwise conv/BN, the SE module's input and output channels
  and the project conv's inputs share one prefix.  The SE hidden (squeeze) width stays full -- a
  choice: it keeps SE weights a plain prefix slice and costs < 0.1% of the MACs.  Block 0 has no
  expand conv (its depthwise conv reads the 16-channel stem output directly), so it is not elastic.
* depth: blocks kept per stage, stages being consecutive blocks with the same output width and
  stride as in OFA: (b1-b2), (b3-b5), (b6-b9), (b10-b11), (b12-b14), max depth (2, 3, 4, 2, 3).
  A stage's first block is never dropped; every later block has a residual connection, so dropping
  it is an identity.  Block 0 sits before the stages and is always kept (OFA's ``first_block``).

Activations (hardswish, hardsigmoid), SE pooling/scaling and residual adds are functional torch ops
per subnet inside ``forward_many``; the extracted model uses ``nn.Hardswish`` / ``nn.ReLU`` /
``nn.Hardsigmoid`` / ``nn.AdaptiveAvgPool2d`` modules.  Counting rules (stp_fast.arch.counting, as
Torch-Pruning): ReLU and pooling modules count 1 op per element, hardswish/hardsigmoid/mul/add 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.counting import conv_macs, linear_macs, norm_ops
from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS, Arch, Space
from stp_fast.models.base import Supernet, l1_order
from stp_fast.nn import elastic
from stp_fast.nn.plain import PlainBuilder, slice_bn, slice_conv, slice_linear
from stp_fast.ops.masked_conv2d import conv_out_size

# torchvision mobilenet_v3_large: (c_in, kernel, expanded, c_out, SE, hardswish, stride)
LARGE_CONFIG = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``divisor``, never 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


@dataclass(frozen=True)
class BlockConfig:
    c_in: int
    kernel: int
    exp: int
    c_out: int
    se: bool
    hardswish: bool
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.c_in == self.c_out

    @property
    def squeeze(self) -> int:
        return make_divisible(self.exp // 4, 8)


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out, eps=_BN_EPS, momentum=_BN_MOMENTUM))  # fmt: skip


class SqueezeExcitation(nn.Module):
    """Parameters of torchvision's SqueezeExcitation (fc1/fc2 1x1 convs with bias)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)


class InvertedResidual(nn.Module):
    """Parameters of one block; ``block`` is indexed like torchvision's (expand, dw, [se], project)."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.has_expand = cfg.exp != cfg.c_in
        layers: list[nn.Module] = [_conv_bn(cfg.c_in, cfg.exp, 1)] if self.has_expand else []
        layers.append(_conv_bn(cfg.exp, cfg.exp, cfg.kernel, cfg.stride, groups=cfg.exp))
        if cfg.se:
            layers.append(SqueezeExcitation(cfg.exp, cfg.squeeze))
        layers.append(_conv_bn(cfg.exp, cfg.c_out, 1))
        self.block = nn.Sequential(*layers)

    # indices into self.block (not submodule attributes: those would duplicate state-dict keys)
    def part(self, name: str) -> tuple[int, nn.Module | None]:
        i = {"expand": 0, "dw": 1, "se": 2}.get(name, 2 + self.cfg.se) - (not self.has_expand)
        if (name == "expand" and not self.has_expand) or (name == "se" and not self.cfg.se):
            return i, None
        return i, self.block[i]


class MobileNetV3(Supernet):
    """Elastic MobileNetV3; see the module docstring."""

    cpu_channels_last = True

    def __init__(self, config: Sequence[tuple], num_classes: int, in_chans: int = 3, *, width_mult: float = 1.0,
                 last_channel: int = 1280, dropout: float = 0.0,
                 width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 8,
                 input_size: Sequence[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")

        def adjust(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        self.cfgs = [BlockConfig(adjust(ci), k, adjust(e), adjust(co), se, hs, s) for ci, k, e, co, se, hs, s in config]
        self.num_classes, self.in_chans, self.dropout = num_classes, in_chans, dropout
        c0, c_last = self.cfgs[0].c_in, self.cfgs[-1].c_out
        self.c_head, self.c_hidden = 6 * c_last, adjust(last_channel)
        stem = _conv_bn(in_chans, c0, 3, 2)
        stem.append(nn.Hardswish())
        head = _conv_bn(c_last, self.c_head, 1)
        head.append(nn.Hardswish())
        self.features = nn.Sequential(stem, *(InvertedResidual(c) for c in self.cfgs), head)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.c_head, self.c_hidden), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(self.c_hidden, num_classes))  # fmt: skip
        self._init_weights()
        self._build_space(width_ratios, divisor, input_size)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _build_space(self, width_ratios, divisor, input_size) -> None:
        # stages: consecutive blocks with one output width, a new one at every stride or width change (OFA)
        self.stages: list[list[int]] = []
        for k, c in enumerate(self.cfgs[1:], start=1):
            if not self.stages or c.stride != 1 or c.c_out != self.cfgs[k - 1].c_out:
                self.stages.append([])
            self.stages[-1].append(k)
        self.where = {k: (s, j) for s, blocks in enumerate(self.stages) for j, k in enumerate(blocks)}
        for k, (_s, j) in self.where.items():
            if j > 0 and not self.cfgs[k].residual:
                raise ValueError(f"block {k} is not a stage's first block but has no residual connection")
        groups = {f"b{k}.exp": c.exp for k, c in enumerate(self.cfgs) if self.block(k).has_expand}
        if len(groups) != len(self.cfgs) - 1 or self.block(0).has_expand:
            raise ValueError("MobileNetV3: exactly the blocks after the first must have an expand conv")
        self.space = Space(
            max_depth=tuple(len(s) for s in self.stages), groups=groups,
            group_block={g: self.where[int(g[1:-4])] for g in groups}, macs_fn=self._macs, params_fn=self._params,
            input_size=tuple(input_size or (self.in_chans, 224, 224)), width_ratios=tuple(width_ratios),
            divisor=divisor,
        )  # fmt: skip

    def block(self, k: int) -> InvertedResidual:
        return self.features[k + 1]

    # ------------------------------------------------------------------ widths of an arch
    def _exp(self, arch: Arch, k: int) -> int:
        return arch.widths[f"b{k}.exp"] if k > 0 else self.cfgs[0].exp

    def _kept(self, arch: Arch, k: int) -> bool:
        if k == 0:
            return True
        s, j = self.where[k]
        return arch.depth[s] > j

    # ------------------------------------------------------------------ batched forward
    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        archs, owner = self._check_archs(x, archs)
        if x.shape[1] != self.in_chans:
            raise ValueError(f"forward: x has {x.shape[1]} channels but the network takes {self.in_chans}")
        n = len(archs)
        x = self._layout(x)
        stem = self.features[0]
        hs = _hswish(elastic.conv_bn(stem[0], stem[1], [x] * n, [stem[0].out_channels] * n, relu=False, stats=owner))
        for k in range(len(self.cfgs)):
            members = [i for i, a in enumerate(archs) if self._kept(a, k)]
            if not members:
                continue
            stats = members.index(owner) if owner in members else None
            xs = [hs[i] for i in members]
            ys = self._block_many(self.block(k), xs, [self._exp(archs[i], k) for i in members], stats)
            for i, y, skip in zip(members, ys, xs):
                hs[i] = y + skip if self.cfgs[k].residual else y
        head = self.features[-1]
        hs = _hswish(elastic.conv_bn(head[0], head[1], hs, [self.c_head] * n, relu=False, stats=owner))
        pooled = [h.mean((2, 3)) for h in hs]
        fc1, fc2 = self.classifier[0], self.classifier[3]
        hidden = _hswish(elastic.linear(fc1, pooled, [self.c_hidden] * n))
        hidden = [F.dropout(h, self.dropout, self.training) for h in hidden]
        return elastic.linear(fc2, hidden, [self.num_classes] * n)

    def _block_many(self, blk: InvertedResidual, xs: list[Tensor], exps: list[int], stats: int | None) -> list[Tensor]:
        cfg, relu = blk.cfg, not blk.cfg.hardswish
        act = (lambda ys: ys) if relu else _hswish
        h = xs
        _, expand = blk.part("expand")
        if expand is not None:
            h = act(elastic.conv_bn(expand[0], expand[1], h, exps, relu=relu, stats=stats))
        _, dw = blk.part("dw")
        h = act(elastic.conv_bn(dw[0], dw[1], h, exps, relu=relu, stats=stats, depthwise=True))
        _, se = blk.part("se")
        if se is not None:
            pooled = [y.mean((2, 3), keepdim=True) for y in h]
            s = elastic.conv(se.fc1, pooled, [cfg.squeeze] * len(h))
            s = elastic.conv(se.fc2, [F.relu(t) for t in s], exps)
            h = [y * F.hardsigmoid(t) for y, t in zip(h, s)]
        _, proj = blk.part("project")
        return elastic.conv_bn(proj[0], proj[1], h, [cfg.c_out] * len(h), relu=False, stats=stats)

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> torch.fx.GraphModule:
        arch = self.space.validate(arch)
        b = PlainBuilder()
        h = b.input("x")
        stem, c0 = self.features[0], self.cfgs[0].c_in
        h = b.module("features.0.0", slice_conv(stem[0], c0, self.in_chans), h)
        h = b.module("features.0.1", slice_bn(stem[1], c0), h)
        h = b.module("features.0.2", nn.Hardswish(), h)
        for k, cfg in enumerate(self.cfgs):
            if self._kept(arch, k):
                y = self._extract_block(b, k, self._exp(arch, k), h)
                h = b.function(torch.add, y, h) if cfg.residual else y
        head, p = self.features[-1], f"features.{len(self.features) - 1}"
        h = b.module(f"{p}.0", slice_conv(head[0], self.c_head, self.cfgs[-1].c_out), h)
        h = b.module(f"{p}.1", slice_bn(head[1], self.c_head), h)
        h = b.module(f"{p}.2", nn.Hardswish(), h)
        h = b.function(torch.flatten, b.module("avgpool", nn.AdaptiveAvgPool2d(1), h), 1)
        h = b.module("classifier.0", slice_linear(self.classifier[0], self.c_hidden, self.c_head), h)
        h = b.module("classifier.1", nn.Hardswish(), h)
        h = b.module("classifier.2", nn.Dropout(self.dropout), h)
        h = b.module("classifier.3", slice_linear(self.classifier[3], self.num_classes, self.c_hidden), h)
        return b.build(h, class_name="PrunedMobileNetV3")

    def _extract_block(self, b: PlainBuilder, k: int, e: int, h):
        blk, cfg = self.block(k), self.cfgs[k]
        p = f"features.{k + 1}.block"
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        i, expand = blk.part("expand")
        if expand is not None:
            h = b.module(f"{p}.{i}.0", slice_conv(expand[0], e, cfg.c_in), h)
            h = b.module(f"{p}.{i}.2", act(), b.module(f"{p}.{i}.1", slice_bn(expand[1], e), h))
        i, dw = blk.part("dw")
        h = b.module(f"{p}.{i}.0", slice_conv(dw[0], e, e, depthwise=True), h)
        h = b.module(f"{p}.{i}.2", act(), b.module(f"{p}.{i}.1", slice_bn(dw[1], e), h))
        i, se = blk.part("se")
        if se is not None:
            s = b.module(f"{p}.{i}.avgpool", nn.AdaptiveAvgPool2d(1), h)
            s = b.module(f"{p}.{i}.fc1", slice_conv(se.fc1, cfg.squeeze, e), s)
            s = b.module(f"{p}.{i}.activation", nn.ReLU(), s)
            s = b.module(f"{p}.{i}.fc2", slice_conv(se.fc2, e, cfg.squeeze), s)
            h = b.function(torch.mul, h, b.module(f"{p}.{i}.scale_activation", nn.Hardsigmoid(), s))
        i, proj = blk.part("project")
        h = b.module(f"{p}.{i}.0", slice_conv(proj[0], cfg.c_out, e), h)
        return b.module(f"{p}.{i}.1", slice_bn(proj[1], cfg.c_out), h)

    # ------------------------------------------------------------------ cost
    def _macs(self, arch: Arch, input_size: tuple[int, ...]) -> int:
        _, hh, ww = input_size
        hh, ww = (conv_out_size(v, 3, 2, 1, 1) for v in (hh, ww))
        c0 = self.cfgs[0].c_in
        total = conv_macs(self.in_chans, c0, 3, (hh, ww)) + norm_ops(c0 * hh * ww)  # hardswish: 0
        for k, cfg in enumerate(self.cfgs):
            if not self._kept(arch, k):
                continue
            e, relu = self._exp(arch, k), int(not cfg.hardswish)
            if self.block(k).has_expand:
                px = hh * ww
                total += conv_macs(cfg.c_in, e, 1, (hh, ww)) + norm_ops(e * px) + relu * e * px
            pad = (cfg.kernel - 1) // 2
            hh, ww = (conv_out_size(v, cfg.kernel, cfg.stride, pad, 1) for v in (hh, ww))
            px = hh * ww
            total += conv_macs(e, e, cfg.kernel, (hh, ww), groups=e) + norm_ops(e * px) + relu * e * px
            if cfg.se:  # pool, fc1 (+bias), ReLU, fc2 (+bias); hardsigmoid and the scaling: 0
                sq = cfg.squeeze
                total += e * px + conv_macs(e, sq, 1, (1, 1), bias=True) + sq + conv_macs(sq, e, 1, (1, 1), bias=True)
            total += conv_macs(e, cfg.c_out, 1, (hh, ww)) + norm_ops(cfg.c_out * px)
        px = hh * ww
        total += conv_macs(self.cfgs[-1].c_out, self.c_head, 1, (hh, ww)) + norm_ops(self.c_head * px)
        total += self.c_head * px  # avgpool
        return total + linear_macs(1, self.c_head, self.c_hidden) + linear_macs(1, self.c_hidden, self.num_classes)

    def _params(self, arch: Arch) -> int:
        c0 = self.cfgs[0].c_in
        total = self.in_chans * c0 * 9 + 2 * c0
        for k, cfg in enumerate(self.cfgs):
            if not self._kept(arch, k):
                continue
            e = self._exp(arch, k)
            if self.block(k).has_expand:
                total += cfg.c_in * e + 2 * e
            total += e * cfg.kernel**2 + 2 * e
            if cfg.se:
                total += e * cfg.squeeze + cfg.squeeze + cfg.squeeze * e + e
            total += e * cfg.c_out + 2 * cfg.c_out
        total += self.cfgs[-1].c_out * self.c_head + 2 * self.c_head
        return total + (self.c_head + 1) * self.c_hidden + (self.c_hidden + 1) * self.num_classes

    # ------------------------------------------------------------------ importance sort
    @torch.no_grad()
    def sort_channels(self) -> None:
        """One-time importance sort: order every block's expansion channels by descending L1 norm of
        the expand conv's filters, permuting the expand conv/BN, the depthwise conv/BN, the SE
        module's fc1 inputs and fc2 outputs, and the project conv's inputs.  The function is unchanged."""
        for k in range(1, len(self.cfgs)):
            blk = self.block(k)
            expand, dw, se, proj = (blk.part(n)[1] for n in ("expand", "dw", "se", "project"))
            order = l1_order(expand[0].weight)
            for seq in (expand, dw):
                seq[0].weight.copy_(seq[0].weight[order])
                for t in (seq[1].weight, seq[1].bias, seq[1].running_mean, seq[1].running_var):
                    t.copy_(t[order])
            if se is not None:
                se.fc1.weight.copy_(se.fc1.weight[:, order])
                se.fc2.weight.copy_(se.fc2.weight[order])
                se.fc2.bias.copy_(se.fc2.bias[order])
            proj[0].weight.copy_(proj[0].weight[:, order])


def _hswish(xs: list[Tensor]) -> list[Tensor]:
    return [F.hardswish(x) for x in xs]


def mobilenetv3_large(num_classes: int, in_chans: int = 3, **kw) -> MobileNetV3:
    """Elastic MobileNetV3-Large. Keywords: ``width_mult`` (torchvision's, channels rounded to 8),
    ``dropout`` (classifier, default 0: off), ``width_ratios``/``divisor`` (expansion-width choices,
    default 0.1..1.0 rounded to multiples of 8), ``input_size`` (default (in_chans, 224, 224))."""
    return MobileNetV3(LARGE_CONFIG, num_classes, in_chans, **kw)
