// masked_conv2d on CPU: compact coordinates + ATen's convolution (oneDNN for float32/bf16/fp16).
//
// Algorithm (KERNELS.md §0.1, §6(ii)): build the active block Wc = weight[out_index][:, in_index]
// ([n, k, kh, kw]; depthwise: rows only, [k, 1, kh, kw]) in x's memory format -- a narrowed view
// made dense for prefixes, one parallel gather (common/gather.h) for index lists -- then
//   forward : y = at::convolution(x, Wc, bias_c)                        (x's memory format)
//   backward: (grad_x, dWc) = at::convolution_backward(grad_out, x, Wc)
//             dWc scattered into zeros of weight's shape (prefix: add_ into the narrowed view)
//             grad_b = grad_out.sum((B, OH, OW)) scattered into zeros [C_out]
// The weight block is built in x's memory format because oneDNN picks channels-last whenever
// either operand is channels-last (a channels-last weight would turn an NCHW x into a
// channels-last output) and NCHW convolutions can be 4-5x slower on CPU (KERNELS.md §5).
// Zero batch, zero active inputs (output = bias) and zero active outputs skip ATen, whose
// convolution mishandles zero input channels.  masked_conv2d_check is shared with the CUDA glue.
#include "masked_conv2d/masked_conv2d.h"

#include <torch/library.h>

#include <initializer_list>
#include <string>

#include "common/checks.h"
#include "common/gather.h"
#include "masked_conv2d/masked_conv2d_cpu.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "masked_conv2d";

void check_conv_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, bool force_depthwise) {
  struct Param {
    const char* name;
    at::IntArrayRef v;
    int64_t lo;  // smallest allowed value
  };
  for (const Param& p : {Param{"stride", stride, 1}, Param{"padding", padding, 0}, Param{"dilation", dilation, 1}}) {
    TORCH_CHECK_VALUE(p.v.size() == 2, op, ": ", p.name, " must have 2 elements (height, width), got ", p.v);
    TORCH_CHECK_VALUE(p.v[0] >= p.lo && p.v[1] >= p.lo, op, ": ", p.name, " must be >= ", p.lo, ", got ", p.v);
  }
  TORCH_CHECK_VALUE(groups >= 1 || (force_depthwise && groups == 0), op, ": groups must be >= 1, got ", groups);
}

// Output size along one spatial dimension; the dilated kernel must fit the padded input.
int64_t conv_out_size(const char* op, const std::string& xn, const char* dim, int64_t size, int64_t kernel,
                      int64_t stride, int64_t pad, int64_t dil) {
  const int64_t span = dil * (kernel - 1) + 1;
  TORCH_CHECK_VALUE(size + 2 * pad >= span, op, ": ", xn, " is too small: its ", dim, " is ", size, " (",
                    size + 2 * pad, " with padding ", pad, ") but the dilated kernel spans ", span, " (kernel ",
                    kernel, ", dilation ", dil, ")");
  return (size + 2 * pad - span) / stride + 1;
}

at::Tensor masked_conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                                 int64_t out_width, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  const MaskedConv2dShape s = masked_conv2d_check(x, weight, bias, in_index, out_index, out_width, stride, padding,
                                                  dilation, groups, nullptr);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor* out_idx = index_or_null(out_c);
  const at::Tensor wc = masked_conv2d_active_weight(weight, s, index_or_null(in_c), out_idx, conv_memory_format(x));
  return masked_conv2d_forward_cpu(x, wc, bias, s, out_idx, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index, int64_t out_width,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool need_x,
    bool need_weight, bool need_bias) {
  const MaskedConv2dShape s = masked_conv2d_check(x, weight, std::nullopt, in_index, out_index, out_width, stride,
                                                  padding, dilation, groups, &grad_out);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor* in_idx = index_or_null(in_c);
  const at::Tensor* out_idx = index_or_null(out_c);

  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());
  if (need_x || need_weight) {
    const at::Tensor wc = masked_conv2d_active_weight(weight, s, in_idx, out_idx, conv_memory_format(x));
    auto [gx, gwc] = masked_conv2d_backward_cpu(grad_out, x, wc, s, stride, padding, dilation, need_x, need_weight);
    if (need_x) grad_x = gx;
    if (need_weight) {
      grad_w = zeros_like_weight(weight);
      masked_conv2d_add_grad_weight_cpu(grad_w, gwc, s, in_idx, out_idx);
    }
  }
  if (need_bias) {
    grad_b = at::zeros({s.C_out}, x.options());
    masked_conv2d_add_grad_bias_cpu(grad_b, grad_out, s, out_idx);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

MaskedConv2dShape masked_conv2d_check(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_index,
                                      const std::optional<at::Tensor>& out_index, int64_t out_width,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, const at::Tensor* grad_out) {
  return masked_conv2d_check_named(x, weight, bias, in_index, out_index, out_width, stride, padding, dilation, groups,
                                   grad_out, ArgNames{kOp});
}

MaskedConv2dShape masked_conv2d_check_named(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& in_index,
                                            const std::optional<at::Tensor>& out_index, int64_t out_width,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef dilation, int64_t groups, const at::Tensor* grad_out,
                                            const ArgNames& names, bool force_depthwise) {
  const char* op = names.op;
  const std::string& xn = names.x;
  check_input_and_weight(op, xn, x, weight);
  CHECK_DIM(op, xn, x, 4, "4-D [B, k, H, W]");
  CHECK_DIM(op, "weight", weight, 4, "4-D [C_out, C_in/groups, kh, kw]");
  check_conv_params(op, stride, padding, dilation, groups, force_depthwise);

  MaskedConv2dShape s{};
  s.B = x.size(0), s.k = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.C_out = weight.size(0), s.C_in_per_group = weight.size(1), s.kh = weight.size(2), s.kw = weight.size(3);
  s.groups = groups;
  TORCH_CHECK_VALUE(s.kh >= 1 && s.kw >= 1, op, ": weight must have a non-empty kernel, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(s.H >= 1 && s.W >= 1, op, ": ", xn, " must have a non-zero spatial size, got shape ", x.sizes());

  check_bias(op, bias, xn, x, s.C_out, "C_out");

  const int64_t out_len = check_out_selection(out_index, out_width, s.C_out, x.device(), names);
  s.out_prefix = out_len < 0;
  s.n = out_width;

  s.depthwise = force_depthwise || (groups > 1 && s.C_in_per_group == 1);
  if (force_depthwise) {
    TORCH_CHECK_VALUE(s.C_in_per_group == 1, op, ": depthwise needs weight of shape [C, 1, kh, kw], got ",
                      weight.sizes());
  }
  if (groups == 1 && !s.depthwise) {
    const int64_t in_len = check_index(in_index, s.C_in_per_group, x.device(), op, names.in_index.c_str());
    s.in_prefix = in_len < 0;
    if (s.in_prefix) {
      TORCH_CHECK_VALUE(s.k <= s.C_in_per_group, op, ": ", xn, " has ", s.k, " channels but weight has only ",
                        s.C_in_per_group, " input channels; pass ", names.in_index, " or a narrower ", xn);
    } else {
      TORCH_CHECK_VALUE(s.k == in_len, op, ": ", xn, " has ", s.k, " channels but ", names.in_index, " has ", in_len,
                        " entries");
    }
  } else if (s.depthwise) {
    TORCH_CHECK_VALUE(groups == s.k && s.k == out_width, op, ": depthwise (weight [C, 1, kh, kw]) needs groups == ",
                      xn, ".size(1) == ", names.out_width, ", got groups=", groups, ", ", xn, ".size(1)=", s.k, ", ",
                      names.out_width, "=", out_width);
    TORCH_CHECK_VALUE(in_index.has_value() == out_index.has_value(), op, ": depthwise needs ", names.in_index, " and ",
                      names.out_index, " to select the same channels (both given or both absent)");
    const int64_t in_len = check_index(in_index, s.C_out, x.device(), op, names.in_index.c_str());
    s.in_prefix = in_len < 0;
    if (!s.in_prefix) {
      // Values of device tensors: compared only when device index checks are on (at::equal syncs).
      const bool compare = in_index->is_cpu() || device_index_checks_enabled();
      TORCH_CHECK_VALUE(in_len == out_len && (in_index->is_same(*out_index) || !compare ||
                                              at::equal(*in_index, *out_index)),
                        op, ": depthwise needs ", names.in_index, " equal to ", names.out_index);
    }
  } else {
    TORCH_CHECK_VALUE(!in_index.has_value() && !out_index.has_value() && s.k == s.C_in_per_group * groups &&
                          out_width == s.C_out,
                      op, ": groups=", groups, " with weight of shape ", weight.sizes(),
                      " needs all channels active (no ", names.in_index, "/", names.out_index, ", ", xn, " with ",
                      s.C_in_per_group * groups, " channels, ", names.out_width, " = ", s.C_out, "); got ", xn,
                      " with ", s.k, " channels and ", names.out_width, " = ", out_width);
    TORCH_CHECK_VALUE(s.C_out % groups == 0, op, ": weight has ", s.C_out,
                      " output channels, not divisible by groups=", groups);
    s.in_prefix = true;
  }

  s.OH = conv_out_size(op, xn, "height", s.H, s.kh, stride[0], padding[0], dilation[0]);
  s.OW = conv_out_size(op, xn, "width", s.W, s.kw, stride[1], padding[1], dilation[1]);

  if (grad_out != nullptr) {
    const std::string& gn = names.grad_out;
    check_dense_like(op, gn, *grad_out, xn, x);
    const std::vector<int64_t> want{s.B, s.n, s.OH, s.OW};
    TORCH_CHECK_VALUE(grad_out->sizes() == at::IntArrayRef(want), op, ": ", gn, " must have shape ",
                      at::IntArrayRef(want), " ([B, ", names.out_width, ", OH, OW]), got ", grad_out->sizes());
  }
  return s;
}

at::MemoryFormat conv_memory_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

at::Tensor masked_conv2d_active_weight(const at::Tensor& weight, const MaskedConv2dShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx, at::MemoryFormat fmt) {
  if (s.depthwise) {  // rows only: channel c uses weight row out_index[c] (or c)
    if (s.out_prefix) return weight.narrow(0, 0, s.k).contiguous(fmt);
    return gather_block(weight, out_idx, nullptr, s.k, 1, fmt);
  }
  if (s.groups > 1) return weight.contiguous(fmt);  // full grouped convolution
  if (s.in_prefix && s.out_prefix) return weight.narrow(0, 0, s.n).narrow(1, 0, s.k).contiguous(fmt);
  return gather_block(weight, out_idx, in_idx, s.n, s.k, fmt);
}

at::Tensor masked_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& wc, const std::optional<at::Tensor>& bias,
                                     const MaskedConv2dShape& s, const at::Tensor* out_idx, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::MemoryFormat fmt = conv_memory_format(x);
  std::optional<at::Tensor> bc;
  if (bias.has_value()) bc = out_idx ? bias->index_select(0, *out_idx) : bias->narrow(0, 0, s.n);
  if (s.B == 0 || s.n == 0 || s.k == 0) {  // nothing to convolve: the output is the bias (or zero)
    at::Tensor y = zeros_in_format({s.B, s.n, s.OH, s.OW}, x.options(), fmt);
    if (bc.has_value() && y.numel() > 0) y.add_(bc->view({1, s.n, 1, 1}));
    return y;
  }
  const at::Tensor y = at::convolution(x.contiguous(fmt), wc, bc, stride, padding, dilation, /*transposed=*/false,
                                       /*output_padding=*/{0, 0}, compact_groups(s));
  return y.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& wc, const MaskedConv2dShape& s,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, bool need_x,
                                                              bool need_weight) {
  const at::MemoryFormat fmt = conv_memory_format(x);
  if (s.B == 0 || s.n == 0 || s.k == 0) {  // no product term: grad_x is zero, the weight block gets nothing
    at::Tensor gx = need_x ? zeros_in_format(x.sizes(), x.options(), fmt) : at::Tensor();
    return {gx, at::Tensor()};
  }
  auto [gx, gw, gb] = at::convolution_backward(grad_out.contiguous(fmt), x.contiguous(fmt), wc,
                                               /*bias_sizes=*/std::nullopt, stride, padding, dilation,
                                               /*transposed=*/false, /*output_padding=*/{0, 0}, compact_groups(s),
                                               {need_x, need_weight, false});
  (void)gb;
  if (need_x) gx = gx.contiguous(fmt);
  return {need_x ? gx : at::Tensor(), need_weight ? gw : at::Tensor()};
}

void masked_conv2d_add_grad_weight_cpu(at::Tensor& grad_w, const at::Tensor& gwc, const MaskedConv2dShape& s,
                                       const at::Tensor* in_idx, const at::Tensor* out_idx) {
  if (!gwc.defined()) return;
  if (s.depthwise) {
    if (s.out_prefix) {
      grad_w.narrow(0, 0, s.k).add_(gwc);
    } else {
      scatter_block(grad_w, gwc, out_idx, nullptr, /*accumulate=*/true);
    }
  } else if (s.groups > 1) {
    grad_w.add_(gwc);
  } else if (s.in_prefix && s.out_prefix) {
    grad_w.narrow(0, 0, s.n).narrow(1, 0, s.k).add_(gwc);
  } else {
    scatter_block(grad_w, gwc, out_idx, in_idx, /*accumulate=*/true);
  }
}

void masked_conv2d_add_grad_bias_cpu(at::Tensor& grad_b, const at::Tensor& grad_out, const MaskedConv2dShape& s,
                                     const at::Tensor* out_idx) {
  if (s.n == 0) return;
  const at::Tensor gsum = grad_out.sum({0, 2, 3});
  if (out_idx) {
    grad_b.index_add_(0, *out_idx, gsum);
  } else {
    grad_b.narrow(0, 0, s.n).add_(gsum);
  }
}

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_masked_conv2d_fwd", &masked_conv2d_fwd_cpu);
  m.impl("_masked_conv2d_bwd", &masked_conv2d_bwd_cpu);
}

}  // namespace stp_fast
