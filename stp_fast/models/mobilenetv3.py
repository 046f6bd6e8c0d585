"""MobileNetV3-Large: a plain PyTorch definition (torchvision's), made elastic by ``stp_fast.convert``.

Layout (Howard et al. 2019, torchvision's ``mobilenet_v3_large`` table): a 3x3/2 stem conv to 16 +
BN + hardswish, 15 inverted-residual blocks (expand 1x1 -> depthwise k x k -> optional SE -> project
1x1; ReLU or hardswish; a residual add when stride 1 and in == out), a 1x1 conv to 960 + BN +
hardswish, global average pooling and the classifier Linear(960, 1280) - hardswish - dropout -
Linear(1280, num_classes).  BN uses eps 1e-3 / momentum 0.01 and the SE squeeze width is
``make_divisible(exp // 4, 8)``, as torchvision.  Module names follow torchvision
(``features.{i}.block.{j}.{0,1,2}``, ``features.{i}.block.{j}.fc1``, ``classifier.{0,3}``), so a
torchvision state dict loads with ``load_state_dict``.

What the engine finds (``net.report()``), close to OFA's MobileNetV3 space:
* width: the expansion width of every block that has an expand conv (group ``features.{k+1}.block.1.0``,
  named by the depthwise conv, k = 1..14): the expand conv's outputs, its BN, the depthwise conv/BN, the
  SE module's input and output channels and the project conv's inputs share one prefix; and the SE
  squeeze width of the blocks with SE (group ``features.{k+1}.block.2.fc1``: fc1 out / fc2 in; the
  hand-written supernet this replaced kept it full, < 0.1% of the MACs).
  Block 0 (no expand conv: its depthwise conv reads the stem output directly), the residual streams
  and the head (the 960-channel conv and the 1280-unit classifier hidden layer, kept with ``ignore=``)
  stay at full width.
* depth: blocks kept per stage, stages being consecutive blocks with the same output width and
  stride as in OFA: (b1-b2), (b3-b5), (b6-b9), (b10-b11), (b12-b14), max depth (2, 3, 4, 2, 3).
  A stage's first block is never dropped; every later block has a residual connection, so dropping
  it is an identity.  Block 0 sits before the stages and is always kept (OFA's ``first_block``,
  through ``ignore=``).

Counting rules (stp_fast.arch.counting, as Torch-Pruning): ReLU and pooling modules count 1 op per
element, hardswish/hardsigmoid/mul/add 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS
from stp_fast.models.base import make_supernet

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
# kept at full width and depth (OFA's space): block 0 (``features.1``) and the head's classifier (which also
# fixes the 960-channel head conv feeding it)
_FIXED = ("features.1", "classifier")


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


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias), BN, then the activation module if any."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out, eps=_BN_EPS, momentum=_BN_MOMENTUM)]  # fmt: skip
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation: pool, fc1 (1x1 conv), ReLU, fc2, hardsigmoid, scale the input."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: ``block`` = [expand], depthwise, [SE], project."""

    def __init__(self, cfg: BlockConfig) -> None:
        super().__init__()
        self.use_res_connect = cfg.residual
        act = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = [_conv_bn(cfg.c_in, cfg.exp, 1, act=act)] if cfg.exp != cfg.c_in else []
        layers.append(_conv_bn(cfg.exp, cfg.exp, cfg.kernel, cfg.stride, groups=cfg.exp, act=act))
        if cfg.se:
            layers.append(SqueezeExcitation(cfg.exp, cfg.squeeze))
        layers.append(_conv_bn(cfg.exp, cfg.c_out, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    """The plain MobileNetV3 (torchvision's); see the module docstring."""

    def __init__(self, config: Sequence[tuple], num_classes: int, in_chans: int = 3, *, width_mult: float = 1.0,
                 last_channel: int = 1280, dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")

        def adjust(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        self.cfgs = [BlockConfig(adjust(ci), k, adjust(e), adjust(co), se, hs, s) for ci, k, e, co, se, hs, s in config]
        if self.cfgs[0].exp != self.cfgs[0].c_in or any(c.exp == c.c_in for c in self.cfgs[1:]):
            raise ValueError("MobileNetV3: exactly the blocks after the first must have an expand conv")
        c_last = self.cfgs[-1].c_out
        c_head, c_hidden = 6 * c_last, adjust(last_channel)
        self.features = nn.Sequential(_conv_bn(in_chans, self.cfgs[0].c_in, 3, 2, act=nn.Hardswish),
                                      *(InvertedResidual(c) for c in self.cfgs),
                                      _conv_bn(c_last, c_head, 1, act=nn.Hardswish))  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c_head, c_hidden), nn.Hardswish(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(c_hidden, num_classes))  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def mobilenetv3_large(num_classes: int, in_chans: int = 3, *, width_mult: float = 1.0, last_channel: int = 1280,
                      dropout: float = 0.0, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 8,
                      input_size: Sequence[int] | None = None):  # fmt: skip
    """Elastic MobileNetV3-Large. Keywords: ``width_mult`` (torchvision's, channels rounded to 8),
    ``dropout`` (classifier, default 0: off), ``width_ratios``/``divisor`` (width choices, default
    0.1..1.0 rounded to multiples of 8), ``input_size`` (default (in_chans, 224, 224))."""
    model = MobileNetV3(LARGE_CONFIG, num_classes, in_chans, width_mult=width_mult, last_channel=last_channel,
                        dropout=dropout)  # fmt: skip
    return make_supernet(model, tuple(input_size or (in_chans, 224, 224)), width_ratios=width_ratios, divisor=divisor,
                         ignore=_FIXED)  # fmt: skip
