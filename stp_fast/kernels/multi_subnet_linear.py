"""Triton kernels for ``multi_subnet_linear`` (installed as ``stp_fast.kernels.multi_subnet_linear``).

S subnets share one weight W[N, K] (and bias[N]); subnet s computes
``y_s[M_s, n_s] = x_s[M_s, k_s] @ W[out_s][:, in_s].T + bias[out_s]`` where in_s/out_s are index
lists or prefixes.  Every direction is ONE launch whatever S is (the per-layer work of a subnet is
tiny in STP, so launches, not FLOPs, dominate on H100/H200; KERNELS.md §0, §6 (iii)).

Algorithm.

* Forward and grad_x share ``_multi_subnet_linear_fwd_kernel``, a grouped "gathered GEMM"
  ``C_s[i, j] = sum_p A_s[i, p] * B[bp_s(p), bj_s(j)] (+ bias[bj_s(j)])`` with B the weight seen
  through its strides (forward: A = x_s, bp = in_s, bj = out_s; grad_x: A = dy_s, bp = out_s,
  bj = in_s, B = W transposed by strides).  Per-subnet metadata lives in one small int64 device table
  (one row per subnet: ``data_ptr()`` of A_s and C_s, I/J/P, row/column strides, index-list pointers,
  first tile), as in the Triton grouped-GEMM tutorial (python/tutorials/08-grouped-gemm.py).  The
  grid is exactly the sum of the subnets' tile counts, so no tile beyond a subnet's width is ever
  launched; a program finds its subnet by scanning the first-tile column (S scalar loads).  Weight
  rows/columns are read in place (prefix bounds or index-list gathers): no sliced copy is made.
* grad_weight / grad_bias: ``_multi_subnet_linear_bwd_weight_kernel``, the atomic-free "W-tile owner"
  schedule of KERNELS.md §6 (iii).  One program per tile of the FULL weight loops over the subnets in
  their given order (fixed), skips those that do not touch its tile, and accumulates
  ``dy_s[:, rows]^T @ x_s[:, cols]`` over each subnet's rows in fp32 registers; it then writes its
  tile once (exact zeros where no subnet contributes), so grad_weight needs no zero-fill, no atomics
  and is bitwise reproducible.  The programs of the first column of tiles also sum the dy columns:
  grad_bias is fused into the same launch (a subnet with k_s == 0 still contributes to it).
  Prefix subnets: rows r are active iff r < n_s, columns c iff c < k_s (partial tiles masked).
  Index lists: the launcher builds per-subnet int32 inverse maps (W row/column -> local position or
  -1) with a few torch ops; the kernel gathers dy/x columns through them.  Trade-off, chosen over
  "one accumulating launch per subnet": a single launch and an fp32 sum in registers across subnets,
  but a W tile costs a full BLOCK_N x BLOCK_K x M_s product for every subnet that touches it, so
  scattered index lists pay up to the dense dW cost per subnet (prefixes pay only their own block).
  Parallelism is (#W tiles); when that is below the SM count and M is long, the launcher splits the
  rows of every subnet into ``split`` chunks (third grid axis), writes fp32 partial tiles to a
  workspace [split, N, K] and sums them with one torch reduction (fixed order: still deterministic).

Tiling.  Tile sizes come from a shape heuristic (max sizes over the subnets), not autotuning:
multi-config autotune fails under the interpreter and widths change every step.  GPU: fp16/bf16
BLOCK_I/J up to 128 with BLOCK_P = 64, fp32 up to 64 with BLOCK_P = 32, 8 warps for 128x128 tiles;
dW tiles 64x64 (128x128 at 2-byte dtypes) x BLOCK_M 32/64.  Under ``TRITON_INTERPRET=1`` 64-wide tiles
(the interpreter costs ~ms per program and K step whatever the tile).  Every ``tl.dot`` dim is >= 16.
Within a subnet tiles go in "grouped" order (GROUP_I rows of tiles reuse W tiles in L2, as in the
matmul tutorial).  Across subnets the schedule runs the subnets with the longest reduction first
(LPT, shortens the tail); W is not interleaved across subnets: for STP-size layers the whole weight
(e.g. 512x512 bf16 = 512 KiB) stays resident in the 50 MB L2 of an H100, so subnets reuse it anyway.

Limits.  float32/float16/bfloat16 (float64 is served by other backends); fp32 accumulation, output in
x's dtype; ``input_precision="tf32"`` for fp32 exactly when cuBLAS may use TF32 (``_common.input_precision``).
Under the interpreter bf16 operands are upcast to fp32 before ``tl.dot`` (triton#11584).  Pointer
offsets are int64.  The metadata table is built on the host and cached on the device by content
(``_common.device_table``: no host sync, nothing copied when the addresses repeat, kept alive for CUDA
graphs); widths never trigger recompiles (they are table entries).

Verified: under ``TRITON_INTERPRET=1`` (tests/kernels/test_multi_subnet_triton.py) against float64
``F.linear`` per subnet, forward and all gradients, S = 1..6, prefix and index lists, fp32/fp16/bf16,
empty batches and zero widths, uncovered W tiles, small forced tiles (several tiles per subnet), the
row-split path, exact zeros and bitwise determinism of grad_weight.  Not yet run on a GPU; the kernels
were compiled for sm_90 (triton.compile + ptxas, no device) for fp32/fp16/bf16 and all flag variants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from stp_fast.kernels._common import block, device_table, input_precision, interpreted, vec
from stp_fast.kernels._common import num_sms as _num_sms

# Columns of the forward / grad_x metadata table (one int64 row per scheduled subnet).
_A, _C, _I, _J, _P, _SAI, _SAP, _SCI, _SCJ, _BP, _BJ, _START = range(12)
_FWD_FIELDS = 12
# Columns of the grad_weight table (one row per subnet, in the given order).
_DY, _X, _M, _NS, _KS, _SDM, _SDN, _SXM, _SXK, _INV_OUT, _INV_IN = range(11)
_BWD_FIELDS = 11


@triton.jit
def _multi_subnet_linear_fwd_kernel(
    meta_ptr, num_groups, w_ptr, bias_ptr, stride_bp, stride_bj,
    HAS_BIAS: tl.constexpr, HAS_BP: tl.constexpr, HAS_BJ: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_I: tl.constexpr,
    NF: tl.constexpr, A_UNIT: tl.constexpr = False, C_UNIT: tl.constexpr = False, VEC: tl.constexpr = 1,
):  # fmt: skip
    """``A_UNIT`` / ``C_UNIT``: every A_s has unit stride along P / every C_s along J (the table's strides
    are opaque to Triton).  ``VEC`` > 1: A/C pointers 16-byte aligned, row strides and P, J multiples of
    VEC elements (``tl.multiple_of`` hints for 16-byte accesses; ``_common.vec``)."""
    pid = tl.program_id(0)
    # Find the subnet: the last table row whose first tile is <= pid (rows are in schedule order).
    g = pid * 0
    for t in range(1, num_groups):
        g += (pid >= tl.load(meta_ptr + t * NF + 11)).to(tl.int32)
    row = meta_ptr + g.to(tl.int64) * NF
    dtype = w_ptr.dtype.element_ty
    a_ptr = tl.load(row + 0).to(tl.pointer_type(dtype))
    c_ptr = tl.load(row + 1).to(tl.pointer_type(dtype))
    I = tl.load(row + 2)  # noqa: E741
    J = tl.load(row + 3)
    P = tl.load(row + 4)
    stride_ai = tl.load(row + 5)
    stride_ap = tl.load(row + 6)
    stride_ci = tl.load(row + 7)
    stride_cj = tl.load(row + 8)
    if VEC > 1:
        a_ptr = tl.multiple_of(a_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)
        J = tl.multiple_of(J, VEC)
        P = tl.multiple_of(P, VEC)
        stride_ai = tl.multiple_of(stride_ai, VEC)
        stride_ci = tl.multiple_of(stride_ci, VEC)
    local = pid - tl.load(row + 11)

    # Grouped ordering inside the subnet (GROUP_I rows of tiles share B tiles in L2).
    num_i = tl.cdiv(I, BLOCK_I)
    num_j = tl.cdiv(J, BLOCK_J)
    tiles_per_group = GROUP_I * num_j
    group = local // tiles_per_group
    first_i = group * GROUP_I
    group_rows = tl.minimum(num_i - first_i, GROUP_I)
    pid_i = first_i + (local % tiles_per_group) % group_rows
    pid_j = (local % tiles_per_group) // group_rows

    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
    mask_i = ri < I
    mask_j = rj < J
    if HAS_BJ:
        bj_ptr = tl.load(row + 10).to(tl.pointer_type(tl.int64))
        bj = tl.load(bj_ptr + rj, mask=mask_j, other=0)
    else:
        bj = rj
    if HAS_BP:
        bp_ptr = tl.load(row + 9).to(tl.pointer_type(tl.int64))
    a_rows = a_ptr + ri[:, None] * stride_ai
    b_cols = w_ptr + bj[None, :] * stride_bj

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = rp < P
        if HAS_BP:
            bp = tl.load(bp_ptr + rp, mask=mask_p, other=0)
        else:
            bp = rp
        if A_UNIT:
            a = tl.load(a_rows + rp[None, :], mask=mask_i[:, None] & mask_p[None, :], other=0.0)
        else:
            a = tl.load(a_rows + rp[None, :] * stride_ap, mask=mask_i[:, None] & mask_p[None, :], other=0.0)
        b = tl.load(b_cols + bp[:, None] * stride_bp, mask=mask_p[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + bj, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    if C_UNIT:
        c_ptrs = c_ptr + ri[:, None] * stride_ci + rj[None, :]
    else:
        c_ptrs = c_ptr + ri[:, None] * stride_ci + rj[None, :] * stride_cj
    tl.store(c_ptrs, acc.to(dtype), mask=mask_i[:, None] & mask_j[None, :])


@triton.jit
def _multi_subnet_linear_bwd_weight_kernel(
    meta_ptr, num_groups, w_ptr, gw_ptr, gb_ptr, N, K,
    stride_gwz, stride_gwn, stride_gwk, stride_gbz,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, IDX_OUT: tl.constexpr, IDX_IN: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, NF: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_z = tl.program_id(2)
    num_z = tl.num_programs(2)
    dtype = w_ptr.dtype.element_ty  # dy_s and x_s share the weight's dtype (gw/gb may be fp32 partials)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    in_n = rn < N
    in_k = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # Fixed subnet order (the table order = the caller's order): the sum is bitwise reproducible.
    for g in range(0, num_groups):
        row = meta_ptr + g * NF
        M = tl.load(row + 2)
        if IDX_OUT:
            inv_out = tl.load(row + 9).to(tl.pointer_type(tl.int32))
            pn = tl.load(inv_out + rn, mask=in_n, other=-1).to(tl.int64)
            vn = pn >= 0
        else:
            pn = rn
            vn = rn < tl.load(row + 3)
        if IDX_IN:
            inv_in = tl.load(row + 10).to(tl.pointer_type(tl.int32))
            pk = tl.load(inv_in + rk, mask=in_k, other=-1).to(tl.int64)
            vk = pk >= 0
        else:
            pk = rk
            vk = rk < tl.load(row + 4)
        cov_n = tl.max(vn.to(tl.int32), axis=0) > 0
        cov_k = tl.max(vk.to(tl.int32), axis=0) > 0
        if NEED_W:
            if NEED_B:  # the first column of tiles also sums dy for grad_bias, even when k_s == 0
                active = cov_n & (cov_k | (pid_k == 0))
            else:
                active = cov_n & cov_k
        else:
            active = cov_n
        if active:
            dy_ptr = tl.load(row + 0).to(tl.pointer_type(dtype))
            x_ptr = tl.load(row + 1).to(tl.pointer_type(dtype))
            stride_dm = tl.load(row + 5)
            stride_dn = tl.load(row + 6)
            stride_xm = tl.load(row + 7)
            stride_xk = tl.load(row + 8)
            # This program's share of the subnet's rows (the whole batch unless split > 1).
            chunk = tl.cdiv(tl.cdiv(M, BLOCK_M), num_z) * BLOCK_M
            m_lo = pid_z * chunk
            m_hi = tl.minimum(M, m_lo + chunk)
            dy_cols = dy_ptr + pn[:, None] * stride_dn
            x_cols = x_ptr + pk[None, :] * stride_xk
            for m0 in range(m_lo, m_hi, BLOCK_M):
                rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
                vm = rm < m_hi
                dyt = tl.load(dy_cols + rm[None, :] * stride_dm, mask=vn[:, None] & vm[None, :], other=0.0)
                if NEED_B:
                    bacc += tl.sum(dyt.to(tl.float32), axis=1)
                if NEED_W:
                    xt = tl.load(x_cols + rm[:, None] * stride_xm, mask=vm[:, None] & vk[None, :], other=0.0)
                    if UPCAST:
                        acc = tl.dot(dyt.to(tl.float32), xt.to(tl.float32), acc, input_precision=INPUT_PRECISION)
                    else:
                        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION)

    if NEED_W:
        gw_ptrs = gw_ptr + pid_z * stride_gwz + rn[:, None] * stride_gwn + rk[None, :] * stride_gwk
        tl.store(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])
    if NEED_B:
        if pid_k == 0:
            tl.store(gb_ptr + pid_z * stride_gbz + rn, bacc.to(gb_ptr.dtype.element_ty), mask=in_n)


_interpreted = interpreted
_block = block


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 uses TF32 exactly when cuBLAS may (PyTorch's matmul TF32 setting)."""
    return input_precision(dtype, device, "matmul")


def _gemm_tiles(max_i: int, max_j: int, elsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, BLOCK_P, num_warps) of the grouped GEMM for the largest subnet sizes."""
    if _interpreted():  # ~ms per program and K step whatever the tile: as few programs as possible
        return _block(max_i, 16, 64), _block(max_j, 16, 64), 64, 4
    big = elsize <= 2
    block_i = _block(max_i, 16, 128 if big else 64)
    block_j = _block(max_j, 16, 128 if big else 64)
    return block_i, block_j, 64 if big else 32, 8 if block_i * block_j >= 128 * 128 else 4


def _wgrad_tiles(n_extent: int, k_extent: int, elsize: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_M, num_warps) of the W-tile-owner kernel; extents = active rows/cols."""
    if _interpreted():
        return 64, 64, 64, 4
    big = elsize <= 2
    block_n = _block(n_extent, 16, 128 if big else 64)
    block_k = _block(k_extent, 16, 128 if big else 64)
    return block_n, block_k, 64 if big else 32, 8 if block_n * block_k >= 128 * 128 else 4


def _index_list(indices: list[Tensor | None] | None, s: int, width: int, device: torch.device) -> Tensor | None:
    """Index tensor of subnet s (contiguous int64), an arange for a None entry, None when all are prefixes."""
    if indices is None:
        return None
    idx = indices[s]
    if idx is None:
        return torch.arange(width, device=device)
    return idx.to(torch.int64).contiguous()


def _grouped_gemm(
    problems: list[tuple[Tensor, Tensor, int, int, int, Tensor | None, Tensor | None]],
    weight: Tensor,
    b_strides: tuple[int, int],
    bias: Tensor | None,
    has_bp: bool,
    has_bj: bool,
) -> None:
    """One launch of ``C_s = A_s @ B[bp_s][:, bj_s] (+ bias[bj_s])`` for every (A_s, C_s, I, J, P, bp_s, bj_s)."""
    interp = _interpreted()
    live = [p for p in problems if p[2] > 0 and p[3] > 0]
    if not live:
        return
    block_i, block_j, block_p, num_warps = _gemm_tiles(
        max(p[2] for p in live), max(p[3] for p in live), weight.element_size()
    )
    # LPT: subnets with the longest K loop first, so the last wave is made of short tiles.
    live.sort(key=lambda p: -p[4])
    rows, start = [], 0
    for a, c, i, j, p, bp, bj in live:
        rows.append([
            a.data_ptr(), c.data_ptr(), i, j, p, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
            bp.data_ptr() if bp is not None else 0, bj.data_ptr() if bj is not None else 0, start,
        ])  # fmt: skip
        start += triton.cdiv(i, block_i) * triton.cdiv(j, block_j)
    meta = device_table(rows, weight.device)
    a_unit = all(p[0].stride(1) == 1 or p[4] <= 1 for p in live)
    c_unit = all(p[1].stride(1) == 1 or p[3] <= 1 for p in live)
    v = 1
    if a_unit and c_unit:
        v = vec([x for p in live for x in (p[0].data_ptr(), p[1].data_ptr())],
                [x for p in live for x in (p[0].stride(0), p[1].stride(0), p[3], p[4])], weight.element_size())
    _multi_subnet_linear_fwd_kernel[(start,)](
        meta, len(rows), weight, bias if bias is not None else weight, b_strides[0], b_strides[1],
        HAS_BIAS=bias is not None, HAS_BP=has_bp, HAS_BJ=has_bj,
        UPCAST=interp and weight.dtype == torch.bfloat16, INPUT_PRECISION=_precision(weight.dtype, weight.device),
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_P=block_p, GROUP_I=8, NF=_FWD_FIELDS,
        A_UNIT=a_unit, C_UNIT=c_unit, VEC=v, num_warps=num_warps,
    )  # fmt: skip


def multi_subnet_linear_fwd_triton(
    xs: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    out_widths: list[int],
    in_indices: list[Tensor] | None,
    out_indices: list[Tensor] | None,
) -> list[Tensor]:
    """``ys[s] (M_s, n_s) = xs[s] (M_s, k_s) @ weight[out_s][:, in_s].T + bias[out_s]`` for all s, one launch.

    Args:
        xs: S 2-D tensors (any strides) in the dtype of ``weight`` (float32/float16/bfloat16).
        weight: (N, K); bias: (N,) or None.
        out_widths: n_s per subnet (== len(out_indices[s]) when given).
        in_indices / out_indices: None (prefixes) or S sorted unique int64 index tensors.
    Returns:
        S contiguous outputs (M_s, n_s) in x's dtype.
    """
    device = weight.device
    ys, problems = [], []
    for s, x in enumerate(xs):
        m, k = x.shape
        n = int(out_widths[s])
        y = x.new_empty(m, n)
        ys.append(y)
        bp = _index_list(in_indices, s, k, device)
        bj = _index_list(out_indices, s, n, device)
        problems.append((x, y, m, n, k, bp, bj))
    _grouped_gemm(
        problems, weight, (weight.stride(1), weight.stride(0)), bias, in_indices is not None, out_indices is not None
    )
    return ys


def _inverse_maps(indices: list[Tensor | None], widths: list[int], full: int, device: torch.device) -> Tensor:
    """int32 [S, full]: inv[s, c] = position of channel c in subnet s's list, -1 if absent (a few torch ops)."""
    S = len(indices)
    lists = [_index_list(indices, s, widths[s], device) for s in range(S)]
    inv = torch.full((S, full), -1, dtype=torch.int32, device=device)
    # S small scatters from device tensors only: no host-to-device copy, no sync (CUDA-graph safe).
    for s in range(S):
        if widths[s]:
            inv[s].index_copy_(0, lists[s], torch.arange(widths[s], dtype=torch.int32, device=device))
    return inv


def _grad_weight_bias(
    grads: list[Tensor],
    xs: list[Tensor],
    weight: Tensor,
    out_widths: list[int],
    in_indices: list[Tensor] | None,
    out_indices: list[Tensor] | None,
    need_w: bool,
    need_b: bool,
    split: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """W-tile-owner launch: full-shaped grad_weight (N, K) and grad_bias (N,), summed over subnets in order.

    ``split`` (rows of each subnet cut into that many chunks, fp32 partials summed by torch) is chosen
    by a heuristic when None; tests pass it explicitly.
    """
    N, K = weight.shape
    device, dtype = weight.device, weight.dtype
    S = len(xs)
    widths_in = [x.shape[1] for x in xs]
    widths_out = [int(w) for w in out_widths]
    inv_out = _inverse_maps(out_indices, widths_out, N, device) if out_indices is not None else None
    inv_in = _inverse_maps(in_indices, widths_in, K, device) if in_indices is not None else None
    interp = _interpreted()
    block_n, block_k, block_m, num_warps = _wgrad_tiles(
        max(widths_out) if out_indices is None else N,
        max(widths_in) if in_indices is None else K,
        weight.element_size(),
    )
    tiles_n = triton.cdiv(N, block_n)
    tiles_k = max(1, triton.cdiv(K, block_k)) if need_w else 1
    if split is None:
        split = 1
        max_m = max((x.shape[0] for x in xs), default=0)
        if not interp and device.type == "cuda":
            # Too few W tiles to fill the GPU and long batches: cut the rows (>= 4 BLOCK_M per chunk).
            want = triton.cdiv(_num_sms(device), tiles_n * tiles_k)
            split = max(1, min(want, max_m // (4 * block_m), 32))
    rows = []
    for s in range(S):
        g, x = grads[s], xs[s]
        rows.append([
            g.data_ptr(), x.data_ptr(), x.shape[0], widths_out[s], widths_in[s],
            g.stride(0), g.stride(1), x.stride(0), x.stride(1),
            inv_out[s].data_ptr() if inv_out is not None else 0, inv_in[s].data_ptr() if inv_in is not None else 0,
        ])  # fmt: skip
    meta = device_table(rows, device)
    out_dtype = dtype if split == 1 else torch.float32
    gw = torch.empty((split, N, K) if need_w else (1, 1, 1), dtype=out_dtype, device=device)
    gb = torch.empty((split, N) if need_b else (1, 1), dtype=out_dtype, device=device)
    _multi_subnet_linear_bwd_weight_kernel[(tiles_n, tiles_k, split)](
        meta, S, weight, gw, gb, N, K, gw.stride(0), gw.stride(1), gw.stride(2), gb.stride(0),
        NEED_W=need_w, NEED_B=need_b, IDX_OUT=inv_out is not None, IDX_IN=inv_in is not None,
        UPCAST=interp and dtype == torch.bfloat16, INPUT_PRECISION=_precision(dtype, device),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, NF=_BWD_FIELDS, num_warps=num_warps,
    )  # fmt: skip
    if split > 1:  # fixed-order second pass over the fp32 partials
        gw = gw.sum(0).to(dtype) if need_w else gw
        gb = gb.sum(0).to(dtype) if need_b else gb
    else:
        gw, gb = gw[0], gb[0]
    return (gw if need_w else None), (gb if need_b else None)


def multi_subnet_linear_bwd_triton(
    grads: list[Tensor],
    xs: list[Tensor],
    weight: Tensor,
    out_widths: list[int],
    in_indices: list[Tensor] | None,
    out_indices: list[Tensor] | None,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[list[Tensor] | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`multi_subnet_linear_fwd_triton`.

    Args:
        grads: S tensors (M_s, n_s) (any strides); xs, weight, widths, indices as in the forward.
    Returns:
        (S grad_x (M_s, k_s) | None, grad_weight (N, K) | None, grad_bias (N,) | None); grad_weight and
        grad_bias sum all subnets (fixed order, no atomics) and are exactly zero at positions no subnet uses.
    """
    device = weight.device
    gxs = None
    if need_x:
        gxs, problems = [], []
        for s, (g, x) in enumerate(zip(grads, xs)):
            m, k = x.shape
            n = int(out_widths[s])
            gx = x.new_empty(m, k)  # n == 0: the kernel's K loop is empty and it writes zeros
            gxs.append(gx)
            bp = _index_list(out_indices, s, n, device)
            bj = _index_list(in_indices, s, k, device)
            problems.append((g, gx, m, k, n, bp, bj))
        _grouped_gemm(
            problems,
            weight,
            (weight.stride(0), weight.stride(1)),
            None,
            out_indices is not None,
            in_indices is not None,
        )
    gw = gb = None
    if need_weight or need_bias:
        N, K = weight.shape
        if N == 0 or (K == 0 and not need_bias):
            gw = torch.zeros_like(weight) if need_weight else None
            gb = weight.new_zeros(N) if need_bias else None
        else:
            gw, gb = _grad_weight_bias(grads, xs, weight, out_widths, in_indices, out_indices, need_weight, need_bias)
    return gxs, gw, gb
