// Gathered GEMM for masked_linear on CUDA (forward, grad_x and grad_weight share this one kernel).
//
//   C[ci(i), cj(j)]  (+)=  sum_p A[i, p] * B[bp(p), bj(j)]  (+ bias[bj(j)])      (see masked_linear.h)
//
// Algorithm: classic shared-memory tiled SIMT GEMM (the tile and its steps are shared with
// masked_conv2d_cuda.cu in common/cuda_common.cuh).  Each block owns a BM x BN = 64 x 64 output tile
// and walks the reduction in BK = 16 deep steps; 256 threads each keep a 4 x 4 register block
// (rows tr + 16*m, cols tc + 16*n, so shared-memory reads are broadcast / consecutive).  Operands
// are read with arbitrary strides and through optional int64 index arrays (the "gather"), converted
// to the accumulator type (float for float/half/bf16, double for double) when staged in shared
// memory, and the epilogue adds the bias and scatters through optional row/col indices.  Each
// operand tile is loaded along whichever of its two dimensions has unit stride, so x/W/g/dW in
// their usual row-major layouts are read with coalesced accesses.  Tails (I, J, P not multiples of
// the tile) are handled with bounds checks; out-of-range elements are staged as zeros.
//
// Split-K (a.split_k > 1): blockIdx.z takes a P slice and stores its raw partial tile into a
// dense [split_k, I, J] workspace; a second kernel sums the slices in a fixed order (deterministic,
// no atomics) and runs the epilogue.  The glue uses it for grad_weight, where P = batch rows is
// long and I x J (n x k) gives too few tiles to fill the GPU.
//
// Limits: J <= 65535 * 64 (grid.y), split_k <= 65535; the kernel uses no tensor cores (this is the
// portable correctness baseline; cuBLAS on compacted operands or a Triton kernel is faster).
// Deliberately free of ATen/torch headers so that it compiles with plain nvcc (KERNELS.md §6(iv)).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_common.cuh"
#include "masked_linear/masked_linear.h"

namespace {

using namespace stp_fast::cuda;        // Num, index_or_identity, launch helpers (common/cuda_common.cuh)
using namespace stp_fast::cuda::simt;  // the GEMM tile (BM, BN, BK, TM, TN, TR, TC, NT, ...)

// Epilogue for one output element: + bias[bj(j)], + C (accumulate), scatter to C[ci(i), cj(j)].
template <typename T>
__device__ __forceinline__ void store_output(const GatheredGemmArgs& a, int64_t i, int64_t j,
                                             typename Num<T>::acc v) {
  if (a.bias != nullptr) {
    const T* bias = static_cast<const T*>(a.bias);
    v += Num<T>::to_acc(bias[index_or_identity(a.bj_index, j) * a.bias_stride]);
  }
  T* C = static_cast<T*>(a.C);
  const int64_t off = index_or_identity(a.ci_index, i) * a.c_si + index_or_identity(a.cj_index, j) * a.c_sj;
  if (a.accumulate) v += Num<T>::to_acc(C[off]);
  C[off] = Num<T>::from_acc(v);
}

// One BM x BN output tile over the P slice [blockIdx.z * p_chunk, min(P, (blockIdx.z + 1) * p_chunk)).
// grid = (ceil(I / BM), ceil(J / BN), split_k), block = NT.
template <typename T>
__global__ void __launch_bounds__(NT) gathered_gemm_kernel(const GatheredGemmArgs a, int64_t p_chunk) {
  using Acc = typename Num<T>::acc;
  __shared__ Acc As[BK][BM + PAD];  // As[p][i]
  __shared__ Acc Bs[BK][BN + PAD];  // Bs[p][j]

  const T* A = static_cast<const T*>(a.A);
  const T* B = static_cast<const T*>(a.B);
  const int tid = static_cast<int>(threadIdx.x);
  const int tc = tid % TC;
  const int tr = tid / TC;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * p_chunk;
  const int64_t p_end = p_begin + p_chunk < a.P ? p_begin + p_chunk : a.P;

  // Staging assignment of this thread, fixed for the whole P loop.  "i-fast": consecutive threads
  // take consecutive rows i (coalesced when A is column-major, e.g. g^T); otherwise consecutive p.
  const bool a_i_fast = a.a_si == 1 && a.a_sp != 1;
  int a_ii[A_LOADS], a_pp[A_LOADS];
  int64_t a_row_off[A_LOADS];
  bool a_row_ok[A_LOADS];
#pragma unroll
  for (int r = 0; r < A_LOADS; ++r) {
    if (a_i_fast) {
      a_ii[r] = tid % BM;
      a_pp[r] = tid / BM + r * (NT / BM);
    } else {
      a_pp[r] = tid % BK;
      a_ii[r] = tid / BK + r * (NT / BK);
    }
    const int64_t i = i0 + a_ii[r];
    a_row_ok[r] = i < a.I;
    a_row_off[r] = a_row_ok[r] ? i * a.a_si : 0;
  }
  // B: "j-fast" unless p is the unit-stride dimension (forward reads W rows along in_index).
  const bool b_j_fast = !(a.b_sp == 1 && a.b_sj != 1);
  int b_jj[B_LOADS], b_pp[B_LOADS];
  int64_t b_col_off[B_LOADS];
  bool b_col_ok[B_LOADS];
#pragma unroll
  for (int r = 0; r < B_LOADS; ++r) {
    if (b_j_fast) {
      b_jj[r] = tid % BN;
      b_pp[r] = tid / BN + r * (NT / BN);
    } else {
      b_pp[r] = tid % BK;
      b_jj[r] = tid / BK + r * (NT / BK);
    }
    const int64_t j = j0 + b_jj[r];
    b_col_ok[r] = j < a.J;
    b_col_off[r] = b_col_ok[r] ? index_or_identity(a.bj_index, j) * a.b_sj : 0;
  }

  Acc acc[TM][TN];
  zero_tile(acc);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
#pragma unroll
    for (int r = 0; r < A_LOADS; ++r) {
      const int64_t p = p0 + a_pp[r];
      Acc v = Acc(0);
      if (a_row_ok[r] && p < p_end) v = Num<T>::to_acc(A[a_row_off[r] + p * a.a_sp]);
      As[a_pp[r]][a_ii[r]] = v;
    }
#pragma unroll
    for (int r = 0; r < B_LOADS; ++r) {
      const int64_t p = p0 + b_pp[r];
      Acc v = Acc(0);
      if (b_col_ok[r] && p < p_end) v = Num<T>::to_acc(B[index_or_identity(a.bp_index, p) * a.b_sp + b_col_off[r]]);
      Bs[b_pp[r]][b_jj[r]] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc ra[TM], rb[TN];
#pragma unroll
      for (int m = 0; m < TM; ++m) ra[m] = As[kk][tr + m * TR];
#pragma unroll
      for (int n = 0; n < TN; ++n) rb[n] = Bs[kk][tc + n * TC];
#pragma unroll
      for (int m = 0; m < TM; ++m) {
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] += ra[m] * rb[n];
      }
    }
    __syncthreads();
  }

  if (a.split_k > 1) {
    // Raw partial sums, dense [split_k, I, J]; the reduce kernel does the epilogue.
    Acc* ws = static_cast<Acc*>(a.workspace) + static_cast<int64_t>(blockIdx.z) * a.I * a.J;
    for_each_result(acc, i0 + tr, j0 + tc, a.I, a.J, [&](int64_t i, int64_t j, Acc v) { ws[i * a.J + j] = v; });
    return;
  }
  for_each_result(acc, i0 + tr, j0 + tc, a.I, a.J, [&](int64_t i, int64_t j, Acc v) { store_output<T>(a, i, j, v); });
}

// Sums the split_k partial tiles of every (i, j) in slice order, then runs the epilogue.
template <typename T>
__global__ void __launch_bounds__(NT) split_k_reduce_kernel(const GatheredGemmArgs a) {
  using Acc = typename Num<T>::acc;
  const Acc* ws = static_cast<const Acc*>(a.workspace);
  const int64_t total = a.I * a.J;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const Acc v = sum_slices(ws, a.split_k, total, e);
    store_output<T>(a, e / a.J, e % a.J, v);
  }
}

template <typename T>
cudaError_t launch_typed(const GatheredGemmArgs& args, cudaStream_t stream) {
  if (args.I < 0 || args.J < 0 || args.P < 0) return cudaErrorInvalidValue;
  if (args.I == 0 || args.J == 0) return cudaSuccess;
  if (args.A == nullptr && args.P > 0) return cudaErrorInvalidValue;
  if ((args.B == nullptr && args.P > 0) || args.C == nullptr) return cudaErrorInvalidValue;

  GatheredGemmArgs a = args;
  int64_t p_chunk = a.P;
  const int64_t split = plan_split(a.P, a.split_k, BK, p_chunk);
  if (split > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  a.split_k = static_cast<int>(split);
  dim3 grid;
  if (!make_grid(stp_fast_cdiv(a.I, BM), stp_fast_cdiv(a.J, BN), split, grid)) return cudaErrorInvalidValue;
  return launch_with_reduce(
      split, [&] { gathered_gemm_kernel<T><<<grid, NT, 0, stream>>>(a, p_chunk); },
      [&] { split_k_reduce_kernel<T><<<stride_blocks(a.I * a.J, NT), NT, 0, stream>>>(a); });
}

}  // namespace

int stp_fast_gathered_gemm_launch(const GatheredGemmArgs& a, int dtype_code, cudaStream_t stream) {
  return dispatch_dtype(dtype_code, [&](auto t) { return launch_typed<decltype(t)>(a, stream); });
}
