"""``multi_subnet_linear``: S width-subnets of one linear layer in one op (one launch on the GPU).

Subnet s computes ``xs[s] @ weight[out_s][:, in_s].T + bias[out_s]`` with ``in_s`` the first
``xs[s].shape[-1]`` input features (or ``in_indices[s]``) and ``out_s`` the first ``out_widths[s]``
outputs (or ``out_indices[s]``).  The weight gradient sums every subnet's contribution into the
full-shaped gradient of the shared weight, deterministically.  One autograd node covers all S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from stp_fast.ops import _autocast, _backend, _multi
from stp_fast.ops._checks import check_device, check_float_tensor
from stp_fast.ops._family import add_block, like_param, register_family, triton_dtype_reasons
from stp_fast.ops._multi import (
    check_index_list,
    check_index_list_values,
    check_subnet_list,
    normalize_widths,
)
from stp_fast.ops.masked_linear import masked_linear_ref

OP = "multi_subnet_linear"


def _index(indices: Sequence[Tensor] | None, s: int) -> Tensor | None:
    return None if indices is None else indices[s]


def multi_subnet_linear_ref(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    out_widths: Sequence[int],
    in_indices: Sequence[Tensor] | None = None,
    out_indices: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Reference: one ``masked_linear_ref`` per subnet. Differentiable by autograd."""
    return [
        masked_linear_ref(x, weight, bias, _index(in_indices, s), _index(out_indices, s), out_widths[s])
        for s, x in enumerate(xs)
    ]


def _ref_forward(xs, weight, bias, out_widths, in_indices, out_indices):
    return multi_subnet_linear_ref(xs, weight, bias, out_widths, in_indices, out_indices)


def _ref_backward(grads, xs, weight, out_widths, in_indices, out_indices, need_x, need_w, need_b):
    gxs = [] if need_x else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = weight.new_zeros(weight.shape[0]) if need_b else None
    for s, (g, x) in enumerate(zip(grads, xs)):
        rows = out_indices[s] if out_indices is not None else out_widths[s]
        cols = in_indices[s] if in_indices is not None else x.shape[-1]
        w_c = weight.index_select(0, rows) if isinstance(rows, Tensor) else weight[:rows]
        w_c = w_c.index_select(1, cols) if isinstance(cols, Tensor) else w_c[:, :cols]
        if need_x:
            gxs.append(g @ w_c)
        if need_w:
            add_block(gw, g.T @ x, rows, cols)
        if need_b:
            add_block(gb, g.sum(0), rows, None)
    return gxs, gw, gb


register_family(OP, ref_forward=_ref_forward, ref_backward=_ref_backward, triton_reasons=triton_dtype_reasons)


def _check_static(xs, weight, bias, out_widths, in_indices, out_indices) -> None:
    check_subnet_list(xs, op=OP, ndim=None, what="[..., k_s]")
    check_float_tensor(weight, op=OP, arg="weight", dtype=xs[0].dtype)
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D [N, K], got {weight.dim()}-D of shape {tuple(weight.shape)}")
    device = xs[0].device
    check_device(weight, device, op=OP, arg="weight")
    n_full, k_full = weight.shape
    if bias is not None:
        check_float_tensor(bias, op=OP, arg="bias", dtype=xs[0].dtype)
        check_device(bias, device, op=OP, arg="bias")
        if bias.shape != (n_full,):
            raise ValueError(f"{OP}: bias must have shape ({n_full},) to match weight, got {tuple(bias.shape)}")
    normalize_widths(out_widths, None, len(xs), n_full, op=OP)
    widths_in = [x.shape[-1] for x in xs]
    for s, k in enumerate(widths_in):
        if k > k_full:
            raise ValueError(f"{OP}: xs[{s}] has {k} features but weight has only {k_full} input features")
    check_index_list(in_indices, len(xs), k_full, device, op=OP, arg="in_indices", lengths=widths_in)
    check_index_list(out_indices, len(xs), n_full, device, op=OP, arg="out_indices", lengths=out_widths)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# Explicit schemas: infer_schema cannot express an optional list of tensors (Tensor[]?).
@torch.library.custom_op(
    "stp_fast::multi_subnet_linear",
    mutates_args=(),
    schema="(Tensor[] xs, Tensor weight, Tensor? bias, SymInt[] out_widths, Tensor[]? in_indices, "
    "Tensor[]? out_indices) -> Tensor[]",
)
def _multi_subnet_linear_op(
    xs: list[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    out_widths: list[int],
    in_indices: Optional[list[Tensor]],
    out_indices: Optional[list[Tensor]],
) -> list[Tensor]:
    _check_static(xs, weight, bias, out_widths, in_indices, out_indices)
    check_index_list_values(in_indices, weight.shape[1], op=OP, arg="in_indices")
    check_index_list_values(out_indices, weight.shape[0], op=OP, arg="out_indices")
    x2 = [_rows(x) for x in xs]
    impl = _backend.pick(OP, weight.device.type, x2, weight, bias, out_widths, in_indices, out_indices)
    ys = impl.fns["forward"](x2, weight, bias, out_widths, in_indices, out_indices)
    return [y.reshape(*x.shape[:-1], n) for y, x, n in zip(ys, xs, out_widths)]


@_multi_subnet_linear_op.register_fake
def _(xs, weight, bias, out_widths, in_indices, out_indices):
    _check_static(xs, weight, bias, out_widths, in_indices, out_indices)
    return [x.new_empty(*x.shape[:-1], n) for x, n in zip(xs, out_widths)]


@torch.library.custom_op(
    "stp_fast::multi_subnet_linear_backward",
    mutates_args=(),
    schema="(Tensor[] grads, Tensor[] xs, Tensor weight, SymInt[] out_widths, Tensor[]? in_indices, "
    "Tensor[]? out_indices, bool need_x, bool need_weight, bool need_bias) -> (Tensor[], Tensor, Tensor)",
)
def _multi_subnet_linear_backward_op(
    grads: list[Tensor],
    xs: list[Tensor],
    weight: Tensor,
    out_widths: list[int],
    in_indices: Optional[list[Tensor]],
    out_indices: Optional[list[Tensor]],
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[list[Tensor], Tensor, Tensor]:
    x2, g2 = [_rows(x) for x in xs], [_rows(g) for g in grads]
    impl = _backend.pick(OP, weight.device.type, x2, weight, None, out_widths, in_indices, out_indices)
    gxs, gw, gb = impl.fns["backward"](g2, x2, weight, out_widths, in_indices, out_indices, need_x, need_weight,
                                       need_bias)  # fmt: skip
    empty = weight.new_empty(0)
    return (
        [gx.reshape(x.shape) for gx, x in zip(gxs, xs)] if need_x else [],
        like_param(gw, weight) if gw is not None else empty,
        gb if gb is not None else empty.clone(),
    )


@_multi_subnet_linear_backward_op.register_fake
def _(grads, xs, weight, out_widths, in_indices, out_indices, need_x, need_weight, need_bias):
    return (
        [x.new_empty(x.shape) for x in xs] if need_x else [],
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        weight.new_empty((weight.shape[0],) if need_bias else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    xs, weight, _bias, out_widths, in_indices, out_indices = inputs
    _multi.save_for_backward(ctx, xs, weight, in_indices, out_indices, out_widths)


def _backward(ctx, grads):
    xs, weight, in_indices, out_indices, out_widths = _multi.saved(ctx)
    need_x, need_w, need_b = _multi.needs(ctx)
    grads = [g if g is not None else x.new_zeros(*x.shape[:-1], n) for g, x, n in zip(grads, xs, out_widths)]
    gxs, gw, gb = _multi_subnet_linear_backward_op(
        grads, xs, weight, out_widths, in_indices, out_indices, need_x, need_w, need_b
    )
    return (
        gxs if need_x else [None] * len(xs),
        gw if need_w else None,
        gb if need_b else None,
        None,
        *_multi.index_grads(ctx),
    )


_multi_subnet_linear_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(torch.ops.stp_fast.multi_subnet_linear.default, "stp_fast::multi_subnet_linear")


def multi_subnet_linear(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    out_widths: Sequence[int] | None = None,
    *,
    in_indices: Sequence[Tensor] | None = None,
    out_indices: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Run S width-subnets of one linear layer together.

    Args:
        xs: S tensors, ``xs[s]`` of shape (..., k_s) holding subnet s's active input features (the
            first k_s, or ``in_indices[s]``).  Leading shapes may differ between subnets.
        weight: (N, K) shared weight; bias: (N,) or None.
        out_widths: S ints, subnet s's output width (default: the lengths of ``out_indices``, or N).
        in_indices / out_indices: None (prefixes, the fast path) or S sorted unique int64 tensors.
    Returns:
        S tensors, output s of shape (..., out_widths[s]).  One autograd node; the gradients of
        weight and bias sum over the subnets.  Under ``torch.autocast`` it behaves like ``F.linear``
        (inputs cast to the autocast dtype, fp32 weights get fp32 gradients).
    """
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{OP}: xs must be a list of tensors, got {type(xs).__name__}")
    check_float_tensor(weight, op=OP, arg="weight")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D [N, K], got {weight.dim()}-D of shape {tuple(weight.shape)}")
    widths = normalize_widths(out_widths, out_indices, len(xs), weight.shape[0], op=OP)
    xs, weight, bias = _autocast.inputs(weight.device.type, list(xs), weight, bias)
    return _multi_subnet_linear_op(
        xs, weight, bias, widths,
        None if in_indices is None else list(in_indices),
        None if out_indices is None else list(out_indices),
    )  # fmt: skip
