"""Wide ResNet supernet (converted by the drop-in engine): subnet == extracted plain model, batched pass ==
per-arch passes, analytic MACs == counted MACs (and Torch-Pruning's count), export, state-dict round trips
and loading the reference implementation's state dict.  Groups are named by their first layer:
``block{i}.layer.{j}.conv1`` (a block's inner width), ``conv1`` (the stem output) and, for group i's
residual stream, its last block's ``conv2``.  Most tests use WRN-16-2 (widths 32/64/128) on 32x32 inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
from stp_fast.models.wrn import wrn28_10

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread

SIZE = (3, 32, 32)
SMALL = {"depth": 16, "widen_factor": 2}


def _net(**kw):
    torch.manual_seed(0)
    net = wrn28_10(10, **{**SMALL, **kw})
    return randomise_bn(net, torch.randn(8, *SIZE))


@pytest.mark.parametrize("kw", [{}, {"prune_residual": True}, {"prune_residual": True, "depth": 10, "widen_factor": 1}])
def test_extracted_equals_subnet_and_macs_match(kw):
    check_extracted_equals_subnet(_net(**kw), SIZE, SEED_ARCHS if kw.get("prune_residual") else 10)


def test_residual_groups():
    groups = _net(prune_residual=True).space.groups
    streams = {"conv1": 16, "block1.layer.1.conv2": 32, "block2.layer.1.conv2": 64, "block3.layer.1.conv2": 128}
    assert {g: groups[g] for g in groups if "conv1" not in g or g == "conv1"} == streams
    assert set(_net().space.groups) == set(groups) - set(streams)
    # WRN-10-1: the first group keeps the stem's 16 channels and has no shortcut conv, so shares its group;
    # every group has one block, so nothing is skippable (no depth stages)
    net = wrn28_10(10, depth=10, widen_factor=1, prune_residual=True)
    widths = {1: 16, 2: 32, 3: 64}
    assert net.space.groups == {f"block{i}.layer.0.{c}": w for i, w in widths.items() for c in ("conv1", "conv2")}
    stem_stream = next(g for g in net.channel_groups if g.name == "block1.layer.0.conv2")
    assert {"conv1", "block1.layer.0.conv2", "block2.layer.0.bn1"} <= set(stem_stream.modules())
    assert net.space.max_depth == ()


def test_full_size_counts():
    net = wrn28_10(10)
    assert net.space.params(net.space.full()) == 36_479_194  # WRN-28-10, 10 classes
    assert (net.space.macs(net.space.full()), net.space.macs(net.space.smallest())) == (5_250_300_170, 127_052_042)
    for a in (net.space.full(), net.space.smallest()):
        assert_counts_match(net, a, SIZE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prune_residual", [False, True])
def test_forward_many_equals_separate_passes(mode, prune_residual):
    check_forward_many_equals_separate_passes(_net(prune_residual=prune_residual), mode, SIZE)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(prune_residual=True), SIZE)


def test_only_full_arch_updates_running_stats():
    net = _net()
    # a pre-activation BN on the stream and the final BN
    check_only_full_arch_updates_running_stats(net, [net.block2.layer[1].bn1, net.bn1], SIZE)


def test_macs_agree_with_torch_pruning():
    for pr in (True, False):
        check_macs_agree_with_torch_pruning(_net(prune_residual=pr), SIZE)


@pytest.mark.parametrize("kw", [{"prune_residual": True}, {"prune_residual": True, "depth": 10, "widen_factor": 1}])
def test_sort_channels_keeps_the_function(kw):
    net = _net(**kw)
    check_sort_channels_keeps_the_function(net, SIZE)
    g2 = net.block2.layer
    stream = [blk.conv2.weight for blk in g2] + [g2[0].convShortcut.weight]
    for s in (g2[0].conv1.weight.abs().flatten(1).sum(1), sum(w.abs().flatten(1).sum(1) for w in stream)):
        assert_descending(s)


class _RefBlock(nn.Module):
    """The reference PyTorch WRN block (xternalz/WideResNet-pytorch, RobustBench), dropout off."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class _RefWRN(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for i in range(1, 4):
            group = nn.Module()
            stride = 1 if i == 1 else 2
            group.layer = nn.Sequential(*(_RefBlock(c[i - 1], c[i], stride) if j == 0 else _RefBlock(c[i], c[i], 1)
                                          for j in range(n)))  # fmt: skip
            setattr(self, f"block{i}", group)
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for i in range(1, 4):
            out = getattr(self, f"block{i}").layer(out)
        out = F.avg_pool2d(self.relu(self.bn1(out)), out.shape[-1])
        return self.fc(out.flatten(1))


def test_reference_state_dict_loads():
    torch.manual_seed(1)
    ref = _RefWRN(16, 2, 10)
    x = torch.randn(2, *SIZE)
    randomise_bn(ref, x)
    check_reference_state_dict_loads(wrn28_10(10, **SMALL), ref, x)


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    check_export_and_reload(
        _net(prune_residual=True), SIZE, lambda: wrn28_10(10, prune_residual=True, **SMALL), tmp_path
    )


def test_onnx_export_runs():
    check_onnx_export(_net(), SIZE)


def test_bad_inputs():
    net = _net(prune_residual=True)
    x = torch.randn(2, *SIZE)
    full = net.space.full()
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"arch.depth\[1\]=0"):
        net(x, arch=stp_fast.Arch.make((2, 0, 2), full.widths))
    with pytest.raises(ValueError, match=r"arch.depth has 4 entries"):
        net(x, arch=stp_fast.Arch.make((2, 2, 2, 2), full.widths))
    with pytest.raises(ValueError, match=r"arch.width\['block2.layer.1.conv1'\]=65 must lie in \[1, 64\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "block2.layer.1.conv1": 65}))
    with pytest.raises(ValueError, match=r"arch.width\['conv1'\]=0"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "conv1": 0}))
    with pytest.raises(ValueError, match=r"unknown groups \['block4.layer.1.conv2'\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "block4.layer.1.conv2": 8}))
    res3 = "block3.layer.1.conv2"
    with pytest.raises(ValueError, match=rf"lacks groups \['{res3}'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != res3}))
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        wrn28_10(10, depth=20)
