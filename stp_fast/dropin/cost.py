"""Exact MACs and parameter counts of any arch of a converted model, without running it.

``count_macs`` (``stp_fast.arch.counting``) counts, per leaf-module call, ``c0*d0*d1 + c1*d0`` with
two dimensions ``d0, d1`` (conv: output channels and input channels per group; linear: output and
input features; norms, activations and pooling: the elements they touch) and constants (positions
times kernel taps, rows, 1 or 2).  Every such dimension is an affine function of the channel-group
widths -- a concatenation adds widths, a flatten multiplies one by the spatial size -- so one probing
pass with all groups full plus one pass per group (that group shrunk) give the slope of every
dimension in every group.  A call counts when every skippable block around it is kept.  ``macs(arch)``
is then a few numpy products (the pool calls it thousands of times); ``check`` compares it with real
counting of random archs at conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from stp_fast.arch.counting import _ELEMENTWISE, _NORM, _POOL


@dataclass
class Record:
    """One counted term: ``c0*d0*d1 + c1*d0 + c2``; ``blocks``: the skippable blocks around it."""

    key: str
    blocks: tuple[str, ...]
    c0: int
    c1: int
    c2: int
    d0: int
    d1: int


def call_record(module: nn.Module, inputs: tuple, output) -> tuple[int, int, int, int, int] | None:
    """``(c0, c1, c2, d0, d1)`` of one module call under ``count_macs``'s rules (None: not counted).
    Reads the module's size attributes, which are the active arch's on elastic modules."""
    x = inputs[0] if inputs else None
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        positions = output.shape[0] * output.shape[2] * output.shape[3]
        return positions * kh * kw, positions if module.bias is not None else 0, 0, module.out_channels, \
            module.in_channels // module.groups  # fmt: skip
    if isinstance(module, nn.Linear):
        rows = x.numel() // x.shape[-1]
        return rows, 1 if module.bias is not None else 0, 0, module.out_features, module.in_features
    if isinstance(module, _NORM):
        return 0, 2 if getattr(module, "affine", True) else 1, 0, x.numel(), 1
    if isinstance(module, nn.LayerNorm):
        return 0, 2 if module.elementwise_affine else 1, 0, x.numel(), 1
    if isinstance(module, _ELEMENTWISE):
        return 0, 1, 0, output.numel(), 1
    if isinstance(module, _POOL):
        return 0, 1, 0, x.numel(), 1
    return None


def param_record(module: nn.Module) -> tuple[int, int, int, int, int]:
    """``(c0, c1, c2, d0, d1)`` of the parameters ``module`` owns (active arch's sizes)."""
    own = dict(module.named_parameters(recurse=False))
    bias = 1 if own.get("bias") is not None else 0
    if isinstance(module, nn.modules.conv._ConvNd) and "weight" in own:
        k = int(np.prod(module.kernel_size))
        return k, bias, 0, module.out_channels, module.in_channels // module.groups
    if isinstance(module, nn.Linear) and "weight" in own:
        return 1, bias, 0, module.out_features, module.in_features
    if isinstance(module, (*_NORM, nn.LayerNorm)) and own:
        width = module.weight.shape[-1] if own.get("weight") is not None else module.bias.shape[-1]
        extra = sum(p.numel() for n, p in own.items() if n not in ("weight", "bias"))
        return 0, sum(1 for n in ("weight", "bias") if own.get(n) is not None), extra, width, 1
    return 0, 0, sum(p.numel() for p in own.values()), 0, 0


class CostModel:
    """MACs and parameters as functions of group widths and dropped blocks.

    ``probe(widths)`` runs the model once with ``widths`` (a partial map; missing groups full) and
    returns ``(calls, params)``, lists of :class:`Record` in a fixed order.  ``shrunk[g]`` is the
    width group ``g`` is probed at (below its full size ``groups[g]``)."""

    def __init__(self, probe: Callable[[Mapping[str, int]], tuple[list[Record], list[Record]]],
                 groups: Mapping[str, int], shrunk: Mapping[str, int], blocks: Sequence[str]) -> None:  # fmt: skip
        self.names = list(groups)
        self.full = np.array([groups[g] for g in self.names], dtype=np.int64)
        self.blocks = {b: i for i, b in enumerate(blocks)}
        base_calls, base_params = probe({})
        probes = [probe({g: shrunk[g]}) for g in self.names]  # one pass per group gives both tables
        self.calls = self._table(base_calls, [p[0] for p in probes], shrunk, "calls")
        self.params = self._table(base_params, [p[1] for p in probes], shrunk, "params")

    def _table(self, base: list[Record], probes: list[list[Record]], shrunk: Mapping[str, int], what: str) -> dict:
        n, g = len(base), len(self.names)
        c = np.array([[r.c0, r.c1, r.c2] for r in base], dtype=np.int64).reshape(n, 3)
        d = np.array([[r.d0, r.d1] for r in base], dtype=np.int64).reshape(n, 2)
        slope = np.zeros((2, n, g), dtype=np.int64)
        for j, (name, recs) in enumerate(zip(self.names, probes)):
            if [r.key for r in recs] != [r.key for r in base]:
                raise RuntimeError(f"stp_fast.convert: the model runs other layers when group {name!r} shrinks; its "
                                   "control flow depends on the widths, which the cost model cannot follow")  # fmt: skip
            delta = self.full[j] - shrunk[name]
            for i, (r, b) in enumerate(zip(recs, base)):
                for k, (dv, bv) in enumerate(((r.d0, b.d0), (r.d1, b.d1))):
                    if (bv - dv) % delta:
                        raise RuntimeError(f"stp_fast.convert: {what} of {b.key} do not scale linearly with the width "
                                           f"of group {name!r}")  # fmt: skip
                    slope[k, i, j] = (bv - dv) // delta
        member = np.zeros((n, max(1, len(self.blocks))), dtype=np.int64)
        for i, r in enumerate(base):
            for blk in r.blocks:
                member[i, self.blocks[blk]] = 1
        return {"c": c, "d": d, "slope": slope, "member": member}

    def _eval(self, table: dict, widths: Mapping[str, int], dropped: Sequence[str]) -> int:
        shrink = self.full - np.array([widths[g] for g in self.names], dtype=np.int64) if self.names else \
            np.zeros(0, dtype=np.int64)  # fmt: skip
        d0 = table["d"][:, 0] - table["slope"][0] @ shrink
        d1 = table["d"][:, 1] - table["slope"][1] @ shrink
        c = table["c"]
        terms = c[:, 0] * d0 * d1 + c[:, 1] * d0 + c[:, 2]
        if dropped:
            off = np.zeros(table["member"].shape[1], dtype=np.int64)
            off[[self.blocks[b] for b in dropped]] = 1
            terms = terms * ((table["member"] @ off) == 0)
        return int(terms.sum())

    def macs(self, widths: Mapping[str, int], dropped: Sequence[str] = ()) -> int:
        return self._eval(self.calls, widths, dropped)

    def count_params(self, widths: Mapping[str, int], dropped: Sequence[str] = ()) -> int:
        return self._eval(self.params, widths, dropped)
