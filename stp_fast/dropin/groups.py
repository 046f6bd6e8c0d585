"""Width: the model's coupled channel groups, from Torch-Pruning's dependency graph.

Torch-Pruning (``torch_pruning.DependencyGraph``, pinned in the dependencies) traces the model through
autograd and finds every set of channels that must shrink together: a layer's outputs with its
BatchNorm and its consumers' inputs, channels tied by residual additions, depthwise convolutions,
concatenations (with their index offsets), attention q/k/v/o projections, flattening.  We keep its
coupling and map each group to *members*: ``(module, "out" | "in", positions)`` where positions are
the member's channel indices of the group's channels 0..C-1.  A group that touches something no
elastic layer can serve (an unwrapped parameter, a non-depthwise grouped convolution, a custom
layer) is kept at full width and the reason is recorded.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from stp_fast.dropin import elastic

HEAD_ATTRS = ("head_dim", "attention_head_size", "head_size", "dim_head")
NUM_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "heads")


@dataclass
class Member:
    module: str
    dim: str  # "out" | "in"
    positions: list[int]


@dataclass
class Group:
    """One coupled channel group.  ``unit``: channels move in multiples of it (attention heads,
    GroupNorm groups); ``frozen``: why the group stays at full width (None: elastic); ``summed``: whether
    the coupling adds channels of several tensors (a residual stream) -- False when the traced group only
    multiplies them (squeeze-excitation, gated MLPs); declared groups assume it."""

    name: str
    size: int
    members: list[Member]
    unit: int = 1
    frozen: str | None = None
    params: list[str] = field(default_factory=list)
    summed: bool = True

    def modules(self) -> list[str]:
        return sorted({m.module for m in self.members})


def _positions(idxs) -> list[int]:
    """Member positions of the group's channels 0..C-1 (Torch-Pruning's HybridIndex carries both)."""
    items = list(idxs)
    if items and hasattr(items[0], "root_idx"):
        pos = [0] * len(items)
        for it in items:
            pos[int(it.root_idx)] = int(it.idx)
        return pos
    return [int(i) for i in items]


def trace(model: nn.Module, args: tuple, kwargs: Mapping, output: Callable) -> list[Group]:
    """The channel groups of ``model`` rooted at its Conv/Linear outputs (see the module docstring)."""
    import torch_pruning as tp

    was_training = model.training
    dg = tp.DependencyGraph()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        dg.build_dependency(model, example_inputs=args, forward_fn=lambda m, _: m(*args, **kwargs),
                            output_transform=output, verbose=False)  # fmt: skip
    model.train(was_training)  # Torch-Pruning leaves the model in eval mode
    names = {m: n for n, m in model.named_modules()}
    groups: list[Group] = []
    for tp_group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Conv1d, nn.Linear)):
        members, params, frozen = [], [], None
        size, summed = None, False
        for dep, idxs in tp_group:
            target = dep.target.module
            summed = summed or str(getattr(target, "_grad_fn", "")).startswith(("AddBackward", "SubBackward"))
            pos = _positions(idxs)
            if isinstance(target, nn.Parameter):
                params.append(dg._param_to_name.get(target, "parameter"))
                frozen = frozen or f"it reaches the unwrapped parameter {params[-1]!r}"
                continue
            name = names.get(target)
            if name is None or not any(True for _ in target.parameters(recurse=False)):
                continue  # an operation (add, cat, view, ...) or a parameter-free module (ReLU, pooling)
            why = elastic.supported(target)
            if why is not None:
                frozen = frozen or f"{name}: {why}"
                continue
            dim = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            if not isinstance(target, (nn.Conv2d, nn.Conv1d, nn.Linear)):
                dim = "out"  # norms: their one channel dimension
            elif dim == "in" and elastic._depthwise(target):
                dim = "out"
            if any(m.module == name and m.dim == dim for m in members):
                continue
            members.append(Member(name, dim, pos))
            if size is None:
                size = len(pos)
        if not members:
            continue
        members, size = _split_fused(tp_group, members, size)
        root = members[0].module
        group = Group(root, size, members, frozen=frozen, params=params, summed=summed)
        group.unit = _unit(model, group)
        groups.append(group)
    return groups


def _split_fused(tp_group, members: list[Member], size: int) -> tuple[list[Member], int]:
    """A projection fused along its output and split evenly before its consumers (timm's qkv: one Linear
    of 3*D outputs, reshaped to [3, heads, head_dim] and unbound; a GLU's two halves, chunked): Torch-Pruning's
    group numbers the k*D fused outputs while the consumers have D.  Each fused member (an output dimension
    of k*D channels) becomes k members, part p holding channels p*D..(p+1)*D-1, so that group channel i is
    channel i of every part -- q, k and v of the same head move together.  Other groups: unchanged."""
    import torch_pruning as tp

    lengths = {len(m.positions) for m in members}
    for dep, _ in tp_group:
        op = dep.target.module
        offsets = getattr(op, "offsets", None) if isinstance(op, (tp.ops._UnbindOp, tp.ops._SplitOp)) else None
        if not offsets or len(offsets) < 3 or len({b - a for a, b in itertools.pairwise(offsets)}) != 1:
            continue
        k, d = len(offsets) - 1, offsets[1] - offsets[0]
        fused = [m for m in members if len(m.positions) == k * d]
        if fused and lengths <= {d, k * d} and all(m.dim == "out" for m in fused):
            out = []
            for m in members:
                parts = range(k) if len(m.positions) == k * d else [None]
                out += [m if p is None else Member(m.module, m.dim, m.positions[p * d : (p + 1) * d]) for p in parts]
            return out, d
    return members, size


def _unit(model: nn.Module, group: Group) -> int:
    """Channel granularity: whole attention heads when the group's producers are sibling projections
    of a module that names its head size, whole groups of a GroupNorm member."""
    modules = dict(model.named_modules())
    unit = 1
    producers = [m.module for m in group.members if m.dim == "out" and isinstance(modules[m.module], nn.Linear)]
    parents = {p.rpartition(".")[0] for p in producers}
    if len(producers) >= 2 and len(parents) == 1:
        parent = modules.get(parents.pop(), None)
        head = _head_dim(parent, group.size) if parent is not None else None
        if head:
            unit = head
    for m in group.members:
        mod = modules[m.module]
        if isinstance(mod, nn.GroupNorm):
            unit = _lcm(unit, mod.num_groups)
    return unit


def _head_dim(module: nn.Module, size: int) -> int | None:
    for attr in HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0 and size % v == 0:
            return v
    for attr in NUM_HEAD_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0 and size % v == 0:
            return size // v
    return None


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)
