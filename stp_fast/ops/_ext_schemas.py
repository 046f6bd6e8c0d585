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
