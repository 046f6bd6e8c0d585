"""MobileNetV3-Large supernet (converted by the drop-in engine): subnet == extracted plain model, batched
pass == per-arch passes, analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict
round trips.  Groups are named by their first layer: ``features.{k+1}.block.1.0`` (block k's expansion
width, named by its depthwise conv) and ``features.{k+1}.block.2.fc1`` (its SE squeeze width).
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

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread

SIZE = 64
X_SHAPE = (3, SIZE, SIZE)
SE_BLOCKS = (3, 4, 5, 10, 11, 12, 13, 14)


def _net(width_mult=0.5, **kw):
    torch.manual_seed(0)
    net = mobilenetv3_large(10, width_mult=width_mult, input_size=X_SHAPE, **kw)
    # non-zero SE biases too; BN momentum 0.01 after the (cumulative) warm-up
    return randomise_bn(net, (8, 3, SIZE, SIZE), momentum=0.01, conv_bias=0.5)


def _exp(k: int) -> str:
    """The expansion-width group of block k (1..14)."""
    return f"features.{k + 1}.block.1.0"


def test_structure_matches_torchvision():
    net = mobilenetv3_large(1000)
    space = net.space
    assert len(net.model.cfgs) == 15 and space.max_depth == (2, 3, 4, 2, 3)
    stages = ([1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11], [12, 13, 14])
    assert [st.blocks for st in net.depth_stages] == [[f"features.{k + 1}" for k in ks] for ks in stages]
    # 14 expansion widths (block 0 has no expand conv) and the 8 SE squeeze widths; streams and head fixed
    assert set(space.groups) == {_exp(k) for k in range(1, 15)} | {f"features.{k + 1}.block.2.fc1" for k in SE_BLOCKS}
    assert space.groups[_exp(1)] == 64 and space.groups[_exp(14)] == 960
    assert space.groups["features.4.block.2.fc1"] == 24  # block 3's SE squeeze: make_divisible(72 // 4, 8)
    assert space.params(space.full()) == 5_483_032  # torchvision mobilenet_v3_large
    assert sum(p.numel() for p in net.parameters()) == 5_483_032
    assert (space.macs(space.full()), space.macs(space.smallest())) == (228_356_576, 31_424_208)
    keys = set(net.state_dict())
    for k in ("features.0.0.weight", "features.1.block.1.0.weight", "features.4.block.2.fc1.bias",
              "features.4.block.3.1.running_var", "features.16.0.weight", "classifier.3.weight"):  # fmt: skip
        assert k in keys, k
    assert space.input_size == (3, 224, 224)


def test_extracted_equals_subnet_and_macs_match():
    check_extracted_equals_subnet(_net(), X_SHAPE, SEED_ARCHS)


def test_dropped_blocks_are_absent_from_the_extracted_model():
    net = _net()
    a = net.space.smallest()
    kept = [k for k in range(15) if f"features.{k + 1}" not in net.dropped_blocks(a)]
    assert kept == [0, 1, 3, 6, 10, 12]
    plain = stp_fast.extract(net, a)
    blocks = list(plain.features)[1:-1]  # the container renumbers: stem, the kept blocks, head
    cfgs = net.model.cfgs
    assert [(b.block[-1][0].out_channels, b.block[-2 - cfgs[k].se][0].kernel_size[0]) for b, k in zip(blocks, kept)] \
        == [(cfgs[k].c_out, cfgs[k].kernel) for k in kept] and len(blocks) == len(kept)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_forward_many_equals_separate_passes(mode):
    check_forward_many_equals_separate_passes(_net(), mode, X_SHAPE)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(), X_SHAPE)


def test_only_full_arch_updates_running_stats():
    net = _net()
    # the depthwise BN of block 4 (elastic width, droppable), block 3's project BN and the stem BN (full width)
    bns = [net.features[5].block[1][1], net.features[4].block[3][1], net.features[0][1]]
    check_only_full_arch_updates_running_stats(net, bns, X_SHAPE)


def test_macs_agree_with_torch_pruning():
    for wm in (0.5, 1.0):
        check_macs_agree_with_torch_pruning(_net(wm), X_SHAPE)


def test_sort_channels_keeps_the_function():
    net = _net()
    check_sort_channels_keeps_the_function(net, X_SHAPE)

    def l1(w):
        return w.abs().flatten(1).sum(1)

    # block 4: the expansion channels' producers are the expand conv and the SE gate's fc2
    blk = net.features[5].block
    assert_descending(l1(blk[0][0].weight) + l1(blk[2].fc2.weight), "expansion channels")
    assert_descending(l1(net.features[8].block[0][0].weight), "expansion channels (no SE)")
    assert_descending(l1(blk[2].fc1.weight), "SE squeeze channels")


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    fresh = lambda: mobilenetv3_large(10, width_mult=0.5, input_size=X_SHAPE)
    check_export_and_reload(_net(), X_SHAPE, fresh, tmp_path)


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
    with pytest.raises(ValueError, match=r"arch.width\['features.4.block.1.0'\]=999"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, _exp(3): 999}))
    with pytest.raises(ValueError, match=r"unknown groups \['features.1.block.0.0'\]"):
        stp_fast.extract(net, stp_fast.Arch.make(full.depth, {**full.widths, "features.1.block.0.0": 8}))
    with pytest.raises(ValueError, match=r"lacks groups \['features.15.block.1.0'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != _exp(14)}))
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="width_mult must be > 0"):
        mobilenetv3_large(10, width_mult=0)
