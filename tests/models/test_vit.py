"""ViT-Tiny supernet: subnet == extracted plain model, batched pass == per-arch passes, analytic MACs ==
counted MACs (and Torch-Pruning's count), export and state-dict round trips.  A reduced configuration
(32x32 images, patch 8, dim 64, 4 blocks, 4 heads) keeps the file fast; the DeiT-Tiny size is checked
for its cost numbers."""

from __future__ import annotations

import io
import random

import pytest
import torch

import stp_fast
from stp_fast.models.vit import vit_tiny

SEED_ARCHS = 30
SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
X_SHAPE = (3, 32, 32)


def _net(**kw):
    torch.manual_seed(0)
    net = vit_tiny(10, **{**SMALL, **kw})
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, biases and embeddings
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight.normal_(0, m.weight.shape[1] ** -0.5)
                m.bias.uniform_(-0.1, 0.1)
        net.cls_token.normal_()
        net.pos_embed.normal_(0, 0.5)
    return net.eval()


def _archs(net, count, seed=0):
    rng = random.Random(seed)
    return [net.space.full(), net.space.smallest()] + [net.space.sample(rng) for _ in range(count - 2)]


def test_extracted_equals_subnet_and_macs_match():
    net = _net()
    x = torch.randn(2, *X_SHAPE)
    worst = 0.0
    for a in _archs(net, SEED_ARCHS):
        plain = stp_fast.extract(net, a).eval()
        with torch.no_grad():
            y, yp = net(x, arch=a), plain(x)
        worst = max(worst, ((y - yp).abs().max() / yp.abs().max()).item())
        assert stp_fast.count_macs(plain, X_SHAPE) == (net.space.macs(a), net.space.params(a))
        assert all(type(m).__module__.startswith("torch.") for m in plain.modules()), "extract must be plain torch"
    assert worst <= 1e-5, f"extracted model differs from the subnet by {worst:.2e} (relative)"


def test_extracted_shapes_follow_the_arch():
    net = _net()
    a = stp_fast.Arch.make((2,), {**net.space.full().widths, "b0.heads": 1, "b1.heads": 3, "b1.mlp": 77})
    plain = stp_fast.extract(net, a)
    b0, b1 = plain.get_submodule("blocks.0"), plain.get_submodule("blocks.1")
    assert b0.attn.qkv.weight.shape == (3 * 16, 64) and b0.attn.proj.weight.shape == (64, 16)
    assert b1.attn.qkv.weight.shape == (3 * 48, 64)
    assert b1.mlp.fc1.weight.shape == (77, 64) and b1.mlp.fc2.weight.shape == (64, 77)
    assert not hasattr(plain.blocks, "2")
    # qkv keeps the q, k and v rows of the first heads: three row ranges of the [3D, D] weight
    w = net.blocks[0].attn.qkv.weight
    torch.testing.assert_close(b0.attn.qkv.weight, torch.cat([w[0:16], w[64:80], w[128:144]]))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_many_equals_separate_passes(mode):
    net = _net()
    net.train(mode == "train")
    x = torch.randn(4, *X_SHAPE)
    archs = _archs(net, 6, seed=5)
    with torch.no_grad():
        many = net.forward_many(x, archs)
        single = [net(x, arch=a) for a in archs]
    for a, b in zip(many, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # archs whose heads are all full take the prefix (no out_indices) path of the qkv projection
    full_heads = [stp_fast.Arch.make(a.depth, {**a.widths, **{f"b{j}.heads": 4 for j in range(4)}}) for a in archs]
    with torch.no_grad():
        for a, b in zip(net.forward_many(x, full_heads), [net(x, arch=a) for a in full_heads]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_many_gradients_equal_sum_of_separate():
    net = _net()
    net.train()
    x = torch.randn(4, *X_SHAPE)
    archs = _archs(net, 4, seed=7)
    sum(y.square().mean() for y in net.forward_many(x, archs)).backward()
    batched = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    for a in archs:
        net(x, arch=a).square().mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(batched[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {n}")


def test_macs_agree_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    net = _net()
    for a in _archs(net, 6, seed=11):
        plain = stp_fast.extract(net, a)
        ops, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, *X_SHAPE))
        assert abs(ops - net.space.macs(a)) <= 0.01 * ops
        assert params == net.space.params(a)


def test_deit_tiny_size_and_cost():
    torch.manual_seed(0)
    net = vit_tiny(1000)
    assert net.space.input_size == (3, 224, 224)
    full, small = net.space.full(), net.space.smallest()
    assert net.space.params(full) == sum(p.numel() for p in net.parameters()) == 5_717_416  # DeiT-Tiny
    assert net.space.choices("b0.heads") == (1, 2, 3)
    for a in (full, small):
        assert stp_fast.count_macs(stp_fast.extract(net, a), (3, 224, 224)) == (net.space.macs(a), net.space.params(a))
    assert small.depth == (1,) and net.space.macs(small) < 0.05 * net.space.macs(full)
    with pytest.raises(ValueError, match="input_size must be"):
        net.space.macs(full, (3, 32, 32))


def test_space_moves_stay_valid():
    net = _net()
    rng = random.Random(3)
    a = net.space.smallest()
    for _ in range(20):
        a = net.space.validate(net.space.mutate(a, rng))
    big = net.space.expand(a, 0.8 * net.space.macs(net.space.full()), rng)
    assert net.space.contains(big, a) and net.space.macs(big) >= 0.8 * net.space.macs(net.space.full())
    assert stp_fast.Arch.from_json(big.to_json()) == big


def test_sort_channels_keeps_the_function():
    net = _net()
    x = torch.randn(2, *X_SHAPE)
    with torch.no_grad():
        before = net(x)
        net.sort_channels()
        after = net(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    qkv = net.blocks[1].attn.qkv.weight.abs().reshape(3, 4, 16, 64).sum((0, 2, 3))
    assert torch.all(qkv[:-1] >= qkv[1:]), "heads must be in descending L1 order"
    w = net.blocks[1].mlp.fc1.weight.abs().sum(1)
    assert torch.all(w[:-1] >= w[1:]), "MLP hidden units must be in descending L1 order"


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    net = _net()
    a = net.space.sample(3)
    plain = stp_fast.extract(net, a).eval()
    x = torch.randn(2, *X_SHAPE)
    scripted = torch.jit.script(plain)
    path = tmp_path / "pruned.pt"
    scripted.save(str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    torch.testing.assert_close(torch.jit.trace(plain, x)(x), plain(x))
    # state dicts load with weights_only=True, into the plain model and (for the full arch) the supernet
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    plain.load_state_dict(torch.load(buf, weights_only=True))
    full_sd = stp_fast.extract(net, net.space.full()).state_dict()
    assert set(full_sd) == set(net.state_dict())
    fresh = vit_tiny(10, **SMALL)
    fresh.load_state_dict(full_sd)
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))


def test_onnx_export_runs():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _net()
    plain = stp_fast.extract(net, net.space.sample(4)).eval()
    x = torch.randn(2, *X_SHAPE)
    buf = io.BytesIO()
    torch.onnx.export(plain, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    y = ort.InferenceSession(buf.getvalue()).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(y), plain(x).detach(), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    net = _net()
    x = torch.randn(2, *X_SHAPE)
    widths = net.space.full().widths
    with pytest.raises(ValueError, match="x has 1 channels but the network takes 3"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="position embedding is fixed"):
        net(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="archs must be a non-empty list"):
        net.forward_many(x, [])
    with pytest.raises(ValueError, match=r"arch.depth\[0\]=0"):
        net(x, arch=stp_fast.Arch.make((0,), widths))
    with pytest.raises(ValueError, match=r"arch\.depth has 2 entries"):
        net(x, arch=stp_fast.Arch.make((2, 2), widths))
    with pytest.raises(ValueError, match=r"arch.width\['b1.heads'\]=5"):
        net(x, arch=stp_fast.Arch.make((4,), {**widths, "b1.heads": 5}))
    with pytest.raises(ValueError, match="unknown groups"):
        stp_fast.extract(net, stp_fast.Arch.make((4,), {**widths, "b0.embed": 8}))
    with pytest.raises(ValueError, match="lacks groups"):
        net.space.macs(stp_fast.Arch.make((4,), {k: v for k, v in widths.items() if k != "b3.mlp"}))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        vit_tiny(10, img_size=30, patch_size=8)
