"""Triton kernels for ``masked_linear`` (installed as ``stp_fast.kernels.masked_linear``).

Algorithm: one "gathered GEMM" kernel serves the forward pass and both weight-side gradients,

    C[ci(i), cj(j)] = sum_p A[i, p] * B[bp(p), bj(j)]  (+ bias[bj(j)])

where bp/bj gather rows/columns of B through optional index lists and ci/cj scatter the output
through optional index lists (a missing list is the identity, i.e. a prefix).  With the weight
W[N, K] seen through its strides:

* forward  y[m, n]  = sum_k x[m, k] * W[out[n], in[k]]    (A = x,   bp = in,  bj = out)
* grad x   dx[m, k] = sum_n dy[m, n] * W[out[n], in[k]]   (A = dy,  bp = out, bj = in)
* grad W   dW[out[n], in[k]] = sum_m dy[m, n] * x[m, k]   (A = dy^T by strides, B = x, ci = out, cj = in)

so no sliced copy of the weight is ever made, and dW is written straight into its full-shaped,
zero-initialised buffer (indices are unique, so no atomics are needed).

Tiling: a grid over (BLOCK_I x BLOCK_J) output tiles in "grouped" order (GROUP_I rows of tiles
share B tiles in L2, as in the Triton matmul tutorial), a K loop of BLOCK_P, fp32 accumulation
(tf32 for fp32 inputs exactly when PyTorch lets cuBLAS use it, ``_common.input_precision``).  The
weight gradient has few (n, k) tiles and a long reduction over the M rows, so it is split-K on a GPU
(second grid axis, ``wgrad_splits``): fp32 partial tiles in a workspace, summed in a fixed order.
Tile sizes come from a shape heuristic, not autotuning: autotune with several configs fails under
the interpreter, and the widths change every step.

Limits: float32/float16/bfloat16 (no float64); under ``TRITON_INTERPRET=1`` bf16 operands are
upcast to fp32 in-kernel because the interpreter's bf16 ``tl.dot`` is wrong (triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from stp_fast.kernels._common import block, input_precision, interpreted, num_sms


@triton.jit
def _gathered_gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    bp_idx_ptr, bj_idx_ptr, ci_idx_ptr, cj_idx_ptr,
    I, J, P,  # noqa: E741
    stride_ai, stride_ap, stride_bp, stride_bj, stride_ci, stride_cj, stride_cz,
    HAS_BIAS: tl.constexpr, HAS_BP: tl.constexpr, HAS_BJ: tl.constexpr,
    HAS_CI: tl.constexpr, HAS_CJ: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_I: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_i = tl.cdiv(I, BLOCK_I)
    num_j = tl.cdiv(J, BLOCK_J)
    tiles_per_group = GROUP_I * num_j
    group = pid // tiles_per_group
    first_i = group * GROUP_I
    group_rows = min(num_i - first_i, GROUP_I)
    pid_i = first_i + (pid % tiles_per_group) % group_rows
    pid_j = (pid % tiles_per_group) // group_rows

    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = ri < I
    mask_j = rj < J
    if HAS_BJ:
        bj = tl.load(bj_idx_ptr + rj, mask=mask_j, other=0)
    else:
        bj = rj.to(tl.int64)
    a_rows = a_ptr + ri.to(tl.int64)[:, None] * stride_ai
    b_cols = b_ptr + bj[None, :] * stride_bj

    # Split-K (grid axis 1): program z reduces its chunk of P into its own slice z of C (an fp32
    # workspace summed by the launcher in a fixed order); one split covers all of P.
    z = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(P, BLOCK_P), tl.num_programs(1)) * BLOCK_P
    p_lo = z * chunk
    p_hi = tl.minimum(P, p_lo + chunk)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        mask_p = rp < p_hi
        if HAS_BP:
            bp = tl.load(bp_idx_ptr + rp, mask=mask_p, other=0)
        else:
            bp = rp.to(tl.int64)
        a = tl.load(a_rows + rp.to(tl.int64)[None, :] * stride_ap, mask=mask_i[:, None] & mask_p[None, :], other=0.0)
        b = tl.load(b_cols + bp[:, None] * stride_bp, mask=mask_p[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + bj, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    if HAS_CI:
        ci = tl.load(ci_idx_ptr + ri, mask=mask_i, other=0)
    else:
        ci = ri.to(tl.int64)
    if HAS_CJ:
        cj = tl.load(cj_idx_ptr + rj, mask=mask_j, other=0)
    else:
        cj = rj.to(tl.int64)
    c_ptrs = c_ptr + z.to(tl.int64) * stride_cz + ci[:, None] * stride_ci + cj[None, :] * stride_cj
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


_interpreted = interpreted
_block = block


def gathered_gemm(
    a: Tensor,
    a_strides: tuple[int, int],
    b: Tensor,
    b_strides: tuple[int, int],
    c: Tensor,
    c_strides: tuple[int, int],
    sizes: tuple[int, int, int],
    *,
    bias: Tensor | None = None,
    bp: Tensor | None = None,
    bj: Tensor | None = None,
    ci: Tensor | None = None,
    cj: Tensor | None = None,
    split: int = 1,
    stride_cz: int = 0,
) -> None:
    """Launch ``C[ci(i), cj(j)] = sum_p A[i, p] * B[bp(p), bj(j)] (+ bias[bj(j)])`` on (I, J, P) = sizes.

    Strides are in elements; index tensors are int64 and contiguous.  Writes into ``c`` in place.
    ``split`` > 1 cuts P into that many chunks; chunk z is written to ``c + z * stride_cz`` (no bias).
    """
    I, J, P = sizes  # noqa: E741
    if I == 0 or J == 0:
        return
    if split > 1 and bias is not None:
        raise ValueError("gathered_gemm: split-K partial sums take no bias")
    block_i, block_j, block_p, num_warps = gemm_tiles(I, J, P, a.element_size())
    dummy = c
    grid = (triton.cdiv(I, block_i) * triton.cdiv(J, block_j), split)
    _gathered_gemm_kernel[grid](
        a, b, c, bias if bias is not None else dummy,
        bp if bp is not None else dummy, bj if bj is not None else dummy,
        ci if ci is not None else dummy, cj if cj is not None else dummy,
        I, J, P,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], c_strides[0], c_strides[1], stride_cz,
        HAS_BIAS=bias is not None, HAS_BP=bp is not None, HAS_BJ=bj is not None,
        HAS_CI=ci is not None, HAS_CJ=cj is not None,
        UPCAST=_interpreted() and a.dtype == torch.bfloat16,
        INPUT_PRECISION=input_precision(a.dtype, a.device, "matmul"),
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_P=block_p, GROUP_I=8,
        num_warps=num_warps,
    )  # fmt: skip


def gemm_tiles(i: int, j: int, p: int, elsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, BLOCK_P, num_warps) of the gathered GEMM."""
    if _interpreted():  # the interpreter costs ~ms per program and K step whatever the tile size: big tiles
        return _block(i, 16, 64), _block(j, 16, 64), _block(p, 16, 64), 4
    big = elsize <= 2
    block_i = _block(i, 16, 128 if big else 64)
    block_j = _block(j, 16, 128 if big else 64)
    return block_i, block_j, 64 if big else 32, 8 if block_i * block_j >= 128 * 128 else 4


def wgrad_splits(n: int, k: int, m: int, elsize: int, device: torch.device) -> int:
    """Split-K factor of the weight gradient (I, J, P) = (n, k, m): the (n, k) tiles alone give one
    program per tile and each reduces all M rows -- 12 to 36 programs for 768-wide layers on a GPU with
    132 SMs (review item 13).  Split the rows so that ~one program per SM runs, each keeping >= 4
    BLOCK_P steps; at most 32 splits (the fp32 workspace is split * n * k)."""
    if _interpreted() or device.type != "cuda":
        return 1
    bi, bj, bp, _ = gemm_tiles(n, k, m, elsize)
    tiles = triton.cdiv(n, bi) * triton.cdiv(k, bj)
    return max(1, min(triton.cdiv(num_sms(device), tiles), m // (4 * bp), 32))


def _contig(idx: Tensor | None) -> Tensor | None:
    return None if idx is None else idx.contiguous()


def masked_linear_fwd_triton(
    x2: Tensor, weight: Tensor, bias: Tensor | None, in_index: Tensor | None, out_index: Tensor | None, out_width: int
) -> Tensor:
    """y (M, n) = x2 (M, k) @ W[out_index][:, in_index].T + bias[out_index], gathering W in-kernel."""
    m, k = x2.shape
    y = x2.new_empty(m, out_width)
    if k == 0:  # nothing to reduce: the output is the bias (or zero)
        y.zero_()
        if bias is not None:
            y += bias[:out_width] if out_index is None else bias[out_index]
        return y
    gathered_gemm(
        x2, x2.stride(), weight, (weight.stride(1), weight.stride(0)), y, y.stride(), (m, out_width, k),
        bias=bias, bp=_contig(in_index), bj=_contig(out_index),
    )  # fmt: skip
    return y


def masked_linear_bwd_triton(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_width: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    split: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x (M, k), grad_weight (N, K) zero outside the active block, grad_bias (N,)).

    ``split`` forces the split-K factor of grad_weight (tests); None: :func:`wgrad_splits`."""
    m, k = x2.shape
    in_index, out_index = _contig(in_index), _contig(out_index)
    gx = gw = gb = None
    if need_x:
        gx = x2.new_empty(m, k)
        if out_width == 0:
            gx.zero_()
        else:
            gathered_gemm(
                g2, g2.stride(), weight, weight.stride(), gx, gx.stride(), (m, k, out_width),
                bp=out_index, bj=in_index,
            )  # fmt: skip
    if need_w:
        gw = torch.zeros_like(weight)
        if m > 0:
            _grad_weight(g2, x2, gw, in_index, out_index, out_width, split)
    if need_b:
        gb = weight.new_zeros(weight.shape[0])
        colsum = g2.sum(0, dtype=torch.float32).to(weight.dtype)
        if out_index is None:
            gb[:out_width] = colsum
        else:
            gb.index_copy_(0, out_index, colsum)
    return gx, gw, gb


def _grad_weight(g2: Tensor, x2: Tensor, gw: Tensor, in_index: Tensor | None, out_index: Tensor | None,
                 out_width: int, split: int | None) -> None:  # fmt: skip
    """gw[out][:, in] = g2^T @ x2 (gw zero elsewhere): straight into gw, or with split-K through an fp32
    workspace [split, n, k] summed in a fixed order (deterministic) and scattered once."""
    m, k = x2.shape
    if split is None:
        split = wgrad_splits(out_width, k, m, x2.element_size(), x2.device)
    if split <= 1:
        gathered_gemm(g2, (g2.stride(1), g2.stride(0)), x2, x2.stride(), gw, gw.stride(), (out_width, k, m),
                      ci=out_index, cj=in_index)  # fmt: skip
        return
    ws = torch.empty((split, out_width, k), dtype=torch.float32, device=x2.device)
    gathered_gemm(g2, (g2.stride(1), g2.stride(0)), x2, x2.stride(), ws, (ws.stride(1), ws.stride(2)),
                  (out_width, k, m), split=split, stride_cz=ws.stride(0))  # fmt: skip
    part = ws.sum(0).to(gw.dtype)
    if out_index is None and in_index is None:
        gw[:out_width, :k] = part
        return
    rows = out_index if out_index is not None else torch.arange(out_width, device=gw.device)
    cols = in_index if in_index is not None else torch.arange(k, device=gw.device)
    gw.index_put_((rows[:, None], cols[None, :]), part)
