// ctypes entry point for the emulated masked_conv2d launchers (test harness only).
//
// Fills MaskedConv2dArgs from two flat arrays (their layouts are mirrored by conv_launch() in
// test_cuda_emu.py) and calls the launchers of the emulated masked_conv2d_cuda.cu.
#include <cstdint>

#include "masked_conv2d/masked_conv2d_cuda.h"

namespace {
// int64 array: sizes, geometry, strides (4 per tensor), then split_k.
enum ConvInt {
  B, K_ACT, H, W, N_ACT, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW,
  X_S,                 // 4 strides of x
  W_S = X_S + 4,       // 4 strides of weight
  G_S = W_S + 4,       // 4 strides of grad_out
  BIAS_S = G_S + 4,
  OUT_S,               // 4 strides of the result
  SPLIT_K = OUT_S + 4,
  CONV_NUM_INTS
};
// pointer array
enum ConvPtr { P_X, P_W, P_G, P_IN, P_OUT_IDX, P_BIAS, P_OUT, P_WS, CONV_NUM_PTRS };
}  // namespace

extern "C" int emu_conv_num_ints() { return CONV_NUM_INTS; }
extern "C" int emu_conv_num_ptrs() { return CONV_NUM_PTRS; }

// op: 0 fwd, 1 grad_x, 2 grad_w (implicit GEMM); 3, 4, 5: the same for depthwise.
extern "C" int emu_masked_conv2d(int op, int dtype, const int64_t* v, void* const* p) {
  MaskedConv2dArgs a;
  a.B = v[B], a.k = v[K_ACT], a.H = v[H], a.W = v[W];
  a.n = v[N_ACT], a.OH = v[OH], a.OW = v[OW], a.kh = v[KH], a.kw = v[KW];
  a.sh = v[SH], a.sw = v[SW], a.ph = v[PH], a.pw = v[PW], a.dh = v[DH], a.dw = v[DW];
  for (int d = 0; d < 4; ++d) {
    a.x_s[d] = v[X_S + d];
    a.w_s[d] = v[W_S + d];
    a.g_s[d] = v[G_S + d];
    a.out_s[d] = v[OUT_S + d];
  }
  a.bias_s = v[BIAS_S];
  a.split_k = static_cast<int>(v[SPLIT_K]);
  a.x = p[P_X], a.w = p[P_W], a.g = p[P_G];
  a.in_index = static_cast<const int64_t*>(p[P_IN]);
  a.out_index = static_cast<const int64_t*>(p[P_OUT_IDX]);
  a.bias = p[P_BIAS], a.out = p[P_OUT], a.workspace = p[P_WS];
  switch (op) {
    case 0:
      return stp_fast_masked_conv2d_fwd_launch(a, dtype, nullptr);
    case 1:
      return stp_fast_masked_conv2d_grad_x_launch(a, dtype, nullptr);
    case 2:
      return stp_fast_masked_conv2d_grad_w_launch(a, dtype, nullptr);
    case 3:
      return stp_fast_masked_conv2d_depthwise_fwd_launch(a, dtype, nullptr);
    case 4:
      return stp_fast_masked_conv2d_depthwise_grad_x_launch(a, dtype, nullptr);
    case 5:
      return stp_fast_masked_conv2d_depthwise_grad_w_launch(a, dtype, nullptr);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int emu_conv_gemm_split_k(int64_t I, int64_t J, int64_t P, int num_sms) {
  return masked_conv2d_gemm_split_k(I, J, P, num_sms);
}
extern "C" int emu_conv_depthwise_split_k(int64_t k, int64_t kh, int64_t kw, int64_t P, int num_sms) {
  return masked_conv2d_depthwise_split_k(k, kh, kw, P, num_sms);
}
