// masked_linear: y[..., n] = x[..., k] @ weight[out_index][:, in_index].T + bias[out_index].
//
// Two halves:
//   * a plain-C interface to the CUDA "gathered GEMM" kernel (GatheredGemmArgs + launcher), which
//     masked_linear_cuda.cu includes without any ATen/torch header;
//   * host-only ATen declarations (argument validation shared by the CPU and CUDA glue), hidden
//     from nvcc's device pass by `#ifndef __CUDACC__`.
#pragma once

#include <cstdint>

#if defined(WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include "common/kernel_abi.h"

// One gathered GEMM (all strides in elements, all indices int64):
//
//   C[ci(i), cj(j)]  (+)=  sum_{p < P} A[i, p] * B[bp(p), bj(j)]  (+ bias[bj(j)])
//
// for i < I, j < J.  A is a strided [I, P] matrix; B is read through optional row/col index
// arrays bp (length P) and bj (length J); C is written through optional scatter indices ci
// (length I) and cj (length J).  A null index pointer means the identity.  Accumulation is in
// float for float/half/bf16 and in double for double.
//
// masked_linear uses it three ways (W = weight [N, K], compact widths n, k, batch rows M):
//   forward : A = x [M, k],  B[p, j] = W[out(j), in(p)]  (bp = in,  b_sp = W.stride(1); bj = out, b_sj = W.stride(0))
//   grad_x  : A = g [M, n],  B[p, j] = W[out(p), in(j)]  (bp = out, b_sp = W.stride(0); bj = in,  b_sj = W.stride(1))
//   grad_W  : A = g^T [n, M] (strides swapped), B = x [M, k], C = dW [N, K] with ci = out, cj = in.
struct GatheredGemmArgs {
  int64_t I = 0, J = 0, P = 0;

  const void* A = nullptr;  // [I, P]
  int64_t a_si = 0, a_sp = 0;

  const void* B = nullptr;  // element (p, j) at B[bp(p) * b_sp + bj(j) * b_sj]
  int64_t b_sp = 0, b_sj = 0;
  const int64_t* bp_index = nullptr;  // [P] or null
  const int64_t* bj_index = nullptr;  // [J] or null

  void* C = nullptr;  // element (i, j) at C[ci(i) * c_si + cj(j) * c_sj]
  int64_t c_si = 0, c_sj = 0;
  const int64_t* ci_index = nullptr;  // [I] or null
  const int64_t* cj_index = nullptr;  // [J] or null

  const void* bias = nullptr;  // optional, element j at bias[bj(j) * bias_stride]
  int64_t bias_stride = 1;

  bool accumulate = false;  // C += result (otherwise C = result)

  // Split-K: the P loop is cut into split_k slices whose partial sums go to `workspace`
  // (split_k * I * J accumulator elements: float, or double for float64), then a second kernel
  // reduces them in a fixed order (deterministic) and runs the epilogue.  split_k == 1: no workspace.
  int split_k = 1;
  void* workspace = nullptr;
};

// Split-K factor of the gathered GEMM: stp_fast_gemm_split_k (common/kernel_abi.h), as the kernel
// uses the shared SIMT tile kStpFastGemmBM x kStpFastGemmBN.
inline int gathered_gemm_pick_split_k(int64_t I, int64_t J, int64_t P, int num_sms) {
  return stp_fast_gemm_split_k(I, J, P, num_sms);
}

// The three GEMMs of masked_linear as GatheredGemmArgs (raw pointers, strides in elements; a null
// index means "prefix").  Plain functions shared by the CUDA glue and by CPU-side emulation tests.
// x2 [M, k], w [N, K], g [M, n]; outputs y [M, n], gx [M, k], dW [N, K] are written, not accumulated.
inline GatheredGemmArgs masked_linear_fwd_gemm(int64_t M, int64_t k, int64_t n, const void* x, int64_t x_s0,
                                               int64_t x_s1, const void* w, int64_t w_s0, int64_t w_s1,
                                               const int64_t* in_idx, const int64_t* out_idx, const void* bias,
                                               int64_t bias_s0, void* y, int64_t y_s0, int64_t y_s1) {
  GatheredGemmArgs a;
  a.I = M, a.J = n, a.P = k;
  a.A = x, a.a_si = x_s0, a.a_sp = x_s1;
  a.B = w, a.b_sp = w_s1, a.b_sj = w_s0, a.bp_index = in_idx, a.bj_index = out_idx;  // B[p, j] = W[out(j), in(p)]
  a.C = y, a.c_si = y_s0, a.c_sj = y_s1;
  a.bias = bias, a.bias_stride = bias_s0;
  return a;
}

inline GatheredGemmArgs masked_linear_grad_x_gemm(int64_t M, int64_t k, int64_t n, const void* g, int64_t g_s0,
                                                  int64_t g_s1, const void* w, int64_t w_s0, int64_t w_s1,
                                                  const int64_t* in_idx, const int64_t* out_idx, void* gx,
                                                  int64_t gx_s0, int64_t gx_s1) {
  GatheredGemmArgs a;
  a.I = M, a.J = k, a.P = n;
  a.A = g, a.a_si = g_s0, a.a_sp = g_s1;
  a.B = w, a.b_sp = w_s0, a.b_sj = w_s1, a.bp_index = out_idx, a.bj_index = in_idx;  // B[p, j] = W[out(p), in(j)]
  a.C = gx, a.c_si = gx_s0, a.c_sj = gx_s1;
  return a;
}

// dW[out(i), in(j)] = sum_m g[m, i] * x[m, j]; dW must be zero-filled by the caller outside the block.
inline GatheredGemmArgs masked_linear_grad_w_gemm(int64_t M, int64_t k, int64_t n, const void* g, int64_t g_s0,
                                                  int64_t g_s1, const void* x, int64_t x_s0, int64_t x_s1,
                                                  const int64_t* in_idx, const int64_t* out_idx, void* dw,
                                                  int64_t dw_s0, int64_t dw_s1) {
  GatheredGemmArgs a;
  a.I = n, a.J = k, a.P = M;
  a.A = g, a.a_si = g_s1, a.a_sp = g_s0;  // A = g^T
  a.B = x, a.b_sp = x_s0, a.b_sj = x_s1;
  a.C = dw, a.c_si = dw_s0, a.c_sj = dw_s1, a.ci_index = out_idx, a.cj_index = in_idx;
  return a;
}

#if defined(WITH_CUDA) || defined(__CUDACC__)
// Launches the gathered GEMM (plus the split-K reduction when a.split_k > 1) on `stream`.
// dtype_code is a StpFastDtype; A, B, C and bias share it.  Returns a cudaError_t as int
// (0 = success): cudaErrorInvalidValue for bad arguments, else cudaGetLastError() after launch.
int stp_fast_gathered_gemm_launch(const GatheredGemmArgs& a, int dtype_code, cudaStream_t stream);
#endif

#ifndef __CUDACC__
#include <ATen/ATen.h>

#include <optional>

namespace stp_fast {

// Sizes of one masked_linear call after validation.
struct MaskedLinearShape {
  int64_t M;   // rows: product of x's leading dimensions
  int64_t k;   // active input features  (x.size(-1))
  int64_t n;   // active output features (out_width)
  int64_t N;   // weight.size(0)
  int64_t K;   // weight.size(1)
  bool in_prefix;
  bool out_prefix;
};

// Validates the arguments of _masked_linear_fwd / _masked_linear_bwd (grad_out may be null in the
// forward) on any device; raises TypeError/ValueError naming the argument.
MaskedLinearShape masked_linear_check(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& in_index,
                                      const std::optional<at::Tensor>& out_index, int64_t out_width,
                                      const at::Tensor* grad_out);

// x.size()[:-1] + [last]: the shape of y (last = n) or of grad_x (last = k).
std::vector<int64_t> masked_linear_out_shape(const at::Tensor& x, int64_t last);

}  // namespace stp_fast
#endif  // __CUDACC__
