"""CIFAR ResNet supernets: subnet == extracted plain model, batched pass == per-arch passes,
analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict round trips."""

from __future__ import annotations

import io
import random

import pytest
import torch

import stp_fast
from stp_fast import models

SEED_ARCHS = 30


def _net(name="resnet20", **kw):
    torch.manual_seed(0)
    net = models.create(name, 10, **kw)
    net.train()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:  # cumulative averages: running stats = the data's, not ~(0, 1)
            m.momentum = None
        for _ in range(2):
            net(torch.randn(8, net.in_chans, 32, 32))
        for m in bns:
            m.momentum = 0.1
    return net.eval()


def _archs(net, count, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


@pytest.mark.parametrize("name,prune_residual", [("resnet20", False), ("resnet20", True), ("resnet56", True)])
def test_extracted_equals_subnet_and_macs_match(name, prune_residual):
    net = _net(name, prune_residual=prune_residual)
    x = torch.randn(2, 3, 32, 32)
    worst = 0.0
    for a in _archs(net, SEED_ARCHS if name == "resnet20" else 8):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert stp_fast.count_macs(plain, (3, 32, 32)) == (net.space.macs(a), net.space.params(a))
        assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), "extract must be plain torch"
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("prune_residual", [False, True])
def test_forward_many_equals_separate_passes(mode, prune_residual):
    net = _net(prune_residual=prune_residual)
    net.train(mode == "train")
    x = torch.randn(4, 3, 32, 32)
    archs = _archs(net, 6, seed=5)
    with torch.no_grad():
        many = net.forward_many(x, archs)
        single = [net(x, arch=a) for a in archs]
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_many_gradients_equal_sum_of_separate():
    net = _net()
    net.train()
    x = torch.randn(4, 3, 32, 32)
    archs = _archs(net, 4, seed=7)
    sum(y.square().mean() for y in net.forward_many(x, archs)).backward()
    batched = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    for a in archs:
        net(x, arch=a).square().mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(batched[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")


def test_only_full_arch_updates_running_stats():
    net = _net()
    net.train()
    bn = net.stages[0][0].bn1
    before = bn.running_mean.clone()
    net.forward_many(torch.randn(4, 3, 32, 32), [net.space.smallest(), net.space.sample(1)])
    assert torch.equal(bn.running_mean, before), "a subnet pass changed the shared running statistics"
    net.forward_many(torch.randn(4, 3, 32, 32), [net.space.smallest(), net.space.full()])
    assert not torch.equal(bn.running_mean, before)


def test_macs_agree_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    for name, pr in (("resnet20", True), ("resnet56", False)):
        net = _net(name, prune_residual=pr)
        for a in _archs(net, 5, seed=11):
            plain = stp_fast.extract(net, a)
            ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, 3, 32, 32))
            assert abs(ops - net.space.macs(a)) <= 0.01 * ops
            assert params == net.space.params(a)


def test_sort_channels_keeps_the_function():
    net = _net(prune_residual=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    w = net.stages[1][0].conv1.weight.abs().flatten(1).sum(1)
    assert torch.all(w[:-1] >= w[1:]), "mid channels must be in descending L1 order"


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    net = _net()
    a = net.space.sample(3)
    plain = stp_fast.extract(net, a).eval()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(plain)
    path = tmp_path / "pruned.pt"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    # state dicts load with weights_only=True, into the plain model and (for the full arch) the supernet
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True))
    full_sd = stp_fast.extract(net, net.space.full()).state_dict()
    fresh = models.create("resnet20", 10)
    fresh.load_state_dict(full_sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))


def test_onnx_export_runs():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _net()
    plain = stp_fast.extract(net, net.space.sample(4)).eval()
    x = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    y = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), plain(x).detach(), rtol=1e-4, atol=1e-5)


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
