// CPU building blocks of masked_conv2d (compact coordinates + ATen/oneDNN convolution), shared
// with multi_subnet_conv2d.  Host-only; index pointers are contiguous int64 tensors or null (prefix).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/gather.h"
#include "masked_conv2d/masked_conv2d.h"

namespace stp_fast {

// masked_conv2d_check with the argument names of `names` in the messages.  force_depthwise: the
// call is depthwise whatever groups is (multi_subnet_conv2d, whose depthwise subnets may have one
// or zero active channels, i.e. groups == k <= 1); then groups == k == out_width is required.
MaskedConv2dShape masked_conv2d_check_named(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& in_index,
                                            const std::optional<at::Tensor>& out_index, int64_t out_width,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, const at::Tensor* grad_out,
                                            const ArgNames& names, bool force_depthwise = false);

// Zeros of the given shape in memory format fmt (at::zeros ignores the options' memory format).
inline at::Tensor zeros_in_format(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  return at::empty(sizes, opts.memory_format(fmt)).zero_();
}

// A zero full-shaped weight gradient in the weight's own memory format.
inline at::Tensor zeros_like_weight(const at::Tensor& weight) {
  return zeros_in_format(weight.sizes(), weight.options(), weight.suggest_memory_format());
}

// Groups of the compact convolution: 1, k (depthwise) or s.groups (full grouped conv).
inline int64_t compact_groups(const MaskedConv2dShape& s) { return s.depthwise ? s.k : s.groups; }

// The active weight block in memory format `fmt`: [n, k, kh, kw] (groups == 1), [k, 1, kh, kw]
// (depthwise: rows only) or the whole weight (grouped).  Prefixes are narrowed views made dense
// (oneDNN needs a dense weight in the backend format; ATen would copy it there anyway); index lists
// are one parallel gather.
at::Tensor masked_conv2d_active_weight(const at::Tensor& weight, const MaskedConv2dShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx, at::MemoryFormat fmt);

// y = conv2d(x, wc, bias[out]) in x's memory format (zero batch / zero channels handled).
at::Tensor masked_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& wc, const std::optional<at::Tensor>& bias,
                                     const MaskedConv2dShape& s, const at::Tensor* out_idx, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation);

// (grad_x in x's memory format or undefined, compact grad of wc or undefined).  An undefined
// compact gradient with need_weight means "all zero" (empty batch or no active channel).
std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& wc, const MaskedConv2dShape& s,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, bool need_x,
                                                              bool need_weight);

// grad_w[out][:, in] += gwc (grad_w full-shaped, same dtype; prefix: add_ into the narrowed view,
// index lists: a parallel scatter).  An undefined gwc adds nothing.
void masked_conv2d_add_grad_weight_cpu(at::Tensor& grad_w, const at::Tensor& gwc, const MaskedConv2dShape& s,
                                       const at::Tensor* in_idx, const at::Tensor* out_idx);

// grad_b[out] += grad_out summed over (B, OH, OW) (grad_b full [C_out]).
void masked_conv2d_add_grad_bias_cpu(at::Tensor& grad_b, const at::Tensor& grad_out, const MaskedConv2dShape& s,
                                     const at::Tensor* out_idx);

}  // namespace stp_fast
