// Plain-C pieces shared by the launch interfaces of the CUDA kernels (masked_linear.h,
// masked_conv2d/masked_conv2d_cuda.h): the element type codes and the SIMT GEMM tile with its
// split-K heuristic.
//
// No ATen and no CUDA headers: included by CPU-only builds, by the .cu files under plain nvcc, by
// the torch glue and by the CPU emulator's bindings (tests/cuda_emu).
#pragma once

#include <cstdint>

// Element type codes understood by every launcher (one code for all float operands of a call).
enum StpFastDtype : int {
  kStpFastFloat32 = 0,
  kStpFastFloat64 = 1,
  kStpFastFloat16 = 2,
  kStpFastBFloat16 = 3,
};

// Tile of the shared-memory SIMT GEMM kernels (masked_linear's gathered GEMM and masked_conv2d's
// implicit GEMM): output tile BM x BN, reduction depth BK per step.
constexpr int kStpFastGemmBM = 64;
constexpr int kStpFastGemmBN = 64;
constexpr int kStpFastGemmBK = 16;

inline int64_t stp_fast_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K factor of an I x J GEMM output with reduction length P on a GPU with `num_sms` SMs:
// enough slices for ~2 blocks per SM when the output has too few BM x BN tiles, each slice at
// least 256 deep, at most 64.  Pure arithmetic (shared by the glue and the emulator tests).
inline int stp_fast_gemm_split_k(int64_t I, int64_t J, int64_t P, int num_sms) {
  const int64_t tiles = stp_fast_cdiv(I, kStpFastGemmBM) * stp_fast_cdiv(J, kStpFastGemmBN);
  if (tiles == 0 || num_sms <= 0) return 1;
  const int64_t want = stp_fast_cdiv(2 * static_cast<int64_t>(num_sms), tiles);
  const int64_t by_depth = P / 256;
  int64_t s = want < by_depth ? want : by_depth;
  if (s > 64) s = 64;
  return s < 1 ? 1 : static_cast<int>(s);
}
