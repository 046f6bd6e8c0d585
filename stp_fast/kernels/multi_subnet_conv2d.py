"""Triton launchers for ``multi_subnet_conv2d`` (installed as ``stp_fast.kernels.multi_subnet_conv2d``).

Algorithm: S subnets share one weight W[C_out, C_in, KH, KW] (and bias).  Subnet s has a compact
input xs[s] [B_s, k_s, H, W] and output ys[s] [B_s, n_s, OH, OW]; its W block is
``W[out_s][:, in_s]`` with out_s/in_s index lists or prefixes.  Every direction is ONE launch over
all subnets, using the grouped kernels of ``stp_fast.kernels.masked_conv2d``:

* forward: grouped implicit GEMM over a (subnet, tile) schedule; per-subnet pointers, widths,
  strides and index lists come from a small int64 device table, so subnets may differ in batch,
  widths (any order, repeats) and memory format.  No tile is launched beyond a subnet's width.
* grad x: the same schedule with roles swapped (rows = input pixels, columns = k_s).
* grad W: split-K "W-tile owner" kernel: each (W tile, tap, split) program sums the subnets that
  touch its tile in subnet order, then a fixed-order reduction of the splits: no atomics, bitwise
  reproducible, exact zeros outside the union of the subnets' blocks.  grad bias: fixed-order sums.
* depthwise (groups == C_out with W [C, 1, KH, KW]): each subnet runs depthwise over its own
  k_s == n_s channels (weight row = index entry or channel), by the direct depthwise kernels.

Limits: groups must be 1 or depthwise (the op contract); float32/float16/bfloat16 only; all subnets
share H, W.  Tiling and verification: see ``stp_fast.kernels.masked_conv2d``.
"""

from __future__ import annotations

from torch import Tensor

from stp_fast.kernels.masked_conv2d import (
    ConvGeometry,
    SubnetConv,
    check_dtype,
    grouped_conv_forward,
    grouped_conv_grad_bias,
    grouped_conv_grad_input,
    grouped_conv_grad_weight,
    index_arg,
    new_activation,
)

OP = "multi_subnet_conv2d"


def _is_depthwise(weight: Tensor, groups: int) -> bool:
    if groups == 1:
        return False
    if groups == weight.shape[0] and weight.shape[1] == 1:
        return True
    raise NotImplementedError(
        f"{OP} (Triton): groups={groups} must be 1 or depthwise (groups == weight.size(0) == "
        f"{weight.shape[0]} with weight.size(1) == 1), got weight of shape {tuple(weight.shape)}"
    )


def _subnets(xs: list[Tensor], ys: list[Tensor], out_widths: list[int], in_indices: list[Tensor] | None,
             out_indices: list[Tensor] | None, depthwise: bool) -> list[SubnetConv]:  # fmt: skip
    """One SubnetConv per subnet; ``ys`` are the outputs (forward) or the grads of the outputs."""
    subs = []
    for s, (x, y, n) in enumerate(zip(xs, ys, out_widths)):
        in_idx = index_arg(in_indices[s]) if in_indices is not None else None
        out_idx = index_arg(out_indices[s]) if out_indices is not None else None
        if depthwise:  # one channel list serves both sides
            out_idx = in_idx = out_idx if out_idx is not None else in_idx
        subs.append(SubnetConv(x, y, x.shape[1], int(n), in_idx, out_idx))
    return subs


def _geometry(xs: list[Tensor], weight: Tensor, stride, padding, dilation) -> ConvGeometry:
    h, w = xs[0].shape[2], xs[0].shape[3]
    for x in xs:
        check_dtype(x, OP)
        if x.dim() != 4 or (x.shape[2], x.shape[3]) != (h, w):
            raise ValueError(f"{OP}: every xs[s] must be [B_s, k_s, {h}, {w}], got {tuple(x.shape)}")
    return ConvGeometry.of(weight, h, w, stride, padding, dilation)


def multi_subnet_conv2d_fwd_triton(
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    out_widths: list[int],
    in_indices: list[Tensor] | None,
    out_indices: list[Tensor] | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> list[Tensor]:
    """ys[s] (B_s, n_s, OH, OW) = conv2d(xs[s], W[out_s][:, in_s], bias[out_s], ...) for all s in one launch."""
    if not xs:
        return []
    depthwise = _is_depthwise(weight, groups)
    geom = _geometry(xs, weight, stride, padding, dilation)
    ys = [new_activation(x, (x.shape[0], int(n), geom.oh, geom.ow)) for x, n in zip(xs, out_widths)]
    grouped_conv_forward(_subnets(xs, ys, out_widths, in_indices, out_indices, depthwise), weight, bias, geom,
                         depthwise)  # fmt: skip
    return ys


def multi_subnet_conv2d_bwd_triton(
    grads: list[Tensor],
    xs: list[Tensor],
    weight: Tensor,
    out_widths: list[int],
    in_indices: list[Tensor] | None,
    out_indices: list[Tensor] | None,
    stride,
    padding,
    dilation,
    groups: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[list[Tensor] | None, Tensor | None, Tensor | None]:
    """(grad xs in each x's layout, grad W summed over subnets (full shape), grad bias summed (C_out,))."""
    depthwise = _is_depthwise(weight, groups)
    grads = [g.to(x.dtype) for g, x in zip(grads, xs)]
    gxs = gw = gb = None
    if not xs:
        gxs = [] if need_x else None
        gw = weight.new_zeros(weight.shape) if need_weight else None
        gb = weight.new_zeros(weight.shape[0]) if need_bias else None
        return gxs, gw, gb
    geom = _geometry(xs, weight, stride, padding, dilation)
    subs = _subnets(xs, grads, out_widths, in_indices, out_indices, depthwise)
    if need_x:
        gxs = [new_activation(x, tuple(x.shape)) for x in xs]
        grouped_conv_grad_input(_subnets(gxs, grads, out_widths, in_indices, out_indices, depthwise), weight, geom,
                                depthwise)  # fmt: skip
    if need_weight:
        gw = grouped_conv_grad_weight(subs, weight, geom, depthwise)
    if need_bias:
        gb = grouped_conv_grad_bias(subs, weight.shape[0], weight)
    return gxs, gw, gb
