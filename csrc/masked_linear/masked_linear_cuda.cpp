// masked_linear on CUDA: torch glue around the gathered-GEMM kernel in masked_linear_cuda.cu.
//
// Validation is shared with the CPU path (masked_linear_check); index values are checked on the
// device with one sync per index.  All three GEMMs read the weight in place through the index
// arrays (no packed copy): forward and grad_x gather W, grad_weight scatters into a zero-filled
// dW.  grad_weight uses split-K (deterministic two-pass reduction) when n x k has too few 64 x 64
// tiles to fill the GPU; the factor comes from gathered_gemm_pick_split_k.  grad_bias is ATen.
// Compiled only in CUDA builds (setup.py defines WITH_CUDA).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "masked_linear/masked_linear.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "masked_linear";

void launch(const GatheredGemmArgs& args, const at::Tensor& like) {
  launch_checked(&stp_fast_gathered_gemm_launch, args, like, kOp, "gathered GEMM");
}

at::Tensor masked_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_index,
                                  const std::optional<at::Tensor>& out_index, int64_t out_width) {
  const MaskedLinearShape s = masked_linear_check(x, weight, bias, in_index, out_index, out_width, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);

  const at::Tensor x2 = x.reshape({s.M, s.k});
  at::Tensor y2 = at::empty({s.M, s.n}, x.options());
  const GatheredGemmArgs args = masked_linear_fwd_gemm(
      s.M, s.k, s.n, x2.const_data_ptr(), x2.stride(0), x2.stride(1), weight.const_data_ptr(), weight.stride(0),
      weight.stride(1), index_ptr(in_c), index_ptr(out_c), bias ? bias->const_data_ptr() : nullptr,
      bias ? bias->stride(0) : 1, y2.mutable_data_ptr(), y2.stride(0), y2.stride(1));
  launch(args, x);
  return y2.view(masked_linear_out_shape(x, s.n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& in_index, const std::optional<at::Tensor>& out_index, int64_t out_width,
    bool need_x, bool need_weight, bool need_bias) {
  const MaskedLinearShape s =
      masked_linear_check(x, weight, std::nullopt, in_index, out_index, out_width, &grad_out);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto in_c = contiguous_index(in_index);
  const auto out_c = contiguous_index(out_index);

  const at::Tensor g2 = grad_out.reshape({s.M, s.n});
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());

  if (need_x) {
    at::Tensor gx2 = at::empty({s.M, s.k}, x.options());
    launch(masked_linear_grad_x_gemm(s.M, s.k, s.n, g2.const_data_ptr(), g2.stride(0), g2.stride(1),
                                     weight.const_data_ptr(), weight.stride(0), weight.stride(1), index_ptr(in_c),
                                     index_ptr(out_c), gx2.mutable_data_ptr(), gx2.stride(0), gx2.stride(1)),
           x);
    grad_x = gx2.view(x.sizes());
  }
  if (need_weight) {
    const at::Tensor x2 = x.reshape({s.M, s.k});
    grad_w = at::zeros({s.N, s.K}, x.options());
    GatheredGemmArgs args = masked_linear_grad_w_gemm(s.M, s.k, s.n, g2.const_data_ptr(), g2.stride(0),
                                                      g2.stride(1), x2.const_data_ptr(), x2.stride(0), x2.stride(1),
                                                      index_ptr(in_c), index_ptr(out_c), grad_w.mutable_data_ptr(),
                                                      grad_w.stride(0), grad_w.stride(1));
    at::Tensor workspace;  // must outlive the launch
    args.split_k = gathered_gemm_pick_split_k(s.n, s.k, s.M, num_sms(x.device()));
    if (args.split_k > 1) {
      workspace = split_k_workspace(static_cast<int64_t>(args.split_k) * s.n * s.k, x);
      args.workspace = workspace.mutable_data_ptr();
    }
    launch(args, x);
  }
  if (need_bias) grad_b = scatter_grad_bias(g2.sum(0), out_c, s.N, x.options());
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(stp_fast, CUDA, m) {
  m.impl("_masked_linear_fwd", &masked_linear_fwd_cuda);
  m.impl("_masked_linear_bwd", &masked_linear_bwd_cuda);
}

}  // namespace stp_fast

#endif  // WITH_CUDA
