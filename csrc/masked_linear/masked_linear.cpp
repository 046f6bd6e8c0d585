// masked_linear on CPU: compact coordinates + ATen BLAS.
//
// Algorithm (KERNELS.md §0.1, §6(i)): gather the active block Wc = weight[out_index][:, in_index]
// ([n, k], a parallel hand-written gather; a strided narrow view with no copy when both sides are
// prefixes), then run dense GEMMs on compact tensors:
//   forward : y  = x2 @ Wc^T (+ bias_c)               at::addmm / at::mm
//   grad_x  : gx = g2 @ Wc                            at::mm
//   grad_W  : dWc = g2^T @ x2, scattered into zeros [N, K] (prefix: at::mm_out into the narrowed view)
//   grad_b  : g2.sum(0) scattered into zeros [N]
// Cost of the gather/scatter is O(n*k), small next to the O(M*n*k) GEMMs.  The argument checks in
// masked_linear_check are shared with the CUDA glue (masked_linear_cuda.cpp).
#include "masked_linear/masked_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "common/checks.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "masked_linear";

// Rows per at::parallel_for chunk so that each chunk moves at least ~32K elements.
int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

// out[r, c] = w[rows(r), cols(c)] for r < n, c < k; out is a fresh contiguous [n, k] tensor.
at::Tensor gather_block(const at::Tensor& w, const at::Tensor* rows, const at::Tensor* cols, int64_t n, int64_t k) {
  at::Tensor out = at::empty({n, k}, w.options());
  if (n == 0 || k == 0) return out;
  const int64_t* ri = rows ? rows->const_data_ptr<int64_t>() : nullptr;
  const int64_t* cj = cols ? cols->const_data_ptr<int64_t>() : nullptr;
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_linear_gather", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* s = src + (ri ? ri[r] : r) * s0;
        scalar_t* d = dst + r * k;
        if (cj) {
          for (int64_t c = 0; c < k; ++c) d[c] = s[cj[c] * s1];
        } else if (s1 == 1) {
          std::memcpy(d, s, k * sizeof(scalar_t));
        } else {
          for (int64_t c = 0; c < k; ++c) d[c] = s[c * s1];
        }
      }
    });
  });
  return out;
}

// dst[rows(r), cols(c)] = src[r, c]; dst is a contiguous [N, K] tensor, src any strided [n, k].
void scatter_block(at::Tensor& dst, const at::Tensor& src, const at::Tensor* rows, const at::Tensor* cols) {
  const int64_t n = src.size(0), k = src.size(1);
  if (n == 0 || k == 0) return;
  const int64_t* ri = rows ? rows->const_data_ptr<int64_t>() : nullptr;
  const int64_t* cj = cols ? cols->const_data_ptr<int64_t>() : nullptr;
  const int64_t d0 = dst.stride(0), s0 = src.stride(0), s1 = src.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "masked_linear_scatter", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* s = sp + r * s0;
        scalar_t* d = dp + (ri ? ri[r] : r) * d0;
        if (cj) {
          for (int64_t c = 0; c < k; ++c) d[cj[c]] = s[c * s1];
        } else if (s1 == 1) {
          std::memcpy(d, s, k * sizeof(scalar_t));
        } else {
          for (int64_t c = 0; c < k; ++c) d[c] = s[c * s1];
        }
      }
    });
  });
}

// The active weight block [n, k]: a view when both sides are prefixes, else a packed copy.
at::Tensor active_weight(const at::Tensor& weight, const MaskedLinearShape& s, const at::Tensor* in_idx,
                         const at::Tensor* out_idx) {
  if (s.in_prefix && s.out_prefix) return weight.narrow(0, 0, s.n).narrow(1, 0, s.k);
  return gather_block(weight, out_idx, in_idx, s.n, s.k);
}

// Contiguous copies of the optional indices (ATen index ops and raw loops assume stride 1).
std::optional<at::Tensor> contiguous_index(const std::optional<at::Tensor>& idx) {
  if (!idx.has_value()) return std::nullopt;
  return idx->contiguous();
}

at::Tensor masked_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index,
                                 int64_t out_width) {
  const MaskedLinearShape s = masked_linear_check(x, weight, bias, in_index, out_index, out_width, nullptr);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor* in_idx = in_c ? &*in_c : nullptr;
  const at::Tensor* out_idx = out_c ? &*out_c : nullptr;

  const at::Tensor x2 = x.reshape({s.M, s.k});
  const at::Tensor wc = active_weight(weight, s, in_idx, out_idx);
  at::Tensor y2;
  if (bias.has_value()) {
    const at::Tensor bc = out_idx ? bias->index_select(0, *out_idx) : bias->narrow(0, 0, s.n);
    y2 = at::addmm(bc, x2, wc.t());
  } else {
    y2 = at::mm(x2, wc.t());
  }
  return y2.view(masked_linear_out_shape(x, s.n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index, int64_t out_width,
    bool need_x, bool need_weight, bool need_bias) {
  const MaskedLinearShape s =
      masked_linear_check(x, weight, std::nullopt, in_index, out_index, out_width, &grad_out);
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);
  const at::Tensor* in_idx = in_c ? &*in_c : nullptr;
  const at::Tensor* out_idx = out_c ? &*out_c : nullptr;

  const at::Tensor g2 = grad_out.reshape({s.M, s.n});
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());

  if (need_x) {
    const at::Tensor wc = active_weight(weight, s, in_idx, out_idx);
    grad_x = at::mm(g2, wc).view(x.sizes());
  }
  if (need_weight) {
    const at::Tensor x2 = x.reshape({s.M, s.k});
    grad_w = at::zeros({s.N, s.K}, x.options());
    if (s.in_prefix && s.out_prefix) {
      at::Tensor block = grad_w.narrow(0, 0, s.n).narrow(1, 0, s.k);
      at::mm_out(block, g2.t(), x2);
    } else {
      scatter_block(grad_w, at::mm(g2.t(), x2), out_idx, in_idx);
    }
  }
  if (need_bias) {
    grad_b = at::zeros({s.N}, x.options());
    const at::Tensor gsum = g2.sum(0);
    if (out_idx) {
      grad_b.index_copy_(0, *out_idx, gsum);
    } else {
      grad_b.narrow(0, 0, s.n).copy_(gsum);
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace

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
  CHECK_STRIDED(kOp, "x", x);
  CHECK_STRIDED(kOp, "weight", weight);
  CHECK_FLOATING(kOp, "x", x);
  CHECK_SAME_DTYPE(kOp, "weight", weight, "x", x);
  CHECK_SAME_DEVICE(kOp, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least 1 dimension [..., k], got a 0-D tensor");
  CHECK_DIM(kOp, "weight", weight, 2, "2-D [N, K]");

  MaskedLinearShape s{};
  s.M = leading_numel(x);
  s.k = x.size(-1);
  s.N = weight.size(0);
  s.K = weight.size(1);

  if (bias.has_value()) {
    CHECK_STRIDED(kOp, "bias", *bias);
    CHECK_SAME_DTYPE(kOp, "bias", *bias, "x", x);
    CHECK_SAME_DEVICE(kOp, "bias", *bias, "x", x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N, kOp, ": bias must be 1-D [N] with N = ", s.N,
                      " (weight.size(0)), got shape ", bias->sizes());
  }

  const int64_t in_len = check_index(in_index, s.K, x.device(), kOp, "in_index");
  s.in_prefix = in_len < 0;
  if (s.in_prefix) {
    TORCH_CHECK_VALUE(s.k <= s.K, kOp, ": x has ", s.k, " features but weight has only ", s.K,
                      " input features (K); pass in_index or a narrower x");
  } else {
    TORCH_CHECK_VALUE(s.k == in_len, kOp, ": x has ", s.k, " features but in_index has ", in_len, " entries");
  }

  const int64_t out_len = check_index(out_index, s.N, x.device(), kOp, "out_index");
  s.out_prefix = out_len < 0;
  if (s.out_prefix) {
    TORCH_CHECK_VALUE(out_width >= 0 && out_width <= s.N, kOp, ": out_width must lie in [0, ", s.N,
                      "] (weight.size(0)), got ", out_width);
  } else {
    TORCH_CHECK_VALUE(out_width == out_len, kOp, ": out_width is ", out_width, " but out_index has ", out_len,
                      " entries");
  }
  s.n = out_width;

  if (grad_out != nullptr) {
    CHECK_STRIDED(kOp, "grad_out", *grad_out);
    CHECK_SAME_DTYPE(kOp, "grad_out", *grad_out, "x", x);
    CHECK_SAME_DEVICE(kOp, "grad_out", *grad_out, "x", x);
    const auto want = masked_linear_out_shape(x, s.n);
    TORCH_CHECK_VALUE(grad_out->sizes() == at::IntArrayRef(want), kOp, ": grad_out must have shape ",
                      at::IntArrayRef(want), " (x.shape[:-1] + [out_width]), got ", grad_out->sizes());
  }
  return s;
}

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_masked_linear_fwd", &masked_linear_fwd_cpu);
  m.impl("_masked_linear_bwd", &masked_linear_bwd_cpu);
}

}  // namespace stp_fast
