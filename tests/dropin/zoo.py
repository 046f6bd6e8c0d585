"""Real model families for the drop-in tests, small enough for 2 CPU cores and built without downloads.

Each builder returns ``Case(model, example, outputs, name)``: a freshly initialised ``nn.Module`` in
eval mode, an example input batch and the ``outputs=`` selector ``stp_fast.convert`` needs (None when
the model returns a tensor).  Hugging Face ``transformers`` models come from small configs; the
torchvision-layout replicas copy torchvision's module names and forward code (torchvision itself
cannot be installed beside the CPU torch wheel used here); ``FunctionalCNN`` is a custom model
written with functional ops (``F.relu``, ``x + y``, ``torch.cat``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    model: nn.Module
    example: Tensor
    outputs: Callable | str | None = None


def _init_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN/LN affine parameters and running statistics (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------- torchvision layout
def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.ResNet's layout and names, with a width knob (torchvision: 64)."""

    def __init__(self, block, layers: list[int], num_classes: int = 10, width: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))  # fmt: skip
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def tv_resnet18(num_classes: int = 10, width: int = 16) -> TVResNet:
    return TVResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


def tv_resnet50(num_classes: int = 10, width: int = 8) -> TVResNet:
    return TVResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))  # fmt: skip


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = [ConvBNReLU(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class TVMobileNetV2(nn.Module):
    """torchvision.models.MobileNetV2's layout and names (width_mult scales every layer)."""

    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
               [6, 320, 1, 1]]  # fmt: skip

    def __init__(self, num_classes: int = 10, width_mult: float = 0.25) -> None:
        super().__init__()
        c_in, last = max(8, int(32 * width_mult)), max(32, int(1280 * width_mult))
        features: list[nn.Module] = [ConvBNReLU(3, c_in, stride=2)]
        for t, c, n, s in self.SETTING:
            c_out = max(8, int(c * width_mult))
            for i in range(n):
                features.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        features.append(ConvBNReLU(c_in, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------- custom, functional
class FunctionalCNN(nn.Module):
    """A custom net written with functional ops: F.relu, residual ``x + y``, ``torch.cat`` of two branches."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.res = nn.ModuleList(nn.ModuleDict({"a": nn.Conv2d(16, 24, 3, padding=1), "bn": nn.BatchNorm2d(24),
                                                "b": nn.Conv2d(24, 16, 3, padding=1)}) for _ in range(2))  # fmt: skip
        self.left = nn.Conv2d(16, 12, 1)
        self.right = nn.Conv2d(16, 20, 3, padding=1)
        self.mix = nn.Conv2d(32, 24, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        for blk in self.res:
            x = x + blk["b"](F.relu(blk["bn"](blk["a"](x))))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        x = F.relu(self.bn1(self.mix(x)))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------- Hugging Face
def _hf(kind: str):
    import transformers as T

    if kind == "resnet_basic":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 48], depths=[2, 2, 2],
                             layer_type="basic", num_labels=10)  # fmt: skip
        return T.ResNetForImageClassification(cfg)
    if kind == "resnet_bottleneck":
        cfg = T.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 48, 64], depths=[2, 3, 2],
                             layer_type="bottleneck", num_labels=10)  # fmt: skip
        return T.ResNetForImageClassification(cfg)
    if kind == "convnext":
        cfg = T.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 48], depths=[2, 2, 2], num_labels=10,
                               num_stages=3, out_features=None, image_size=32)  # fmt: skip
        return T.ConvNextForImageClassification(cfg)
    if kind == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=4,
                          num_attention_heads=4, intermediate_size=128, num_labels=10)  # fmt: skip
        return T.ViTForImageClassification(cfg)
    if kind == "mobilenetv2":
        cfg = T.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=10)
        return T.MobileNetV2ForImageClassification(cfg)
    if kind == "swin":
        cfg = T.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=4, num_labels=10)  # fmt: skip
        return T.SwinForImageClassification(cfg)
    raise ValueError(kind)


HF_KINDS = ("resnet_basic", "resnet_bottleneck", "convnext", "vit", "mobilenetv2", "swin")
LOCAL_KINDS = ("tv_resnet18", "tv_resnet50", "tv_mobilenetv2", "functional_cnn")


def build(name: str, *, batch: int = 4, size: int = 32, seed: int = 0) -> Case:
    """The model ``name`` (one of ``HF_KINDS + LOCAL_KINDS``) with seeded weights and BN statistics."""
    torch.manual_seed(seed)
    if name in HF_KINDS:
        model, outputs = _hf(name), "logits"
    else:
        model = {"tv_resnet18": tv_resnet18, "tv_resnet50": tv_resnet50, "tv_mobilenetv2": TVMobileNetV2,
                 "functional_cnn": FunctionalCNN}[name]()  # fmt: skip
        outputs = None
    example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return Case(name, _init_bn(model, seed), example, outputs)
