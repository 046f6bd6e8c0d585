// masked_linear on CPU: compact coordinates + ATen BLAS.
//
// Algorithm (KERNELS.md §0.1, §6(i)): gather the active block Wc = weight[out_index][:, in_index]
// ([n, k], the parallel gather of common/gather.h; a strided narrow view with no copy when both
// sides are prefixes), then run dense GEMMs on compact tensors:
//   forward : y  = x2 @ Wc^T (+ bias_c)               at::addmm / at::mm
//   grad_x  : gx = g2 @ Wc                            at::mm
//   grad_W  : dWc = g2^T @ x2, scattered into zeros [N, K] (prefix: addmm_ into the narrowed view)
//   grad_b  : g2.sum(0) scattered into zeros [N]
// Cost of the gather/scatter is O(n*k), small next to the O(M*n*k) GEMMs.  The argument checks in
// masked_linear_check are shared with the CUDA glue (masked_linear_cuda.cpp); the building blocks
// (masked_linear_cpu.h) are shared with multi_subnet_linear, which accumulates several subnets.
#include "masked_linear/masked_linear.h"

#include <torch/library.h>

#include "common/checks.h"
#include "common/gather.h"
#include "masked_linear/masked_linear_cpu.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "masked_linear";

at::Tensor masked_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                                 int64_t out_width) {
  const MaskedLinearShape s = masked_linear_check(x, weight, bias, in_index, out_index, out_width, nullptr);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor wc = masked_linear_active_weight(weight, s, index_or_null(in_c), index_or_null(out_c));
  return masked_linear_forward_cpu(x, wc, bias, s, index_or_null(out_c));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index, int64_t out_width,
    bool need_x, bool need_weight, bool need_bias) {
  const MaskedLinearShape s =
      masked_linear_check(x, weight, std::nullopt, in_index, out_index, out_width, &grad_out);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor* in_idx = index_or_null(in_c);
  const at::Tensor* out_idx = index_or_null(out_c);

  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());
  if (need_x) {
    grad_x = masked_linear_grad_x_cpu(grad_out, x, masked_linear_active_weight(weight, s, in_idx, out_idx), s);
  }
  if (need_weight) {
    grad_w = at::zeros({s.N, s.K}, x.options());
    masked_linear_add_grad_weight_cpu(grad_w, grad_out, x, s, in_idx, out_idx);
  }
  if (need_bias) {
    grad_b = at::zeros({s.N}, x.options());
    masked_linear_add_grad_bias_cpu(grad_b, grad_out, s, out_idx);
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

at::Tensor masked_linear_active_weight(const at::Tensor& weight, const MaskedLinearShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx) {
  if (s.in_prefix && s.out_prefix) return weight.narrow(0, 0, s.n).narrow(1, 0, s.k);
  return gather_block(weight, out_idx, in_idx, s.n, s.k);
}

at::Tensor masked_linear_forward_cpu(const at::Tensor& x, const at::Tensor& wc, const std::optional<at::Tensor>& bias,
                                     const MaskedLinearShape& s, const at::Tensor* out_idx) {
  const at::Tensor x2 = x.reshape({s.M, s.k});
  at::Tensor y2;
  if (bias.has_value()) {
    const at::Tensor bc = out_idx ? bias->index_select(0, *out_idx) : bias->narrow(0, 0, s.n);
    y2 = at::addmm(bc, x2, wc.t());
  } else {
    y2 = at::mm(x2, wc.t());
  }
  return y2.view(masked_linear_out_shape(x, s.n));
}

at::Tensor masked_linear_grad_x_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& wc,
                                    const MaskedLinearShape& s) {
  return at::mm(grad_out.reshape({s.M, s.n}), wc).view(x.sizes());
}

void masked_linear_add_grad_weight_cpu(at::Tensor& grad_w, const at::Tensor& grad_out, const at::Tensor& x,
                                       const MaskedLinearShape& s, const at::Tensor* in_idx,
                                       const at::Tensor* out_idx) {
  const at::Tensor g2 = grad_out.reshape({s.M, s.n});
  const at::Tensor x2 = x.reshape({s.M, s.k});
  if (s.in_prefix && s.out_prefix) {
    at::Tensor block = grad_w.narrow(0, 0, s.n).narrow(1, 0, s.k);
    block.addmm_(g2.t(), x2);  // beta = 1: accumulates straight into the strided view (BLAS ldc = K)
  } else {
    scatter_block(grad_w, at::mm(g2.t(), x2), out_idx, in_idx, /*accumulate=*/true);
  }
}

void masked_linear_add_grad_bias_cpu(at::Tensor& grad_b, const at::Tensor& grad_out, const MaskedLinearShape& s,
                                     const at::Tensor* out_idx) {
  const at::Tensor gsum = grad_out.reshape({s.M, s.n}).sum(0);
  if (out_idx) {
    grad_b.index_add_(0, *out_idx, gsum);
  } else {
    grad_b.narrow(0, 0, s.n).add_(gsum);
  }
}

std::vector<int64_t> masked_linear_out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

MaskedLinearShape masked_linear_check(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& in_index,
                                      const std::optional<at::Tensor>& out_index, int64_t out_width,
                                      const at::Tensor* grad_out) {
  return masked_linear_check_named(x, weight, bias, in_index, out_index, out_width, grad_out, ArgNames{kOp});
}

MaskedLinearShape masked_linear_check_named(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& in_index,
                                            const std::optional<at::Tensor>& out_index, int64_t out_width,
                                            const at::Tensor* grad_out, const ArgNames& names) {
  const char* op = names.op;
  const std::string& xn = names.x;
  check_input_and_weight(op, xn, x, weight);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", xn, " must have at least 1 dimension [..., k], got a 0-D tensor");
  CHECK_DIM(op, "weight", weight, 2, "2-D [N, K]");

  MaskedLinearShape s{};
  s.M = leading_numel(x);
  s.k = x.size(-1);
  s.N = weight.size(0);
  s.K = weight.size(1);

  check_bias(op, bias, xn, x, s.N, "N");

  const int64_t in_len = check_index(in_index, s.K, x.device(), op, names.in_index.c_str());
  s.in_prefix = in_len < 0;
  if (s.in_prefix) {
    TORCH_CHECK_VALUE(s.k <= s.K, op, ": ", xn, " has ", s.k, " features but weight has only ", s.K,
                      " input features (K); pass ", names.in_index, " or a narrower ", xn);
  } else {
    TORCH_CHECK_VALUE(s.k == in_len, op, ": ", xn, " has ", s.k, " features but ", names.in_index, " has ", in_len,
                      " entries");
  }

  s.out_prefix = check_out_selection(out_index, out_width, s.N, x.device(), names) < 0;
  s.n = out_width;

  if (grad_out != nullptr) {
    const std::string& gn = names.grad_out;
    check_dense_like(op, gn, *grad_out, xn, x);
    const auto want = masked_linear_out_shape(x, s.n);
    TORCH_CHECK_VALUE(grad_out->sizes() == at::IntArrayRef(want), op, ": ", gn, " must have shape ",
                      at::IntArrayRef(want), " (", xn, ".shape[:-1] + [", names.out_width, "]), got ",
                      grad_out->sizes());
  }
  return s;
}

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_masked_linear_fwd", &masked_linear_fwd_cpu);
  m.impl("_masked_linear_bwd", &masked_linear_bwd_cpu);
}

}  // namespace stp_fast
