// CUDA-on-CPU emulator: the scheduler (test harness only; see README.md and include/emu_runtime.h).
//
// One block at a time: every CUDA thread of the block is a coroutine with its own stack (a small
// x86-64 stack switch, or ucontext on other machines / with -DEMU_USE_UCONTEXT).  A "phase" runs each
// unfinished thread (in the selected order) until it either returns or calls __syncthreads(); then
// the scheduler checks that the phase is consistent (all threads finished, or all threads wait at
// the same __syncthreads() of the source) and starts the next phase.  Shared memory is the
// kernel's function-static storage, so it behaves exactly like a block's __shared__ memory.
#include "emu_runtime.h"

#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_FAST_SWITCH 1
#include <xmmintrin.h>
#else
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
dim3 blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread; touched lazily by the OS
constexpr unsigned kMaxThreadsPerBlock = 1024;

#ifdef EMU_FAST_SWITCH
// x86-64 System V stack switch without the signal-mask system calls of swapcontext (~50x faster):
// saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is `next`.
extern "C" void emu_switch_stack(void** save, void* next);
asm(R"(
  .text
  .globl emu_switch_stack
  .hidden emu_switch_stack
  .type emu_switch_stack,@function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");

struct Context {
  void* sp = nullptr;
};

void trampoline();

// A fresh context that starts trampoline() on the stack [base, base + bytes).
void make_context(Context& c, char* base, size_t bytes) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + bytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                           // fake return address of trampoline
  *--slot = reinterpret_cast<uint64_t>(&trampoline);     // popped by `ret`
  for (int r = 0; r < 6; ++r) *--slot = 0;               // rbp, rbx, r12-r15
  uint16_t fpu_cw;
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  *--slot = static_cast<uint64_t>(_mm_getcsr()) | (static_cast<uint64_t>(fpu_cw) << 32);
  c.sp = slot;
}
void switch_context(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void trampoline();
void make_context(Context& c, char* base, size_t bytes) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, trampoline, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Thread {
  Context ctx;
  std::unique_ptr<char[]> stack;  // uninitialised on purpose: pages are committed on first use
  bool done = false;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
};

Context g_scheduler;
std::vector<Thread> g_threads;
Thread* g_current = nullptr;
const std::function<void()>* g_body = nullptr;

cudaError_t g_sticky = cudaSuccess;
std::string g_message;
int g_mode = 0;
uint64_t g_rng = 0x9e3779b97f4a7c15ull;
long long g_stats[3] = {0, 0, 0};
long long g_block_serial = 0;                  // incremented per block
std::map<void*, long long> g_shared_poisoned;  // shared array -> block that last poisoned it

void record_error(cudaError_t e, const std::string& msg) {
  if (g_sticky == cudaSuccess) g_sticky = e;
  if (g_message.empty()) g_message = msg;
}

uint64_t next_random() {  // xorshift64*
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 0x2545f4914f6cdd1dull;
}

void trampoline() {
  (*g_body)();
  g_current->done = true;
  switch_context(g_current->ctx, g_scheduler);  // never resumed
  __builtin_unreachable();
}

void set_thread_index(unsigned t) {
  threadIdx.x = t % blockDim.x;
  threadIdx.y = (t / blockDim.x) % blockDim.y;
  threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Runs one block; false after an error.
bool run_block(unsigned nt, const std::function<void()>& body) {
  if (g_threads.size() < nt) g_threads.resize(nt);
  g_body = &body;
  for (unsigned t = 0; t < nt; ++t) {
    Thread& th = g_threads[t];
    if (!th.stack) th.stack.reset(new char[kStackBytes]);
    th.done = false;
    make_context(th.ctx, th.stack.get(), kStackBytes);
  }
  std::vector<unsigned> order(nt);
  for (unsigned t = 0; t < nt; ++t) order[t] = g_mode == 1 ? nt - 1 - t : t;
  ++g_stats[0];
  ++g_block_serial;
  for (;;) {
    if (g_mode == 2) {
      for (unsigned t = nt; t > 1; --t) std::swap(order[t - 1], order[next_random() % t]);
    }
    unsigned finished = 0, waiting = 0;
    const Thread* first_waiter = nullptr;
    for (unsigned t : order) {
      Thread& th = g_threads[t];
      if (th.done) continue;
      set_thread_index(t);
      g_current = &th;
      ++g_stats[2];
      switch_context(g_scheduler, th.ctx);
      if (th.done) {
        ++finished;
        continue;
      }
      ++waiting;
      if (first_waiter == nullptr) {
        first_waiter = &th;
      } else if (th.barrier_line != first_waiter->barrier_line ||
                 std::strcmp(th.barrier_file, first_waiter->barrier_file) != 0) {
        record_error(cudaErrorLaunchFailure,
                     "emu: threads of one block wait at different __syncthreads(): " +
                         std::string(first_waiter->barrier_file) + ":" + std::to_string(first_waiter->barrier_line) +
                         " and " + th.barrier_file + ":" + std::to_string(th.barrier_line));
        return false;
      }
    }
    if (waiting == 0) return true;
    if (finished != 0) {
      record_error(cudaErrorLaunchFailure,
                   "emu: divergent __syncthreads() at " + std::string(first_waiter->barrier_file) + ":" +
                       std::to_string(first_waiter->barrier_line) + ": " + std::to_string(finished) +
                       " thread(s) of the block returned while " + std::to_string(waiting) + " wait");
      return false;
    }
    ++g_stats[1];
  }
}

}  // namespace

void barrier(const char* file, int line) {
  if (g_current == nullptr) {
    record_error(cudaErrorLaunchFailure, "emu: __syncthreads() called outside a kernel");
    return;
  }
  g_current->barrier_file = file;
  g_current->barrier_line = line;
  switch_context(g_current->ctx, g_scheduler);
}

void shared_region(void* data, size_t bytes) {
  long long& last = g_shared_poisoned[data];
  if (last == g_block_serial) return;
  last = g_block_serial;
  std::memset(data, 0xff, bytes);
}

cudaError_t get_last_error() {
  const cudaError_t e = g_sticky;
  g_sticky = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const unsigned long long nt = 1ull * block.x * block.y * block.z;
  if (dynamic_smem != 0) {
    record_error(cudaErrorInvalidConfiguration, "emu: dynamic shared memory is not emulated");
    return;
  }
  if (nt == 0 || nt > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "emu: invalid launch configuration grid=(%u,%u,%u) block=(%u,%u,%u)", grid.x,
                  grid.y, grid.z, block.x, block.y, block.z);
    record_error(cudaErrorInvalidConfiguration, buf);
    return;
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (!run_block(static_cast<unsigned>(nt), body)) {
          g_current = nullptr;
          return;
        }
      }
    }
  }
  g_current = nullptr;
}

}  // namespace emu

extern "C" {
void emu_set_schedule(int mode, uint64_t seed) {
  emu::g_mode = mode;
  emu::g_rng = seed ? seed : 0x9e3779b97f4a7c15ull;
}
const char* emu_last_error_message() { return emu::g_message.c_str(); }
void emu_clear_error_message() { emu::g_message.clear(); }
void emu_stats(long long* out3) { std::memcpy(out3, emu::g_stats, sizeof emu::g_stats); }
void emu_reset_stats() { std::memset(emu::g_stats, 0, sizeof emu::g_stats); }
}
