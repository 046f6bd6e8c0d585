// CPU stand-in for the slice of <cuda_runtime.h> that stp_fast's kernels use (test harness only).
//
// Compiled by g++ in place of the CUDA toolkit header: execution-space qualifiers become no-ops,
// __shared__ becomes `static` (one copy per kernel instantiation; blocks run one after another),
// threadIdx/blockIdx/blockDim/gridDim are globals set by the emulator's scheduler, and
// __syncthreads() yields to the scheduler (emu_runtime.h).  Anything a kernel uses that is not
// declared here (warp shuffles, atomics, dynamic `extern __shared__`, intrinsics) fails to compile,
// which is deliberate: the emulator must not silently give such code the wrong semantics.
#pragma once

#include <cstddef>
#include <cstdint>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

namespace emu {
cudaError_t get_last_error();  // returns and clears the sticky error, like cudaGetLastError
const char* error_string(cudaError_t e);
void barrier(const char* file, int line);  // __syncthreads() of the current emulated thread
}  // namespace emu

inline cudaError_t cudaGetLastError() { return emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return emu::error_string(e); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static

constexpr int warpSize = 32;

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// A macro so that the emulator can check that every thread of a block waits at the same
// __syncthreads() of the source (file and line), whatever the compiler duplicates or unrolls.
#define __syncthreads() ::emu::barrier(__FILE__, __LINE__)
