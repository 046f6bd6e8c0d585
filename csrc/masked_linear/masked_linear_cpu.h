// CPU building blocks of masked_linear (compact coordinates + ATen BLAS), shared with
// multi_subnet_linear.  Host-only; index pointers are contiguous int64 tensors or null (prefix).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"
#include "common/gather.h"
#include "masked_linear/masked_linear.h"

namespace stp_fast {

// masked_linear_check with the argument names of `names` in the messages (a multi-subnet op names
// the list element, e.g. "multi_subnet_linear: xs[2] has 7 features but in_indices[2] has 5 entries").
MaskedLinearShape masked_linear_check_named(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& in_index,
                                            const std::optional<at::Tensor>& out_index, int64_t out_width,
                                            const at::Tensor* grad_out, const ArgNames& names);

// The active weight block weight[out][:, in] ([n, k]): a strided view when both sides are
// prefixes, else a packed parallel gather.
at::Tensor masked_linear_active_weight(const at::Tensor& weight, const MaskedLinearShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx);

// y = x @ wc^T + bias[out] with wc the active block (shape x.shape[:-1] + [n]).
at::Tensor masked_linear_forward_cpu(const at::Tensor& x, const at::Tensor& wc, const std::optional<at::Tensor>& bias,
                                     const MaskedLinearShape& s, const at::Tensor* out_idx);

// grad_x = grad_out @ wc (shape of x).
at::Tensor masked_linear_grad_x_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wc,
                                    const MaskedLinearShape& s);

// grad_w[out][:, in] += grad_out2^T @ x2 (grad_w full [N, K], same dtype; prefix: one addmm_ into
// the narrowed view, no temporary).
void masked_linear_add_grad_weight_cpu(at::Tensor& grad_w, const at::Tensor& grad_out, const at::Tensor& x,
                                       const MaskedLinearShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx);

// grad_b[out] += grad_out summed over its rows (grad_b full [N]).
void masked_linear_add_grad_bias_cpu(at::Tensor& grad_b, const at::Tensor& grad_out, const MaskedLinearShape& s,
                                     const at::Tensor* out_idx);

}  // namespace stp_fast
