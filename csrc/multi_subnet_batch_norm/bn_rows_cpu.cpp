// Training-mode BatchNorm (+ ReLU) on CPU for float32 tensors whose channels are innermost and dense:
// channels-last [B, C, H, W] (the layout the stp_fast convnets run in on the CPU) or [B, C].
//
// Why: ATen's channels-last kernels vectorise over C, which the pruned subnets make small and odd
// (5, 13, 29 ... channels): for [64, 13, 32, 32] on one core ATen takes ~1.5 ms forward (+0.3 ms
// ReLU) and ~1.8 ms backward, these kernels ~0.7 ms (ReLU fused) and ~1.0 ms: two passes over the
// data each, and ~1e-7 relative error against float64 where ATen's float32 sums give ~3e-6.
// The flat tensor is cut into chunks of L floats, L a multiple of
// lcm(C, 16) and >= 1024: element j of every chunk belongs to channel j % C, so every loop runs
// over whole chunks with per-position (not per-channel) coefficients and vectorises for any C;
// per-position sums are folded into channels at the end.
//   forward : one pass for the statistics (sums of x - x[first row] and of its squares: float32
//             within blocks of 32 chunks, float64 across them), one pass y = x * alpha + beta (+ ReLU)
//             with alpha = invstd * w, beta = b - mean * alpha (ATen's formula);
//   backward: one pass for sum(dy) and sum(dy * (x - mean)) (summed the same way), one pass
//             dx = (dy - sum(dy) / n - (x - mean) * invstd^2 * sum(dy * (x - mean)) / n) * invstd * w.
// Sums run per thread in a fixed chunk partition and are added in thread order (deterministic for a
// given thread count).  The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at load time (GCC target_clones).
#include "multi_subnet_batch_norm/bn_rows_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define STP_FAST_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STP_FAST_MULTIVERSION
#endif

namespace stp_fast {

namespace {

constexpr int64_t kVec = 16;        // floats in a 512-bit vector: the chunk length is a multiple of it
constexpr int64_t kMinChunk = 1024;  // and at least this many floats (one call per chunk)
constexpr int64_t kBlock = 32;       // chunks summed in float32 before joining the float64 totals
constexpr int64_t kGrain = 32768;    // floats per parallel task at least

// The elements [lo, hi) (lo a multiple of L) chunk by chunk: f(chunk pointer offset, length).
template <typename F>
void for_chunks(int64_t lo, int64_t hi, int64_t L, F&& f) {
  for (int64_t i = lo; i < hi; i += L) f(i, std::min(L, hi - i));
}

STP_FAST_MULTIVERSION
void moments_chunk(const float* __restrict__ x, int64_t n, const float* __restrict__ shift, float* __restrict__ s,
                   float* __restrict__ q) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] - shift[j];
    s[j] += v;
    q[j] += v * v;
  }
}

STP_FAST_MULTIVERSION
void affine_chunk(const float* __restrict__ x, float* __restrict__ y, int64_t n, const float* __restrict__ a,
                  const float* __restrict__ b, bool relu) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j] * a[j] + b[j];
    y[j] = relu ? (v < 0.f ? 0.f : v) : v;
  }
}

STP_FAST_MULTIVERSION
void grad_moments_chunk(const float* __restrict__ g, const float* __restrict__ x, int64_t n,
                        const float* __restrict__ mean, float* __restrict__ s, float* __restrict__ q) {
  for (int64_t j = 0; j < n; ++j) {
    const float dy = g[j];
    s[j] += dy;
    q[j] += dy * (x[j] - mean[j]);
  }
}

STP_FAST_MULTIVERSION
void grad_x_chunk(const float* __restrict__ g, const float* __restrict__ x, float* __restrict__ dx, int64_t n,
                  const float* __restrict__ mean, const float* __restrict__ mean_dy, const float* __restrict__ k,
                  const float* __restrict__ scale) {
  for (int64_t j = 0; j < n; ++j) dx[j] = (g[j] - mean_dy[j] - (x[j] - mean[j]) * k[j]) * scale[j];
}

struct Layout {
  int64_t C, N, L, chunks;  // channels, elements, chunk length, chunks (the last may be partial)
};

Layout layout_of(const at::Tensor& x) {
  const int64_t C = x.size(1), N = x.numel();
  const int64_t period = C / std::gcd(C, kVec) * kVec;      // lcm(C, 16)
  const int64_t L = period * ((kMinChunk + period - 1) / period);  // long enough to amortise a call
  return {C, N, L, (N + L - 1) / L};
}

// Per-position sums of two quantities over all chunks, folded into channels: (sum0[C], sum1[C]).
// chunk(i, n, s, q) adds chunk i's terms to float32 accumulators, which are added to float64 totals
// every kBlock chunks (float32 halves the work of the sums; kBlock bounds their rounding error).
template <typename Chunk>
std::pair<std::vector<double>, std::vector<double>> channel_sums(const Layout& t, Chunk&& chunk) {
  const int threads = at::get_num_threads();
  std::vector<double> acc(static_cast<size_t>(2 * t.L * threads), 0.0);
  at::parallel_for(0, t.chunks, std::max<int64_t>(1, kGrain / t.L), [&](int64_t begin, int64_t end) {
    double* total = acc.data() + 2 * t.L * at::get_thread_num();
    std::vector<float> part(2 * t.L, 0.f);
    for (int64_t c0 = begin; c0 < end; c0 += kBlock) {
      const int64_t c1 = std::min(end, c0 + kBlock);
      for_chunks(c0 * t.L, std::min(c1 * t.L, t.N), t.L,
                 [&](int64_t i, int64_t n) { chunk(i, n, part.data(), part.data() + t.L); });
      for (int64_t j = 0; j < 2 * t.L; ++j) {
        total[j] += part[j];
        part[j] = 0.f;
      }
    }
  });
  std::vector<double> s0(t.C, 0.0), s1(t.C, 0.0);
  for (int th = 0; th < threads; ++th) {
    const double* s = acc.data() + 2 * t.L * th;
    for (int64_t j = 0; j < t.L; ++j) {
      s0[j % t.C] += s[j];
      s1[j % t.C] += s[t.L + j];
    }
  }
  return {s0, s1};
}

// A per-channel vector repeated to the chunk length L.
template <typename T, typename V>
std::vector<T> tiled(const V& per_channel, const Layout& t) {
  std::vector<T> out(t.L);
  for (int64_t j = 0; j < t.L; ++j) out[j] = static_cast<T>(per_channel[j % t.C]);
  return out;
}

// Elementwise pass over all chunks in parallel.
template <typename Chunk>
void each_chunk(const Layout& t, Chunk&& chunk) {
  at::parallel_for(0, t.chunks, std::max<int64_t>(1, kGrain / t.L), [&](int64_t begin, int64_t end) {
    for_chunks(begin * t.L, std::min(end * t.L, t.N), t.L, chunk);
  });
}

std::vector<float> values(const at::Tensor& p, int64_t C, float fallback) {
  std::vector<float> out(C, fallback);
  if (p.defined()) {
    const at::Tensor c = p.to(at::kFloat).contiguous();
    std::copy(c.data_ptr<float>(), c.data_ptr<float>() + C, out.begin());
  }
  return out;
}

}  // namespace

bool bn_rows_applicable(const at::Tensor& x) {
  if (x.scalar_type() != at::kFloat || x.numel() == 0 || x.size(1) == 0) return false;
  if (x.dim() == 2) return x.is_contiguous();
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor bn_rows_output(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& mean, const at::Tensor& invstd, bool relu) {
  const Layout t = layout_of(x);
  const std::vector<float> w = values(weight, t.C, 1.f), b = values(bias, t.C, 0.f);
  const std::vector<float> m = values(mean, t.C, 0.f), is = values(invstd, t.C, 1.f);
  std::vector<float> alpha(t.C), beta(t.C);
  for (int64_t c = 0; c < t.C; ++c) {
    alpha[c] = is[c] * w[c];
    beta[c] = b[c] - m[c] * alpha[c];
  }
  const std::vector<float> a_t = tiled<float>(alpha, t), b_t = tiled<float>(beta, t);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  each_chunk(t, [&](int64_t i, int64_t n) { affine_chunk(xp + i, yp + i, n, a_t.data(), b_t.data(), relu); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_rows_forward(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps, bool relu) {
  const Layout t = layout_of(x);
  const float* xp = x.data_ptr<float>();
  // shifted data (x - the first row) keeps float32 sums of squares free of cancellation
  std::vector<float> first(xp, xp + t.C);
  const std::vector<float> shift = tiled<float>(first, t);
  auto [sum, sumsq] = channel_sums(
      t, [&](int64_t i, int64_t n, float* s, float* q) { moments_chunk(xp + i, n, shift.data(), s, q); });
  const double rows = static_cast<double>(t.N / t.C);
  at::Tensor mean = at::empty({t.C}, x.options()), invstd = at::empty({t.C}, x.options());
  for (int64_t c = 0; c < t.C; ++c) {
    const double d = sum[c] / rows, var = std::max(0.0, sumsq[c] / rows - d * d);
    mean.data_ptr<float>()[c] = static_cast<float>(first[c] + d);
    invstd.data_ptr<float>()[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
  return {bn_rows_output(x, weight, bias, mean, invstd, relu), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_rows_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& weight, const at::Tensor& mean,
                                                                const at::Tensor& invstd, std::array<bool, 3> mask) {
  const Layout t = layout_of(x);
  const at::Tensor g = grad.strides() == x.strides() ? grad : at::empty_like(x).copy_(grad);
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>();
  const std::vector<float> m = values(mean, t.C, 0.f), is = values(invstd, t.C, 1.f), w = values(weight, t.C, 1.f);
  const std::vector<float> mf_t = tiled<float>(m, t);
  auto [sum_dy, sum_dy_xmu] = channel_sums(
      t, [&](int64_t i, int64_t n, float* s, float* q) { grad_moments_chunk(gp + i, xp + i, n, mf_t.data(), s, q); });
  at::Tensor gx, gw, gb;
  if (mask[1]) {
    gw = at::empty({t.C}, x.options());
    for (int64_t c = 0; c < t.C; ++c) gw.data_ptr<float>()[c] = static_cast<float>(sum_dy_xmu[c] * is[c]);
  }
  if (mask[2]) {
    gb = at::empty({t.C}, x.options());
    for (int64_t c = 0; c < t.C; ++c) gb.data_ptr<float>()[c] = static_cast<float>(sum_dy[c]);
  }
  if (mask[0]) {
    const double rows = static_cast<double>(t.N / t.C);
    std::vector<float> mean_dy(t.C), k(t.C), scale(t.C);
    for (int64_t c = 0; c < t.C; ++c) {
      mean_dy[c] = static_cast<float>(sum_dy[c] / rows);
      k[c] = static_cast<float>(sum_dy_xmu[c] / rows * is[c] * is[c]);
      scale[c] = is[c] * w[c];
    }
    const std::vector<float> md_t = tiled<float>(mean_dy, t), k_t = tiled<float>(k, t), sc_t = tiled<float>(scale, t);
    gx = at::empty_like(x);
    float* dp = gx.data_ptr<float>();
    each_chunk(t, [&](int64_t i, int64_t n) {
      grad_x_chunk(gp + i, xp + i, dp + i, n, mf_t.data(), md_t.data(), k_t.data(), sc_t.data());
    });
  }
  return {gx, gw, gb};
}

}  // namespace stp_fast
