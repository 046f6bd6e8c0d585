// Kernels that check the emulator itself (test harness only): a correct shared-memory exchange,
// the same exchange without its barrier, two kinds of barrier divergence and a 3-D block.
// Valid CUDA, but only ever compiled by the emulator harness.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 64;

// out[t] = in[kThreads - 1 - t] through shared memory; the barrier is skipped when !sync.
__global__ void reverse_kernel(const float* in, float* out, bool sync) {
  __shared__ float buf[kThreads];
  const int t = static_cast<int>(threadIdx.x);
  buf[t] = in[blockIdx.x * kThreads + t];
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + t] = buf[kThreads - 1 - t];
}

// Threads below `cut` wait at a barrier, the others return: divergent __syncthreads().
__global__ void early_exit_kernel(float* out, int cut) {
  const int t = static_cast<int>(threadIdx.x);
  if (t >= cut) return;
  __syncthreads();
  out[t] = 1.f;
}

// Even and odd threads wait at two different barriers.
__global__ void split_barrier_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = 1.f;
}

// Writes the linear thread id and the block id of every thread of a 3-D block / 2-D grid.
__global__ void index_kernel(int64_t* out) {
  const int64_t tid = threadIdx.x + blockDim.x * (threadIdx.y + static_cast<int64_t>(blockDim.y) * threadIdx.z);
  const int64_t nt = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  const int64_t bid = blockIdx.x + static_cast<int64_t>(gridDim.x) * blockIdx.y;
  out[2 * (bid * nt + tid)] = tid;
  out[2 * (bid * nt + tid) + 1] = bid;
}

}  // namespace

extern "C" int emu_selftest(int which, const void* in, void* out, int arg) {
  switch (which) {
    case 0:
    case 1:
      reverse_kernel<<<arg, kThreads, 0, nullptr>>>(static_cast<const float*>(in), static_cast<float*>(out),
                                                    which == 0);
      break;
    case 2:
      early_exit_kernel<<<1, kThreads>>>(static_cast<float*>(out), arg);
      break;
    case 3:
      split_barrier_kernel<<<1, kThreads>>>(static_cast<float*>(out));
      break;
    case 4:
      index_kernel<<<dim3(3, 2), dim3(4, 3, 2)>>>(static_cast<int64_t*>(out));
      break;
    case 5:
      index_kernel<<<1, 2048>>>(static_cast<int64_t*>(out));  // too many threads per block
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}
