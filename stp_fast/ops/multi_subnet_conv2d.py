"""``multi_subnet_conv2d``: S width-subnets of one convolution in one op (one launch on the GPU).

Subnet s convolves ``xs[s]`` (its first ``k_s`` input channels, or ``in_indices[s]``) with the
shared weight restricted to its first ``out_widths[s]`` output channels (or ``out_indices[s]``).
All subnets share stride/padding/dilation and the input's spatial size; batch sizes may differ.
Depthwise layers (weight ``[C, 1, kh, kw]``) pass ``groups=C``: each subnet then runs depthwise
over its own ``k_s == out_widths[s]`` channels.  The weight gradient sums all subnets' contributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stp_fast.ops import _autocast, _backend, _multi
from stp_fast.ops._checks import check_device, check_float_tensor, check_same_index
from stp_fast.ops._family import add_block, like_param, register_family, take_block, triton_dtype_reasons
from stp_fast.ops.masked_conv2d import masked_conv2d_ref, memory_format, output_shape, pair

OP = "multi_subnet_conv2d"
_CONV = "int[2] stride, int[2] padding, int[2] dilation, int groups"


def _depthwise(weight: Tensor, groups: int) -> bool:
    return groups > 1


def _subnet_args(weight, x, s, out_widths, in_indices, out_indices, groups):
    """(rows, cols, groups) of subnet s's active weight block (cols None: dim 1 whole, depthwise)."""
    rows = out_indices[s] if out_indices is not None else out_widths[s]
    if _depthwise(weight, groups):
        return rows, None, out_widths[s]
    return rows, (in_indices[s] if in_indices is not None else x.shape[1]), 1


def multi_subnet_conv2d_ref(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    out_widths: Sequence[int],
    in_indices: Sequence[Tensor] | None = None,
    out_indices: Sequence[Tensor] | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
) -> list[Tensor]:
    """Reference: one ``masked_conv2d_ref`` per subnet. Differentiable by autograd."""
    outs = []
    for s, x in enumerate(xs):
        rows, cols, g = _subnet_args(weight, x, s, out_widths, in_indices, out_indices, groups)
        out_idx = rows if isinstance(rows, Tensor) else None
        in_idx = None if cols is None or not isinstance(cols, Tensor) else cols
        outs.append(masked_conv2d_ref(x, weight, bias, in_idx, out_idx, out_widths[s], stride, padding, dilation, g))
    return outs


def _ref_forward(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups):
    return multi_subnet_conv2d_ref(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation,
                                   groups)  # fmt: skip


def _ref_backward(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding, dilation, groups,
                  need_x, need_w, need_b):  # fmt: skip
    gxs = [] if need_x else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = weight.new_zeros(weight.shape[0]) if need_b else None
    for s, (g, x) in enumerate(zip(grads, xs)):
        rows, cols, gr = _subnet_args(weight, x, s, out_widths, in_indices, out_indices, groups)
        w_c = take_block(weight, rows, cols)
        gx, gw_c, gb_c = torch.ops.aten.convolution_backward(
            g, x, w_c, [w_c.shape[0]] if need_b else None, stride, padding, dilation, False, [0, 0], gr,
            [need_x, need_w, need_b],
        )  # fmt: skip
        if need_x:
            gxs.append(gx.contiguous(memory_format=memory_format(x)))
        if need_w:
            add_block(gw, gw_c, rows, cols)
        if need_b:
            add_block(gb, gb_c, rows, None)
    return gxs, gw, gb


register_family(OP, ref_forward=_ref_forward, ref_backward=_ref_backward, triton_reasons=triton_dtype_reasons)


def _check_static(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups) -> None:
    _multi.check_subnet_list(xs, op=OP, ndim=4, what="4-D [B_s, k_s, H, W]")
    device = xs[0].device
    check_float_tensor(weight, op=OP, arg="weight", dtype=xs[0].dtype)
    check_device(weight, device, op=OP, arg="weight")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D [C_out, C_in, kh, kw], got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape[:2]
    if bias is not None:
        check_float_tensor(bias, op=OP, arg="bias", dtype=xs[0].dtype)
        check_device(bias, device, op=OP, arg="bias")
        if bias.shape != (c_out,):
            raise ValueError(f"{OP}: bias must have shape ({c_out},) to match weight, got {tuple(bias.shape)}")
    depthwise = _depthwise(weight, groups)
    if groups != 1 and not (groups == c_out and c_in == 1):
        raise ValueError(
            f"{OP}: groups must be 1, or {c_out} (= weight.size(0), with weight.size(1) == 1) for a depthwise "
            f"layer; got groups={groups} with weight {tuple(weight.shape)}"
        )
    _multi.normalize_widths(out_widths, None, len(xs), c_out, op=OP)
    spatial = tuple(xs[0].shape[2:])
    widths_in = [x.shape[1] for x in xs]
    for s, x in enumerate(xs):
        if tuple(x.shape[2:]) != spatial:
            raise ValueError(f"{OP}: xs[{s}] has spatial size {tuple(x.shape[2:])} but xs[0] has {spatial}")
        if depthwise and widths_in[s] != out_widths[s]:
            raise ValueError(f"{OP}: depthwise subnet {s} has {widths_in[s]} input channels but out_widths[{s}]="
                             f"{out_widths[s]}")  # fmt: skip
        if not depthwise and widths_in[s] > c_in:
            raise ValueError(f"{OP}: xs[{s}] has {widths_in[s]} channels but weight has only {c_in} input channels")
    in_dim = c_out if depthwise else c_in
    _multi.check_index_list(in_indices, len(xs), in_dim, device, op=OP, arg="in_indices", lengths=widths_in)
    _multi.check_index_list(out_indices, len(xs), c_out, device, op=OP, arg="out_indices", lengths=out_widths)
    if depthwise and (in_indices is None) != (out_indices is None):
        raise ValueError(f"{OP}: depthwise needs in_indices and out_indices to be the same channels")
    shape = output_shape(xs[0], weight, 1, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(f"{OP}: input of size {spatial} is too small for kernel {tuple(weight.shape[2:])} with "
                         f"padding {tuple(padding)} and dilation {tuple(dilation)}")  # fmt: skip


def _check_values(weight, in_indices, out_indices, groups) -> None:
    depthwise = _depthwise(weight, groups)
    _multi.check_index_list_values(in_indices, weight.shape[0 if depthwise else 1], op=OP, arg="in_indices")
    _multi.check_index_list_values(out_indices, weight.shape[0], op=OP, arg="out_indices")
    if depthwise and in_indices is not None:
        for s, (a, b) in enumerate(zip(in_indices, out_indices)):
            check_same_index(a, b, f"{OP}: depthwise subnet {s} needs in_indices[{s}] == out_indices[{s}]")


def _run_forward(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups):
    """The op's body: checks, then the chosen backend's forward."""
    args = (xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups)
    _check_static(*args)
    _check_values(weight, in_indices, out_indices, groups)
    return list(_backend.pick(OP, weight.device.type, *args).fns["forward"](*args))


def _run_backward(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding, dilation, groups, need_x,
                  need_weight, need_bias):  # fmt: skip
    """The backward op's body: (grad_xs, grad_weight, grad_bias), None where not asked for."""
    conv = (stride, padding, dilation, groups)
    impl = _backend.pick(OP, weight.device.type, xs, weight, None, out_widths, in_indices, out_indices, *conv)
    return impl.fns["backward"](grads, xs, weight, out_widths, in_indices, out_indices, *conv, need_x, need_weight,
                                need_bias)  # fmt: skip


def _dense_grads(grads, xs, weight, out_widths, stride, padding, dilation) -> list[Tensor]:
    """Output gradients in their input's memory format; zeros for outputs that got none."""
    return [
        g.contiguous(memory_format=memory_format(x)) if g is not None
        else x.new_zeros(output_shape(x, weight, n, stride, padding, dilation))
        for g, x, n in zip(grads, xs, out_widths)
    ]  # fmt: skip


@torch.library.custom_op(
    "stp_fast::multi_subnet_conv2d",
    mutates_args=(),
    schema="(Tensor[] xs, Tensor weight, Tensor? bias, SymInt[] out_widths, Tensor[]? in_indices, "
    f"Tensor[]? out_indices, {_CONV}) -> Tensor[]",
)
def _multi_subnet_conv2d_op(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups):
    return _run_forward(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups)


@_multi_subnet_conv2d_op.register_fake
def _(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups):
    _check_static(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation, groups)
    return [
        x.new_empty(output_shape(x, weight, n, stride, padding, dilation)).contiguous(memory_format=memory_format(x))
        for x, n in zip(xs, out_widths)
    ]


@torch.library.custom_op(
    "stp_fast::multi_subnet_conv2d_backward",
    mutates_args=(),
    schema="(Tensor[] grads, Tensor[] xs, Tensor weight, SymInt[] out_widths, Tensor[]? in_indices, "
    f"Tensor[]? out_indices, {_CONV}, bool need_x, bool need_weight, bool need_bias) -> (Tensor[], Tensor, Tensor)",
)
def _multi_subnet_conv2d_backward_op(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding,
                                     dilation, groups, need_x, need_weight, need_bias):  # fmt: skip
    gxs, gw, gb = _run_backward(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding, dilation,
                                groups, need_x, need_weight, need_bias)  # fmt: skip
    empty = weight.new_empty(0)
    gw = like_param(gw, weight) if gw is not None else empty
    return (list(gxs) if need_x else [], gw, gb if gb is not None else empty.clone())


@_multi_subnet_conv2d_backward_op.register_fake
def _(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding, dilation, groups, nx, nw, nb):
    return (
        [x.new_empty(x.shape).contiguous(memory_format=memory_format(x)) for x in xs] if nx else [],
        torch.empty_like(weight) if nw else weight.new_empty(0),  # the weight's strides (channels-last too)
        weight.new_empty((weight.shape[0],) if nb else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    xs, weight, _bias, out_widths, in_indices, out_indices, *conv = inputs
    _multi.save_for_backward(ctx, xs, weight, in_indices, out_indices, out_widths)
    ctx.conv = conv


def _backward(ctx, grads):
    xs, weight, in_indices, out_indices, out_widths = _multi.saved(ctx)
    need_x, need_w, need_b = _multi.needs(ctx)
    stride, padding, dilation, _groups = ctx.conv
    grads = _dense_grads(grads, xs, weight, out_widths, stride, padding, dilation)
    gxs, gw, gb = _multi_subnet_conv2d_backward_op(
        grads, xs, weight, out_widths, in_indices, out_indices, *ctx.conv, need_x, need_w, need_b
    )
    return (gxs if need_x else [None] * len(xs), gw if need_w else None, gb if need_b else None, None,
            *_multi.index_grads(ctx), None, None, None, None)  # fmt: skip


_multi_subnet_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(torch.ops.stp_fast.multi_subnet_conv2d.default, "stp_fast::multi_subnet_conv2d")


class MultiSubnetConv2dFunction(torch.autograd.Function):
    """The op's eager twin (``_backend.eager_ok``): the same checks, backend and kernels in forward and
    backward, without the custom-op dispatch.  ``apply(weight, bias, params, *xs)`` with ``params`` =
    (out_widths, in_indices, out_indices, stride, padding, dilation, groups); returns the S outputs."""

    @staticmethod
    def forward(ctx, weight, bias, params, *xs):
        ctx.save_for_backward(weight, *xs)
        ctx.params = params
        return tuple(_run_forward(list(xs), weight, bias, *params))

    @staticmethod
    def backward(ctx, *grads):
        weight, *xs = ctx.saved_tensors
        out_widths, in_indices, out_indices, stride, padding, dilation, groups = ctx.params
        need_w, need_b = ctx.needs_input_grad[:2]
        need_x = any(ctx.needs_input_grad[3:])
        grads = _dense_grads(grads, xs, weight, out_widths, stride, padding, dilation)
        gxs, gw, gb = _run_backward(grads, xs, weight, out_widths, in_indices, out_indices, stride, padding, dilation,
                                    groups, need_x, need_w, need_b)  # fmt: skip
        return (gw if need_w else None, gb if need_b else None, None, *(gxs if need_x else [None] * len(xs)))


def multi_subnet_conv2d(
    xs: Sequence[Tensor],
    weight: Tensor,
    bias: Tensor | None = None,
    out_widths: Sequence[int] | None = None,
    *,
    in_indices: Sequence[Tensor] | None = None,
    out_indices: Sequence[Tensor] | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> list[Tensor]:
    """Run S width-subnets of one convolution together.

    Args:
        xs: S tensors, ``xs[s]`` (B_s, k_s, H, W) holding subnet s's active input channels (the first
            k_s, or ``in_indices[s]``); NCHW or channels-last.
        weight: (C_out, C_in, kh, kw) shared weight, or (C, 1, kh, kw) with ``groups=C`` (depthwise);
            bias: (C_out,) or None.
        out_widths: S ints (default: lengths of ``out_indices``; depthwise: k_s; else C_out).
        in_indices / out_indices: None (prefixes, the fast path) or S sorted unique int64 tensors.
        stride, padding, dilation: as in ``F.conv2d``, shared by all subnets.
    Returns:
        S tensors (B_s, out_widths[s], OH, OW), channels-last where the input is.  One autograd node;
        weight and bias gradients sum over the subnets.  In plain eager mode (CPU and CUDA) the node is
        ``MultiSubnetConv2dFunction`` (the same checks and kernels without the custom-op dispatch),
        otherwise the custom op ``stp_fast::multi_subnet_conv2d``.
        Under ``torch.autocast`` it behaves like ``F.conv2d``: float inputs are cast to the autocast
        dtype, the outputs have it, fp32 weights get fp32 gradients (``stp_fast.ops._autocast``).
    """
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{OP}: xs must be a list of tensors, got {type(xs).__name__}")
    check_float_tensor(weight, op=OP, arg="weight")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D [C_out, C_in, kh, kw], got shape {tuple(weight.shape)}")
    if out_widths is None and out_indices is None and groups > 1:
        out_widths = [x.shape[1] if isinstance(x, Tensor) and x.dim() == 4 else 0 for x in xs]
    widths = _multi.normalize_widths(out_widths, out_indices, len(xs), weight.shape[0], op=OP)
    if groups > 1 and (in_indices is None) != (out_indices is None):  # depthwise: one list names both sides
        in_indices = out_indices = in_indices if in_indices is not None else out_indices
    device = weight.device.type
    xs, weight, bias = _autocast.inputs(device, list(xs), weight, bias)
    params = (
        widths,
        None if in_indices is None else list(in_indices),
        None if out_indices is None else list(out_indices),
        pair(stride, "stride", op=OP, minimum=1),
        pair(padding, "padding", op=OP, minimum=0),
        pair(dilation, "dilation", op=OP, minimum=1),
        groups,
    )
    if _backend.eager_ok(device, (*xs, weight, bias)):
        if _autocast.dtype(device) is None:
            return list(MultiSubnetConv2dFunction.apply(weight, bias, params, *xs))
        with _autocast.excluded(device):  # inputs cast above; the body runs as the custom op's does
            return list(MultiSubnetConv2dFunction.apply(weight, bias, params, *xs))
    return _multi_subnet_conv2d_op(xs, weight, bias, *params)
