"""MobileNetV3-Large supernet: subnet == extracted plain model, batched pass == per-arch passes,
analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict round trips.
A reduced model (width_mult=0.5) on 64x64 inputs keeps the file fast."""

from __future__ import annotations

import io
import random

import pytest
import torch

import stp_fast
from stp_fast.models.mobilenetv3 import mobilenetv3_large

SEED_ARCHS = 30
SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: with 2 OpenMP threads on a busy 2-core machine the spinning threads made
    # this file ~14x slower (137 s vs 10 s measured); one thread is also the fastest when idle.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(width_mult=0.5, **kw):
    torch.manual_seed(0)
    net = mobilenetv3_large(10, width_mult=width_mult, **kw)
    net.train()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters, non-zero SE biases
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.momentum = None  # cumulative: the running statistics become the data's, not ~(0, 1)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
        for _ in range(2):
            net(torch.randn(8, net.in_chans, SIZE, SIZE))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.01
    return net.eval()


def _archs(net, count, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


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
    net = _net()
    x = torch.randn(2, 3, SIZE, SIZE)
    worst = 0.0
    for a in _archs(net, SEED_ARCHS):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert stp_fast.count_macs(plain, (3, SIZE, SIZE)) == (net.space.macs(a, (3, SIZE, SIZE)), net.space.params(a))
        assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), "extract must be plain torch"
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


def test_dropped_blocks_are_absent_from_the_extracted_model():
    net = _net()
    a = net.space.smallest()
    names = {n for n, _ in stp_fast.extract(net, a).named_modules()}
    kept = [k for k in range(15) if k == 0 or net._kept(a, k)]
    assert kept == [0, 1, 3, 6, 10, 12]
    assert all((f"features.{k + 1}" in names) == (k in kept) for k in range(15))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_many_equals_separate_passes(mode):
    net = _net()
    net.train(mode == "train")
    x = torch.randn(4, 3, SIZE, SIZE)
    archs = _archs(net, 6, seed=5)
    with torch.no_grad():
        many = net.forward_many(x, archs)
        single = [net(x, arch=a) for a in archs]
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_many_gradients_equal_sum_of_separate():
    net = _net()
    net.train()
    x = torch.randn(4, 3, SIZE, SIZE)
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
    bn = net.features[5].block[1][1]  # depthwise BN of block 4 (elastic width, droppable)
    before = bn.running_mean.clone()
    net.forward_many(torch.randn(4, 3, SIZE, SIZE), [net.space.smallest(), net.space.sample(1)])
    assert torch.equal(bn.running_mean, before), "a subnet pass changed the shared running statistics"
    net.forward_many(torch.randn(4, 3, SIZE, SIZE), [net.space.smallest(), net.space.full()])
    assert not torch.equal(bn.running_mean, before)


def test_macs_agree_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    for wm in (0.5, 1.0):
        net = _net(wm)
        for a in _archs(net, 5, seed=11):
            plain = stp_fast.extract(net, a)
            ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, 3, SIZE, SIZE))
            assert abs(ops - net.space.macs(a, (3, SIZE, SIZE))) <= 0.01 * ops
            assert params == net.space.params(a)


def test_sort_channels_keeps_the_function():
    net = _net()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    w = net.features[5].block[0][0].weight.abs().flatten(1).sum(1)
    assert torch.all(w[:-1] >= w[1:]), "expansion channels must be in descending L1 order"


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    net = _net()
    a = net.space.sample(3)
    plain = stp_fast.extract(net, a).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    scripted = torch.jit.script(plain)
    path = tmp_path / "pruned.pt"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True))
    full_sd = stp_fast.extract(net, net.space.full()).state_dict()
    fresh = mobilenetv3_large(10, width_mult=0.5)
    fresh.load_state_dict(full_sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))


def test_onnx_export_runs():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _net()
    plain = stp_fast.extract(net, net.space.sample(4)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    buf = io.BytesIO()
    torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    y = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), plain(x).detach(), rtol=1e-4, atol=1e-5)


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
