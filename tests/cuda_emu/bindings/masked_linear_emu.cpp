// ctypes entry point for the emulated masked_linear launcher (test harness only).
//
// Builds GatheredGemmArgs with the same helpers the CUDA glue uses (masked_linear_*_gemm in
// masked_linear.h) and calls stp_fast_gathered_gemm_launch from the emulated
// masked_linear_cuda.cu.  Compiled with -D__CUDACC__, so masked_linear.h exposes only its plain-C
// half (no ATen).
#include <cstdint>

#include "masked_linear/masked_linear.h"

namespace {
// Layout of the `v` (int64) array; mirrored by ML_INTS in test_cuda_emu.py.
enum MlInt { M, K_ACT, N_ACT, S0, S1, W_S0, W_S1, BIAS_S0, OUT_S0, OUT_S1, SPLIT_K, ACCUMULATE, ML_NUM_INTS };
// Layout of the `p` (pointer) array: A operand (x or grad_out), B operand (weight or x), in_index,
// out_index, bias, output, workspace.
enum MlPtr { P_A, P_B, P_IN, P_OUT_IDX, P_BIAS, P_C, P_WS, ML_NUM_PTRS };
}  // namespace

extern "C" int emu_ml_num_ints() { return ML_NUM_INTS; }
extern "C" int emu_ml_num_ptrs() { return ML_NUM_PTRS; }

// op: 0 forward (A = x, B = weight, C = y), 1 grad_x (A = grad_out, B = weight, C = grad_x),
// 2 grad_weight (A = grad_out, B = x, C = full grad_weight).  Returns the launcher's cudaError_t.
extern "C" int emu_masked_linear(int op, int dtype, const int64_t* v, void* const* p) {
  const auto* in_idx = static_cast<const int64_t*>(p[P_IN]);
  const auto* out_idx = static_cast<const int64_t*>(p[P_OUT_IDX]);
  GatheredGemmArgs a;
  if (op == 0) {
    a = masked_linear_fwd_gemm(v[M], v[K_ACT], v[N_ACT], p[P_A], v[S0], v[S1], p[P_B], v[W_S0], v[W_S1], in_idx,
                               out_idx, p[P_BIAS], v[BIAS_S0], p[P_C], v[OUT_S0], v[OUT_S1]);
  } else if (op == 1) {
    a = masked_linear_grad_x_gemm(v[M], v[K_ACT], v[N_ACT], p[P_A], v[S0], v[S1], p[P_B], v[W_S0], v[W_S1], in_idx,
                                  out_idx, p[P_C], v[OUT_S0], v[OUT_S1]);
  } else if (op == 2) {
    // Here (W_S0, W_S1) are the strides of x.
    a = masked_linear_grad_w_gemm(v[M], v[K_ACT], v[N_ACT], p[P_A], v[S0], v[S1], p[P_B], v[W_S0], v[W_S1], in_idx,
                                  out_idx, p[P_C], v[OUT_S0], v[OUT_S1]);
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  a.split_k = static_cast<int>(v[SPLIT_K]);
  a.workspace = p[P_WS];
  a.accumulate = v[ACCUMULATE] != 0;
  return stp_fast_gathered_gemm_launch(a, static_cast<int>(dtype), nullptr);
}

extern "C" int emu_ml_pick_split_k(int64_t I, int64_t J, int64_t P, int num_sms) {
  return gathered_gemm_pick_split_k(I, J, P, num_sms);
}
