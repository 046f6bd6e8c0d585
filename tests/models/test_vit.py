"""ViT-Tiny supernet (converted by the drop-in engine): subnet == extracted plain model, batched pass ==
per-arch passes, analytic MACs == counted MACs (and Torch-Pruning's count), export and state-dict round
trips.  Groups: ``blocks.{j}.attn.qkv`` (the block's heads, in channels: multiples of head_dim) and
``blocks.{j}.mlp.fc1`` (its MLP hidden width).  A reduced configuration (32x32 images, patch 8, dim 64,
4 blocks, 4 heads of 16) keeps the file fast; the DeiT-Tiny size is checked for its cost numbers."""

from __future__ import annotations

import random

import pytest
import torch
from _supernet_checks import (
    MODES,
    SEED_ARCHS,
    assert_counts_match,
    assert_descending,
    assert_forward_many_matches,
    check_export_and_reload,
    check_extracted_equals_subnet,
    check_forward_many_equals_separate_passes,
    check_forward_many_gradients,
    check_macs_agree_with_torch_pruning,
    check_onnx_export,
    check_reference_state_dict_loads,
    check_sort_channels_keeps_the_function,
)
from torch import nn

import stp_fast
from stp_fast.models.vit import vit_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one intra-op thread

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


def test_extracted_equals_subnet_and_macs_match():
    check_extracted_equals_subnet(_net(), X_SHAPE, SEED_ARCHS)


def _heads(j: int) -> str:
    return f"blocks.{j}.attn.qkv"


def test_heads_move_as_whole_heads():
    net = _net()
    groups = {g.name: g for g in net.channel_groups}
    heads = groups[_heads(2)]
    assert heads.unit == 16 and heads.size == 64 and heads.frozen is None
    # q, k and v rows of the same head are one group channel; the output projection's columns follow
    assert [(m.module, m.dim, m.positions[0]) for m in heads.members] == [
        ("blocks.2.attn.qkv", "out", 0), ("blocks.2.attn.qkv", "out", 64), ("blocks.2.attn.qkv", "out", 128),
        ("blocks.2.attn.proj", "in", 0)]  # fmt: skip
    assert net.space.choices(_heads(2)) == (16, 32, 48, 64)
    assert set(net.space.groups) == {f"blocks.{j}.{g}" for j in range(4) for g in ("attn.qkv", "mlp.fc1")}


def test_extracted_shapes_follow_the_arch():
    net = _net()
    a = stp_fast.Arch.make((2,), {**net.space.full().widths, _heads(0): 16, _heads(1): 48, "blocks.1.mlp.fc1": 77})
    plain = stp_fast.extract(net, a)
    b0, b1 = plain.get_submodule("blocks.0"), plain.get_submodule("blocks.1")
    assert b0.attn.qkv.weight.shape == (3 * 16, 64) and b0.attn.proj.weight.shape == (64, 16)
    assert b1.attn.qkv.weight.shape == (3 * 48, 64)
    assert b1.mlp.fc1.weight.shape == (77, 64) and b1.mlp.fc2.weight.shape == (64, 77)
    assert not hasattr(plain.blocks, "2")
    # qkv keeps the q, k and v rows of the first heads: three row ranges of the [3D, D] weight
    w = net.blocks[0].attn.qkv.weight
    torch.testing.assert_close(b0.attn.qkv.weight, torch.cat([w[0:16], w[64:80], w[128:144]]))


@pytest.mark.parametrize("mode", MODES)
def test_forward_many_equals_separate_passes(mode):
    net = _net()
    x, archs = check_forward_many_equals_separate_passes(net, mode, X_SHAPE)
    # archs whose heads are all full take the prefix (no out_indices) path of the qkv projection
    full_heads = [stp_fast.Arch.make(a.depth, {**a.widths, **{_heads(j): 64 for j in range(4)}}) for a in archs]
    assert_forward_many_matches(net, x, full_heads)


def test_forward_many_gradients_equal_sum_of_separate():
    check_forward_many_gradients(_net(), X_SHAPE)


def test_macs_agree_with_torch_pruning():
    check_macs_agree_with_torch_pruning(_net(), X_SHAPE, count=6)


def test_deit_tiny_size_and_cost():
    torch.manual_seed(0)
    net = vit_tiny(1000)
    assert net.space.input_size == (3, 224, 224)
    full, small = net.space.full(), net.space.smallest()
    assert net.space.params(full) == sum(p.numel() for p in net.parameters()) == 5_717_416  # DeiT-Tiny
    assert net.space.choices(_heads(0)) == (64, 128, 192)  # 1, 2, 3 heads
    assert (net.space.macs(full), net.space.macs(small)) == (1_076_801_896, 44_867_445)
    for a in (full, small):
        assert_counts_match(net, a, (3, 224, 224))
    assert small.depth == (1,) and net.space.macs(small) < 0.05 * net.space.macs(full)
    with pytest.raises(ValueError, match="position embedding is fixed"):
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
    check_sort_channels_keeps_the_function(net, X_SHAPE)
    assert_descending(net.blocks[1].attn.qkv.weight.abs().reshape(3, 4, 16, 64).sum((0, 2, 3)), "heads")
    assert_descending(net.blocks[1].mlp.fc1.weight.abs().sum(1), "MLP hidden units")


class _RefAttention(nn.Module):
    """timm's ``Attention`` (fused qkv, fixed head count), written out (timm does not install here)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class _RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _RefBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = (nn.LayerNorm(dim, eps=1e-6), _RefAttention(dim, num_heads),
                                                            nn.Identity(), nn.Identity())  # fmt: skip
        self.norm2, self.mlp, self.ls2, self.drop_path2 = (nn.LayerNorm(dim, eps=1e-6), _RefMlp(dim, hidden),
                                                           nn.Identity(), nn.Identity())  # fmt: skip

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _RefViT(nn.Module):
    """timm's ``VisionTransformer`` (class token, learned position embedding, pre-norm blocks)."""

    def __init__(self, num_classes, img_size, patch_size, embed_dim, depth, num_heads):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dim) * 0.02)
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*(_RefBlock(embed_dim, num_heads, 4 * embed_dim) for _ in range(depth)))
        self.norm, self.fc_norm, self.head_drop = nn.LayerNorm(embed_dim, eps=1e-6), nn.Identity(), nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(x))))
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))


def test_timm_state_dict_loads():
    torch.manual_seed(1)
    ref = _RefViT(10, **SMALL).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    check_reference_state_dict_loads(vit_tiny(10, **SMALL), ref, torch.randn(2, *X_SHAPE))


def test_export_and_reload_without_stp_fast_classes(tmp_path):
    plain, x = check_export_and_reload(_net(), X_SHAPE, lambda: vit_tiny(10, **SMALL), tmp_path)
    torch.testing.assert_close(torch.jit.trace(plain, x)(x), plain(x))


def test_onnx_export_runs():
    check_onnx_export(_net(), X_SHAPE)


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
    with pytest.raises(ValueError, match=r"arch.width\['blocks.1.attn.qkv'\]=80"):
        net(x, arch=stp_fast.Arch.make((4,), {**widths, _heads(1): 80}))
    with pytest.raises(ValueError, match="unknown groups"):
        stp_fast.extract(net, stp_fast.Arch.make((4,), {**widths, "b0.embed": 8}))
    with pytest.raises(ValueError, match="lacks groups"):
        net.space.macs(stp_fast.Arch.make((4,), {k: v for k, v in widths.items() if k != "blocks.3.mlp.fc1"}))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        vit_tiny(10, img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="position embedding is fixed"):
        vit_tiny(10, **SMALL, input_size=(3, 64, 64))
