// Parallel gather/scatter of a weight block on the CPU, shared by every op's CPU kernels.
//
// A "block" selects rows (dim 0) and columns (dim 1) of a weight and keeps its trailing dimensions
// whole: for a linear weight [N, K] a block is [n, k]; for a conv weight [C_out, C_in, kh, kw] it is
// [n, k, kh, kw] (every (row, column) cell carries a kh x kw kernel).  Rows/columns are either given
// by an int64 index (contiguous, values already validated) or are a prefix (null index).
//
//   gather_block : out = w[rows][:, cols]                (fresh tensor, any memory format)
//   scatter_block: dst[rows][:, cols] (+)= src           (dst full-shaped, src compact)
//
// Cost O(n * k * cells), small next to the GEMM/convolution that uses the block; rows are split over
// threads with at::parallel_for (an ATen op would do two index_select passes instead of one).
// Host-only (uses ATen); never include this from a .cu file.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace stp_fast {

namespace gather_detail {

// Rows per at::parallel_for chunk so that each chunk moves at least ~32K elements.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

// Element offsets of the trailing cells (dims >= 2) of `t`, in row-major order of those dims.
inline std::vector<int64_t> cell_offsets(const at::Tensor& t) {
  std::vector<int64_t> offs{0};
  for (int64_t d = 2; d < t.dim(); ++d) {
    std::vector<int64_t> next;
    next.reserve(offs.size() * t.size(d));
    for (const int64_t o : offs)
      for (int64_t i = 0; i < t.size(d); ++i) next.push_back(o + i * t.stride(d));
    offs.swap(next);
  }
  return offs;
}

inline bool is_iota(const std::vector<int64_t>& v) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] != static_cast<int64_t>(i)) return false;
  return true;
}

// dst[dr(r), dc(c), cell] (+)= src[sr(r), sc(c), cell] for r < n, c < k; a null index is the identity.
// dst and src have the same dtype and number of dimensions and the same trailing sizes.
inline void copy_block(at::Tensor& dst, const at::Tensor& src, int64_t n, int64_t k, const int64_t* dr,
                       const int64_t* dc, const int64_t* sr, const int64_t* sc, bool accumulate) {
  if (n == 0 || k == 0) return;
  const std::vector<int64_t> doff = cell_offsets(dst), soff = cell_offsets(src);
  const int64_t cells = static_cast<int64_t>(doff.size());
  if (cells == 0) return;
  // One cell run is contiguous on both sides: copy it with memcpy (or a plain loop when adding).
  const bool dense_cells = is_iota(doff) && is_iota(soff);
  const int64_t d0 = dst.stride(0), d1 = dst.stride(1), s0 = src.stride(0), s1 = src.stride(1);
  // Whole rows are contiguous runs (linear weights, prefix columns): one memcpy per row.
  const bool dense_rows = dense_cells && !dc && !sc && d1 == cells && s1 == cells;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "stp_fast_copy_block", [&] {
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(k * cells), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* srow = sp + (sr ? sr[r] : r) * s0;
        scalar_t* drow = dp + (dr ? dr[r] : r) * d0;
        if (dense_rows) {
          if (accumulate) {
            for (int64_t i = 0; i < k * cells; ++i) drow[i] += srow[i];
          } else {
            std::memcpy(drow, srow, k * cells * sizeof(scalar_t));
          }
          continue;
        }
        for (int64_t c = 0; c < k; ++c) {
          const scalar_t* s = srow + (sc ? sc[c] : c) * s1;
          scalar_t* d = drow + (dc ? dc[c] : c) * d1;
          if (dense_cells && !accumulate) {
            std::memcpy(d, s, cells * sizeof(scalar_t));
          } else if (accumulate) {
            for (int64_t t = 0; t < cells; ++t) d[doff[t]] += s[soff[t]];
          } else {
            for (int64_t t = 0; t < cells; ++t) d[doff[t]] = s[soff[t]];
          }
        }
      }
    });
  });
}

inline const int64_t* index_data(const at::Tensor* idx) { return idx ? idx->const_data_ptr<int64_t>() : nullptr; }

}  // namespace gather_detail

// A contiguous copy of an optional index (the raw loops and ATen index ops assume stride 1).
inline std::optional<at::Tensor> contiguous_index(const std::optional<at::Tensor>& idx) {
  if (!idx.has_value()) return std::nullopt;
  return idx->contiguous();
}

inline const at::Tensor* index_or_null(const std::optional<at::Tensor>& idx) { return idx ? &*idx : nullptr; }

// a and b are the very same tensor contents: same data pointer, dtype, shape and strides.
inline bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() &&
                          a.sizes().equals(b.sizes()) && a.strides().equals(b.strides()));
}

// Two channel selections (index or prefix of the given widths) pick the same channels.
inline bool same_selection(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b, int64_t width_a,
                           int64_t width_b) {
  if (a.has_value() != b.has_value()) return false;
  if (!a.has_value()) return width_a == width_b;
  return a->is_same(*b) || (a->size(0) == b->size(0) && at::equal(*a, *b));
}

// out[r, c, ...] = w[rows(r), cols(c), ...] for r < n, c < k: a fresh [n, k, *w.shape[2:]] tensor in
// memory format `fmt` (Contiguous, or ChannelsLast for 4-D conv weights).  Null index: prefix.
inline at::Tensor gather_block(const at::Tensor& w, const at::Tensor* rows, const at::Tensor* cols, int64_t n,
                               int64_t k, at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  std::vector<int64_t> shape(w.sizes().begin(), w.sizes().end());
  shape[0] = n;
  shape[1] = k;
  at::Tensor out = at::empty(shape, w.options().memory_format(fmt));
  gather_detail::copy_block(out, w, n, k, nullptr, nullptr, gather_detail::index_data(rows),
                            gather_detail::index_data(cols), false);
  return out;
}

// dst[rows(r), cols(c), ...] = src[r, c, ...] (or += with accumulate) for the whole compact src
// [n, k, ...]; dst is the full-shaped tensor (any strides), same dtype as src.  Null index: prefix.
// Only the selected block of dst is touched.
inline void scatter_block(at::Tensor& dst, const at::Tensor& src, const at::Tensor* rows, const at::Tensor* cols,
                          bool accumulate = false) {
  gather_detail::copy_block(dst, src, src.size(0), src.size(1), gather_detail::index_data(rows),
                            gather_detail::index_data(cols), nullptr, nullptr, accumulate);
}

}  // namespace stp_fast
