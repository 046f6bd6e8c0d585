// masked_conv2d on CUDA: implicit-GEMM convolution with in-kernel channel gathers, plus depthwise.
//
//   y = conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding, dilation)
//
// Implicit GEMM (groups == 1).  One shared-memory tiled SIMT GEMM kernel (the scheme and tile of
// masked_linear_cuda.cu, shared through common/cuda_common.cuh: 64 x 64 output tile per block,
// 16-deep reduction steps, 256 threads with a 4 x 4 register block each, fp32 accumulation, double
// for float64) is instantiated for three problems, each a "policy" that says how to gather an
// operand element and where a result goes:
//   forward : rows (b, oh, ow) = B*OH*OW, cols j < n,   reduction (c, ky, kx) over k*kh*kw
//             A = x at (oh*sh - ph + ky*dh, ow*sw - pw + kx*dw) or 0 in the padding;
//             B = weight[out(j), in(c), ky, kx]; epilogue + bias[out(j)], store y[b, j, oh, ow].
//   grad_x  : rows (b, ih, iw) = B*H*W,   cols c < k,   reduction (j, ky, kx) over n*kh*kw
//             A = grad_out[b, j, oh, ow] where ih + ph - ky*dh = oh*sh exactly (divisibility and
//             range checked per element, 0 otherwise) -- the transposed convolution;
//             B = weight[out(j), in(c), ky, kx]; store grad_x[b, c, ih, iw].
//   grad_w  : rows j < n, cols (c, ky, kx) = k*kh*kw,   reduction (b, oh, ow) over B*OH*OW
//             A = grad_out^T, B = the im2col gather of x; store grad_weight[out(j), in(c), ky, kx]
//             (the caller zero-fills the rest).  Split-K over blockIdx.z into a workspace, then a
//             second kernel sums the slices in a fixed order: deterministic, no atomics.
// The reduction index of each 16-deep step is decoded once per step by 16 threads into shared
// memory (double-buffered, so a step costs two barriers); each thread decodes its staging rows and
// columns once per block.  The decode order follows the memory layout (channel fastest for a
// channels-last operand, kernel tap fastest for NCHW), and each operand tile is staged along its
// unit-stride dimension, so both layouts read coalesced rows of x / grad_out.  Everything is
// strided (NCHW, channels-last and arbitrary views) and all offsets are 64-bit.
//
// Depthwise (weight [C, 1, kh, kw], channel c of x uses weight row ch(c)): direct kernels.
// forward / grad_x: one thread per output element in the output's memory order (taps from global,
// L1-cached).  grad_weight: one block per (channel group, tap) reduces over B*OH*OW with a
// fixed-order shared-memory tree (32 channels x 8 lanes for channels-last, 1 x 256 for NCHW), with
// the same deterministic split/workspace scheme as the GEMM.
//
// Limits: grid.y <= 65535 tiles of 64 columns, split_k <= 65535.  No tensor cores: this is the
// portable baseline (cuDNN on compacted weights is faster for large dense problems).  grad_x does
// not skip the (s-1)/s of the reduction that stride s makes zero.
// Deliberately free of ATen/torch headers so that it compiles with plain nvcc (KERNELS.md §6(iv));
// tested on CPU by the emulator in tests/cuda_emu.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_common.cuh"
#include "masked_conv2d/masked_conv2d_cuda.h"

namespace {

using namespace stp_fast::cuda;        // Num, index_or_identity, launch helpers (common/cuda_common.cuh)
using namespace stp_fast::cuda::simt;  // the GEMM tile (BM, BN, BK, TM, TN, TR, TC, NT, ...)

constexpr int DW_NT = kMaskedConv2dDwThreads;

static_assert(TR == TC, "the micro-tile mapping swaps thread rows and cols at run time");
static_assert((DW_NT & (DW_NT - 1)) == 0 && DW_NT >= 32, "tree reduction needs a power of two >= 32");

// 0 <= v < n for a signed v, with one comparison.
__device__ __forceinline__ bool in_range(int64_t v, int64_t n) {
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(n);
}

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM policies.  Each describes one GEMM  C[i, j] = sum_p A[i, p] * B[p, j]:
//   rows() / cols() / depth()      I, J, P
//   operands_ok()                  the pointers the reduction reads are set (when P > 0)
//   Row row(i), Col col(j)         per staging row / column state, decoded once per block
//   KInfo kinfo(p, p_end)          per reduction index state, decoded once per step (shared)
//   load_a(Row, KInfo), load_b(KInfo, Col)  the gathered operands (0 outside / in the padding)
//   store(i, j, v)                 epilogue for one result element
//   a_rows_fast() / b_cols_fast()  stage A along rows (else along p), B along cols (else along p)
//   out_rows_fast()                consecutive threads own consecutive result rows (else cols)
// A KInfo lives in shared memory, so it must stay a plain aggregate (no constructors).

template <typename T>
struct ConvFwd {
  using Acc = typename Num<T>::acc;
  struct Row {
    int64_t base, ih0, iw0;  // x offset of the batch; top-left input position of the window
    bool ok;
  };
  struct Col {
    int64_t w_off;  // out(j) * w_s0
    bool ok;
  };
  struct KInfo {
    int64_t x_off, w_off, dy, dx;  // c * x_s1; weight offset of (in(c), ky, kx); ky*dh; kx*dw
    bool ok;
  };

  const MaskedConv2dArgs& a;
  int64_t taps;
  bool c_fast;  // reduction order: channel fastest (channels-last x) or tap fastest (NCHW)

  __host__ __device__ explicit ConvFwd(const MaskedConv2dArgs& args)
      : a(args), taps(args.kh * args.kw), c_fast(args.x_s[1] == 1) {}

  __host__ __device__ int64_t rows() const { return a.B * a.OH * a.OW; }
  __host__ __device__ int64_t cols() const { return a.n; }
  __host__ __device__ int64_t depth() const { return a.k * taps; }
  __host__ __device__ bool operands_ok() const { return depth() == 0 || (a.x != nullptr && a.w != nullptr); }
  __device__ bool a_rows_fast() const { return a.x_s[1] != 1; }
  __device__ bool b_cols_fast() const { return (c_fast ? a.w_s[1] : a.w_s[3]) != 1; }
  __device__ bool out_rows_fast() const { return a.out_s[1] != 1; }

  __device__ Row row(int64_t i) const {
    if (i >= rows()) return Row{0, 0, 0, false};
    const int64_t ow = i % a.OW, t = i / a.OW;
    const int64_t oh = t % a.OH, b = t / a.OH;
    return Row{b * a.x_s[0], oh * a.sh - a.ph, ow * a.sw - a.pw, true};
  }
  __device__ Col col(int64_t j) const {
    if (j >= a.n) return Col{0, false};
    return Col{index_or_identity(a.out_index, j) * a.w_s[0], true};
  }
  __device__ KInfo kinfo(int64_t p, int64_t p_end) const {
    if (p >= p_end) return KInfo{0, 0, 0, 0, false};
    const int64_t c = c_fast ? p % a.k : p / taps;
    const int64_t tap = c_fast ? p / a.k : p % taps;
    const int64_t ky = tap / a.kw, kx = tap % a.kw;
    return KInfo{c * a.x_s[1], index_or_identity(a.in_index, c) * a.w_s[1] + ky * a.w_s[2] + kx * a.w_s[3],
                 ky * a.dh, kx * a.dw, true};
  }
  __device__ Acc load_a(const Row& r, const KInfo& q) const {
    if (!(r.ok && q.ok)) return Acc(0);
    const int64_t ih = r.ih0 + q.dy, iw = r.iw0 + q.dx;
    if (!in_range(ih, a.H) || !in_range(iw, a.W)) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.x)[r.base + q.x_off + ih * a.x_s[2] + iw * a.x_s[3]]);
  }
  __device__ Acc load_b(const KInfo& q, const Col& c) const {
    if (!(q.ok && c.ok)) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.w)[c.w_off + q.w_off]);
  }
  __device__ void store(int64_t i, int64_t j, Acc v) const {
    const int64_t ow = i % a.OW, t = i / a.OW;
    const int64_t oh = t % a.OH, b = t / a.OH;
    if (a.bias != nullptr) {
      v += Num<T>::to_acc(static_cast<const T*>(a.bias)[index_or_identity(a.out_index, j) * a.bias_s]);
    }
    static_cast<T*>(a.out)[b * a.out_s[0] + j * a.out_s[1] + oh * a.out_s[2] + ow * a.out_s[3]] =
        Num<T>::from_acc(v);
  }
};

template <typename T>
struct ConvGradX {
  using Acc = typename Num<T>::acc;
  struct Row {
    int64_t base, th, tw;  // grad_out offset of the batch; ih + ph, iw + pw
    bool ok;
  };
  struct Col {
    int64_t w_off;  // in(c) * w_s1
    bool ok;
  };
  struct KInfo {
    int64_t g_off, w_off, dy, dx;  // j * g_s1; weight offset of (out(j), ky, kx); ky*dh; kx*dw
    bool ok;
  };

  const MaskedConv2dArgs& a;
  int64_t taps;
  bool j_fast;  // reduction order: output channel fastest (channels-last grad_out) or tap fastest

  __host__ __device__ explicit ConvGradX(const MaskedConv2dArgs& args)
      : a(args), taps(args.kh * args.kw), j_fast(args.g_s[1] == 1) {}

  __host__ __device__ int64_t rows() const { return a.B * a.H * a.W; }
  __host__ __device__ int64_t cols() const { return a.k; }
  __host__ __device__ int64_t depth() const { return a.n * taps; }
  __host__ __device__ bool operands_ok() const { return depth() == 0 || (a.g != nullptr && a.w != nullptr); }
  __device__ bool a_rows_fast() const { return a.g_s[1] != 1; }
  __device__ bool b_cols_fast() const { return (j_fast ? a.w_s[0] : a.w_s[3]) != 1; }
  __device__ bool out_rows_fast() const { return a.out_s[1] != 1; }

  __device__ Row row(int64_t i) const {
    if (i >= rows()) return Row{0, 0, 0, false};
    const int64_t iw = i % a.W, t = i / a.W;
    const int64_t ih = t % a.H, b = t / a.H;
    return Row{b * a.g_s[0], ih + a.ph, iw + a.pw, true};
  }
  __device__ Col col(int64_t c) const {
    if (c >= a.k) return Col{0, false};
    return Col{index_or_identity(a.in_index, c) * a.w_s[1], true};
  }
  __device__ KInfo kinfo(int64_t p, int64_t p_end) const {
    if (p >= p_end) return KInfo{0, 0, 0, 0, false};
    const int64_t j = j_fast ? p % a.n : p / taps;
    const int64_t tap = j_fast ? p / a.n : p % taps;
    const int64_t ky = tap / a.kw, kx = tap % a.kw;
    return KInfo{j * a.g_s[1], index_or_identity(a.out_index, j) * a.w_s[0] + ky * a.w_s[2] + kx * a.w_s[3],
                 ky * a.dh, kx * a.dw, true};
  }
  // grad_out[b, j, oh, ow] with oh*sh = ih + ph - ky*dh (same for w), or 0 when no output pixel
  // of the forward read x[b, c, ih, iw] through tap (ky, kx).
  __device__ Acc load_a(const Row& r, const KInfo& q) const {
    if (!(r.ok && q.ok)) return Acc(0);
    int64_t oh = r.th - q.dy, ow = r.tw - q.dx;
    if (oh < 0 || ow < 0) return Acc(0);
    if (a.sh != 1) {
      if (oh % a.sh != 0) return Acc(0);
      oh /= a.sh;
    }
    if (a.sw != 1) {
      if (ow % a.sw != 0) return Acc(0);
      ow /= a.sw;
    }
    if (oh >= a.OH || ow >= a.OW) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.g)[r.base + q.g_off + oh * a.g_s[2] + ow * a.g_s[3]]);
  }
  __device__ Acc load_b(const KInfo& q, const Col& c) const {
    if (!(q.ok && c.ok)) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.w)[q.w_off + c.w_off]);
  }
  __device__ void store(int64_t i, int64_t c, Acc v) const {
    const int64_t iw = i % a.W, t = i / a.W;
    const int64_t ih = t % a.H, b = t / a.H;
    static_cast<T*>(a.out)[b * a.out_s[0] + c * a.out_s[1] + ih * a.out_s[2] + iw * a.out_s[3]] =
        Num<T>::from_acc(v);
  }
};

template <typename T>
struct ConvGradW {
  using Acc = typename Num<T>::acc;
  struct Row {
    int64_t g_off;  // j * g_s1
    bool ok;
  };
  struct Col {
    int64_t x_off, dy, dx;  // c * x_s1; ky*dh; kx*dw
    bool ok;
  };
  struct KInfo {
    int64_t g_off, x_base, ih0, iw0;  // grad_out offset of (b, oh, ow); b * x_s0; window corner
    bool ok;
  };

  const MaskedConv2dArgs& a;
  int64_t taps;
  bool c_fast;  // column order: channel fastest (channels-last x) or tap fastest (NCHW)

  __host__ __device__ explicit ConvGradW(const MaskedConv2dArgs& args)
      : a(args), taps(args.kh * args.kw), c_fast(args.x_s[1] == 1) {}

  __host__ __device__ int64_t rows() const { return a.n; }
  __host__ __device__ int64_t cols() const { return a.k * taps; }
  __host__ __device__ int64_t depth() const { return a.B * a.OH * a.OW; }
  __host__ __device__ bool operands_ok() const { return depth() == 0 || (a.g != nullptr && a.x != nullptr); }
  __device__ bool a_rows_fast() const { return a.g_s[3] != 1; }
  __device__ bool b_cols_fast() const { return c_fast; }
  __device__ bool out_rows_fast() const { return a.out_s[0] == 1; }

  __device__ void decode_col(int64_t q, int64_t& c, int64_t& ky, int64_t& kx) const {
    c = c_fast ? q % a.k : q / taps;
    const int64_t tap = c_fast ? q / a.k : q % taps;
    ky = tap / a.kw;
    kx = tap % a.kw;
  }
  __device__ Row row(int64_t j) const {
    if (j >= a.n) return Row{0, false};
    return Row{j * a.g_s[1], true};
  }
  __device__ Col col(int64_t q) const {
    if (q >= cols()) return Col{0, 0, 0, false};
    int64_t c, ky, kx;
    decode_col(q, c, ky, kx);
    return Col{c * a.x_s[1], ky * a.dh, kx * a.dw, true};
  }
  __device__ KInfo kinfo(int64_t p, int64_t p_end) const {
    if (p >= p_end) return KInfo{0, 0, 0, 0, false};
    const int64_t ow = p % a.OW, t = p / a.OW;
    const int64_t oh = t % a.OH, b = t / a.OH;
    return KInfo{b * a.g_s[0] + oh * a.g_s[2] + ow * a.g_s[3], b * a.x_s[0], oh * a.sh - a.ph, ow * a.sw - a.pw,
                 true};
  }
  __device__ Acc load_a(const Row& r, const KInfo& q) const {
    if (!(r.ok && q.ok)) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.g)[r.g_off + q.g_off]);
  }
  __device__ Acc load_b(const KInfo& q, const Col& c) const {
    if (!(q.ok && c.ok)) return Acc(0);
    const int64_t ih = q.ih0 + c.dy, iw = q.iw0 + c.dx;
    if (!in_range(ih, a.H) || !in_range(iw, a.W)) return Acc(0);
    return Num<T>::to_acc(static_cast<const T*>(a.x)[q.x_base + c.x_off + ih * a.x_s[2] + iw * a.x_s[3]]);
  }
  __device__ void store(int64_t j, int64_t q, Acc v) const {
    int64_t c, ky, kx;
    decode_col(q, c, ky, kx);
    const int64_t off = index_or_identity(a.out_index, j) * a.out_s[0] +
                        index_or_identity(a.in_index, c) * a.out_s[1] + ky * a.out_s[2] + kx * a.out_s[3];
    static_cast<T*>(a.out)[off] = Num<T>::from_acc(v);
  }
};

// One BM x BN result tile over the reduction slice [blockIdx.z * p_chunk, +p_chunk) of policy Op.
// grid = (ceil(I / BM), ceil(J / BN), split), block = NT.  With split > 1 the raw partial tile goes
// to the workspace [split, I, J]; split_k_reduce_kernel finishes.
template <class Op>
__global__ void __launch_bounds__(NT) implicit_gemm_kernel(const MaskedConv2dArgs a, int64_t p_chunk, int split) {
  using Acc = typename Op::Acc;
  using KInfo = typename Op::KInfo;
  __shared__ Acc As[BK][BM + PAD];  // As[p][i]
  __shared__ Acc Bs[BK][BN + PAD];  // Bs[p][j]
  __shared__ KInfo ks[2][BK];       // decoded reduction indices of the current and the next step

  const Op op(a);
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t I = op.rows(), J = op.cols(), P = op.depth();
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * p_chunk;
  const int64_t p_end = p_begin + p_chunk < P ? p_begin + p_chunk : P;

  // Staging assignment of this thread, fixed for the whole reduction.
  const bool a_rows_fast = op.a_rows_fast();
  int a_ii[A_LOADS], a_pp[A_LOADS];
  typename Op::Row a_row[A_LOADS];
#pragma unroll
  for (int r = 0; r < A_LOADS; ++r) {
    a_ii[r] = a_rows_fast ? tid % BM : tid / BK + r * (NT / BK);
    a_pp[r] = a_rows_fast ? tid / BM + r * (NT / BM) : tid % BK;
    a_row[r] = op.row(i0 + a_ii[r]);
  }
  const bool b_cols_fast = op.b_cols_fast();
  int b_jj[B_LOADS], b_pp[B_LOADS];
  typename Op::Col b_col[B_LOADS];
#pragma unroll
  for (int r = 0; r < B_LOADS; ++r) {
    b_jj[r] = b_cols_fast ? tid % BN : tid / BK + r * (NT / BK);
    b_pp[r] = b_cols_fast ? tid / BN + r * (NT / BN) : tid % BK;
    b_col[r] = op.col(j0 + b_jj[r]);
  }
  // Register block: rows tr + TR*m, cols tc + TC*n; consecutive threads walk along the result's
  // unit-stride dimension so that the epilogue stores are coalesced.
  const bool out_rows_fast = op.out_rows_fast();
  const int tr = out_rows_fast ? tid % TR : tid / TC;
  const int tc = out_rows_fast ? tid / TR : tid % TC;

  Acc acc[TM][TN];
  zero_tile(acc);

  if (tid < BK) ks[0][tid] = op.kinfo(p_begin + tid, p_end);
  __syncthreads();
  int buf = 0;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
#pragma unroll
    for (int r = 0; r < A_LOADS; ++r) As[a_pp[r]][a_ii[r]] = op.load_a(a_row[r], ks[buf][a_pp[r]]);
#pragma unroll
    for (int r = 0; r < B_LOADS; ++r) Bs[b_pp[r]][b_jj[r]] = op.load_b(ks[buf][b_pp[r]], b_col[r]);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc ra[TM], rb[TN];
#pragma unroll
      for (int m = 0; m < TM; ++m) ra[m] = As[kk][tr + m * TR];
#pragma unroll
      for (int n = 0; n < TN; ++n) rb[n] = Bs[kk][tc + n * TC];
#pragma unroll
      for (int m = 0; m < TM; ++m) {
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] += ra[m] * rb[n];
      }
    }
    // The other buffer was last read while staging the previous step, before this step's first
    // barrier, so it can be refilled now; the barrier below publishes it.
    if (tid < BK) ks[buf ^ 1][tid] = op.kinfo(p0 + BK + tid, p_end);
    buf ^= 1;
    __syncthreads();
  }

  Acc* ws = split > 1 ? static_cast<Acc*>(a.workspace) + static_cast<int64_t>(blockIdx.z) * I * J : nullptr;
  for_each_result(acc, i0 + tr, j0 + tc, I, J, [&](int64_t i, int64_t j, Acc v) {
    if (ws != nullptr) {
      ws[i * J + j] = v;
    } else {
      op.store(i, j, v);
    }
  });
}

// Sums the split partial tiles of every (i, j) in slice order, then runs the policy's epilogue.
template <class Op>
__global__ void __launch_bounds__(NT) split_k_reduce_kernel(const MaskedConv2dArgs a, int split) {
  using Acc = typename Op::Acc;
  const Op op(a);
  const Acc* ws = static_cast<const Acc*>(a.workspace);
  const int64_t J = op.cols();
  const int64_t total = op.rows() * J;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const Acc v = sum_slices(ws, split, total, e);
    op.store(e / J, e % J, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Depthwise kernels.  n == k; channel c reads weight row ch(c) = chan[c] (or c).

__host__ __device__ __forceinline__ const int64_t* depthwise_channels(const MaskedConv2dArgs& a) {
  return a.out_index != nullptr ? a.out_index : a.in_index;
}

// Decodes a flat index over [B, C, Hs, Ws] in memory order: channel fastest when cl.
__device__ __forceinline__ void decode_bchw(int64_t e, int64_t C, int64_t Hs, int64_t Ws, bool cl, int64_t& b,
                                            int64_t& c, int64_t& h, int64_t& w) {
  if (cl) {
    c = e % C;
    e /= C;
    w = e % Ws;
    e /= Ws;
    h = e % Hs;
    b = e / Hs;
  } else {
    w = e % Ws;
    e /= Ws;
    h = e % Hs;
    e /= Hs;
    c = e % C;
    b = e / C;
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) depthwise_fwd_kernel(const MaskedConv2dArgs a, bool cl) {
  using Acc = typename Num<T>::acc;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int64_t* chan = depthwise_channels(a);
  const int64_t total = a.B * a.k * a.OH * a.OW;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    int64_t b, c, oh, ow;
    decode_bchw(e, a.k, a.OH, a.OW, cl, b, c, oh, ow);
    const int64_t ch = index_or_identity(chan, c);
    const T* xp = x + b * a.x_s[0] + c * a.x_s[1];
    const T* wp = w + ch * a.w_s[0];
    Acc acc = Acc(0);
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t ih = oh * a.sh - a.ph + ky * a.dh;
      if (!in_range(ih, a.H)) continue;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t iw = ow * a.sw - a.pw + kx * a.dw;
        if (!in_range(iw, a.W)) continue;
        acc += Num<T>::to_acc(xp[ih * a.x_s[2] + iw * a.x_s[3]]) * Num<T>::to_acc(wp[ky * a.w_s[2] + kx * a.w_s[3]]);
      }
    }
    if (a.bias != nullptr) acc += Num<T>::to_acc(static_cast<const T*>(a.bias)[ch * a.bias_s]);
    static_cast<T*>(a.out)[b * a.out_s[0] + c * a.out_s[1] + oh * a.out_s[2] + ow * a.out_s[3]] =
        Num<T>::from_acc(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) depthwise_grad_x_kernel(const MaskedConv2dArgs a, bool cl) {
  using Acc = typename Num<T>::acc;
  const T* g = static_cast<const T*>(a.g);
  const T* w = static_cast<const T*>(a.w);
  const int64_t* chan = depthwise_channels(a);
  const int64_t total = a.B * a.k * a.H * a.W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    int64_t b, c, ih, iw;
    decode_bchw(e, a.k, a.H, a.W, cl, b, c, ih, iw);
    const T* gp = g + b * a.g_s[0] + c * a.g_s[1];
    const T* wp = w + index_or_identity(chan, c) * a.w_s[0];
    Acc acc = Acc(0);
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      int64_t oh = ih + a.ph - ky * a.dh;
      if (oh < 0 || oh % a.sh != 0) continue;
      oh /= a.sh;
      if (oh >= a.OH) continue;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        int64_t ow = iw + a.pw - kx * a.dw;
        if (ow < 0 || ow % a.sw != 0) continue;
        ow /= a.sw;
        if (ow >= a.OW) continue;
        acc += Num<T>::to_acc(gp[oh * a.g_s[2] + ow * a.g_s[3]]) * Num<T>::to_acc(wp[ky * a.w_s[2] + kx * a.w_s[3]]);
      }
    }
    static_cast<T*>(a.out)[b * a.out_s[0] + c * a.out_s[1] + ih * a.out_s[2] + iw * a.out_s[3]] =
        Num<T>::from_acc(acc);
  }
}

// grad_weight[ch(c), 0, ky, kx] = sum over (b, oh, ow) of grad_out[b, c, oh, ow] * x[b, c, ih, iw].
// Block = cw channels x (DW_NT / cw) lanes over the reduction slice blockIdx.y; grid.x = channel
// groups * taps.  The lanes of a channel are combined by a fixed shared-memory tree.
template <typename T>
__global__ void __launch_bounds__(DW_NT) depthwise_grad_w_kernel(const MaskedConv2dArgs a, int cw, int64_t p_chunk,
                                                                 int split) {
  using Acc = typename Num<T>::acc;
  __shared__ Acc red[DW_NT];
  const int tid = static_cast<int>(threadIdx.x);
  const int lanes = DW_NT / cw;
  const int lane = tid / cw;
  const int64_t taps = a.kh * a.kw;
  const int64_t tap = static_cast<int64_t>(blockIdx.x) % taps;
  const int64_t c = static_cast<int64_t>(blockIdx.x) / taps * cw + tid % cw;
  const int64_t ky = tap / a.kw, kx = tap % a.kw;
  const int64_t P = a.B * a.OH * a.OW;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * p_chunk;
  const int64_t p_end = p_begin + p_chunk < P ? p_begin + p_chunk : P;

  Acc acc = Acc(0);
  if (c < a.k) {
    const T* gp = static_cast<const T*>(a.g) + c * a.g_s[1];
    const T* xp = static_cast<const T*>(a.x) + c * a.x_s[1];
    for (int64_t p = p_begin + lane; p < p_end; p += lanes) {
      const int64_t ow = p % a.OW, t = p / a.OW;
      const int64_t oh = t % a.OH, b = t / a.OH;
      const int64_t ih = oh * a.sh - a.ph + ky * a.dh, iw = ow * a.sw - a.pw + kx * a.dw;
      if (!in_range(ih, a.H) || !in_range(iw, a.W)) continue;
      acc += Num<T>::to_acc(gp[b * a.g_s[0] + oh * a.g_s[2] + ow * a.g_s[3]]) *
             Num<T>::to_acc(xp[b * a.x_s[0] + ih * a.x_s[2] + iw * a.x_s[3]]);
    }
  }
  red[tid] = acc;
  __syncthreads();
  for (int s = lanes / 2; s > 0; s /= 2) {
    if (lane < s) red[tid] += red[tid + s * cw];
    __syncthreads();
  }
  if (lane != 0 || c >= a.k) return;
  if (split > 1) {
    static_cast<Acc*>(a.workspace)[static_cast<int64_t>(blockIdx.y) * a.k * taps + c * taps + tap] = red[tid];
  } else {
    const int64_t ch = index_or_identity(depthwise_channels(a), c);
    static_cast<T*>(a.out)[ch * a.out_s[0] + ky * a.out_s[2] + kx * a.out_s[3]] = Num<T>::from_acc(red[tid]);
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) depthwise_grad_w_reduce_kernel(const MaskedConv2dArgs a, int split) {
  using Acc = typename Num<T>::acc;
  const Acc* ws = static_cast<const Acc*>(a.workspace);
  const int64_t taps = a.kh * a.kw;
  const int64_t total = a.k * taps;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const Acc v = sum_slices(ws, split, total, e);
    const int64_t c = e / taps, tap = e % taps;
    const int64_t ch = index_or_identity(depthwise_channels(a), c);
    static_cast<T*>(a.out)[ch * a.out_s[0] + (tap / a.kw) * a.out_s[2] + (tap % a.kw) * a.out_s[3]] =
        Num<T>::from_acc(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

bool valid_geometry(const MaskedConv2dArgs& a) {
  const bool sizes = a.B >= 0 && a.k >= 0 && a.H >= 0 && a.W >= 0 && a.n >= 0 && a.OH >= 0 && a.OW >= 0 &&
                     a.kh >= 1 && a.kw >= 1;
  return sizes && a.sh >= 1 && a.sw >= 1 && a.ph >= 0 && a.pw >= 0 && a.dh >= 1 && a.dw >= 1;
}

template <class Op>
cudaError_t launch_gemm(const MaskedConv2dArgs& a, cudaStream_t stream) {
  const Op op(a);
  const int64_t I = op.rows(), J = op.cols(), P = op.depth();
  if (I == 0 || J == 0) return cudaSuccess;
  if (a.out == nullptr || !op.operands_ok()) return cudaErrorInvalidValue;
  int64_t p_chunk = P;
  const int64_t split = plan_split(P, a.split_k, BK, p_chunk);
  if (split > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  dim3 grid;
  if (!make_grid(stp_fast_cdiv(I, BM), stp_fast_cdiv(J, BN), split, grid)) return cudaErrorInvalidValue;
  const int s = static_cast<int>(split);
  return launch_with_reduce(
      split, [&] { implicit_gemm_kernel<Op><<<grid, NT, 0, stream>>>(a, p_chunk, s); },
      [&] { split_k_reduce_kernel<Op><<<stride_blocks(I * J, NT), NT, 0, stream>>>(a, s); });
}

// The direct depthwise kernels (forward, grad_x): one thread per element of the `total` results,
// reading `in` (x or grad_out) and the weight.
using DepthwiseDirectKernel = void (*)(MaskedConv2dArgs, bool);

cudaError_t launch_depthwise_direct(DepthwiseDirectKernel kernel, const MaskedConv2dArgs& a, int64_t total,
                                    const void* in, cudaStream_t stream) {
  if (a.n != a.k) return cudaErrorInvalidValue;
  if (total == 0) return cudaSuccess;
  if (in == nullptr || a.w == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  const bool cl = a.out_s[1] == 1 && a.k > 1;
  kernel<<<stride_blocks(total, NT), NT, 0, stream>>>(a, cl);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_depthwise_grad_w(const MaskedConv2dArgs& a, cudaStream_t stream) {
  if (a.n != a.k) return cudaErrorInvalidValue;
  const int64_t taps = a.kh * a.kw;
  if (a.k == 0) return cudaSuccess;
  if (a.out == nullptr) return cudaErrorInvalidValue;
  const int64_t P = a.B * a.OH * a.OW;
  if (P > 0 && (a.g == nullptr || a.x == nullptr)) return cudaErrorInvalidValue;
  int64_t p_chunk = P;
  const int64_t split = plan_split(P, a.split_k, DW_NT, p_chunk);
  if (split > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  // Channels-last operands: 32 consecutive channels per block read 32 consecutive elements.
  const int cw = a.x_s[1] == 1 && a.g_s[1] == 1 && a.k > 1 ? 32 : 1;
  dim3 grid;
  if (!make_grid(stp_fast_cdiv(a.k, cw) * taps, split, 1, grid)) return cudaErrorInvalidValue;
  const int s = static_cast<int>(split);
  return launch_with_reduce(
      split, [&] { depthwise_grad_w_kernel<T><<<grid, DW_NT, 0, stream>>>(a, cw, p_chunk, s); },
      [&] { depthwise_grad_w_reduce_kernel<T><<<stride_blocks(a.k * taps, NT), NT, 0, stream>>>(a, s); });
}

// Calls launch(T{}) for the element type T named by dtype_code, after the geometry check.
template <typename F>
int dispatch(const MaskedConv2dArgs& a, int dtype_code, F&& launch) {
  if (!valid_geometry(a)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(dtype_code, launch);
}

}  // namespace

int stp_fast_masked_conv2d_fwd_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) { return launch_gemm<ConvFwd<decltype(t)>>(a, stream); });
}
int stp_fast_masked_conv2d_grad_x_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) { return launch_gemm<ConvGradX<decltype(t)>>(a, stream); });
}
int stp_fast_masked_conv2d_grad_w_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) { return launch_gemm<ConvGradW<decltype(t)>>(a, stream); });
}
int stp_fast_masked_conv2d_depthwise_fwd_launch(const MaskedConv2dArgs& a, int dtype_code, cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) {
    return launch_depthwise_direct(depthwise_fwd_kernel<decltype(t)>, a, a.B * a.k * a.OH * a.OW, a.x, stream);
  });
}
int stp_fast_masked_conv2d_depthwise_grad_x_launch(const MaskedConv2dArgs& a, int dtype_code,
                                                   cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) {
    return launch_depthwise_direct(depthwise_grad_x_kernel<decltype(t)>, a, a.B * a.k * a.H * a.W, a.g, stream);
  });
}
int stp_fast_masked_conv2d_depthwise_grad_w_launch(const MaskedConv2dArgs& a, int dtype_code,
                                                   cudaStream_t stream) {
  return dispatch(a, dtype_code, [&](auto t) { return launch_depthwise_grad_w<decltype(t)>(a, stream); });
}
