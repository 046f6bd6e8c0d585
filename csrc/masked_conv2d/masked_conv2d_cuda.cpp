// masked_conv2d on CUDA: torch glue around the kernels of masked_conv2d_cuda.cu.
//
// Validation is shared with the CPU path (masked_conv2d_check in masked_conv2d.h; index values are
// checked on the device with one sync per index).  groups == 1 runs the implicit-GEMM kernels,
// which read the weight in place through the index arrays (no packed copy) and write grad_weight
// into a zero-filled full-shape tensor at the gathered positions; depthwise runs the direct
// kernels; any other groups > 1 (only legal with full widths and no index) is a plain grouped
// convolution and goes to ATen (cuDNN).  grad_weight uses the deterministic split-K schedule when
// its output has too few tiles for the GPU (masked_conv2d_gemm_split_k / _depthwise_split_k).
// grad_bias is an ATen reduction scattered into zeros.
//
// Memory format (contract): y and grad_x are channels-last when x is channels-last (and not also
// contiguous), else contiguous NCHW; grad_weight is a contiguous tensor of weight's shape.
// Compiled only in CUDA builds (setup.py defines WITH_CUDA).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "masked_conv2d/masked_conv2d.h"
#include "masked_conv2d/masked_conv2d_cuda.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "masked_conv2d";

using Launcher = int (*)(const MaskedConv2dArgs&, int, cudaStream_t);

void launch(Launcher fn, const MaskedConv2dArgs& args, const at::Tensor& like, const char* what) {
  launch_checked(fn, args, like, kOp, what);
}

void set_strides(int64_t (&dst)[4], const at::Tensor& t) {
  for (int d = 0; d < 4; ++d) dst[d] = t.stride(d);
}

// Sizes, geometry, weight and indices; the caller adds the operands of one launcher.
MaskedConv2dArgs base_args(const MaskedConv2dShape& s, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& in_c,
                           const std::optional<at::Tensor>& out_c) {
  MaskedConv2dArgs a;
  a.B = s.B, a.k = s.k, a.H = s.H, a.W = s.W;
  a.n = s.n, a.OH = s.OH, a.OW = s.OW, a.kh = s.kh, a.kw = s.kw;
  a.sh = stride[0], a.sw = stride[1], a.ph = padding[0], a.pw = padding[1], a.dh = dilation[0], a.dw = dilation[1];
  a.w = weight.const_data_ptr();
  set_strides(a.w_s, weight);
  a.in_index = index_ptr(in_c);
  a.out_index = index_ptr(out_c);
  return a;
}

at::Tensor masked_conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& in_index,
                                  const std::optional<at::Tensor>& out_index, int64_t out_width,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const MaskedConv2dShape s = masked_conv2d_check(x, weight, bias, in_index, out_index, out_width, stride, padding,
                                                  dilation, groups, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = conv_memory_format(x);
  if (s.groups > 1 && !s.depthwise) {  // full widths, no index: a plain grouped convolution
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, groups).contiguous(fmt);
  }
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  at::Tensor y = at::empty({s.B, s.n, s.OH, s.OW}, x.options().memory_format(fmt));
  MaskedConv2dArgs a = base_args(s, weight, stride, padding, dilation, in_c, out_c);
  a.x = x.const_data_ptr();
  set_strides(a.x_s, x);
  if (bias.has_value()) {
    a.bias = bias->const_data_ptr();
    a.bias_s = bias->stride(0);
  }
  a.out = y.mutable_data_ptr();
  set_strides(a.out_s, y);
  if (s.depthwise) {
    launch(&stp_fast_masked_conv2d_depthwise_fwd_launch, a, x, "depthwise forward kernel");
  } else {
    launch(&stp_fast_masked_conv2d_fwd_launch, a, x, "forward kernel");
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index, int64_t out_width,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool need_x,
    bool need_weight, bool need_bias) {
  const MaskedConv2dShape s = masked_conv2d_check(x, weight, std::nullopt, in_index, out_index, out_width, stride,
                                                  padding, dilation, groups, &grad_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = conv_memory_format(x);
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());

  if (s.groups > 1 && !s.depthwise) {  // full widths, no index: ATen's grouped convolution backward
    const std::array<bool, 3> mask{need_x, need_weight, need_bias};
    const std::vector<int64_t> bias_sizes{s.C_out};
    auto grads = at::convolution_backward(grad_out, x, weight, need_bias ? at::OptionalIntArrayRef(bias_sizes)
                                                                         : at::OptionalIntArrayRef(),
                                          stride, padding, dilation, false, {0, 0}, groups, mask);
    if (need_x) grad_x = std::get<0>(grads).contiguous(fmt);
    if (need_weight) grad_w = std::get<1>(grads).contiguous();
    if (need_bias) grad_b = std::get<2>(grads);
    return {grad_x, grad_w, grad_b};
  }

  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const MaskedConv2dArgs base = base_args(s, weight, stride, padding, dilation, in_c, out_c);

  if (need_x) {
    grad_x = at::empty({s.B, s.k, s.H, s.W}, x.options().memory_format(fmt));
    MaskedConv2dArgs a = base;
    a.g = grad_out.const_data_ptr();
    set_strides(a.g_s, grad_out);
    a.out = grad_x.mutable_data_ptr();
    set_strides(a.out_s, grad_x);
    if (s.depthwise) {
      launch(&stp_fast_masked_conv2d_depthwise_grad_x_launch, a, x, "depthwise grad_x kernel");
    } else {
      launch(&stp_fast_masked_conv2d_grad_x_launch, a, x, "grad_x kernel");
    }
  }
  if (need_weight) {
    grad_w = at::zeros(weight.sizes(), x.options());
    MaskedConv2dArgs a = base;
    a.x = x.const_data_ptr();
    set_strides(a.x_s, x);
    a.g = grad_out.const_data_ptr();
    set_strides(a.g_s, grad_out);
    a.out = grad_w.mutable_data_ptr();
    set_strides(a.out_s, grad_w);
    const int64_t P = s.B * s.OH * s.OW;
    const int sms = num_sms(x.device());
    a.split_k = s.depthwise ? masked_conv2d_depthwise_split_k(s.k, s.kh, s.kw, P, sms)
                            : masked_conv2d_gemm_split_k(s.n, s.k * s.kh * s.kw, P, sms);
    at::Tensor workspace;  // must outlive the launch
    if (a.split_k > 1) {
      workspace = split_k_workspace(masked_conv2d_workspace_elems(a, s.depthwise, a.split_k), x);
      a.workspace = workspace.mutable_data_ptr();
    }
    if (s.depthwise) {
      launch(&stp_fast_masked_conv2d_depthwise_grad_w_launch, a, x, "depthwise grad_weight kernel");
    } else {
      launch(&stp_fast_masked_conv2d_grad_w_launch, a, x, "grad_weight kernel");
    }
  }
  if (need_bias) {
    // Depthwise: channel c's bias is bias[ch(c)], ch = out_index (== in_index) or the prefix.
    const auto& bias_index = s.depthwise && !out_c.has_value() ? in_c : out_c;
    grad_b = scatter_grad_bias(grad_out.sum(at::IntArrayRef{0, 2, 3}), bias_index, s.C_out, grad_out.options());
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(stp_fast, CUDA, m) {
  m.impl("_masked_conv2d_fwd", &masked_conv2d_fwd_cuda);
  m.impl("_masked_conv2d_bwd", &masked_conv2d_bwd_cuda);
}

}  // namespace stp_fast

#endif  // WITH_CUDA
