// Torch-side helpers shared by the CUDA glue of every op (masked_linear_cuda.cpp,
// masked_conv2d_cuda.cpp): dtype codes, index pointers, the SM count, checked launches of the
// plain-C launchers, split-K workspaces and the grad_bias scatter.
//
// Host-only (ATen + the CUDA runtime API); include it only in CUDA builds, under `#ifdef WITH_CUDA`
// (setup.py defines WITH_CUDA), never from a .cu file.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>

#include "common/gather.h"
#include "common/kernel_abi.h"

namespace stp_fast {

// The StpFastDtype code of a supported floating dtype; TypeError "<op>: unsupported dtype" otherwise.
inline int dtype_code(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kStpFastFloat32;
    case at::kDouble:
      return kStpFastFloat64;
    case at::kHalf:
      return kStpFastFloat16;
    case at::kBFloat16:
      return kStpFastBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", t);
  return -1;
}

// The data of an optional contiguous int64 index (see contiguous_index), or null for a prefix.
inline const int64_t* index_ptr(const std::optional<at::Tensor>& idx) {
  return idx.has_value() ? idx->const_data_ptr<int64_t>() : nullptr;
}

// The number of SMs of `device`, or 0 when the query fails (the caller then runs without split-K).
inline int num_sms(const at::Device& device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the (non-sticky) error and run without split-K
    return 0;
  }
  return sms;
}

// Runs a plain-C launcher on the current stream of like's device with like's dtype code; raises
// "<op>: <what> launch failed: <CUDA error>" when it returns an error.
template <class Args>
void launch_checked(int (*launcher)(const Args&, int, cudaStream_t), const Args& args, const at::Tensor& like,
                    const char* op, const char* what) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  const int err = launcher(args, dtype_code(op, like.scalar_type()), stream);
  TORCH_CHECK(err == 0, op, ": ", what, " launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// A split-K workspace of `elems` accumulator elements (float64 for float64 `like`, else float32) on
// like's device.  It must outlive the launch (the stream-ordered allocator makes that enough).
inline at::Tensor split_k_workspace(int64_t elems, const at::Tensor& like) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({elems}, like.options().dtype(acc));
}

// grad_bias: zeros [size] (with `opts`) holding the per-channel sums `gsum` at `index`, or at the
// prefix when there is no index.
inline at::Tensor scatter_grad_bias(const at::Tensor& gsum, const std::optional<at::Tensor>& index, int64_t size,
                                    const at::TensorOptions& opts) {
  at::Tensor gb = at::zeros({size}, opts);
  if (index.has_value()) {
    gb.index_copy_(0, *index, gsum);
  } else {
    gb.narrow(0, 0, gsum.size(0)).copy_(gsum);
  }
  return gb;
}

}  // namespace stp_fast
