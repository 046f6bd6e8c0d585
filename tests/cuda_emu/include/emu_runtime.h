// CUDA-on-CPU emulator: the launch side (test harness only; see tests/cuda_emu/README.md).
//
// The harness rewrites every `kernel<<<grid, block, smem, stream>>>(args...)` of a .cu file into
//     ::emu::Launch(grid, block, smem, stream).bind(kernel)(args...)
// which runs the grid block by block on the calling CPU thread.  Inside a block each CUDA thread
// is a coroutine with its own stack: a thread runs until it reaches __syncthreads(),
// then the next thread runs, and the block moves past the barrier only when every thread has
// reached it.  So shared memory and barriers have exactly the CUDA block semantics, and the
// order in which threads run between two barriers is selectable (forward, reverse, shuffled) to
// expose missing barriers.  Errors (barrier divergence, bad launch configuration) are recorded as
// the sticky error returned by cudaGetLastError(), never by aborting the process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "cuda_runtime.h"

namespace emu {

// Runs body once per thread of every block of the grid.  Returns after the whole grid or after
// the first error (recorded as the sticky error).
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

// Called (by the harness's rewrite) right after every __shared__ declaration: the first thread of
// a block that reaches it fills the array with 0xFF bytes (NaN in every float type), so a read of
// shared memory the block never wrote is visible instead of returning a previous block's data.
void shared_region(void* data, size_t bytes);

struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t dynamic_smem = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(dynamic_smem) {}

  // The launch bound to a kernel; calling it with the kernel's arguments runs the grid.  Arguments
  // are converted to the kernel's parameter types once, and every thread gets its own copy.
  template <class... P>
  struct Bound {
    void (*kernel)(P...);
    dim3 grid, block;
    size_t smem;
    void operator()(P... args) const {
      auto k = kernel;
      run_grid(grid, block, smem, [&] { k(args...); });
    }
  };

  template <class... P>
  Bound<P...> bind(void (*kernel)(P...)) const {
    return Bound<P...>{kernel, grid, block, smem};
  }
};

}  // namespace emu

// Scheduler controls and statistics, exported to Python (ctypes) by emu_runtime.cpp.
extern "C" {
// mode 0: threads run in index order between barriers; 1: reverse order; 2: a fresh shuffle per
// phase drawn from `seed`.
void emu_set_schedule(int mode, uint64_t seed);
// The message of the last recorded error ("" if none); not cleared by cudaGetLastError.
const char* emu_last_error_message();
void emu_clear_error_message();
// Counters since the last reset: [0] blocks run, [1] barrier phases passed, [2] thread resumes.
void emu_stats(long long* out3);
void emu_reset_stats();
}
