"""``masked_linear``: a linear layer restricted to active input and output channels.

``y = x @ weight[out_index][:, in_index].T + bias[out_index]`` where ``x`` holds only the active
input features.  The fast backends never materialise the sliced weight: the C++ CPU kernel reads a
prefix as a strided view (index lists are packed once with a parallel gather), the Triton and CUDA
kernels gather the active rows/columns inside the GEMM.  The weight gradient has the full shape of
``weight`` and is exactly zero at pruned positions, so an optimizer sees the usual parameter.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from stp_fast.ops import _autocast, _backend
from stp_fast.ops._checks import (
    check_device,
    check_float_tensor,
    check_index_static,
    check_index_values,
    normalize_index,
)
from stp_fast.ops._family import like_param, put_block, register_family, take_block, triton_dtype_reasons

OP = "masked_linear"


def masked_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    in_index: Tensor | None = None,
    out_index: Tensor | None = None,
    out_width: int | None = None,
) -> Tensor:
    """Reference: slice the weight explicitly, then ``F.linear``. Differentiable by autograd.

    Args:
        x: (..., k) active input features.
        weight: (N, K); bias: (N,) or None.
        in_index: (k,) int64 sorted unique, or None for the first k = x.shape[-1] inputs.
        out_index: (n,) int64 sorted unique, or None for the first ``out_width`` outputs (all by default).
    Returns:
        (..., n) in the dtype of x.
    """
    w = (
        weight.index_select(0, out_index)
        if out_index is not None
        else weight[: weight.shape[0] if out_width is None else out_width]
    )
    w = w.index_select(1, in_index) if in_index is not None else w[:, : x.shape[-1]]
    b = None
    if bias is not None:
        b = bias.index_select(0, out_index) if out_index is not None else bias[: w.shape[0]]
    return F.linear(x, w, b)


def _ref_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, in_index, out_index, out_width: int) -> Tensor:
    return masked_linear_ref(x2, weight, bias, in_index, out_index, out_width)


def _ref_backward(g2, x2, weight, in_index, out_index, out_width, need_x, need_w, need_b):
    rows = out_index if out_index is not None else out_width
    cols = in_index if in_index is not None else x2.shape[-1]
    gx = g2 @ take_block(weight, rows, cols) if need_x else None
    gw = put_block(weight, g2.T @ x2, rows, cols) if need_w else None
    gb = put_block(weight.new_empty(weight.shape[0]), g2.sum(0), rows, None) if need_b else None
    return gx, gw, gb


register_family(OP, ref_forward=_ref_forward, ref_backward=_ref_backward, triton_reasons=triton_dtype_reasons)


def _check_static(x, weight, bias, in_index, out_index, out_width) -> None:
    check_float_tensor(x, op=OP, arg="x")
    check_float_tensor(weight, op=OP, arg="weight", dtype=x.dtype)
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D [N, K], got {weight.dim()}-D of shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension [..., k]")
    n_full, k_full = weight.shape
    for t, arg in ((weight, "weight"), (bias, "bias"), (in_index, "in_index"), (out_index, "out_index")):
        check_device(t, x.device, op=OP, arg=arg)
    if bias is not None:
        check_float_tensor(bias, op=OP, arg="bias", dtype=x.dtype)
        if bias.shape != (n_full,):
            raise ValueError(f"{OP}: bias must have shape ({n_full},) to match weight, got {tuple(bias.shape)}")
    k = x.shape[-1]
    if in_index is not None:
        check_index_static(in_index, k_full, op=OP, arg="in_index")
        if in_index.shape[0] != k:
            raise ValueError(f"{OP}: x has {k} features but in_index has {in_index.shape[0]} entries")
    elif k > k_full:
        raise ValueError(f"{OP}: x has {k} features but weight has only {k_full} input features")
    if out_index is not None:
        check_index_static(out_index, n_full, op=OP, arg="out_index")
        if out_index.shape[0] != out_width:
            raise ValueError(f"{OP}: out_width={out_width} but out_index has {out_index.shape[0]} entries")
    elif not 0 <= out_width <= n_full:
        raise ValueError(f"{OP}: out_width={out_width} must lie in [0, {n_full}]")


def _rows(t: Tensor) -> Tensor:
    """(..., c) -> (M, c), also for M = 0 or c = 0 (where reshape(-1, c) is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _check_values(weight, in_index, out_index) -> None:
    if in_index is not None:
        check_index_values(in_index, weight.shape[1], op=OP, arg="in_index")
    if out_index is not None:
        check_index_values(out_index, weight.shape[0], op=OP, arg="out_index")


# Explicit schemas: SymInt widths, so torch.compile with dynamic shapes does not specialise on them.
@torch.library.custom_op(
    "stp_fast::masked_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, Tensor? out_index, SymInt out_width) -> Tensor",
)
def _masked_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    in_index: Optional[Tensor],
    out_index: Optional[Tensor],
    out_width: int,
) -> Tensor:
    _check_static(x, weight, bias, in_index, out_index, out_width)
    _check_values(weight, in_index, out_index)
    x2 = _rows(x)
    impl = _backend.pick(OP, x.device.type, x2, weight, bias, in_index, out_index, out_width)
    y2 = impl.fns["forward"](x2, weight, bias, in_index, out_index, out_width)
    return y2.reshape(*x.shape[:-1], out_width)


@_masked_linear_op.register_fake
def _(x, weight, bias, in_index, out_index, out_width):
    _check_static(x, weight, bias, in_index, out_index, out_width)
    return x.new_empty(*x.shape[:-1], out_width)


@torch.library.custom_op(
    "stp_fast::masked_linear_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor? in_index, Tensor? out_index, SymInt out_width, "
    "bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)",
)
def _masked_linear_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    in_index: Optional[Tensor],
    out_index: Optional[Tensor],
    out_width: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    x2, g2 = _rows(x), _rows(grad_out)
    impl = _backend.pick(OP, x.device.type, x2, weight, None, in_index, out_index, out_width)
    gx, gw, gb = impl.fns["backward"](g2, x2, weight, in_index, out_index, out_width, need_x, need_weight, need_bias)
    empty = x.new_empty(0)
    return (
        gx.reshape(x.shape) if gx is not None else empty,
        like_param(gw, weight) if gw is not None else empty.clone(),
        gb if gb is not None else empty.clone(),
    )


@_masked_linear_backward_op.register_fake
def _(grad_out, x, weight, in_index, out_index, out_width, need_x, need_weight, need_bias):
    return (
        x.new_empty(x.shape if need_x else (0,)),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
        weight.new_empty((weight.shape[0],) if need_bias else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, in_index, out_index, out_width = inputs
    ctx.save_for_backward(x, weight, in_index, out_index)
    ctx.out_width = out_width


def _backward(ctx, grad_out):
    x, weight, in_index, out_index = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = _masked_linear_backward_op(
        grad_out, x, weight, in_index, out_index, ctx.out_width, need_x, need_w, need_b
    )
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None)


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(torch.ops.stp_fast.masked_linear.default, "stp_fast::masked_linear")


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    in_index: Tensor | int | None = None,
    out_index: Tensor | int | None = None,
) -> Tensor:
    """Linear layer over active channels: ``x @ weight[out_index][:, in_index].T + bias[out_index]``.

    Args:
        x: (..., k) float tensor holding only the active input features.
        weight: (N, K) full weight, same dtype and device as x.
        bias: (N,) or None.
        in_index: the k active input features: a sorted unique int64 tensor, an int k (the first
            k features) or None (all K; then k must equal K).
        out_index: the n active outputs, in the same three forms (None: all N).
    Returns:
        (..., n) tensor.  Saved for backward: x, weight and the index tensors (no sliced copies).
        Under ``torch.autocast`` it behaves like ``F.linear`` (inputs cast to the autocast dtype, fp32
        accumulation, the output in that dtype, fp32 weights get fp32 gradients).
    Raises:
        TypeError / ValueError naming the argument on wrong dtypes, devices, shapes or indices.
    """
    check_float_tensor(x, op=OP, arg="x")
    check_float_tensor(weight, op=OP, arg="weight")
    x, weight, bias = _autocast.inputs(x.device.type, x, weight, bias)
    check_float_tensor(weight, op=OP, arg="weight", dtype=x.dtype)
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D [N, K], got {weight.dim()}-D of shape {tuple(weight.shape)}")
    in_idx, k = normalize_index(in_index, weight.shape[1], op=OP, arg="in_index")
    out_idx, n = normalize_index(out_index, weight.shape[0], op=OP, arg="out_index")
    if x.dim() >= 1 and x.shape[-1] != k:
        what = "in_index selects" if in_index is not None else "weight has"
        raise ValueError(f"{OP}: x has {x.shape[-1]} features but {what} {k} input features")
    return _masked_linear_op(x, weight, bias, in_idx, out_idx, n)
