"""Vision Transformer (ViT-Tiny, DeiT-Tiny configuration): a plain PyTorch definition with timm's parameter
names, made elastic by ``stp_fast.convert``.

Layout (Dosovitskiy et al. 2021; DeiT-Tiny, Touvron et al. 2021): a 16x16 patch-embedding conv to
``embed_dim`` = 192, a cls token and a learned position embedding, 12 pre-norm blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) with 3 heads and MLP ratio 4 (GELU), a final
LayerNorm and a linear head on the cls token.  Keywords ``img_size``, ``patch_size``, ``embed_dim``,
``depth``, ``num_heads`` and ``mlp_ratio`` give smaller configurations (the tests use 32x32 images).
Parameter names are timm's ``VisionTransformer`` names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{j}.attn.qkv`` -- one fused q|k|v Linear --, ``blocks.{j}.attn.proj``,
``blocks.{j}.mlp.fc1``, ``norm``, ``head``, ...), so a timm DeiT-Tiny state dict and
``extract(net, full).state_dict()`` both load into the supernet.

What the engine finds (``net.report()``; ALGORITHMS.md 2.1 and gotcha 2):
* depth: blocks kept, a prefix of the 12 (at least one; the patch embedding, cls token, position
  embedding, final norm and head are never dropped);
* heads per block (group ``blocks.{j}.attn.qkv``, counted in channels, in units of ``head_dim``: whole
  heads): the fused qkv projection keeps the q, k and v rows of the kept heads -- three row ranges of
  its [3D, D] weight (the attention reshapes with -1 heads, so any head count runs) -- and the output
  projection the matching input columns;
* MLP hidden width per block (group ``blocks.{j}.mlp.fc1``): fc1's rows and fc2's input columns.
The embed dim (the residual stream shared by every block, gotcha 3; it reaches the position
embedding and the cls token) is not pruned.

MACs follow :mod:`stp_fast.arch.counting` (Torch-Pruning's rules): conv/linear multiply-accumulates
plus bias adds, LayerNorm 2 ops per element, module activations only if counting.py lists them (it
does not list ``nn.GELU``; Torch-Pruning counts it at 1 op/element, at most 1/(2*embed_dim) of a
block's linear MACs, 0.2% for ViT-Tiny).  The attention matmuls (QK^T and AV, 2*T^2*h*d MACs per
block for T tokens, 179 M of ViT-Tiny's 1.25 G at 224x224) and the softmax are NOT included: they are
functional ops (``F.scaled_dot_product_attention``), which neither ``count_macs`` nor Torch-Pruning's
``count_ops_and_params`` counts (Torch-Pruning counts them only inside ``nn.MultiheadAttention`` or a
timm ``Attention`` module).  The numbers are the linear-layer MACs that pruning papers usually report
for ViTs' parameterised layers, not the full runtime cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.space import DEFAULT_WIDTH_RATIOS
from stp_fast.models.base import make_supernet


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's Attention (fused qkv); the head count is read from the qkv width (-1), so fewer heads run."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """The plain ViT; see the module docstring."""

    def __init__(self, num_classes: int, in_chans: int = 3, *, img_size: int | Sequence[int] = 224,
                 patch_size: int = 16, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(img) != 2 or img[0] % patch_size or img[1] % patch_size:
            raise ValueError(f"vit: img_size {img_size} must be divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"vit: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"vit: depth must be >= 1, got {depth}")
        self.img_size: tuple[int, int] = (img[0], img[1])
        num_tokens = (img[0] // patch_size) * (img[1] // patch_size) + 1
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, int(embed_dim * mlp_ratio)) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != self.img_size[0] or x.shape[-1] != self.img_size[1]:
            raise ValueError(f"vit: x is {x.shape[-2]}x{x.shape[-1]} but the network takes {self.img_size[0]}x"
                             f"{self.img_size[1]} images (the position embedding is fixed)")  # fmt: skip
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int, in_chans: int = 3, *, img_size: int | Sequence[int] | None = None, patch_size: int = 16,
             embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
             width_ratios: Sequence[float] = DEFAULT_WIDTH_RATIOS, divisor: int = 1,
             input_size: Sequence[int] | None = None):  # fmt: skip
    """ViT-Tiny / DeiT-Tiny (patch 16, dim 192, 12 blocks, 3 heads, MLP ratio 4) for 224x224 images;
    keywords (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, width_ratios, divisor)
    override the configuration.  ``input_size`` = (C, H, W) sets ``img_size`` when that is not given."""
    if img_size is None:
        img_size = tuple(input_size[1:]) if input_size is not None else 224
    model = VisionTransformer(num_classes, in_chans, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                              depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)  # fmt: skip
    size = (in_chans, *model.img_size)
    if input_size is not None and tuple(input_size) != size:
        raise ValueError(f"vit: input_size {tuple(input_size)} must be {size} (the position embedding is fixed)")
    return make_supernet(model, size, channels_last=False, width_ratios=width_ratios, divisor=divisor)
