"""ResNet-50 supernet (torchvision layout, converted by the drop-in engine): subnet == extracted plain model,
batched pass == per-arch passes, analytic MACs == counted MACs (and Torch-Pruning's count), export,
state-dict round trips and loading a torchvision-style ResNet-50 state dict.  Groups are named by their
first layer: ``layer{i}.{j}.conv1`` / ``.conv2`` (a block's inner widths), ``conv1`` (the stem output) and
``layer{i}.0.downsample.0`` (stage i's residual stream).  Most tests use a 1/8-width net on 64x64 inputs."""

from __future__ import annotations

import pytest
import torch
from _supernet_checks import (
    MODES,
    SEED_ARCHS,
    assert_counts_match,
    assert_descending,
    check_export_and_reload,
    check_extracted_equals_subnet,
    check_forward_many_equals_separate_passes,
    check_forward_many_gradients,
    check_macs_agree_with_torch_pruning,
    check_only_full_arch_updates_running_stats,
    check_onnx_export,
    check_reference_state_dict_loads,
    check_sort_channels_keeps_the_function,
    randomise_bn,
)
from torch import nn

import stp_fast
from stp_fast.models.resnet_imagenet import resnet50

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread

SIZE = (3, 64, 64)


def _net(width_mult=0.125, **kw):
    torch.manual_seed(0)
    net = resnet50(10, width_mult=width_mult, input_size=SIZE, **kw)
    return randomise_bn(net, torch.randn(8, *SIZE))


@pytest.mark.parametrize("prune_residual", [False, True])
def test_extracted_equals_subnet_and_macs_match(prune_residual):
    check_extracted_equals_subnet(_net(prune_residual=prune_residual), SIZE, SEED_ARCHS if prune_residual else 10)


@pytest.fixture(scope="module")
def full_net():
    """The full-width ResNet-50 for 1000 classes at 224x224 (converted once for the module: ~10 s on one core)."""
    torch.manual_seed(0)
    return resnet50(1000)


def test_full_size_counts(full_net):
    net, space = full_net, full_net.space
    assert space.params(space.full()) == 25_557_032  # torchvision's ResNet-50
    assert (space.macs(space.full()), space.macs(space.smallest())) == (4_121_925_096, 548_175_070)
    assert len(space.groups) == 32 and space.max_depth == (3, 4, 6, 3)
    for a in (space.full(), space.smallest()):
        assert_counts_match(net, a, (3, 224, 224))


def test_groups_follow_the_blocks():
    net = _net(prune_residual=True)
    groups = net.space.groups
    assert len(groups) == 37  # 16 blocks x (conv1, conv2) + the stem + 4 residual streams
    assert groups["conv1"] == 8 and groups["layer1.0.downsample.0"] == 32 and groups["layer4.0.downsample.0"] == 256
    assert groups["layer2.1.conv1"] == groups["layer2.1.conv2"] == 16
    assert net.space.group_block["layer3.2.conv2"] == (2, 2) and "layer3.0.conv1" not in net.space.group_block
    assert set(_net().space.groups) == {g for g in groups if "downsample" not in g and g != "conv1"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prune_residual", [False, True])
def test_forward_many_equals_separate_passes(mode, prune_residual):
    check_forward_many_equals_separate_passes(_net(prune_residual=prune_residual), mode, SIZE)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(prune_residual=True), SIZE)


def test_only_full_arch_updates_running_stats():
    net = _net()
    # an elastic BN, and two of the residual streams (full width here)
    check_only_full_arch_updates_running_stats(net, [net.layer2[0].bn2, net.layer2[1].bn3, net.bn1], SIZE)


def test_macs_agree_with_torch_pruning():
    for pr in (True, False):
        check_macs_agree_with_torch_pruning(_net(prune_residual=pr), SIZE)


def test_sort_channels_keeps_the_function():
    net = _net(prune_residual=True)
    check_sort_channels_keeps_the_function(net, SIZE)
    for w in (net.layer2[1].conv1.weight, net.layer2[1].conv2.weight, net.conv1.weight):
        assert_descending(w.abs().flatten(1).sum(1))


class _RefBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck, written out (torchvision does not install here)."""

    def __init__(self, c_in, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _RefResNet50(nn.Module):
    """torchvision.models.resnet50 (same module names and forward)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
            stride = 1 if i == 1 else 2
            ds = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            blocks = [_RefBottleneck(c_in, planes, stride, ds)]
            blocks += [_RefBottleneck(planes * 4, planes, 1, None) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            c_in = planes * 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_torchvision_state_dict_loads(full_net):
    torch.manual_seed(1)
    ref = _RefResNet50(1000)
    x = torch.randn(2, *SIZE)
    randomise_bn(ref, x)
    check_reference_state_dict_loads(full_net, ref, x)


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    fresh = lambda: resnet50(10, width_mult=0.125, prune_residual=True, input_size=SIZE)
    check_export_and_reload(_net(prune_residual=True), SIZE, fresh, tmp_path)


def test_onnx_export_runs():
    check_onnx_export(_net(), SIZE)


def test_bad_inputs():
    net = _net(prune_residual=True)
    x = torch.randn(2, *SIZE)
    full = net.space.full()
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"arch.depth\[3\]=0"):
        net(x, arch=stp_fast.Arch.make((3, 4, 6, 0), full.widths))
    with pytest.raises(ValueError, match=r"arch.depth has 3 entries"):
        net(x, arch=stp_fast.Arch.make((3, 4, 6), full.widths))
    with pytest.raises(ValueError, match=r"arch.width\['layer2.1.conv1'\]=17 must lie in \[1, 16\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "layer2.1.conv1": 17}))
    with pytest.raises(ValueError, match=r"arch.width\['layer4.0.downsample.0'\]=257"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "layer4.0.downsample.0": 257}))
    with pytest.raises(ValueError, match=r"unknown groups \['layer5.0.downsample.0'\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "layer5.0.downsample.0": 8}))
    with pytest.raises(ValueError, match=r"lacks groups \['conv1'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != "conv1"}))
    with pytest.raises(ValueError, match="layers must be 4 positive block counts"):
        resnet50(10, layers=(3, 4, 6))
