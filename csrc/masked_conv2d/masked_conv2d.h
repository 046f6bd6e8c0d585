// masked_conv2d: y = conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding,
// dilation, groups), with x [B, k, H, W] holding only the active input channels.
//
// Shared by the CPU kernels (masked_conv2d.cpp, multi_subnet_conv2d.cpp) and the CUDA glue: the
// argument validation below runs on any device.  The ATen part is hidden from nvcc's device pass
// by `#ifndef __CUDACC__` (as in masked_linear.h), so a .cu file may include this header.
#pragma once

#include <cstdint>

#ifndef __CUDACC__
#include <ATen/ATen.h>

#include <optional>

namespace stp_fast {

struct MaskedConv2dShape {
  int64_t B, k, H, W;                     // x: [B, k, H, W]
  int64_t n, OH, OW;                      // output: [B, n, OH, OW]
  int64_t C_out, C_in_per_group, kh, kw;  // weight
  int64_t groups;
  bool in_prefix, out_prefix, depthwise;
};

// Validates the arguments of _masked_conv2d_fwd/_bwd on any device (grad_out null in the forward);
// raises TypeError/ValueError naming the argument ("masked_conv2d: ...").
//
// Modes: groups == 1 (any in_index over weight.size(1), any out_index over weight.size(0));
// depthwise (groups > 1 and weight.size(1) == 1: groups == k == out_width, in_index and out_index
// both absent or equal, indexing weight.size(0)); any other groups > 1 only with no index and full
// widths (k == C_in_per_group * groups, out_width == C_out).  The output spatial size is at least 1
// (a ValueError names the input size when the dilated kernel does not fit the padded input).
MaskedConv2dShape masked_conv2d_check(const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_index,
    const std::optional<at::Tensor>& out_index, int64_t out_width, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const at::Tensor* grad_out);

// The memory format of the output and of grad_x (CPU and CUDA alike): channels-last when x is
// channels-last (and not also NCHW-contiguous), else contiguous NCHW.
at::MemoryFormat conv_memory_format(const at::Tensor& x);

}  // namespace stp_fast
#endif  // __CUDACC__
