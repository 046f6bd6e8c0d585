// Device and launch helpers shared by the CUDA kernels (masked_linear_cuda.cu, masked_conv2d_cuda.cu).
//
//   Num<T>, index_or_identity      element <-> accumulator conversions; optional index arrays
//   simt::                         the shared-memory SIMT GEMM tile of both GEMM kernels (64 x 64
//                                  result tile per block, 16-deep reduction steps, 256 threads with
//                                  a 4 x 4 register block each), its accumulator init and epilogue
//                                  loop
//   sum_slices                     the fixed-order sum of split-K partial results
//   host side                      grid sizing, split-K planning, the two-pass launch sequence and
//                                  the dtype dispatch of the plain-C launchers
//
// Deliberately free of ATen/torch headers (KERNELS.md §6(iv)): only the CUDA headers, <cstdint> and
// the plain-C codes of common/kernel_abi.h, so it compiles under plain nvcc and under the stand-in
// headers of the CPU emulator (tests/cuda_emu).  It holds no kernel launch and no __shared__
// declaration: the emulator rewrites those in the .cu files only, so they stay there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/kernel_abi.h"

namespace stp_fast {
namespace cuda {

// Element type <-> accumulator type: float for float/half/bf16, double for double.
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(float v) { return v; }
  __device__ __forceinline__ static float from_acc(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  __device__ __forceinline__ static double to_acc(double v) { return v; }
  __device__ __forceinline__ static double from_acc(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// idx[i], or i when there is no index array.
__host__ __device__ __forceinline__ int64_t index_or_identity(const int64_t* idx, int64_t i) {
  return idx ? idx[i] : i;
}

// Sum of element e over the `split` slices of a [split, total] workspace, in slice order (deterministic).
template <typename Acc>
__device__ __forceinline__ Acc sum_slices(const Acc* ws, int split, int64_t total, int64_t e) {
  Acc v = Acc(0);
  for (int s = 0; s < split; ++s) v += ws[s * total + e];
  return v;
}

// ---------------------------------------------------------------------------------------------
// The SIMT GEMM tile.  A block owns a BM x BN result tile and walks the reduction in BK-deep steps
// staged in shared memory (As[p][i], Bs[p][j], each row padded by PAD); thread (tr, tc) keeps the
// TM x TN register block of rows tr + TR*m and cols tc + TC*n, so shared-memory reads are
// broadcast / consecutive.
namespace simt {

constexpr int BM = kStpFastGemmBM;
constexpr int BN = kStpFastGemmBN;
constexpr int BK = kStpFastGemmBK;
constexpr int TM = 4;                  // rows per thread
constexpr int TN = 4;                  // cols per thread
constexpr int TR = BM / TM;            // 16 thread rows
constexpr int TC = BN / TN;            // 16 thread cols
constexpr int NT = TR * TC;            // 256 threads per block
constexpr int A_LOADS = BM * BK / NT;  // A elements staged per thread per step (4)
constexpr int B_LOADS = BK * BN / NT;  // B elements staged per thread per step (4)
constexpr int PAD = 1;                 // breaks the stride-64 bank pattern of reduction-fast staging

static_assert(BM % TM == 0 && BN % TN == 0, "tile must split into register blocks");
static_assert((BM * BK) % NT == 0 && (BK * BN) % NT == 0, "tiles must split evenly over threads");
static_assert(NT % BM == 0 && NT % BN == 0 && NT % BK == 0, "loader mappings need NT divisible by tile dims");

// The operand staging and the BK-step multiply stay written out in each kernel: moved into shared
// inline functions they change the generated code (register allocation; for masked_conv2d's
// fp32/fp64 grad_weight GEMM ~22% fewer instructions), which has not been timed on a GPU.  The two
// helpers below leave the SASS of both kernels unchanged (cuobjdump -sass, sm_80 and sm_90).

template <typename Acc>
__device__ __forceinline__ void zero_tile(Acc (&acc)[TM][TN]) {
#pragma unroll
  for (int m = 0; m < TM; ++m) {
#pragma unroll
    for (int n = 0; n < TN; ++n) acc[m][n] = Acc(0);
  }
}

// Calls f(i, j, acc[m][n]) for the register-block elements (i, j) = (i_base + TR*m, j_base + TC*n)
// that lie inside the I x J result.
template <typename Acc, class F>
__device__ __forceinline__ void for_each_result(const Acc (&acc)[TM][TN], int64_t i_base, int64_t j_base, int64_t I,
                                                int64_t J, F&& f) {
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t i = i_base + m * TR;
    if (i >= I) continue;
#pragma unroll
    for (int n = 0; n < TN; ++n) {
      const int64_t j = j_base + n * TC;
      if (j < J) f(i, j, acc[m][n]);
    }
  }
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// Host side.

// Blocks for a grid-stride loop over `total` elements (the loop covers anything beyond the cap).
inline unsigned stride_blocks(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > (1 << 20)) blocks = 1 << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

// Effective split of a reduction of length P: slices are whole multiples of `quantum` and never
// empty, so the result never exceeds the request (the workspace was sized for the request).
inline int64_t plan_split(int64_t P, int requested, int64_t quantum, int64_t& p_chunk) {
  p_chunk = P;
  if (requested <= 1 || P <= quantum) return 1;
  const int64_t per = (P + requested - 1) / requested;
  p_chunk = (per + quantum - 1) / quantum * quantum;
  return (P + p_chunk - 1) / p_chunk;
}

// The grid (x, y, z), or false when it exceeds CUDA's limits (x < 2^31, y and z <= 65535).
inline bool make_grid(int64_t x, int64_t y, int64_t z, dim3& grid) {
  if (x > 2147483647LL || y > 65535 || z > 65535) return false;
  grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
  return true;
}

// The launches of a split reduction: launch_main(), then, when split > 1 and it launched cleanly,
// launch_reduce() (the kernel that sums the slices).  Returns cudaGetLastError() after them.
template <class Main, class Reduce>
cudaError_t launch_with_reduce(int64_t split, Main&& launch_main, Reduce&& launch_reduce) {
  launch_main();
  if (split > 1) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    launch_reduce();
  }
  return cudaGetLastError();
}

// Calls launch(T{}) for the element type T named by dtype_code (a StpFastDtype); returns its
// cudaError_t as int, or cudaErrorInvalidValue for an unknown code.
template <typename F>
int dispatch_dtype(int dtype_code, F&& launch) {
  switch (dtype_code) {
    case kStpFastFloat32:
      return static_cast<int>(launch(float{}));
    case kStpFastFloat64:
      return static_cast<int>(launch(double{}));
    case kStpFastFloat16:
      return static_cast<int>(launch(__half{}));
    case kStpFastBFloat16:
      return static_cast<int>(launch(__nv_bfloat16{}));
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace cuda
}  // namespace stp_fast
