"""The one-time importance sort: each elastic group's channels ordered by importance, strongest first,
so that the prefix a subnet keeps holds the strongest channels of pretrained weights.

Score of a group channel = the sum over the group's producers (the Conv/Linear layers whose output
channels it is) of the L1 norm of that channel's filter (``"l1"``; ``"l2"`` uses the L2 norm).  Groups
whose channels move in units (attention heads) are ordered unit by unit.  The permutation is applied to
every member along its dimension -- producers' outputs, BatchNorm/LayerNorm parameters and statistics,
consumers' inputs, depthwise filters -- so the network computes the same function (``convert`` checks
it).  Sorting twice changes nothing: the second sort's order is the identity (stable sort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stp_fast.dropin import elastic
from stp_fast.dropin.groups import Group

CRITERIA = ("l1", "l2")


def _filter_norm(weight: Tensor, positions: Tensor, p: int) -> Tensor:
    w = weight.detach().index_select(0, positions).float().flatten(1)
    return w.abs().sum(1) if p == 1 else w.pow(2).sum(1).sqrt()


@torch.no_grad()
def group_scores(modules: dict[str, nn.Module], group: Group, criterion: str | Callable = "l1") -> Tensor:
    """Importance of the group's channels 0..C-1 (higher = more important)."""
    if callable(criterion):
        return torch.as_tensor(criterion(modules, group), dtype=torch.float32)
    p = 1 if criterion == "l1" else 2
    score = torch.zeros(group.size)
    for m in group.members:
        mod = modules[m.module]
        if m.dim == "out" and isinstance(mod, (nn.Conv2d, nn.Conv1d, nn.Linear)) and not elastic._depthwise(mod):
            score += _filter_norm(mod.weight, torch.as_tensor(m.positions), p).cpu()
    if not score.any():  # no producer (e.g. only depthwise/norm members): order by the norms' |gamma|
        for m in group.members:
            w = getattr(modules[m.module], "weight", None)
            if isinstance(w, Tensor) and w.dim() == 1:
                score += w.detach().abs().float().cpu()[torch.as_tensor(m.positions)]
    return score


def order(score: Tensor, unit: int) -> Tensor:
    """Channel order by descending score, in whole units (stable: ties keep their order)."""
    if unit > 1:
        units = score.view(-1, unit).sum(1).argsort(descending=True, stable=True)
        return (units.view(-1, 1) * unit + torch.arange(unit)).flatten()
    return score.argsort(descending=True, stable=True)


def _permute(t: Tensor | None, dim: int, positions: Tensor, perm: Tensor) -> None:
    if t is None:
        return
    pos = positions.to(t.device)
    src = t.detach().index_select(dim, pos.index_select(0, perm.to(t.device)))
    t.data.index_copy_(dim, pos, src)


@torch.no_grad()
def apply_order(modules: dict[str, nn.Module], group: Group, perm: Tensor) -> None:
    """Permute every member of ``group`` so that group channel ``perm[j]`` becomes channel ``j``."""
    for m in group.members:
        mod = modules[m.module]
        pos = torch.as_tensor(m.positions)
        tensors = {**dict(mod.named_parameters(recurse=False)), **dict(mod.named_buffers(recurse=False))}
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            if m.dim == "out":
                _permute(tensors.get("weight"), 0, pos, perm)
                _permute(tensors.get("bias"), 0, pos, perm)
            else:
                _permute(tensors.get("weight"), 1, pos, perm)
        else:
            for name, t in tensors.items():
                if name != "num_batches_tracked" and t is not None and t.dim() >= 1:
                    _permute(t, t.dim() - 1 if t.dim() > 1 else 0, pos, perm)


def sort_groups(model: nn.Module, groups: Sequence[Group], criterion: str | Callable = "l1") -> None:
    """Sort every group of ``groups`` by importance (see the module docstring)."""
    if not callable(criterion) and criterion not in CRITERIA:
        raise ValueError(f"importance must be one of {CRITERIA}, a callable or None, got {criterion!r}")
    modules = dict(model.named_modules())
    for g in groups:
        apply_order(modules, g, order(group_scores(modules, g, criterion), g.unit))
