// The per-subnet argument handling shared by the multi-subnet layer ops (multi_subnet_linear,
// multi_subnet_conv2d): list checks, list items, and the validated subnets with contiguous indices.
// Host-only (uses ATen); never include this from a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/gather.h"

namespace stp_fast {

// One validated subnet: its shape (MaskedLinearShape, MaskedConv2dShape) and contiguous copies of
// its indices (none: prefix).
template <class Shape>
struct Subnet {
  Shape s;
  std::optional<at::Tensor> in_c, out_c;
  const at::Tensor* in() const { return index_or_null(in_c); }
  const at::Tensor* out() const { return index_or_null(out_c); }
};

// Item i of an optional list argument (none when the list is absent).
inline std::optional<at::Tensor> list_item(const std::optional<at::TensorList>& list, size_t i) {
  if (!list.has_value()) return std::nullopt;
  return (*list)[i];
}

// Checks xs (check_subnet_inputs) and that out_widths, and in_indices, out_indices and grads when
// given, hold one entry per subnet.  Returns the number of subnets.
inline size_t check_subnet_lists(const char* op, at::TensorList xs, at::IntArrayRef out_widths,
                                 const std::optional<at::TensorList>& in_indices,
                                 const std::optional<at::TensorList>& out_indices, const at::TensorList* grads) {
  check_subnet_inputs(op, xs);
  const size_t S = xs.size();
  check_list_len(op, "out_widths", out_widths.size(), S);
  if (in_indices.has_value()) check_list_len(op, "in_indices", in_indices->size(), S);
  if (out_indices.has_value()) check_list_len(op, "out_indices", out_indices->size(), S);
  if (grads != nullptr) check_list_len(op, "grads", grads->size(), S);
  return S;
}

// The S subnets, in order: subnet i's shape is check_one(i, in_index_i, out_index_i), which
// validates it; its indices are then made contiguous.
template <class Shape, class CheckOne>
std::vector<Subnet<Shape>> check_each_subnet(size_t S, const std::optional<at::TensorList>& in_indices,
                                             const std::optional<at::TensorList>& out_indices, CheckOne&& check_one) {
  std::vector<Subnet<Shape>> subs(S);
  for (size_t i = 0; i < S; ++i) {
    const auto in_i = list_item(in_indices, i);
    const auto out_i = list_item(out_indices, i);
    subs[i].s = check_one(i, in_i, out_i);
    subs[i].in_c = contiguous_index(in_i);
    subs[i].out_c = contiguous_index(out_i);
  }
  return subs;
}

}  // namespace stp_fast
