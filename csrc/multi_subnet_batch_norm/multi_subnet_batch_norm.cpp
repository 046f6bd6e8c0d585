// multi_subnet_batch_norm (+ optional ReLU) on CPU: S subnets sharing one BN layer's parameters.
//
// Subnet s normalises xs[s] [B_s, c_s, *spatial] over its channels indices[s] (or the prefix c_s)
// of the layer's C channels, with ATen's fused CPU kernels on compact parameters:
//   forward : at::native_batch_norm on the sliced weight/bias (views for prefixes, index_select for
//             index lists).  training: batch statistics, running stats passed undefined so nothing
//             is mutated; save_mean / save_invstd are the returned means / invstds.  eval: the
//             sliced running stats (means = running_mean, invstds = 1/sqrt(running_var + eps)).
//             ReLU in place on the output.  means / invstds are float32 [c_s] (float64 for float64 inputs).
//             Training on float32 channels-last inputs: bn_rows_cpu.cpp's chunked kernels instead
//             (ReLU fused; ATen's channels-last kernels are 3-4x slower for the small, odd channel
//             counts of pruned subnets), and in the backward too.
//   backward: the ReLU mask is recomputed from x as y = x * alpha + beta > 0 (alpha = invstd * w,
//             beta = b - mean * alpha, ATen's own forward formula; no sign mismatch with the
//             forward's output in 1M-element checks for fp32/bf16/fp64, NCHW and channels-last,
//             training and eval), grad_out is masked, then
//             at::native_batch_norm_backward (eval: running_var = 1/invstd^2 with eps = 0, so the
//             kernel uses exactly the forward's invstd).  grad_weight / grad_bias are summed over
//             the subnets in subnet order into zeros [C] (deterministic).
// float16/bfloat16 inputs use ATen's mixed-type path (float32 parameters and statistics, as
// autocast does), so statistics are never rounded to 16 bits; gradient sums over subnets run in
// float32 and are rounded once.  float64 inputs get float64 statistics, so the float64 backward is exact to
// float64 rounding.
// An empty subnet batch (B_s = 0 or empty spatial size) has no statistics: training returns
// mean 0 and invstd 1/sqrt(eps) (variance 0) for it, an empty output and zero gradients.
#include <torch/library.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "multi_subnet_batch_norm/bn_rows_cpu.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "multi_subnet_batch_norm";

struct BnSubnet {
  int64_t c;                      // active channels
  std::optional<at::Tensor> idx;  // contiguous index (none: prefix)
};

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// dtype of parameters and statistics handed to ATen: float32 for float16/bfloat16 inputs.
at::ScalarType param_dtype(const at::Tensor& x) { return is_reduced(x.scalar_type()) ? at::kFloat : x.scalar_type(); }

// A per-channel parameter sliced to the subnet's channels and cast to `dtype` (undefined if absent).
at::Tensor slice_param(const std::optional<at::Tensor>& p, const BnSubnet& sub, at::ScalarType dtype) {
  if (!p.has_value()) return at::Tensor();
  const at::Tensor t = sub.idx ? p->index_select(0, *sub.idx) : p->narrow(0, 0, sub.c);
  return t.to(dtype);
}

// The subnet's weight for ATen in dtype pd; float16/bfloat16 without affine weight: ones, which
// force ATen's mixed-type path (float statistics).
at::Tensor subnet_weight(const std::optional<at::Tensor>& weight, const BnSubnet& sub, const at::Tensor& x,
                         at::ScalarType pd) {
  at::Tensor w = slice_param(weight, sub, pd);
  if (!w.defined() && is_reduced(x.scalar_type())) w = at::ones({sub.c}, x.options().dtype(at::kFloat));
  return w;
}

// acc[channels of sub] += v (acc full [C]).
void add_channels(at::Tensor& acc, const at::Tensor& v, const BnSubnet& sub) {
  if (sub.c == 0) return;
  if (sub.idx) {
    acc.index_add_(0, *sub.idx, v.to(acc.scalar_type()));
  } else {
    acc.narrow(0, 0, sub.c).add_(v);
  }
}

// dtype of the returned statistics: float64 for float64 inputs, else float32.
at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A fresh [c] copy of v in x's statistics dtype (outputs never alias the inputs).
at::Tensor float_copy(const at::Tensor& v, const at::Tensor& like) {
  at::Tensor out = at::empty({v.size(0)}, like.options().dtype(stat_dtype(like)));
  out.copy_(v);
  return out;
}

// Per-channel statistics/parameters broadcast against x [B, c, *spatial].
at::Tensor channel_view(const at::Tensor& v, const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = v.size(0);
  return v.view(shape);
}

// Checks a per-channel parameter (weight, bias, running stats) and returns its length (-1 absent).
int64_t check_param(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x0, bool stats) {
  if (!p.has_value()) return -1;
  CHECK_STRIDED(kOp, name, *p);
  if (stats) {  // running statistics may be float32 for float16/bfloat16 layers
    TORCH_CHECK_TYPE(p->scalar_type() == x0.scalar_type() || p->scalar_type() == at::kFloat, kOp, ": ", name,
                     " must have xs[0]'s dtype (", x0.scalar_type(), ") or float32, got ", p->scalar_type());
  } else {  // affine parameters: x's dtype, or float32 for float16/bfloat16 inputs (mixed precision, autocast)
    const bool mixed = is_reduced(x0.scalar_type()) && p->scalar_type() == at::kFloat;
    TORCH_CHECK_TYPE(p->scalar_type() == x0.scalar_type() || mixed, kOp, ": ", name, " has dtype ",
                     p->scalar_type(), " but xs[0] has ", x0.scalar_type(),
                     "; it must have xs[0]'s dtype, or float32 for float16/bfloat16 inputs");
  }
  CHECK_SAME_DEVICE(kOp, name, *p, "xs[0]", x0);
  CHECK_DIM(kOp, name, *p, 1, "1-D [C]");
  return p->size(0);
}

// A per-channel parameter of the layer: the tensor, its name, whether it is a running statistic.
struct Param {
  const std::optional<at::Tensor>* t;
  const char* name;
  bool stats;
};

// The layer's channel count from its parameters (all present ones must agree); -1 when none given.
int64_t check_params(const at::Tensor& x0, std::initializer_list<Param> params) {
  int64_t C = -1;
  const char* first = nullptr;
  for (const auto& [p, name, stats] : params) {
    const int64_t len = check_param(*p, name, x0, stats);
    if (len < 0) continue;
    TORCH_CHECK_VALUE(C < 0 || len == C, kOp, ": ", name, " has ", len, " channels but ", first, " has ", C);
    C = len, first = name;
  }
  return C;
}

// Validates the subnet inputs and their channel selections against a layer of C channels (-1:
// unknown, no parameter given).
std::vector<BnSubnet> check_subnets(at::TensorList xs, int64_t C, const std::optional<at::TensorList>& indices) {
  std::vector<BnSubnet> subs(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string xn = item_name("xs", i);
    TORCH_CHECK_VALUE(xs[i].dim() >= 2, kOp, ": ", xn, " must be [B, c, *spatial] (at least 2-D), got shape ",
                      xs[i].sizes());
    subs[i].c = xs[i].size(1);
    if (indices.has_value()) {
      const std::string in = item_name("indices", i);
      const int64_t dim = C >= 0 ? C : std::numeric_limits<int64_t>::max();
      const int64_t len = check_index((*indices)[i], dim, xs[0].device(), kOp, in.c_str());
      TORCH_CHECK_VALUE(len == subs[i].c, kOp, ": ", xn, " has ", subs[i].c, " channels but ", in, " has ", len,
                        " entries");
      subs[i].idx = (*indices)[i].contiguous();
    } else if (C >= 0) {
      TORCH_CHECK_VALUE(subs[i].c <= C, kOp, ": ", xn, " has ", subs[i].c, " channels but the layer has only ", C);
    }
  }
  return subs;
}

void check_common(at::TensorList xs, const std::optional<at::TensorList>& indices) {
  check_subnet_inputs(kOp, xs);
  if (indices.has_value()) check_list_len(kOp, "indices", indices->size(), xs.size());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> multi_subnet_batch_norm_fwd_cpu(
    at::TensorList xs, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::TensorList>& indices, bool training, double eps, bool relu) {
  check_common(xs, indices);
  const int64_t C = check_params(xs[0], {{&weight, "weight", false},
                                         {&bias, "bias", false},
                                         {&running_mean, "running_mean", true},
                                         {&running_var, "running_var", true}});
  TORCH_CHECK_VALUE(training || (running_mean.has_value() && running_var.has_value()), kOp,
                    ": running_mean and running_var are required when training=False");
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), kOp, ": eps must be a finite number >= 0, got ", eps);
  const auto subs = check_subnets(xs, C, indices);

  const size_t S = subs.size();
  std::vector<at::Tensor> ys(S), means(S), invstds(S);
  for (size_t i = 0; i < S; ++i) {
    const at::Tensor& x = xs[i];
    const BnSubnet& sub = subs[i];
    const at::ScalarType pd = param_dtype(x);
    const at::Tensor w = subnet_weight(weight, sub, x, pd);
    const at::Tensor b = slice_param(bias, sub, pd);
    at::Tensor y, mean, invstd;
    bool relu_done = false;
    if (training) {
      if (x.numel() == 0) {
        y = at::empty_like(x);
        mean = at::zeros({sub.c}, x.options().dtype(at::kFloat));
        invstd = at::full({sub.c}, 1.0 / std::sqrt(eps), x.options().dtype(at::kFloat));
      } else if (bn_rows_applicable(x)) {  // float32 channels-last: the chunked kernels, ReLU fused
        std::tie(y, mean, invstd) = bn_rows_forward(x, w, b, eps, relu);
        relu_done = true;
      } else {
        std::tie(y, mean, invstd) = at::native_batch_norm(x, w, b, at::Tensor(), at::Tensor(), true, 0.0, eps);
      }
    } else {
      mean = slice_param(running_mean, sub, pd);
      const at::Tensor var = slice_param(running_var, sub, pd);
      invstd = (var + eps).rsqrt();
      y = x.numel() == 0 ? at::empty_like(x)
                         : std::get<0>(at::native_batch_norm(x, w, b, mean, var, false, 0.0, eps));
    }
    if (relu && !relu_done) y.relu_();
    ys[i] = y;
    means[i] = float_copy(mean, x);
    invstds[i] = float_copy(invstd, x);
  }
  return {ys, means, invstds};
}

// Checks grads/means/invstds of the backward against the subnets.
void check_bwd_lists(at::TensorList grads, at::TensorList xs, at::TensorList means, at::TensorList invstds,
                     const std::vector<BnSubnet>& subs) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string gn = item_name("grads", i), xn = item_name("xs", i);
    check_dense_like(kOp, gn, grads[i], xn, xs[i]);
    TORCH_CHECK_VALUE(grads[i].sizes() == xs[i].sizes(), kOp, ": ", gn, " must have the shape of ", xn, " ",
                      xs[i].sizes(), ", got ", grads[i].sizes());
    for (const auto& [list, name] : {std::pair<at::TensorList, const char*>{means, "means"}, {invstds, "invstds"}}) {
      const std::string sn = item_name(name, i);
      CHECK_STRIDED(kOp, sn, list[i]);
      TORCH_CHECK_TYPE(list[i].scalar_type() == stat_dtype(xs[i]), kOp, ": ", sn, " must be ",
                       stat_dtype(xs[i]), " (float64 for float64 inputs, else float32), got ", list[i].scalar_type());
      CHECK_SAME_DEVICE(kOp, sn, list[i], xn, xs[i]);
      TORCH_CHECK_VALUE(list[i].dim() == 1 && list[i].size(0) == subs[i].c, kOp, ": ", sn, " must be 1-D [",
                        subs[i].c, "] (", xn, "'s channels), got shape ", list[i].sizes());
    }
  }
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multi_subnet_batch_norm_bwd_cpu(
    at::TensorList grads, at::TensorList xs, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::TensorList means, at::TensorList invstds,
    const std::optional<at::TensorList>& indices, bool training, bool relu, bool need_x, bool need_weight,
    bool need_bias) {
  check_common(xs, indices);
  check_list_len(kOp, "grads", grads.size(), xs.size());
  check_list_len(kOp, "means", means.size(), xs.size());
  check_list_len(kOp, "invstds", invstds.size(), xs.size());
  const int64_t C = check_params(xs[0], {{&weight, "weight", false}, {&bias, "bias", false}});
  const auto subs = check_subnets(xs, C, indices);
  check_bwd_lists(grads, xs, means, invstds, subs);

  const at::TensorOptions opts = xs[0].options();
  const at::ScalarType pd0 = param_dtype(xs[0]);
  // Without the parameter there is no gradient to return (the "not asked for" empty tensor).
  const bool want_w = need_weight && weight.has_value(), want_b = need_bias && bias.has_value();
  std::vector<at::Tensor> grad_xs(need_x ? xs.size() : 0);
  at::Tensor gw_acc = want_w ? at::zeros({C}, opts.dtype(pd0)) : at::Tensor();
  at::Tensor gb_acc = want_b ? at::zeros({C}, opts.dtype(pd0)) : at::Tensor();

  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    const BnSubnet& sub = subs[i];
    const at::ScalarType pd = param_dtype(x);
    const at::Tensor w = subnet_weight(weight, sub, x, pd);
    const at::Tensor mean = means[i].to(pd), invstd = invstds[i].to(pd);
    at::Tensor g = grads[i];
    if (x.numel() == 0) {
      if (need_x) grad_xs[i] = at::zeros_like(x);
      continue;
    }
    if (relu) {
      // y recomputed from x with the forward's formula y = x * alpha + beta (in float32 for 16-bit
      // inputs), rounded to x's dtype like the forward's output, then ReLU's own backward
      // (grad where y > 0).  addcmul + threshold_backward: ~10x faster than at::where here.
      const at::Tensor b = slice_param(bias, sub, pd);
      at::Tensor y;
      if (training && bn_rows_applicable(x)) {  // the forward's own kernel: the same y bit for bit
        y = bn_rows_output(x, w, b, mean, invstd, /*relu=*/false);
      } else {
        const at::Tensor alpha = w.defined() ? invstd * w : invstd;
        const at::Tensor beta = b.defined() ? b - mean * alpha : -mean * alpha;
        y = at::addcmul(channel_view(beta, x), x, channel_view(alpha, x)).to(x.scalar_type());
      }
      g = at::threshold_backward(g, y, 0);
    }
    const std::array<bool, 3> mask{need_x, want_w, want_b};
    at::Tensor gx, gw, gb;
    if (training && bn_rows_applicable(x)) {
      std::tie(gx, gw, gb) = bn_rows_backward(g, x, w, mean, invstd, mask);
    } else if (training) {
      std::tie(gx, gw, gb) = at::native_batch_norm_backward(g, x, w, at::Tensor(), at::Tensor(), mean, invstd, true,
                                                            0.0, mask);
    } else {  // eval: the kernel computes invstd = 1/sqrt(running_var + eps) -- hand it 1/invstd^2, eps 0
      std::tie(gx, gw, gb) = at::native_batch_norm_backward(g, x, w, mean, invstd.pow(-2), at::Tensor(), at::Tensor(),
                                                            false, 0.0, mask);
    }
    if (need_x) grad_xs[i] = gx;
    if (want_w) add_channels(gw_acc, gw, sub);
    if (want_b) add_channels(gb_acc, gb, sub);
  }
  const at::Tensor empty = at::empty({0}, opts);
  return {grad_xs, want_w ? gw_acc.to(weight->scalar_type()) : empty,
          want_b ? gb_acc.to(bias->scalar_type()) : empty.clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_multi_subnet_batch_norm_fwd", &multi_subnet_batch_norm_fwd_cpu);
  m.impl("_multi_subnet_batch_norm_bwd", &multi_subnet_batch_norm_bwd_cpu);
}

}  // namespace stp_fast
