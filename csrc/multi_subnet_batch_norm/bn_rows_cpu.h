// Training-mode BatchNorm (+ ReLU) kernels for float32 CPU tensors with dense innermost channels
// (channels-last [B, C, H, W] or [B, C]); see bn_rows_cpu.cpp.  Host-only.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace stp_fast {

// x is float32, non-empty, and channels-last contiguous (4-D) or contiguous (2-D).
bool bn_rows_applicable(const at::Tensor& x);

// (y, mean, invstd): batch statistics over all but the channel dimension (biased variance), y in
// x's layout; weight / bias [C] may be undefined (1 / 0).  mean / invstd are float32 [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_rows_forward(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps, bool relu);

// y = x * alpha + beta (+ ReLU) with alpha = invstd * w, beta = b - mean * alpha: the forward's output
// from its statistics, bit for bit (the ReLU mask of the backward is recomputed with it).
at::Tensor bn_rows_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& mean, const at::Tensor& invstd, bool relu);

// (grad_x, grad_weight, grad_bias) of the training-mode forward without ReLU (undefined where `mask`
// does not ask); grad_out any layout, grad_x in x's layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_rows_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& weight, const at::Tensor& mean,
                                                                const at::Tensor& invstd, std::array<bool, 3> mask);

}  // namespace stp_fast
