"""MobileNetV3-Large supernet: subnet == extracted plain model, batched pass == per-arch passes,

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread
analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict round trips.
A reduced model (width_mult=0.5) on 64x64 inputs keeps the file fast."""

from __future__ import annotations

import pytest
import torch
from _supernet_checks import (
    MODES,
    SEED_ARCHS,
    assert_descending,
    check_export_and_reload,
    check_extracted_equals_subnet,
    check_forward_many_equals_separate_passes,
    check_forward_many_gradients,
    check_macs_agree_with_torch_pruning,
    check_only_full_arch_updates_running_stats,
    check_onnx_export,
    check_sort_channels_keeps_the_function,
    randomise_bn,
)

import stp_fast
from stp_fast.models.mobilenetv3 import mobilenetv3_large

SIZE = 64
X_SHAPE = (3, SIZE, SIZE)


def _net(width_mult=0.5, **kw):
    torch.manual_seed(0)
    net = mobilenetv3_large(10, width_mult=width_mult, **kw)
    # non-zero SE biases too; BN momentum 0.01 after the (cumulative) warm-up
    return randomise_bn(net, (8, net.in_chans, SIZE, SIZE), momentum=0.01, conv_bias=0.5)


def test_structure_matches_torchvision():
    net = mobilenetv3_large(1000)
    assert len(net.cfgs) == 15 and net.space.max_depth == (2, 3, 4, 2, 3)
    assert net.stages == [[1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14]]
    assert net.space.groups["b1.exp"] == 64 and net.space.groups["b14.exp"] == 960 and "b0.exp" not in net.space.groups
    assert net.space.params(net.space.full()) == 5_483_032  # torchvision mobilenet_v3_large
    assert sum(p.numel() for p in net.parameters()) == 5_483_032
    keys = set(net.state_dict())
    for k in ("features.0.0.weight", "features.1.block.1.0.weight", "features.4.block.2.fc1.bias",
              "features.4.block.3.1.running_var", "features.16.0.weight", "classifier.3.weight"):  # fmt: skip
        assert k in keys, k
    assert net.space.input_size == (3, 224, 224)


def test_extracted_equals_subnet_and_macs_match():
    check_extracted_equals_subnet(_net(), X_SHAPE, SEED_ARCHS)


def test_dropped_blocks_are_absent_from_the_extracted_model():
    net = _net()
    a = net.space.smallest()
    names = {n for n, _ in stp_fast.extract(net, a).named_modules()}
    kept = [k for k in range(15) if k == 0 or net._kept(a, k)]
    assert kept == [0, 1, 3, 6, 10, 12]
    assert all((f"features.{k + 1}" in names) == (k in kept) for k in range(15))


@pytest.mark.parametrize("mode", MODES)
def test_forward_many_equals_separate_passes(mode):
    check_forward_many_equals_separate_passes(_net(), mode, X_SHAPE)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(), X_SHAPE)


def test_only_full_arch_updates_running_stats():
    net = _net()
    bn = net.features[5].block[1][1]  # depthwise BN of block 4 (elastic width, droppable)
    check_only_full_arch_updates_running_stats(net, [bn], X_SHAPE)


def test_macs_agree_with_torch_pruning():
    for wm in (0.5, 1.0):
        check_macs_agree_with_torch_pruning(_net(wm), X_SHAPE)


def test_sort_channels_keeps_the_function():
    net = _net()
    check_sort_channels_keeps_the_function(net, X_SHAPE)
    assert_descending(net.features[5].block[0][0].weight.abs().flatten(1).sum(1), "expansion channels")


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    check_export_and_reload(_net(), X_SHAPE, lambda: mobilenetv3_large(10, width_mult=0.5), tmp_path)


def test_onnx_export_runs():
    check_onnx_export(_net(), X_SHAPE)


def test_bad_archs_name_the_field():
    net = _net()
    x = torch.randn(2, 3, SIZE, SIZE)
    full = net.space.full()
    with pytest.raises(ValueError, match=r"arch.depth\[1\]=0"):
        net(x, arch=stp_fast.Arch.make((2, 0, 4, 2, 3), full.widths))
    with pytest.raises(ValueError, match=r"arch.depth\[0\]=3"):
        net(x, arch=stp_fast.Arch.make((3, 3, 4, 2, 3), full.widths))
    with pytest.raises(ValueError, match=r"arch\.depth has 6 entries but the network has 5"):
        net(x, arch=stp_fast.Arch.make((1, 2, 3, 4, 2, 3), full.widths))
    with pytest.raises(ValueError, match=r"arch.width\['b3.exp'\]=999"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "b3.exp": 999}))
    with pytest.raises(ValueError, match=r"unknown groups \['b0.exp'\]"):
        stp_fast.extract(net, stp_fast.Arch.make(full.depth, {**full.widths, "b0.exp": 8}))
    with pytest.raises(ValueError, match=r"lacks groups \['b14.exp'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != "b14.exp"}))
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="width_mult must be > 0"):
        mobilenetv3_large(10, width_mult=0)
