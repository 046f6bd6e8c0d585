"""Vision Transformer (ViT-Tiny, DeiT-Tiny configuration) as an elastic supernet.

Layout (Dosovitskiy et al. 2021; DeiT-Tiny, Touvron et al. 2021): a 16x16 patch-embedding conv to
``embed_dim`` = 192, a cls token and a learned position embedding, 12 pre-norm blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) with 3 heads and MLP ratio 4 (GELU), a final
LayerNorm and a linear head on the cls token.  Keywords ``img_size``, ``patch_size``, ``embed_dim``,
``depth``, ``num_heads`` and ``mlp_ratio`` give smaller configurations (the tests use 32x32 images).
Parameter names are timm's ``VisionTransformer`` names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{j}.attn.qkv``, ``blocks.{j}.mlp.fc1``, ``norm``, ``head``, ...), so a timm
DeiT-Tiny state dict and ``extract(net, full).state_dict()`` both load into the supernet.

Elastic dimensions (one stage; ALGORITHMS.md 2.1 and gotcha 2):
* depth: blocks kept, a prefix of the 12 (at least one; the patch embedding, cls token, position
  embedding, final norm and head are never dropped);
* heads per block (group ``b{j}.heads``, counted in heads, choices 1..num_heads): the qkv projection
  keeps the q, k and v rows of the first h heads -- three separate row ranges of its [3D, D] weight,
  passed to ``multi_subnet_linear`` as ``out_indices`` (the weight keeps timm's q|k|v layout, so no
  reorganisation) -- and the output projection keeps the matching first h*d input columns (a prefix);
* MLP hidden width per block (group ``b{j}.mlp``, choices from the space's width ratios): fc1 keeps
  its first m rows, fc2 its first m input columns.
The embed dim (the residual stream shared by every block, gotcha 3) is not pruned.

MACs follow :mod:`stp_fast.arch.counting` (Torch-Pruning's rules): conv/linear multiply-accumulates
plus bias adds, LayerNorm 2 ops per element, module activations only if counting.py lists them (it
does not list ``nn.GELU``; Torch-Pruning counts it at 1 op/element, at most 1/(2*embed_dim) of a
block's linear MACs, 0.2% for ViT-Tiny).  The attention matmuls (QK^T and AV, 2*T^2*h*d MACs per
block for T tokens, 179 M of ViT-Tiny's 1.25 G at 224x224) and the softmax are NOT included: they are
functional ops (``F.scaled_dot_product_attention``), which neither ``count_macs`` nor Torch-Pruning's
``count_ops_and_params`` counts (Torch-Pruning counts them only inside ``nn.MultiheadAttention`` or a
timm ``Attention`` module).  Keeping them out makes ``space.macs(a) == count_macs(extract(net, a))``
exact and within 1% of Torch-Pruning; the numbers are the linear-layer MACs that pruning papers
usually report for ViTs' parameterised layers, not the full runtime cost.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from stp_fast.arch import counting
from stp_fast.arch.counting import conv_macs, linear_macs, norm_ops
from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS, Arch, Space
from stp_fast.models.base import Supernet, l1_order
from stp_fast.nn import elastic
from stp_fast.nn.plain import PlainBuilder, slice_linear
from stp_fast.ops import multi_subnet_conv2d, multi_subnet_linear

# count_macs counts GELU modules only if counting.py lists them (today it does not); follow it.
_GELU_OPS = 1 if issubclass(nn.GELU, counting._ELEMENTWISE) else 0


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)


class VisionTransformer(Supernet):
    """Elastic ViT; see the module docstring."""

    def __init__(self, num_classes: int, in_chans: int = 3, *, img_size: int | Sequence[int] = 224,
                 patch_size: int = 16, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS,
                 divisor: int = 1) -> None:  # fmt: skip
        super().__init__()
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(img) != 2 or img[0] % patch_size or img[1] % patch_size:
            raise ValueError(f"vit: img_size {img_size} must be divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"vit: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"vit: depth must be >= 1, got {depth}")
        self.num_classes, self.in_chans, self.img_size, self.patch_size = num_classes, in_chans, img, patch_size
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.mlp_hidden = int(embed_dim * mlp_ratio)
        self.grid = (img[0] // patch_size, img[1] // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1] + 1
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, self.mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()
        groups, where = {}, {}
        for j in range(depth):
            groups[f"b{j}.heads"], groups[f"b{j}.mlp"] = num_heads, self.mlp_hidden
            where[f"b{j}.heads"] = where[f"b{j}.mlp"] = (0, j)
        self.space = Space(
            max_depth=(depth,), groups=groups, group_block=where, macs_fn=self._macs, params_fn=self._params,
            input_size=(in_chans, *img), width_ratios=tuple(width_ratios), divisor=divisor,
            # heads are counted in heads: every count 1..num_heads is a choice
            group_choices={f"b{j}.heads": tuple(range(1, num_heads + 1)) for j in range(depth)},
        )  # fmt: skip

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ index helpers
    def _qkv_rows(self, heads: int, device: torch.device) -> Tensor:
        """Rows of the [3D, D] qkv weight holding the q, k and v of the first ``heads`` heads."""
        r = torch.arange(heads * self.head_dim, device=device)
        return torch.cat([r + part * self.embed_dim for part in range(3)])

    def _attend(self, qkv: Tensor, heads: int) -> Tensor:
        """softmax(q k^T / sqrt(d)) v over ``heads`` heads: [B, T, 3*h*d] -> [B, T, h*d]."""
        q, k, v = qkv.unflatten(-1, (3, heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    # ------------------------------------------------------------------ batched forward
    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        archs, _ = self._check_archs(x, archs)  # no BatchNorm: no statistics owner
        if x.shape[1] != self.in_chans:
            raise ValueError(f"forward: x has {x.shape[1]} channels but the network takes {self.in_chans}")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"forward: x is {tuple(x.shape[2:])} but the network takes {self.img_size} images "
                             f"(the position embedding is fixed)")  # fmt: skip
        n, dim = len(archs), self.embed_dim
        proj = self.patch_embed.proj  # shared by every arch: computed once
        t = multi_subnet_conv2d([x], proj.weight, proj.bias, [dim], stride=proj.stride)[0].flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos_embed
        hs = [t] * n
        for j, blk in enumerate(self.blocks):
            members = [i for i, a in enumerate(archs) if a.depth[0] > j]
            if not members:
                break
            heads = [archs[i].widths[f"b{j}.heads"] for i in members]
            mlps = [archs[i].widths[f"b{j}.mlp"] for i in members]
            xs = [hs[i] for i in members]
            ys = [F.layer_norm(h, (dim,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps) for h in xs]
            rows = None if all(h == self.num_heads for h in heads) else [self._qkv_rows(h, x.device) for h in heads]
            qkv = multi_subnet_linear(ys, blk.attn.qkv.weight, blk.attn.qkv.bias,
                                      [3 * h * self.head_dim for h in heads], out_indices=rows)  # fmt: skip
            ys = elastic.linear(blk.attn.proj, [self._attend(q, h) for q, h in zip(qkv, heads)], [dim] * len(xs))
            xs = [h + y for h, y in zip(xs, ys)]
            ys = [F.layer_norm(h, (dim,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps) for h in xs]
            ys = [F.gelu(y) for y in elastic.linear(blk.mlp.fc1, ys, mlps)]
            ys = elastic.linear(blk.mlp.fc2, ys, [dim] * len(xs))
            for i, h, y in zip(members, xs, ys):
                hs[i] = h + y
        cls = [F.layer_norm(h, (dim,), self.norm.weight, self.norm.bias, self.norm.eps)[:, 0] for h in hs]
        return elastic.linear(self.head, cls, [self.num_classes] * n)

    # ------------------------------------------------------------------ extraction
    def extract(self, arch: Arch) -> fx.GraphModule:
        """Plain model of ``arch``: an fx GraphModule of nn.Conv2d/Linear/LayerNorm/GELU modules and torch
        functions (scaled_dot_product_attention for attention), with the supernet's parameter names."""
        arch = self.space.validate(arch)
        b = PlainBuilder()
        x = b.input("x")
        h = b.module("patch_embed.proj", _copy_conv(self.patch_embed.proj), x)
        h = b.function(torch.transpose, b.function(torch.flatten, h, 2), 1, 2)
        cls = _param(b, "cls_token", self.cls_token)
        cls = b.graph.call_method("expand", (cls, b.graph.call_method("size", (x, 0)), -1, -1))
        h = b.function(torch.add, b.function(torch.cat, [cls, h], 1), _param(b, "pos_embed", self.pos_embed))
        for j in range(arch.depth[0]):
            blk, p = self.blocks[j], f"blocks.{j}"
            heads, mlp = arch.widths[f"b{j}.heads"], arch.widths[f"b{j}.mlp"]
            inner = heads * self.head_dim
            y = b.module(f"{p}.norm1", _copy_ln(blk.norm1), h)
            rows = self._qkv_rows(heads, blk.attn.qkv.weight.device)
            y = b.module(f"{p}.attn.qkv", _rows_linear(blk.attn.qkv, rows), y)
            y = b.function(torch.unflatten, y, -1, (3, heads, self.head_dim))
            q, k, v = _split_qkv(b, y)
            y = b.function(F.scaled_dot_product_attention, q, k, v)
            y = b.function(torch.flatten, b.function(torch.transpose, y, 1, 2), 2)
            y = b.module(f"{p}.attn.proj", slice_linear(blk.attn.proj, self.embed_dim, inner), y)
            h = b.function(torch.add, h, y)
            y = b.module(f"{p}.norm2", _copy_ln(blk.norm2), h)
            y = b.module(f"{p}.mlp.fc1", slice_linear(blk.mlp.fc1, mlp, self.embed_dim), y)
            y = b.module(f"{p}.mlp.act", nn.GELU(), y)
            y = b.module(f"{p}.mlp.fc2", slice_linear(blk.mlp.fc2, self.embed_dim, mlp), y)
            h = b.function(torch.add, h, y)
        h = b.module("norm", _copy_ln(self.norm), h)
        h = b.function(operator.getitem, h, (slice(None), 0))
        h = b.module("head", slice_linear(self.head, self.num_classes, self.embed_dim), h)
        return b.build(h, class_name="PrunedVisionTransformer")

    # ------------------------------------------------------------------ cost
    def _macs(self, arch: Arch, input_size: tuple[int, ...]) -> int:
        if tuple(input_size) != (self.in_chans, *self.img_size):
            raise ValueError(f"vit: input_size must be {(self.in_chans, *self.img_size)} (the position embedding "
                             f"is fixed), got {tuple(input_size)}")  # fmt: skip
        dim, tok = self.embed_dim, self.num_tokens
        total = conv_macs(self.in_chans, dim, self.patch_size, self.grid, bias=True)
        for j in range(arch.depth[0]):
            inner, mlp = arch.widths[f"b{j}.heads"] * self.head_dim, arch.widths[f"b{j}.mlp"]
            total += 2 * norm_ops(tok * dim)
            total += linear_macs(tok, dim, 3 * inner) + linear_macs(tok, inner, dim)
            total += linear_macs(tok, dim, mlp) + _GELU_OPS * tok * mlp + linear_macs(tok, mlp, dim)
        return total + norm_ops(tok * dim) + linear_macs(1, dim, self.num_classes)

    def _params(self, arch: Arch) -> int:
        dim = self.embed_dim
        total = self.in_chans * dim * self.patch_size**2 + dim + dim + self.num_tokens * dim
        for j in range(arch.depth[0]):
            inner, mlp = arch.widths[f"b{j}.heads"] * self.head_dim, arch.widths[f"b{j}.mlp"]
            total += 4 * dim + (dim + 1) * 3 * inner + (inner + 1) * dim + (dim + 1) * mlp + (mlp + 1) * dim
        return total + 2 * dim + (dim + 1) * self.num_classes

    # ------------------------------------------------------------------ importance sort
    @torch.no_grad()
    def sort_channels(self) -> None:
        """One-time importance sort: order every block's heads by descending L1 norm of their q, k and v
        rows, and its MLP hidden units by the L1 norm of their fc1 rows, permuting the qkv rows (the
        same head order inside q, k and v), the proj input columns and fc1/fc2 consistently, so that a
        prefix keeps the most important ones.  The network function is unchanged."""
        d, dim = self.head_dim, self.embed_dim
        for blk in self.blocks:
            qkv, proj = blk.attn.qkv, blk.attn.proj
            score = qkv.weight.abs().reshape(3, self.num_heads, d, dim).sum((0, 2, 3))
            heads = score.argsort(descending=True)
            cols = (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()
            rows = torch.cat([cols + part * dim for part in range(3)])
            qkv.weight.copy_(qkv.weight[rows])
            qkv.bias.copy_(qkv.bias[rows])
            proj.weight.copy_(proj.weight[:, cols])
            order = l1_order(blk.mlp.fc1.weight)
            blk.mlp.fc1.weight.copy_(blk.mlp.fc1.weight[order])
            blk.mlp.fc1.bias.copy_(blk.mlp.fc1.bias[order])
            blk.mlp.fc2.weight.copy_(blk.mlp.fc2.weight[:, order])


def _split_qkv(b: PlainBuilder, qkv: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """[B, T, 3, h, d] -> q, k, v of shape [B, h, T, d]."""
    parts = b.function(torch.unbind, b.function(torch.permute, qkv, (2, 0, 3, 1, 4)), 0)
    return tuple(b.function(operator.getitem, parts, i) for i in range(3))


def _param(b: PlainBuilder, name: str, p: nn.Parameter) -> fx.Node:
    """A get_attr node for a copy of parameter ``p`` stored under ``name`` in the built module."""
    b.modules[name] = nn.Parameter(p.detach().clone())
    return b.graph.get_attr(name)


def _copy_ln(ln: nn.LayerNorm) -> nn.LayerNorm:
    new = nn.LayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine)
    new.load_state_dict(ln.state_dict())
    return new.to(ln.weight.device)


def _copy_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)  # fmt: skip
    new.load_state_dict(conv.state_dict())
    return new.to(conv.weight.device)


def _rows_linear(fc: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new Linear holding the output rows ``rows`` of ``fc`` (in that order)."""
    new = nn.Linear(fc.in_features, len(rows), fc.bias is not None)
    with torch.no_grad():
        new.weight.copy_(fc.weight[rows])
        if fc.bias is not None:
            new.bias.copy_(fc.bias[rows])
    return new.to(fc.weight.device)


def vit_tiny(num_classes: int, in_chans: int = 3, **kw) -> VisionTransformer:
    """ViT-Tiny / DeiT-Tiny (patch 16, dim 192, 12 blocks, 3 heads, MLP ratio 4) for 224x224 images;
    keywords (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, width_ratios, divisor)
    override the configuration."""
    return VisionTransformer(num_classes, in_chans, **kw)
