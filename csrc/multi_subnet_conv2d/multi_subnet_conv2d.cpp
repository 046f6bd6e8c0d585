// multi_subnet_conv2d on CPU: S subnets sharing one conv weight, each in compact coordinates.
//
// Subnet s: ys[s] = conv2d(xs[s], weight[out_s][:, in_s], bias[out_s]) -- masked_conv2d per subnet
// with the building blocks of masked_conv2d_cpu.h (prefix blocks are narrowed views of the weight,
// index lists one parallel gather; the block is built in xs[s]'s memory format and the output and
// grad_x keep it).  groups is 1, or weight.size(0) with weight [C, 1, kh, kw]: depthwise, each
// subnet over its own k_s == out_widths[s] channels (a compact depthwise conv with groups = k_s).
// The loop over subnets runs here in C++; every convolution is one ATen (oneDNN) call.
//
// Backward: grad_weight / grad_bias are full-shaped zeros into which the subnets add their compact
// gradients in subnet order (prefix: add_ into the narrowed view; index lists: parallel
// scatter-add), so the result is deterministic.
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/gather.h"
#include "common/subnets.h"
#include "masked_conv2d/masked_conv2d_cpu.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "multi_subnet_conv2d";

using ConvSubnet = Subnet<MaskedConv2dShape>;

// Validates every argument; returns the per-subnet shapes and contiguous indices.
std::vector<ConvSubnet> check_subnets(at::TensorList xs, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef out_widths,
                                      const std::optional<at::TensorList>& in_indices,
                                      const std::optional<at::TensorList>& out_indices, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                      const at::TensorList* grads) {
  const size_t S = check_subnet_lists(kOp, xs, out_widths, in_indices, out_indices, grads);
  CHECK_DIM(kOp, "weight", weight, 4, "4-D [C_out, C_in/groups, kh, kw]");
  const bool depthwise = groups != 1;
  TORCH_CHECK_VALUE(!depthwise || (groups == weight.size(0) && weight.size(1) == 1), kOp,
                    ": groups must be 1, or weight.size(0) with weight [C, 1, kh, kw] (depthwise); got groups=",
                    groups, " with weight of shape ", weight.sizes());

  const auto check_one = [&](size_t i, const std::optional<at::Tensor>& in_i, const std::optional<at::Tensor>& out_i) {
    const ArgNames names = subnet_names(kOp, i);
    // Depthwise: subnet i is a compact depthwise conv over its own k_i channels (groups = k_i,
    // which may be 1 or 0), so the mode is forced rather than inferred from groups.
    int64_t sub_groups = 1;
    if (depthwise) {
      CHECK_DIM(kOp, names.x, xs[i], 4, "4-D [B, k, H, W]");
      sub_groups = xs[i].size(1);
    }
    const MaskedConv2dShape s = masked_conv2d_check_named(xs[i], weight, bias, in_i, out_i, out_widths[i], stride,
                                                          padding, dilation, sub_groups,
                                                          grads ? &(*grads)[i] : nullptr, names, depthwise);
    if (i > 0) {
      TORCH_CHECK_VALUE(xs[i].size(2) == xs[0].size(2) && xs[i].size(3) == xs[0].size(3), kOp, ": ", names.x,
                        " has spatial size (", xs[i].size(2), ", ", xs[i].size(3), ") but xs[0] has (",
                        xs[0].size(2), ", ", xs[0].size(3), "); all subnets share one H, W");
    }
    return s;
  };
  return check_each_subnet<MaskedConv2dShape>(S, in_indices, out_indices, check_one);
}

std::vector<at::Tensor> multi_subnet_conv2d_fwd_cpu(at::TensorList xs, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, at::IntArrayRef out_widths,
                                                    const std::optional<at::TensorList>& in_indices,
                                                    const std::optional<at::TensorList>& out_indices,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, int64_t groups) {
  const auto subs = check_subnets(xs, weight, bias, out_widths, in_indices, out_indices, stride, padding, dilation,
                                  groups, nullptr);
  std::vector<at::Tensor> ys;
  ys.reserve(subs.size());
  for (size_t i = 0; i < subs.size(); ++i) {
    const ConvSubnet& sub = subs[i];
    const at::Tensor wc = masked_conv2d_active_weight(weight, sub.s, sub.in(), sub.out(), conv_memory_format(xs[i]));
    ys.push_back(masked_conv2d_forward_cpu(xs[i], wc, bias, sub.s, sub.out(), stride, padding, dilation));
  }
  return ys;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multi_subnet_conv2d_bwd_cpu(
    at::TensorList grads, at::TensorList xs, const at::Tensor& weight, at::IntArrayRef out_widths,
    const std::optional<at::TensorList>& in_indices, const std::optional<at::TensorList>& out_indices,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool need_x,
    bool need_weight, bool need_bias) {
  const auto subs = check_subnets(xs, weight, std::nullopt, out_widths, in_indices, out_indices, stride, padding,
                                  dilation, groups, &grads);
  const at::TensorOptions opts = xs[0].options();
  std::vector<at::Tensor> grad_xs(need_x ? subs.size() : 0);
  at::Tensor grad_w = need_weight ? zeros_like_weight(weight)
                                  : at::empty({0}, opts);
  at::Tensor grad_b = need_bias ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);
  for (size_t i = 0; i < subs.size(); ++i) {
    const ConvSubnet& sub = subs[i];
    if (need_x || need_weight) {
      const at::Tensor wc = masked_conv2d_active_weight(weight, sub.s, sub.in(), sub.out(), conv_memory_format(xs[i]));
      auto [gx, gwc] =
          masked_conv2d_backward_cpu(grads[i], xs[i], wc, sub.s, stride, padding, dilation, need_x, need_weight);
      if (need_x) grad_xs[i] = gx;
      if (need_weight) masked_conv2d_add_grad_weight_cpu(grad_w, gwc, sub.s, sub.in(), sub.out());
    }
    if (need_bias) masked_conv2d_add_grad_bias_cpu(grad_b, grads[i], sub.s, sub.out());
  }
  return {grad_xs, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_multi_subnet_conv2d_fwd", &multi_subnet_conv2d_fwd_cpu);
  m.impl("_multi_subnet_conv2d_bwd", &multi_subnet_conv2d_bwd_cpu);
}

}  // namespace stp_fast
