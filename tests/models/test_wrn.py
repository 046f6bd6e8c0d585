"""Wide ResNet supernet: subnet == extracted plain model, batched pass == per-arch passes, analytic MACs ==
counted MACs (and Torch-Pruning's count), export, state-dict round trips and loading the reference
implementation's state dict.  Most tests use WRN-16-2 (widths 32/64/128) on 32x32 inputs."""

from __future__ import annotations

import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stp_fast
from stp_fast.models.wrn import wrn28_10

SEED_ARCHS = 30
SIZE = (3, 32, 32)
SMALL = {"depth": 16, "widen_factor": 2}


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


def _net(**kw):
    torch.manual_seed(0)
    net = wrn28_10(10, **{**SMALL, **kw})
    _randomise_bn(net, torch.randn(8, *SIZE))
    return net.eval()


def _archs(net, count, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


@pytest.mark.parametrize("kw", [{}, {"prune_residual": True}, {"prune_residual": True, "depth": 10, "widen_factor": 1}])
def test_extracted_equals_subnet_and_macs_match(kw):
    net = _net(**kw)
    x = torch.randn(2, *SIZE)
    worst = 0.0
    for a in _archs(net, SEED_ARCHS if kw.get("prune_residual") else 10):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert stp_fast.count_macs(plain, SIZE) == (net.space.macs(a), net.space.params(a))
        assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), "extract must be plain torch"
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


def test_residual_groups():
    assert [g for g in _net(prune_residual=True).space.groups if g.endswith("res")] == ["g1.res", "g2.res", "g3.res"]
    # WRN-10-1: the first group keeps the stem's 16 channels and has no shortcut conv, so shares its group
    groups = list(wrn28_10(10, depth=10, widen_factor=1, prune_residual=True).space.groups)
    assert groups == ["stem", "g1.b0.mid", "g2.res", "g2.b0.mid", "g3.res", "g3.b0.mid"]


def test_full_size_counts():
    net = wrn28_10(10)
    assert net.space.params(net.space.full()) == 36_479_194  # WRN-28-10, 10 classes
    for a in (net.space.full(), net.space.smallest()):
        assert stp_fast.count_macs(stp_fast.extract(net, a), SIZE) == (net.space.macs(a), net.space.params(a))


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
    bns = (net.block2.layer[1].bn1, net.bn1)  # a pre-activation BN on the stream and the final BN
    before = [bn.running_mean.clone() for bn in bns]
    net.forward_many(torch.randn(4, *SIZE), [net.space.smallest(), net.space.sample(1)])
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(bns, before)), "a subnet pass changed them"
    net.forward_many(torch.randn(4, *SIZE), [net.space.smallest(), net.space.full()])
    assert not any(torch.equal(bn.running_mean, b) for bn, b in zip(bns, before))


def test_macs_agree_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    for pr in (True, False):
        net = _net(prune_residual=pr)
        for a in _archs(net, 5, seed=11):
            plain = stp_fast.extract(net, a)
            ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, *SIZE))
            assert abs(ops - net.space.macs(a)) <= 0.01 * ops
            assert params == net.space.params(a)


@pytest.mark.parametrize("kw", [{"prune_residual": True}, {"prune_residual": True, "depth": 10, "widen_factor": 1}])
def test_sort_channels_keeps_the_function(kw):
    net = _net(**kw)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    g2 = net.block2.layer
    stream = [blk.conv2.weight for blk in g2] + [g2[0].convShortcut.weight]
    for s in (g2[0].conv1.weight.abs().flatten(1).sum(1), sum(w.abs().flatten(1).sum(1) for w in stream)):
        assert torch.all(s[:-1] >= s[1:]), "channels must be in descending L1 order"


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
    _randomise_bn(ref, x)
    ref.eval()
    sd = ref.state_dict()
    net = wrn28_10(10, **SMALL)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-5)
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
    fresh = wrn28_10(10, prune_residual=True, **SMALL)
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
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"arch.depth\[1\]=0"):
        net(x, arch=stp_fast.Arch.make((2, 0, 2), full.widths))
    with pytest.raises(ValueError, match=r"arch.depth has 4 entries"):
        net(x, arch=stp_fast.Arch.make((2, 2, 2, 2), full.widths))
    with pytest.raises(ValueError, match=r"arch.width\['g2.b1.mid'\]=65 must lie in \[1, 64\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "g2.b1.mid": 65}))
    with pytest.raises(ValueError, match=r"arch.width\['stem'\]=0"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "stem": 0}))
    with pytest.raises(ValueError, match=r"unknown groups \['g4.res'\]"):
        net(x, arch=stp_fast.Arch.make(full.depth, {**full.widths, "g4.res": 8}))
    with pytest.raises(ValueError, match=r"lacks groups \['g3.res'\]"):
        net.space.macs(stp_fast.Arch.make(full.depth, {k: v for k, v in full.widths.items() if k != "g3.res"}))
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        wrn28_10(10, depth=20)
