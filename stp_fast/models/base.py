"""What every stp_fast supernet shares: single-arch forward through the batched path, arch checks,
and which subnet owns the BatchNorm running statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stp_fast.arch.space import Arch, Space


class Supernet(nn.Module):
    """Base class. Subclasses set ``self.space`` and implement ``forward_many`` and ``extract``.

    * ``net(x)`` runs the full network; ``net(x, arch=a)`` runs subnet ``a``.
    * ``net.forward_many(x, archs)`` runs every arch on the same batch in one batched pass (each layer
      is one multi-subnet op over the archs that include it) and returns their logits in order.
    * In train mode each subnet's BatchNorm uses its own batch statistics; only the full network's
      pass (an arch equal to ``space.full()``) updates the running statistics.
    """

    space: Space
    # Run the convolutions channels-last on CPU tensors: oneDNN's fp32 kernels are faster there than
    # with NCHW, whose tensors it reorders around every call (a 3x3 16->16 conv at 32x32, B64, fwd+bwd
    # on 2 cores: 14 -> 4.4 ms; forward_many fwd+bwd of full + 4 subnets on one core: resnet20 ~20%,
    # resnet50 (width 1/4, 96px) 14%, wrn28 (widen 2) 16%, mobilenetv3 (width 1/2, 96px) 18%).
    # Set by the convnets; the logits are the same up to float rounding.
    cpu_channels_last: bool = False

    def forward(self, x: Tensor, arch: Arch | None = None) -> Tensor:
        return self.forward_many(x, [arch if arch is not None else self.space.full()])[0]

    def forward_many(self, x: Tensor, archs: Sequence[Arch]) -> list[Tensor]:
        raise NotImplementedError

    def extract(self, arch: Arch) -> nn.Module:
        raise NotImplementedError

    def _layout(self, x: Tensor) -> Tensor:
        """``x`` in the memory format the network computes in (see ``cpu_channels_last``)."""
        if self.cpu_channels_last and x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _run_blocks(self, stages, hs: list[Tensor], archs: Sequence[Arch], owner: int | None, block_many,
                    first: int = 0) -> list[Tensor]:  # fmt: skip
        """Run every block of ``stages`` once for the archs that keep it (the others pass through).

        ``block_many(block, xs, sub_archs, stage_number, block_index, stats)`` computes one block for a
        subset of the archs; ``stage_number`` counts from ``first`` (as in the model's group names)."""
        hs = list(hs)
        for i, stage in enumerate(stages):
            for j, block in enumerate(stage):
                members = active(archs, i, j)
                if members:
                    ys = block_many(block, [hs[m] for m in members], [archs[m] for m in members], i + first, j,
                                    owner_within(owner, members))  # fmt: skip
                    for m, y in zip(members, ys):
                        hs[m] = y
        return hs

    def _check_archs(self, x: Tensor, archs: Sequence[Arch]) -> tuple[list[Arch], int | None]:
        """Validated archs and the index of the one owning BN statistics (the first full arch)."""
        if not isinstance(archs, (list, tuple)) or not archs:
            raise ValueError("forward_many: archs must be a non-empty list of Arch")
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"forward: x must be a 4-D image batch [B, C, H, W], got {getattr(x, 'shape', x)}")
        archs = [self.space.validate(a) for a in archs]
        full = self.space.full()
        owner = next((i for i, a in enumerate(archs) if a == full), None)
        return archs, owner


def active(archs: Sequence[Arch], stage: int, block: int) -> list[int]:
    """Indices of the archs that keep block ``block`` of stage ``stage``."""
    return [i for i, a in enumerate(archs) if a.depth[stage] > block]


def owner_within(owner: int | None, members: Sequence[int]) -> int | None:
    """Position of the statistics owner inside a subset of the archs (None if it is not there)."""
    return members.index(owner) if owner is not None and owner in members else None


@torch.no_grad()
def l1_order(weight: Tensor) -> Tensor:
    """Output channels of ``weight`` by descending L1 norm (the one-time importance sort)."""
    return weight.abs().flatten(1).sum(1).argsort(descending=True)


def make_supernet(model: nn.Module, input_size: Sequence[int], *, channels_last: bool = True, **convert_kw):
    """A built-in model definition (plain PyTorch) made elastic by the drop-in engine, ``stp_fast.convert``:
    the same engine users' models go through.  ``input_size`` = (C, H, W) of the images; the example batch
    is drawn from a fixed generator (the caller's RNG is untouched).  Convnets run channels-last on the CPU."""
    from stp_fast.dropin import convert

    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    return convert(model, x, importance_sort=None, channels_last=channels_last, **convert_kw)
