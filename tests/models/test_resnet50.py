"""ResNet-50 supernet (torchvision layout): subnet == extracted plain model, batched pass == per-arch
passes, analytic MACs == counted MACs (and Torch-Pruning's count), export, state-dict round trips and
loading a torchvision-style ResNet-50 state dict.  Most tests use a 1/8-width net on 64x64 inputs."""

from __future__ import annotations

import io
import random

import pytest
import torch
from torch import nn

import stp_fast
from stp_fast.models.resnet_imagenet import resnet50

SEED_ARCHS = 30
SIZE = (3, 64, 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: on a busy 2-core machine intra-op threads spin-wait far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_bn(net: nn.Module, x: torch.Tensor) -> None:
    """Non-trivial BN affine parameters and running statistics (two train-mode batches)."""
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for _ in range(2):
            net(x)


def _net(width_mult=0.125, **kw):
    torch.manual_seed(0)
    net = resnet50(10, width_mult=width_mult, **kw)
    _randomise_bn(net, torch.randn(8, *SIZE))
    return net.eval()


def _archs(net, count, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


@pytest.mark.parametrize("prune_residual", [False, True])
def test_extracted_equals_subnet_and_macs_match(prune_residual):
    net = _net(prune_residual=prune_residual)
    x = torch.randn(2, *SIZE)
    worst = 0.0
    for a in _archs(net, SEED_ARCHS if prune_residual else 10):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert stp_fast.count_macs(plain, SIZE) == (net.space.macs(a, SIZE), net.space.params(a))
        assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), "extract must be plain torch"
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


def test_full_size_counts():
    net = resnet50(1000)
    assert net.space.params(net.space.full()) == 25_557_032  # torchvision's ResNet-50
    for a in (net.space.full(), net.space.smallest()):
        assert stp_fast.count_macs(stp_fast.extract(net, a), (3, 224, 224)) == (net.space.macs(a), net.space.params(a))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("prune_residual", [False, True])
def test_forward_many_equals_separate_passes(mode, prune_residual):
    net = _net(prune_residual=prune_residual)
    net.train(mode == "train")
    x = torch.randn(4, *SIZE)
    archs = _archs(net, 6, seed=5)
    with torch.no_grad():
        many = net.forward_many(x, archs)
        single = [net(x, arch=a) for a in archs]
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_many_gradients_equal_sum_of_separate():
    net = _net(prune_residual=True)
    net.train()
    x = torch.randn(4, *SIZE)
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
    bn = net.layer2[0].bn2
    before = bn.running_mean.clone()
    net.forward_many(torch.randn(4, *SIZE), [net.space.smallest(), net.space.sample(1)])
    assert torch.equal(bn.running_mean, before), "a subnet pass changed the shared running statistics"
    net.forward_many(torch.randn(4, *SIZE), [net.space.smallest(), net.space.full()])
    assert not torch.equal(bn.running_mean, before)


def test_macs_agree_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    for pr in (True, False):
        net = _net(prune_residual=pr)
        for a in _archs(net, 5, seed=11):
            plain = stp_fast.extract(net, a)
            ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, *SIZE))
            assert abs(ops - net.space.macs(a, SIZE)) <= 0.01 * ops
            assert params == net.space.params(a)


def test_sort_channels_keeps_the_function():
    net = _net(prune_residual=True)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    for w in (net.layer2[1].conv1.weight, net.layer2[1].conv2.weight, net.conv1.weight):
        s = w.abs().flatten(1).sum(1)
        assert torch.all(s[:-1] >= s[1:]), "channels must be in descending L1 order"


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


def test_torchvision_state_dict_loads():
    torch.manual_seed(1)
    ref = _RefResNet50(1000)
    x = torch.randn(2, *SIZE)
    _randomise_bn(ref, x)
    ref.eval()
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    net = resnet50(1000)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
        # and the extracted full model's state dict loads back into the torchvision layout
        ref.load_state_dict(stp_fast.extract(net, net.space.full()).state_dict())


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    net = _net(prune_residual=True)
    a = net.space.sample(3)
    plain = stp_fast.extract(net, a).eval()
    x = torch.randn(2, *SIZE)
    scripted = torch.jit.script(plain)
    path = tmp_path / "pruned.pt"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True))
    fresh = resnet50(10, width_mult=0.125, prune_residual=True)
    fresh.load_state_dict(stp_fast.extract(net, net.space.full()).state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))


def test_onnx_export_runs():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _net()
    plain = stp_fast.extract(net, net.space.sample(4)).eval()
    x = torch.randn(2, *SIZE)
    buf = io.BytesIO()
    torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    y = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), plain(x).detach(), rtol=1e-4, atol=1e-5)


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
    with pytest.raises(ValueError, match=r"arch.width\['l2.b1.mid1'\]=17 must lie in \[1, 16\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "l2.b1.mid1": 17}))
    with pytest.raises(ValueError, match=r"arch.width\['l4.res'\]=257"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "l4.res": 257}))
    with pytest.raises(ValueError, match=r"unknown groups \['l5.res'\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "l5.res": 8}))
    with pytest.raises(ValueError, match=r"lacks groups \['stem'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != "stem"}))
    with pytest.raises(ValueError, match="layers must be 4 positive block counts"):
        resnet50(10, layers=(3, 4, 6))
