"""CIFAR ResNet supernets: subnet == extracted plain model, batched pass == per-arch passes,
analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict round trips."""

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
from stp_fast import models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread

SIZE = (3, 32, 32)


def _net(name="resnet20", **kw):
    torch.manual_seed(0)
    net = models.create(name, 10, **kw)
    return randomise_bn(net, (8, net.in_chans, 32, 32), momentum=0.1)


@pytest.mark.parametrize("name,prune_residual", [("resnet20", False), ("resnet20", True), ("resnet56", True)])
def test_extracted_equals_subnet_and_macs_match(name, prune_residual):
    net = _net(name, prune_residual=prune_residual)
    check_extracted_equals_subnet(net, SIZE, SEED_ARCHS if name == "resnet20" else 8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prune_residual", [False, True])
def test_forward_many_equals_separate_passes(mode, prune_residual):
    check_forward_many_equals_separate_passes(_net(prune_residual=prune_residual), mode, SIZE)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(), SIZE)


def test_only_full_arch_updates_running_stats():
    net = _net()
    check_only_full_arch_updates_running_stats(net, [net.stages[0][0].bn1, net.stem.bn], SIZE)  # elastic, stream


def test_macs_agree_with_torch_pruning():
    for name, pr in (("resnet20", True), ("resnet56", False)):
        check_macs_agree_with_torch_pruning(_net(name, prune_residual=pr), SIZE)


def test_sort_channels_keeps_the_function():
    net = _net(prune_residual=True)
    check_sort_channels_keeps_the_function(net, SIZE)
    assert_descending(net.stages[1][0].conv1.weight.abs().flatten(1).sum(1), "mid channels")


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    check_export_and_reload(_net(), SIZE, lambda: models.create("resnet20", 10), tmp_path)


def test_onnx_export_runs():
    check_onnx_export(_net(), SIZE)


def test_recalibrate_bn_uses_cumulative_averages():
    net = _net()
    plain = stp_fast.extract(net, net.space.sample(5))
    batches = [torch.randn(4, 3, 32, 32) * (i + 1) for i in range(3)]
    stp_fast.recalibrate_bn(plain, batches, num_images=12)
    assert not plain.training
    recalibrated = plain.stem.bn.running_mean.clone()
    feats = []
    plain.stem.bn.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.no_grad():
        plain.train()
        for b in batches:
            plain(b)
    expected = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(recalibrated, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        stp_fast.recalibrate_bn(plain, batches, num_images=0)


def test_bad_inputs():
    net = _net()
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="archs must be a non-empty list"):
        net.forward_many(torch.randn(2, 3, 32, 32), [])
    with pytest.raises(ValueError, match=r"arch.depth\[2\]=0"):
        net(torch.randn(2, 3, 32, 32), arch=stp_fast.Arch.make((1, 1, 0), net.space.full().widths))
