// masked_conv2d on CUDA: the plain-C interface of the kernels in masked_conv2d_cuda.cu.
//
//   y = conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding, dilation)
//
// No ATen here: masked_conv2d_cuda.cu includes this header under plain nvcc, and the CPU emulator
// tests (tests/cuda_emu) include it under g++.  The ATen-side validation (masked_conv2d_check)
// lives in masked_conv2d.h; the torch glue is masked_conv2d_cuda.cpp.
//
// Conventions: every tensor is described by a data pointer plus 4 strides in elements, in the
// logical order of its dimensions (so NCHW and channels-last are both "strided"); indices are
// int64, contiguous, sorted, and a null index means the prefix of the channels.
#pragma once

#include <cstdint>

#if defined(WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

#include "common/kernel_abi.h"

// One masked_conv2d problem (groups == 1, or depthwise).  Sizes:
//   x, grad_x     [B, k, H, W]     k active input channels (compact)
//   y, grad_out   [B, n, OH, OW]   n active output channels (compact)
//   weight        [C_out, C_in_per_group, kh, kw], read (and grad_weight written) at
//                 [out_index[j], in_index[c], ky, kx]; depthwise: [ch(c), 0, ky, kx] with
//                 ch = out_index (or in_index, which must then be equal) or the identity.
// Which pointers a launcher reads or writes is listed at the launcher.
struct MaskedConv2dArgs {
  int64_t B = 0, k = 0, H = 0, W = 0;
  int64_t n = 0, OH = 0, OW = 0;
  int64_t kh = 1, kw = 1;
  int64_t sh = 1, sw = 1;  // stride
  int64_t ph = 0, pw = 0;  // padding
  int64_t dh = 1, dw = 1;  // dilation

  const void* x = nullptr;  // [B, k, H, W]
  int64_t x_s[4] = {0, 0, 0, 0};
  const void* w = nullptr;  // full weight [C_out, C_in_per_group, kh, kw]
  int64_t w_s[4] = {0, 0, 0, 0};
  const void* g = nullptr;  // grad_out [B, n, OH, OW]
  int64_t g_s[4] = {0, 0, 0, 0};
  const int64_t* in_index = nullptr;   // [k] or null (prefix)
  const int64_t* out_index = nullptr;  // [n] or null (prefix)
  const void* bias = nullptr;          // [C_out] or null; element out(j) at bias[out(j) * bias_s]
  int64_t bias_s = 1;

  // The result: y [B, n, OH, OW] (forward), grad_x [B, k, H, W], or the FULL grad_weight
  // [C_out, C_in_per_group, kh, kw] (only the gathered positions are written: the caller zero-fills).
  void* out = nullptr;
  int64_t out_s[4] = {0, 0, 0, 0};

  // grad_weight only: split of the reduction over B*OH*OW into split_k slices whose partial sums go
  // to `workspace` (masked_conv2d_workspace_elems accumulator elements: float, or double for
  // float64) and are then summed in a fixed order (deterministic, no atomics).  1: no workspace.
  int split_k = 1;
  void* workspace = nullptr;
};

// Threads per block of the depthwise weight-gradient kernel (one block per channel and tap).  The
// implicit-GEMM kernels use the shared SIMT tile kStpFastGemmBM x kStpFastGemmBN x kStpFastGemmBK.
constexpr int kMaskedConv2dDwThreads = 256;

// Split-K factor for the implicit-GEMM grad_weight (I = n rows, J = k*kh*kw columns, P = B*OH*OW):
// stp_fast_gemm_split_k (common/kernel_abi.h).
inline int masked_conv2d_gemm_split_k(int64_t I, int64_t J, int64_t P, int num_sms) {
  return stp_fast_gemm_split_k(I, J, P, num_sms);
}

// Split factor for the depthwise grad_weight (k*kh*kw blocks, each reducing over P = B*OH*OW):
// ~4 blocks per SM, each slice at least 4 elements per thread, at most 64.
inline int masked_conv2d_depthwise_split_k(int64_t k, int64_t kh, int64_t kw, int64_t P, int num_sms) {
  const int64_t blocks = k * kh * kw;
  if (blocks == 0 || num_sms <= 0) return 1;
  const int64_t want = stp_fast_cdiv(4 * static_cast<int64_t>(num_sms), blocks);
  const int64_t by_depth = P / (4 * kMaskedConv2dDwThreads);
  int64_t s = want < by_depth ? want : by_depth;
  if (s > 64) s = 64;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Accumulator elements of the workspace that a grad_weight launch with split `split` needs.
inline int64_t masked_conv2d_workspace_elems(const MaskedConv2dArgs& a, bool depthwise, int split) {
  if (split <= 1) return 0;
  const int64_t per_slice = depthwise ? a.k * a.kh * a.kw : a.n * a.k * a.kh * a.kw;
  return static_cast<int64_t>(split) * per_slice;
}

#if defined(WITH_CUDA) || defined(__CUDACC__)
// Launchers.  dtype_code is a StpFastDtype shared by every float operand.  Each returns a
// cudaError_t as int (0 = success): cudaErrorInvalidValue for bad arguments, else
// cudaGetLastError() after the launches.  Nothing is launched when the result is empty.
//
// Implicit GEMM, groups == 1:
//   fwd    : reads x, w, in/out_index, bias (optional); writes out = y [B, n, OH, OW].
//   grad_x : reads g, w, in/out_index;                  writes out = grad_x [B, k, H, W].
//   grad_w : reads g, x, in/out_index;                  writes out = grad_weight at the gathered
//            positions [out(j), in(c), ky, kx]; uses split_k / workspace.
int stp_fast_masked_conv2d_fwd_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream);
int stp_fast_masked_conv2d_grad_x_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream);
int stp_fast_masked_conv2d_grad_w_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream);

// Depthwise (n == k, weight [C, 1, kh, kw], channel c uses weight row ch(c)): same operands as
// above; grad_w writes out[ch(c), 0, ky, kx] and uses split_k / workspace.
int stp_fast_masked_conv2d_depthwise_fwd_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream);
int stp_fast_masked_conv2d_depthwise_grad_x_launch(const MaskedConv2dArgs& a, int dtype_code,
                                                   cudaStream_t stream);
int stp_fast_masked_conv2d_depthwise_grad_w_launch(const MaskedConv2dArgs& a, int dtype_code,
                                                   cudaStream_t stream);
#endif
