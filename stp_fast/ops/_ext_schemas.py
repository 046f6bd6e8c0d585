"""Schemas of the private ops that the compiled extension ``stp_fast._C`` implements.

Schemas live in Python (house style): ``csrc/`` only adds kernels with ``TORCH_LIBRARY_IMPL(stp_fast,
CPU|CUDA, m)``.  Defining them here, before ``_C`` is loaded, means the dispatcher always knows the
ops and a missing extension shows up as "no kernel for this dispatch key" rather than "no such op".
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("stp_fast", "FRAGMENT")

# masked_linear: y[..., n] = x[..., k] @ weight[out_index][:, in_index].T + bias[out_index]
#   in_index None  -> the first x.size(-1) input features (prefix);
#   out_index None -> the first out_width output features (prefix).
_lib.define(
    "_masked_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, Tensor? out_index, "
    "int out_width) -> Tensor"
)
# Returns (grad_x, grad_weight, grad_bias); an output that was not asked for is an empty tensor.
# grad_weight/grad_bias have the full shapes of weight/bias, exactly zero at pruned positions.
_lib.define(
    "_masked_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? in_index, Tensor? out_index, "
    "int out_width, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"
)

# masked_conv2d: y = conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding, dilation, groups)
#   x: [B, k, H, W] (NCHW or channels-last strides) holding only the active input channels.
#   groups == 1, or depthwise (weight [C, 1, kh, kw], in_index == out_index, groups == k == out_width),
#   or groups > 1 with no index and full widths (a plain grouped convolution).
_CONV_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"
_lib.define(
    "_masked_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? in_index, Tensor? out_index, "
    f"int out_width, {_CONV_ARGS}) -> Tensor"
)
_lib.define(
    "_masked_conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? in_index, Tensor? out_index, "
    f"int out_width, {_CONV_ARGS}, bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"
)

# multi_subnet_linear: for each subnet s, ys[s] = xs[s] @ weight[out_s][:, in_s].T + bias[out_s] where
#   in_s = in_indices[s] or the prefix of xs[s].size(-1); out_s = out_indices[s] or the prefix out_widths[s].
#   Backward: grad_weight / grad_bias sum the contributions of every subnet (full shapes, zero elsewhere);
#   grad_xs is an empty list when not asked for.
_lib.define(
    "_multi_subnet_linear_fwd(Tensor[] xs, Tensor weight, Tensor? bias, int[] out_widths, "
    "Tensor[]? in_indices, Tensor[]? out_indices) -> Tensor[]"
)
_lib.define(
    "_multi_subnet_linear_bwd(Tensor[] grads, Tensor[] xs, Tensor weight, int[] out_widths, "
    "Tensor[]? in_indices, Tensor[]? out_indices, bool need_x, bool need_weight, bool need_bias) "
    "-> (Tensor[], Tensor, Tensor)"
)

# multi_subnet_conv2d: the same for convolution; xs[s]: [B_s, k_s, H, W] (one H, W for all subnets).
#   groups == 1, or groups == weight.size(0) with weight.size(1) == 1: depthwise, each subnet over its
#   own k_s == out_widths[s] channels.
_lib.define(
    "_multi_subnet_conv2d_fwd(Tensor[] xs, Tensor weight, Tensor? bias, int[] out_widths, "
    f"Tensor[]? in_indices, Tensor[]? out_indices, {_CONV_ARGS}) -> Tensor[]"
)
_lib.define(
    "_multi_subnet_conv2d_bwd(Tensor[] grads, Tensor[] xs, Tensor weight, int[] out_widths, "
    f"Tensor[]? in_indices, Tensor[]? out_indices, {_CONV_ARGS}, bool need_x, bool need_weight, "
    "bool need_bias) -> (Tensor[], Tensor, Tensor)"
)

# multi_subnet_batch_norm (+ optional ReLU): xs[s]: [B_s, c_s, *spatial], channels = indices[s] or the
#   prefix c_s.  training: per-subnet batch statistics over its own channels (biased variance for the
#   normalisation); else the (sliced) running statistics.  Returns (ys, means, invstds), means/invstds
#   float32 [c_s] (float64 for float64 inputs; in eval mode: the running statistics used).
#   Running statistics are never mutated here: the Python layer updates them from the returned
#   statistics of the one subnet that owns them.
_lib.define(
    "_multi_subnet_batch_norm_fwd(Tensor[] xs, Tensor? weight, Tensor? bias, Tensor? running_mean, "
    "Tensor? running_var, Tensor[]? indices, bool training, float eps, bool relu) "
    "-> (Tensor[], Tensor[], Tensor[])"
)
# grad_weight / grad_bias: full [C] shapes, summed over subnets; empty tensors when not asked for.
_lib.define(
    "_multi_subnet_batch_norm_bwd(Tensor[] grads, Tensor[] xs, Tensor? weight, Tensor? bias, Tensor[] means, "
    "Tensor[] invstds, Tensor[]? indices, bool training, bool relu, bool need_x, bool need_weight, "
    "bool need_bias) -> (Tensor[], Tensor, Tensor)"
)
