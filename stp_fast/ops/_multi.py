"""Argument handling shared by the multi-subnet ops (S subnets of one layer, one shared weight).

Subnet s reads the first ``k_s`` input channels (or ``in_indices[s]``) and writes ``out_widths[s]``
output channels (the first ones, or ``out_indices[s]``).  Index lists are all-or-nothing per side:
either every subnet gives one, or every subnet uses prefixes (the fast path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stp_fast.ops._checks import check_device, check_float_tensor, check_index_static, check_index_values


def check_subnet_list(xs: Sequence[Tensor], *, op: str, ndim: int | None, what: str) -> None:
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{op}: xs must be a list of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{op}: xs is empty; give at least one subnet input")
    for s, x in enumerate(xs):
        check_float_tensor(x, op=op, arg=f"xs[{s}]", dtype=xs[0].dtype if s else None)
        check_device(x, xs[0].device, op=op, arg=f"xs[{s}]")
        if (ndim is not None and x.dim() != ndim) or x.dim() < 1:
            raise ValueError(f"{op}: xs[{s}] must be {what}, got shape {tuple(x.shape)}")


def normalize_widths(
    out_widths: Sequence[int] | None, out_indices: Sequence[Tensor] | None, count: int, full: int, *, op: str
) -> list[int]:
    """Output widths per subnet: given, or the lengths of out_indices, or all ``full`` channels."""
    if out_widths is None:
        return [int(t.shape[0]) for t in out_indices] if out_indices is not None else [full] * count
    if not isinstance(out_widths, (list, tuple)) or not all(
        isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in out_widths
    ):
        raise TypeError(f"{op}: out_widths must be a list of ints, got {out_widths!r}")
    if len(out_widths) != count:
        raise ValueError(f"{op}: out_widths has {len(out_widths)} entries but xs has {count} subnets")
    for s, w in enumerate(out_widths):
        if not 0 <= w <= full:
            raise ValueError(f"{op}: out_widths[{s}]={w} must lie in [0, {full}] (the layer's width)")
    return list(out_widths)


def check_index_list(
    indices: Sequence[Tensor] | None, count: int, dim: int, device, *, op: str, arg: str, lengths: Sequence[int]
) -> None:
    """Static checks of a per-subnet index list (None = prefixes)."""
    if indices is None:
        return
    if not isinstance(indices, (list, tuple)):
        raise TypeError(f"{op}: {arg} must be None or a list of int64 tensors, got {type(indices).__name__}")
    if len(indices) != count:
        raise ValueError(f"{op}: {arg} has {len(indices)} entries but xs has {count} subnets")
    for s, (idx, length) in enumerate(zip(indices, lengths)):
        if not isinstance(idx, Tensor):
            raise TypeError(f"{op}: {arg}[{s}] must be an int64 tensor, got {type(idx).__name__}")
        check_index_static(idx, dim, op=op, arg=f"{arg}[{s}]")
        check_device(idx, device, op=op, arg=f"{arg}[{s}]")
        if idx.shape[0] != length:
            raise ValueError(f"{op}: {arg}[{s}] has {idx.shape[0]} entries but subnet {s} has width {length}")


def check_index_list_values(indices: Sequence[Tensor] | None, dim: int, *, op: str, arg: str) -> None:
    for s, idx in enumerate(indices or ()):
        check_index_values(idx, dim, op=op, arg=f"{arg}[{s}]")


def save_for_backward(ctx, xs, weight, in_indices, out_indices, out_widths) -> None:
    """Save a multi-subnet op's tensors (no copies) and its list structure on ``ctx``."""
    ctx.save_for_backward(*xs, weight, *(in_indices or ()), *(out_indices or ()))
    ctx.subnets = (len(xs), list(out_widths), in_indices is not None, out_indices is not None)


def saved(ctx):
    """(xs, weight, in_indices, out_indices, out_widths) as saved by :func:`save_for_backward`."""
    count, out_widths, has_in, has_out = ctx.subnets
    tensors = ctx.saved_tensors
    xs, weight, rest = list(tensors[:count]), tensors[count], tensors[count + 1 :]
    in_indices = list(rest[:count]) if has_in else None
    out_indices = list(rest[count if has_in else 0 :][:count]) if has_out else None
    return xs, weight, in_indices, out_indices, out_widths


def needs(ctx) -> tuple[bool, bool, bool]:
    """(need grad of any xs, of weight, of bias) from ``ctx.needs_input_grad``."""
    need_xs, need_w, need_b = ctx.needs_input_grad[:3]
    need_x = any(need_xs) if isinstance(need_xs, (list, tuple)) else bool(need_xs)
    return need_x, bool(need_w), bool(need_b)


def index_grads(ctx) -> tuple[list | None, list | None]:
    """Backward's "no gradient" entries for the index lists: one None per index tensor."""
    count, _, has_in, has_out = ctx.subnets
    return ([None] * count if has_in else None), ([None] * count if has_out else None)
