"""``masked_conv2d``: a 2-D convolution restricted to active input and output channels.

``y = conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding, dilation, groups)``
where ``x`` holds only the active input channels.  The fast backends never build the sliced weight
on the GPU (the Triton/CUDA implicit GEMMs gather it inside the kernel); on the CPU the C++ kernel
uses a strided view for prefixes and a parallel gather for index lists, then oneDNN.  Gradients of
weight and bias have their full shapes, exactly zero at pruned positions.

Groups: ``groups=1``; depthwise (weight ``[C, 1, kh, kw]``, ``groups`` = the number of active
channels, ``in_index`` equal to ``out_index``); or any ``groups`` with all channels active.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    check_same_index,
    normalize_index,
)
from stp_fast.ops._family import like_param, put_block, register_family, take_block, triton_dtype_reasons

OP = "masked_conv2d"


def pair(value: int | Sequence[int], name: str, *, op: str, minimum: int) -> list[int]:
    """``value`` as a list of two ints >= ``minimum`` (stride/dilation: 1, padding: 0)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got bool")
    vals = [value, value] if isinstance(value, int) else list(value)
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return vals


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _block_args(weight, x, in_index, out_index, out_width, groups):
    """(rows, cols, groups of the compact conv) selecting the active weight block."""
    n = weight.shape[0] if out_width is None else out_width
    rows = out_index if out_index is not None else n
    if groups > 1:  # depthwise over the active channels, or a full grouped conv: dim 1 stays whole
        return rows, None, groups
    return rows, (in_index if in_index is not None else x.shape[1]), 1


def masked_conv2d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    in_index: Tensor | None = None,
    out_index: Tensor | None = None,
    out_width: int | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> Tensor:
    """Reference: slice the weight explicitly, then ``F.conv2d``. Differentiable by autograd.

    Args:
        x: (B, k, H, W) active input channels; weight: (C_out, C_in/groups, kh, kw); bias: (C_out,).
        in_index / out_index: int64 sorted unique, or None for prefixes (k = x.shape[1] inputs,
            ``out_width`` outputs, all by default).
    Returns:
        (B, n, OH, OW).
    """
    rows, cols, g = _block_args(weight, x, in_index, out_index, out_width, groups)
    b = None if bias is None else take_block(bias, rows, None)
    w = take_block(weight, rows, cols)
    if x.shape[1] == 0 or w.shape[0] == 0:  # F.conv2d mis-shapes/rejects these: y is the bias (or empty)
        shape = output_shape(x, weight, w.shape[0], stride, padding, dilation)
        y = x.new_zeros(shape) + (0 if b is None else b.view(1, -1, 1, 1))
        return y.contiguous(memory_format=memory_format(x))
    # F.conv2d picks channels-last when the weight is; the op's contract (and fake) follow x alone
    return F.conv2d(x, w, b, stride, padding, dilation, g).contiguous(memory_format=memory_format(x))


def _ref_forward(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups):
    return masked_conv2d_ref(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups)


def _ref_backward(g, x, weight, in_index, out_index, out_width, stride, padding, dilation, groups, nx, nw, nb):
    rows, cols, gr = _block_args(weight, x, in_index, out_index, out_width, groups)
    w_c = take_block(weight, rows, cols)
    if x.shape[1] == 0 or w_c.shape[0] == 0:  # see masked_conv2d_ref
        gx, gw_c, gb_c = torch.zeros_like(x), torch.zeros_like(w_c), g.sum((0, 2, 3))
    else:
        gx, gw_c, gb_c = torch.ops.aten.convolution_backward(
            g, x, w_c, [w_c.shape[0]] if nb else None, stride, padding, dilation, False, [0, 0], gr, [nx, nw, nb]
        )
    gw = put_block(weight, gw_c, rows, cols) if nw else None
    gb = put_block(weight.new_empty(weight.shape[0]), gb_c, rows, None) if nb else None
    return (gx.contiguous(memory_format=memory_format(x)) if nx else None), gw, gb


register_family(OP, ref_forward=_ref_forward, ref_backward=_ref_backward, triton_reasons=triton_dtype_reasons)


def _check_static(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups) -> None:
    check_float_tensor(x, op=OP, arg="x")
    check_float_tensor(weight, op=OP, arg="weight", dtype=x.dtype)
    if x.dim() != 4:
        raise ValueError(f"{OP}: x must be 4-D [B, k, H, W], got {x.dim()}-D of shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D [C_out, C_in/groups, kh, kw], got shape {tuple(weight.shape)}")
    for t, arg in ((weight, "weight"), (bias, "bias"), (in_index, "in_index"), (out_index, "out_index")):
        check_device(t, x.device, op=OP, arg=arg)
    c_out, c_in_g, kh, kw = weight.shape
    k = x.shape[1]
    if bias is not None:
        check_float_tensor(bias, op=OP, arg="bias", dtype=x.dtype)
        if bias.shape != (c_out,):
            raise ValueError(f"{OP}: bias must have shape ({c_out},) to match weight, got {tuple(bias.shape)}")
    if groups < 1:
        raise ValueError(f"{OP}: groups must be >= 1, got {groups}")
    if out_index is not None:
        check_index_static(out_index, c_out, op=OP, arg="out_index")
        if out_index.shape[0] != out_width:
            raise ValueError(f"{OP}: out_width={out_width} but out_index has {out_index.shape[0]} entries")
    elif not 0 <= out_width <= c_out:
        raise ValueError(f"{OP}: out_width={out_width} must lie in [0, {c_out}]")
    if groups == 1:
        if in_index is not None:
            check_index_static(in_index, c_in_g, op=OP, arg="in_index")
            if in_index.shape[0] != k:
                raise ValueError(f"{OP}: x has {k} channels but in_index has {in_index.shape[0]} entries")
        elif k > c_in_g:
            raise ValueError(f"{OP}: x has {k} channels but weight has only {c_in_g} input channels")
    elif c_in_g == 1:  # depthwise
        if not (groups == k == out_width):
            raise ValueError(
                f"{OP}: depthwise (weight [C, 1, kh, kw]) needs groups == active channels == out_width, "
                f"got groups={groups}, x channels={k}, out_width={out_width}"
            )
        if (in_index is None) != (out_index is None):
            raise ValueError(f"{OP}: depthwise needs in_index and out_index to be the same channels")
        if in_index is not None:
            check_index_static(in_index, c_out, op=OP, arg="in_index")
    else:
        if in_index is not None or out_index is not None or k != c_in_g * groups or out_width != c_out:
            raise ValueError(
                f"{OP}: groups={groups} with weight {tuple(weight.shape)} needs all channels active "
                f"(no in_index/out_index, x with {c_in_g * groups} channels); got x with {k} channels"
            )
        if c_out % groups:
            raise ValueError(f"{OP}: weight has {c_out} output channels, not divisible by groups={groups}")
    oh = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{OP}: input of size {tuple(x.shape[2:])} is too small for kernel ({kh}, {kw}) with "
            f"padding {tuple(padding)} and dilation {tuple(dilation)}"
        )


def _check_values(weight, in_index, out_index, groups) -> None:
    if in_index is not None:
        dim = weight.shape[0] if groups > 1 else weight.shape[1]
        check_index_values(in_index, dim, op=OP, arg="in_index")
        if groups > 1 and out_index is not None:
            msg = f"{OP}: depthwise needs in_index and out_index to be the same channels"
            check_same_index(in_index, out_index, msg)
    if out_index is not None:
        check_index_values(out_index, weight.shape[0], op=OP, arg="out_index")


def output_shape(x: Tensor, weight: Tensor, out_width: int, stride, padding, dilation) -> list[int]:
    kh, kw = weight.shape[2:]
    return [
        x.shape[0],
        out_width,
        conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0]),
        conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1]),
    ]


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is channels-last (and not also NCHW-contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


_CONV = "int[2] stride, int[2] padding, int[2] dilation, int groups"


# Explicit schemas: SymInt widths, so torch.compile with dynamic shapes does not specialise on them.
@torch.library.custom_op(
    "stp_fast::masked_conv2d",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, Tensor? out_index, SymInt out_width, "
    f"{_CONV}) -> Tensor",
)
def _masked_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    in_index: Optional[Tensor],
    out_index: Optional[Tensor],
    out_width: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    args = (x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups)
    _check_static(*args)
    _check_values(weight, in_index, out_index, groups)
    impl = _backend.pick(OP, x.device.type, *args)
    return impl.fns["forward"](*args)


@_masked_conv2d_op.register_fake
def _(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups):
    _check_static(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups)
    shape = output_shape(x, weight, out_width, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=memory_format(x))


@torch.library.custom_op(
    "stp_fast::masked_conv2d_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor? in_index, Tensor? out_index, SymInt out_width, "
    f"{_CONV}, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)",
)
def _masked_conv2d_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    in_index: Optional[Tensor],
    out_index: Optional[Tensor],
    out_width: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (grad_out, x, weight, in_index, out_index, out_width, stride, padding, dilation, groups)
    impl = _backend.pick(OP, x.device.type, x, weight, None, in_index, out_index, out_width, stride, padding,
                         dilation, groups)  # fmt: skip
    gx, gw, gb = impl.fns["backward"](*args, need_x, need_weight, need_bias)
    empty = x.new_empty(0)
    return (
        gx if gx is not None else empty,
        like_param(gw, weight) if gw is not None else empty.clone(),
        gb if gb is not None else empty.clone(),
    )


@_masked_conv2d_backward_op.register_fake
def _(grad_out, x, weight, in_index, out_index, out_width, stride, padding, dilation, groups, nx, nw, nb):
    return (
        x.new_empty(x.shape if nx else (0,)).contiguous(
            memory_format=memory_format(x) if nx else torch.contiguous_format
        ),
        torch.empty_like(weight) if nw else weight.new_empty(0),  # the weight's strides (channels-last too)
        weight.new_empty((weight.shape[0],) if nb else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, in_index, out_index, out_width, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, in_index, out_index)
    ctx.conv = (out_width, stride, padding, dilation, groups)


def _backward(ctx, grad_out):
    x, weight, in_index, out_index = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw, gb = _masked_conv2d_backward_op(
        grad_out.contiguous(memory_format=memory_format(x)), x, weight, in_index, out_index, *ctx.conv,
        need_x, need_w, need_b,
    )  # fmt: skip
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, *([None] * 7))


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(torch.ops.stp_fast.masked_conv2d.default, "stp_fast::masked_conv2d")


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    in_index: Tensor | int | None = None,
    out_index: Tensor | int | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """2-D convolution over active channels, without materialising the sliced weight on the GPU.

    Args:
        x: (B, k, H, W) float tensor holding only the active input channels (NCHW or channels-last).
        weight: (C_out, C_in/groups, kh, kw) full weight; bias: (C_out,) or None.
        in_index / out_index: active channels: a sorted unique int64 tensor, an int (the first k)
            or None (all).  Depthwise: weight (C, 1, kh, kw), groups = number of active channels,
            and in_index equal to out_index (or both None/ints).
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d``.
    Returns:
        (B, n, OH, OW), channels-last when x is.  Saved for backward: x, weight, index tensors.
        Under ``torch.autocast`` it behaves like ``F.conv2d`` (inputs cast to the autocast dtype, fp32
        accumulation, the output in that dtype, fp32 weights get fp32 gradients).
    Raises:
        TypeError / ValueError naming the argument on wrong dtypes, devices, shapes or indices.
    """
    check_float_tensor(x, op=OP, arg="x")
    check_float_tensor(weight, op=OP, arg="weight")
    x, weight, bias = _autocast.inputs(x.device.type, x, weight, bias)
    check_float_tensor(weight, op=OP, arg="weight", dtype=x.dtype)
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D [C_out, C_in/groups, kh, kw], got shape {tuple(weight.shape)}")
    stride_ = pair(stride, "stride", op=OP, minimum=1)
    padding_ = pair(padding, "padding", op=OP, minimum=0)
    dilation_ = pair(dilation, "dilation", op=OP, minimum=1)
    depthwise = groups > 1 and weight.shape[1] == 1
    in_dim = weight.shape[0] if depthwise else weight.shape[1] * groups
    in_idx, k = normalize_index(in_index, in_dim, op=OP, arg="in_index")
    out_idx, n = normalize_index(out_index, weight.shape[0], op=OP, arg="out_index")
    if depthwise:  # one output per active channel: either index argument names both sides
        if out_index is None:
            out_idx, n = in_idx, k
        elif in_index is None:
            in_idx, k = out_idx, n
    if x.dim() == 4 and x.shape[1] != k:
        what = "in_index selects" if in_index is not None or out_index is not None else "weight has"
        raise ValueError(f"{OP}: x has {x.shape[1]} channels but {what} {k} input channels")
    return _masked_conv2d_op(x, weight, bias, in_idx, out_idx, n, stride_, padding_, dilation_, groups)
