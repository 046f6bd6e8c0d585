// multi_subnet_linear on CPU: S subnets sharing one weight [N, K], each in compact coordinates.
//
// Subnet s: ys[s] = xs[s] @ weight[out_s][:, in_s].T + bias[out_s] -- masked_linear per subnet with
// the building blocks of masked_linear_cpu.h (prefix blocks are strided views of the weight, index
// lists one parallel gather).  The loop over subnets runs here in C++ (one dispatcher call for the
// whole layer); every GEMM is an ATen BLAS call, already parallel over the cores.
//
// Backward: grad_weight / grad_bias are full-shaped zeros into which the subnets add their
// contributions in subnet order (prefix: addmm_ with beta = 1 straight into the narrowed view;
// index lists: compact mm + parallel scatter-add), so the result is deterministic.
//
// Shared input: subnets given the very same input tensor (same data pointer, dtype, shape and
// strides) with the same input channels and prefix outputs -- the first layer, where every subnet
// sees the same batch -- form a group computed once at its widest out width n_max:
//   forward : one GEMM x @ W[:n_max, in]^T; each member gets its first n_s columns (a copy);
//   backward: grad_w[:n_max, in] += G^T @ x with G the members' grads summed (zero-padded to n_max)
//             -- one GEMM instead of one per member; grad_bias from G; grad_x stays per member.
// The GEMMs then cost n_max instead of sum_s n_s output columns.  [measured] dev box (AMD EPYC
// Zen 5, torch 2.13 CPU, fp32, 1 thread, min of 30): M = 256, K = 512, N = 1024, S = 4 prefix
// subnets on one x with widths 1/.75/.5/.25: forward 2.0 vs 4.7 ms per-subnet, grad_w+grad_b
// 2.1 vs 4.6-5.4 ms; four equal widths: forward 1.0 vs 3.8 ms; K = 32, M = 4096: forward 6.4-6.7
// vs 10.0-10.6 ms.  Groups of one member take the plain per-subnet path.  (The same grouping was
// measured for multi_subnet_conv2d and not adopted there: at the stem, k = 3, the convolution is
// bound by writing its output and the output copies cost about what they save.)
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/gather.h"
#include "common/subnets.h"
#include "masked_linear/masked_linear_cpu.h"

namespace stp_fast {

namespace {

constexpr const char* kOp = "multi_subnet_linear";

using LinearSubnet = Subnet<MaskedLinearShape>;

// Validates every argument; returns the per-subnet shapes and contiguous indices.
std::vector<LinearSubnet> check_subnets(at::TensorList xs, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, at::IntArrayRef out_widths,
                                        const std::optional<at::TensorList>& in_indices,
                                        const std::optional<at::TensorList>& out_indices,
                                        const at::TensorList* grads) {
  const size_t S = check_subnet_lists(kOp, xs, out_widths, in_indices, out_indices, grads);
  const auto check_one = [&](size_t i, const std::optional<at::Tensor>& in_i, const std::optional<at::Tensor>& out_i) {
    return masked_linear_check_named(xs[i], weight, bias, in_i, out_i, out_widths[i], grads ? &(*grads)[i] : nullptr,
                                     subnet_names(kOp, i));
  };
  return check_each_subnet<MaskedLinearShape>(S, in_indices, out_indices, check_one);
}

// Subnets grouped by shared input (header comment), members in subnet order, groups ordered by
// their first member.  Subnets with an out index are always alone.
std::vector<std::vector<size_t>> shared_input_groups(at::TensorList xs, const std::vector<LinearSubnet>& subs) {
  std::vector<std::vector<size_t>> groups;
  std::vector<bool> taken(subs.size(), false);
  for (size_t i = 0; i < subs.size(); ++i) {
    if (taken[i]) continue;
    groups.push_back({i});
    if (!subs[i].s.out_prefix) continue;
    for (size_t j = i + 1; j < subs.size(); ++j) {
      if (taken[j] || !subs[j].s.out_prefix || !same_tensor(xs[i], xs[j]) ||
          !same_selection(subs[i].in_c, subs[j].in_c, subs[i].s.k, subs[j].s.k))
        continue;
      taken[j] = true;
      groups.back().push_back(j);
    }
  }
  return groups;
}

// The shape of a group: its first member widened to the group's largest out width.
MaskedLinearShape group_shape(const std::vector<size_t>& group, const std::vector<LinearSubnet>& subs) {
  MaskedLinearShape s = subs[group[0]].s;
  for (const size_t i : group) s.n = std::max(s.n, subs[i].s.n);
  return s;
}

std::vector<at::Tensor> multi_subnet_linear_fwd_cpu(at::TensorList xs, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, at::IntArrayRef out_widths,
                                                    const std::optional<at::TensorList>& in_indices,
                                                    const std::optional<at::TensorList>& out_indices) {
  const auto subs = check_subnets(xs, weight, bias, out_widths, in_indices, out_indices, nullptr);
  std::vector<at::Tensor> ys(subs.size());
  for (const auto& group : shared_input_groups(xs, subs)) {
    const LinearSubnet& first = subs[group[0]];
    const MaskedLinearShape s = group_shape(group, subs);
    const at::Tensor wc = masked_linear_active_weight(weight, s, first.in(), first.out());
    const at::Tensor y = masked_linear_forward_cpu(xs[group[0]], wc, bias, s, first.out());
    bool y_given = false;  // outputs never alias: one widest member takes y, the rest get copies
    for (const size_t i : group) {
      if (subs[i].s.n == s.n && !y_given) {
        ys[i] = y;
        y_given = true;
      } else {
        ys[i] = y.narrow(-1, 0, subs[i].s.n).clone(at::MemoryFormat::Contiguous);
      }
    }
  }
  return ys;
}

// The members' grads summed into one [M, n_max] tensor (zero-padded), in member order; for
// float16/bfloat16 the sum runs in float32 and is rounded once.
at::Tensor summed_grads(const std::vector<size_t>& group, const std::vector<LinearSubnet>& subs, at::TensorList grads,
                        const MaskedLinearShape& s) {
  const at::ScalarType dt = grads[group[0]].scalar_type();
  const bool reduced = dt == at::kHalf || dt == at::kBFloat16;
  at::Tensor acc = at::zeros({s.M, s.n}, grads[group[0]].options().dtype(reduced ? at::kFloat : dt));
  for (const size_t i : group) acc.narrow(1, 0, subs[i].s.n).add_(grads[i].reshape({s.M, subs[i].s.n}));
  return reduced ? acc.to(dt) : acc;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> multi_subnet_linear_bwd_cpu(
    at::TensorList grads, at::TensorList xs, const at::Tensor& weight, at::IntArrayRef out_widths,
    const std::optional<at::TensorList>& in_indices, const std::optional<at::TensorList>& out_indices, bool need_x,
    bool need_weight, bool need_bias) {
  const auto subs = check_subnets(xs, weight, std::nullopt, out_widths, in_indices, out_indices, &grads);
  const at::TensorOptions opts = xs[0].options();
  std::vector<at::Tensor> grad_xs(need_x ? subs.size() : 0);
  at::Tensor grad_w = need_weight ? at::zeros({weight.size(0), weight.size(1)}, opts) : at::empty({0}, opts);
  at::Tensor grad_b = need_bias ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);

  for (const auto& group : shared_input_groups(xs, subs)) {
    const LinearSubnet& first = subs[group[0]];
    const MaskedLinearShape s = group_shape(group, subs);
    const at::Tensor& x = xs[group[0]];
    if (need_x) {
      const at::Tensor wc = masked_linear_active_weight(weight, s, first.in(), first.out());
      for (const size_t i : group) {  // each member's rows of the group's block
        grad_xs[i] = masked_linear_grad_x_cpu(grads[i], xs[i], wc.narrow(0, 0, subs[i].s.n), subs[i].s);
      }
    }
    if (!need_weight && !need_bias) continue;
    // One member: its own grad; several: their sum at the group's width (same addmm_/scatter either way).
    const at::Tensor g = group.size() == 1 ? grads[group[0]] : summed_grads(group, subs, grads, s);
    if (need_weight) masked_linear_add_grad_weight_cpu(grad_w, g, x, s, first.in(), first.out());
    if (need_bias) masked_linear_add_grad_bias_cpu(grad_b, g, s, first.out());
  }
  return {grad_xs, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(stp_fast, CPU, m) {
  m.impl("_multi_subnet_linear_fwd", &multi_subnet_linear_fwd_cpu);
  m.impl("_multi_subnet_linear_bwd", &multi_subnet_linear_bwd_cpu);
}

}  // namespace stp_fast
