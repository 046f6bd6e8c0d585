// Argument checks shared by every stp_fast op (FlashAttention-style CHECK_* macros).
//
// Every failure raises a Python exception that names the op and the argument:
//   * TypeError  (TORCH_CHECK_TYPE)  -- wrong dtype;
//   * ValueError (TORCH_CHECK_VALUE) -- wrong rank, shape, device, range or order.
// Messages read "<op>: <arg> ...", e.g. "masked_linear: in_index must be int64, got Int".
// Host-only (uses ATen); never include this from a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

// dtype of t is one of float32, float64, float16, bfloat16.
#define CHECK_FLOATING(op, name, t)                                                            \
  TORCH_CHECK_TYPE(::stp_fast::is_supported_floating((t).scalar_type()), op, ": ", name,     \
                   " must be float32, float64, float16 or bfloat16, got ", (t).scalar_type())

// t has the same dtype as ref.
#define CHECK_SAME_DTYPE(op, name, t, ref_name, ref)                                            \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), op, ": ", name, " has dtype ",  \
                   (t).scalar_type(), " but ", ref_name, " has dtype ", (ref).scalar_type())

// t lives on the same device as ref ("bias is on cpu but x is on cuda:0").
#define CHECK_SAME_DEVICE(op, name, t, ref_name, ref)                                        \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), op, ": ", name, " is on ", (t).device(), \
                    " but ", ref_name, " is on ", (ref).device())

// t is a dense (strided) tensor, not sparse/mkldnn/nested.
#define CHECK_STRIDED(op, name, t) \
  TORCH_CHECK_VALUE((t).layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", (t).layout())

// t has exactly `ndim` dimensions; `what` describes the expected shape, e.g. "2-D [N, K]".
#define CHECK_DIM(op, name, t, ndim, what)                                                 \
  TORCH_CHECK_VALUE((t).dim() == (ndim), op, ": ", name, " must be ", what, ", got ", (t).dim(), \
                    "-D tensor of shape ", (t).sizes())

namespace stp_fast {

inline bool is_supported_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Range/order check of a 1-D int64 index on the host: one pass computing min, max and the first
// order violation.  Messages match check_index_values_device (plus the offending pair).
inline void check_index_values_host(const at::Tensor& index, int64_t dim, const char* op, const char* arg) {
  const auto acc = index.accessor<int64_t, 1>();
  const int64_t len = acc.size(0);
  if (len == 0) return;
  int64_t lo = acc[0], hi = acc[0], bad = -1;
  for (int64_t i = 1; i < len; ++i) {
    const int64_t v = acc[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    if (bad < 0 && v <= acc[i - 1]) bad = i;
  }
  TORCH_CHECK_VALUE(lo >= 0, op, ": ", arg, " entries must lie in [0, ", dim, "), got min ", lo);
  TORCH_CHECK_VALUE(hi < dim, op, ": ", arg, " entries must lie in [0, ", dim, "), got max ", hi);
  TORCH_CHECK_VALUE(bad < 0, op, ": ", arg, " must be sorted in strictly increasing order (no duplicates); got ",
                    (bad > 0 ? acc[bad - 1] : 0), " then ", (bad > 0 ? acc[bad] : 0), " at positions ", bad - 1, ", ",
                    bad);
}

// Same check on any device with ATen ops and a single device-to-host copy (one sync on CUDA):
// min, max and the smallest step between neighbours.
inline void check_index_values_device(const at::Tensor& index, int64_t dim, const char* op, const char* arg) {
  const int64_t len = index.size(0);
  if (len == 0) return;
  const at::Tensor min_step = len > 1 ? (index.slice(0, 1, len) - index.slice(0, 0, len - 1)).min()
                                      : at::ones({}, index.options());
  const at::Tensor stats = at::stack({index.min(), index.max(), min_step}).to(at::kCPU);
  const int64_t* s = stats.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(s[0] >= 0, op, ": ", arg, " entries must lie in [0, ", dim, "), got min ", s[0]);
  TORCH_CHECK_VALUE(s[1] < dim, op, ": ", arg, " entries must lie in [0, ", dim, "), got max ", s[1]);
  TORCH_CHECK_VALUE(s[2] > 0, op, ": ", arg, " must be sorted in strictly increasing order (no duplicates)");
}

// Whether the values of device (CUDA) index tensors are checked here: only with
// STP_FAST_CHECK_INDICES=always (or 1).  The check costs a device sync, and the Python ops that call
// these kernels have already checked their index tensors (once per tensor, see stp_fast/ops/_checks.py).
inline bool device_index_checks_enabled() {
  const char* v = std::getenv("STP_FAST_CHECK_INDICES");
  if (v == nullptr) return false;
  const std::string s(v);
  return s == "always" || s == "1";
}

// Validates an optional channel index over a dimension of size `dim`: int64, 1-D, on `device`,
// entries strictly increasing in [0, dim).  Returns its length, or -1 when the index is absent
// (meaning "prefix").  The values are checked on the host for CPU tensors; device tensors only when
// device_index_checks_enabled() (one sync).  Later ops (masked_conv2d, multi-subnet ops) reuse this.
inline int64_t check_index(const std::optional<at::Tensor>& index, int64_t dim, const at::Device& device,
                           const char* op, const char* arg) {
  if (!index.has_value()) return -1;
  const at::Tensor& idx = *index;
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ", idx.scalar_type());
  CHECK_STRIDED(op, arg, idx);
  CHECK_DIM(op, arg, idx, 1, "1-D");
  TORCH_CHECK_VALUE(idx.device() == device, op, ": ", arg, " is on ", idx.device(), " but x is on ", device);
  if (idx.is_cpu()) {
    check_index_values_host(idx, dim, op, arg);
  } else if (device_index_checks_enabled()) {
    check_index_values_device(idx, dim, op, arg);
  }
  return idx.size(0);
}

// t is a dense tensor with ref's dtype and device (a bias or grad_out against x).
inline void check_dense_like(const char* op, const std::string& name, const at::Tensor& t, const std::string& ref_name,
                             const at::Tensor& ref) {
  CHECK_STRIDED(op, name, t);
  CHECK_SAME_DTYPE(op, name, t, ref_name, ref);
  CHECK_SAME_DEVICE(op, name, t, ref_name, ref);
}

// The input (named xn) and the weight of a layer op: both dense, x floating, the weight with x's
// dtype and device.  Ranks are the caller's.
inline void check_input_and_weight(const char* op, const std::string& xn, const at::Tensor& x,
                                   const at::Tensor& weight) {
  CHECK_STRIDED(op, xn, x);
  CHECK_STRIDED(op, "weight", weight);
  CHECK_FLOATING(op, xn, x);
  CHECK_SAME_DTYPE(op, "weight", weight, xn, x);
  CHECK_SAME_DEVICE(op, "weight", weight, xn, x);
}

// An optional bias of a layer op: dense, x's dtype and device, 1-D [rows] with rows = weight.size(0),
// called rows_name in the message ("bias must be 1-D [N] with N = ...").
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const std::string& xn,
                       const at::Tensor& x, int64_t rows, const char* rows_name) {
  if (!bias.has_value()) return;
  check_dense_like(op, "bias", *bias, xn, x);
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, op, ": bias must be 1-D [", rows_name, "] with ",
                    rows_name, " = ", rows, " (weight.size(0)), got shape ", bias->sizes());
}

// Names of the per-call arguments as they appear in messages.  A single-layer op uses the defaults;
// the multi-subnet ops name the list element instead ("xs[2]", "in_indices[2]", "out_widths[2]").
struct ArgNames {
  const char* op;
  std::string x = "x";
  std::string in_index = "in_index";
  std::string out_index = "out_index";
  std::string out_width = "out_width";
  std::string grad_out = "grad_out";
};

// The output selection of a layer op over the weight's `rows` output rows: out_index (checked
// with check_index) and out_width, which is its length, or without an index the width of the
// prefix in [0, rows].  Returns the index length, or -1 for a prefix.
inline int64_t check_out_selection(const std::optional<at::Tensor>& out_index, int64_t out_width, int64_t rows,
                                   const at::Device& device, const ArgNames& names) {
  const char* op = names.op;
  const int64_t out_len = check_index(out_index, rows, device, op, names.out_index.c_str());
  if (out_len < 0) {
    TORCH_CHECK_VALUE(out_width >= 0 && out_width <= rows, op, ": ", names.out_width, " must lie in [0, ", rows,
                      "] (weight.size(0)), got ", out_width);
  } else {
    TORCH_CHECK_VALUE(out_width == out_len, op, ": ", names.out_width, " is ", out_width, " but ", names.out_index,
                      " has ", out_len, " entries");
  }
  return out_len;
}

// "<list>[<i>]", e.g. item_name("xs", 2) == "xs[2]".
inline std::string item_name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Names for subnet i of a multi-subnet op (lists xs, in_indices, out_indices, out_widths, grads).
inline ArgNames subnet_names(const char* op, size_t i) {
  return ArgNames{op, item_name("xs", i), item_name("in_indices", i), item_name("out_indices", i),
                  item_name("out_widths", i), item_name("grads", i)};
}

// A list argument of a multi-subnet op holds one entry per subnet.
inline void check_list_len(const char* op, const char* name, size_t len, size_t num_subnets) {
  TORCH_CHECK_VALUE(len == num_subnets, op, ": ", name, " must have one entry per subnet (", num_subnets,
                    " subnets, the length of xs), got ", len);
}

// The inputs of a multi-subnet op: at least one tensor; all dense, floating, and on xs[0]'s dtype
// and device.
inline void check_subnet_inputs(const char* op, at::TensorList xs) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs must hold at least one tensor (one per subnet), got an empty list");
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = item_name("xs", i);
    CHECK_STRIDED(op, name, xs[i]);
    CHECK_FLOATING(op, name, xs[i]);
    if (i > 0) {
      CHECK_SAME_DTYPE(op, name, xs[i], "xs[0]", xs[0]);
      CHECK_SAME_DEVICE(op, name, xs[i], "xs[0]", xs[0]);
    }
  }
}

// Product of all but the last dimension: the number of rows of t viewed as [M, t.size(-1)].
// (t.reshape({-1, 0}) is ambiguous, so never rely on -1 when the last dimension can be 0.)
inline int64_t leading_numel(const at::Tensor& t) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) m *= t.size(d);
  return m;
}

}  // namespace stp_fast
