"""Triton kernels for ``masked_conv2d`` and ``multi_subnet_conv2d`` (installed as ``stp_fast.kernels.masked_conv2d``).

Algorithm: implicit-GEMM convolution over a *grouped* (subnet, tile) schedule.  A launch serves a
list of "subnet convolutions" that share one weight W[C_out, C_in/groups, KH, KW]; subnet s has a
compact input x_s [B_s, k_s, H, W] (only its active input channels), a compact output
y_s [B_s, n_s, OH, OW] and reads W through index lists (``in_idx``/``out_idx``) or prefix bounds
(W index = offset + local channel) *inside* the kernel, so no sliced weight is ever made.
``masked_conv2d`` is the S=1 case; a grouped (groups > 1, full-width) convolution is S=groups
subnets whose x/y are channel slices and whose W rows start at g * C_out/groups.

* forward   rows = B_s*OH*OW output pixels, columns = n_s output channels, reduction over
            (kh, kw, k_s input channels): ``y[p, o] = sum x[b, i, oh*s-p+kh*d, ...] W[out(o), in(i), kh, kw]``.
* grad x    the same kernel with the roles swapped (``TRANSPOSED``): rows = B_s*H*W input pixels,
            columns = k_s input channels, reduction over (kh, kw, n_s output channels); an output
            pixel contributes when ``ih + pad - kh*dil`` is a non-negative multiple of the stride.
* grad W    atomic-free split-K "W-tile owner": program (W tile, tap (kh, kw), split j) loops over
            the subnets in a fixed order, skips those that do not touch its tile (prefix: local
            channel = W index - offset in [0, width); index lists: an inverse map W index -> local
            position or -1 per subnet) and accumulates ``dy_s^T x_s`` over split j's share of the
            subnet's B_s*OH*OW pixels.  Splits go to an fp32 workspace reduced in a fixed order by a
            second kernel (one split: written straight into grad W).  Tiles no subnet touches are
            written as exact zeros, so the full-shaped grad W needs no memset and is bitwise
            reproducible.  grad bias: fixed-order torch column sums (tiny).
* depthwise (W [C, 1, KH, KW], groups == k == n per subnet): a direct-convolution kernel
            (pixels x channels, no ``tl.dot``) for forward and grad x, and a split-K kernel for grad W.

Per-subnet metadata (data pointers of x_s/y_s taken with ``data_ptr()``, B_s, widths, the 4 strides
of each activation, so NCHW, channels-last and any view work, index-list pointers, W offsets, the
first tile) is one small int64 [S, 18] device tensor, cached on the device by content
(``_common.device_table``: pinned staging, non-blocking copy, no host sync); each program finds its
subnet by scanning the first-tile column (S is small), as the Triton grouped-GEMM tutorial does with
its pointer tables.

Memory access: the implicit GEMM reads W through a repack whose column axis (C_out forward, C_in
for grad x) is unit-stride (``coalesced_weight``; an OIHW 3x3 weight would put every W element in
its own 32-byte sector); channels-last activations get ``A_UNIT``/``C_UNIT`` (unit channel stride
visible to Triton) and, when pointers, pixel strides, widths and W offsets are 16-byte multiples,
``VEC`` ``tl.multiple_of`` hints: in the sm_90 PTX the A and W tiles then load with 16-byte
``cp.async`` and C stores with ``st.global.v4`` instead of 2-byte accesses.

Tiling: shape/dtype heuristics (no multi-config autotune: it fails under the interpreter and widths
change every step).  Conv kernels: one flat loop over (tap, channel block) as in inductor's conv
template; BLOCK_K = 32; 1x1 kernels: BLOCK_M x BLOCK_N = 128x64 or (16-bit) 64x128 with 8 warps,
else 64 x BLOCK_N with 4; other kernels at most 64x64 with 4 warps (``max_warps``: inductor caps this
loop at 4 warps after wrong results with 8, triton#1254; ``STP_FAST_CONV_WARPS=8`` lifts it); grad W: 64x64 W tiles x 64 pixels (16-bit, 8 warps) or x 32 (fp32, 4 warps), split
over pixels so that ~2 programs per SM run while each split keeps >= 8 pixel blocks; depthwise
64 pixels x 32 channels.  These are the largest tiles that ptxas (Triton 3.9, sm_90) compiled without
register spills (checked ahead of time without a GPU; nested loops and offsets kept live across the
K loop spilled 1-2 KB per thread).  Every ``tl.dot`` operand is >= 16 in every dimension.  Offsets
are int32 unless some tensor spans >= 2**31 elements (``OFF64``).  Under ``TRITON_INTERPRET=1``
tiles are as large as the (tiny) test shapes allow: the interpreter costs ~ms per program and step.

Limits: float32/float16/bfloat16 (float64 is served by other backends); fp32 accumulation, results
stored in x's dtype; fp32 uses TF32 exactly when cuDNN convolutions may (``_common.input_precision``).  Under the
interpreter bf16 operands are upcast before ``tl.dot`` (the interpreter's bf16 dot is wrong,
triton#11584).  Pixel counts B*H*W must stay below 2**31.  groups > 1 that is not depthwise is
served only with full widths and no index lists (the op contract); anything else raises
NotImplementedError so the op layer can use another backend.

Verified: ``tests/kernels/test_conv2d_triton.py`` against float64 ``F.conv2d`` + autograd under the
Triton interpreter (CPU), and every kernel/tile configuration the GPU heuristics produce compiles to
an sm_90 cubin; not yet run or timed on a GPU.
Sources: torch/_inductor/kernel/conv.py (implicit-GEMM template), triton tutorials 03 and 08.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from stp_fast.kernels._common import block, device_table, input_precision, interpreted, num_sms, vec

# Columns of the per-subnet metadata table (int64 [S, NF]).  "A" is the activation the kernel reads
# along the reduction, "C" the other one (written by the conv kernels, read by the grad-W kernels).
_A = tl.constexpr(0)  # data_ptr of A
_C = tl.constexpr(1)  # data_ptr of C
_NB = tl.constexpr(2)  # batch B_s
_RED = tl.constexpr(3)  # channels of A (reduction width)
_COL = tl.constexpr(4)  # channels of C (column width)
_SA = tl.constexpr(5)  # strides of A: batch, channel, h, w (columns 5..8)
_SC = tl.constexpr(9)  # strides of C (columns 9..12)
_RED_IDX = tl.constexpr(13)  # data_ptr of A's channel index list into W (0 = prefix)
_COL_IDX = tl.constexpr(14)  # data_ptr of C's channel index list into W (0 = prefix)
_RED_OFF = tl.constexpr(15)  # prefix offset: W index = offset + local channel
_COL_OFF = tl.constexpr(16)
_TILE = tl.constexpr(17)  # first tile of the subnet in the grouped schedule
_NF = tl.constexpr(18)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_setup(meta_ptr, S, DH, DW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr = 1):
    """Find this program's subnet and tile; decode its rows into (batch, dest h, dest w).

    ``VEC`` > 1 promises that every subnet's column width is a multiple of VEC (alignment hints)."""
    pid = tl.program_id(0)
    sub = pid * 0
    for s in range(1, S):  # subnets with no tiles share their successor's start: the last match wins
        sub = tl.where(pid >= tl.load(meta_ptr + s * _NF + _TILE), s, sub)
    row = meta_ptr + sub * _NF
    cols = tl.load(row + _COL).to(tl.int32)
    if VEC > 1:
        cols = tl.multiple_of(cols, VEC)
    rows = (tl.load(row + _NB) * DH * DW).to(tl.int32)
    tile = (pid - tl.load(row + _TILE)).to(tl.int32)
    num_n = tl.cdiv(cols, BLOCK_N)
    rm = (tile // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tile % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < rows
    mask_n = rn < cols
    b = rm // (DH * DW)
    dh = (rm % (DH * DW)) // DW
    dw = rm % DW
    return row, rn, mask_m, mask_n, b, dh, dw


@triton.jit
def _source_base(dh, dw, ok, STRIDE_H, STRIDE_W, PAD_H, PAD_W, TRANSPOSED: tl.constexpr):
    """Tap-independent part of the source pixel of dest pixels (dh, dw); rows with ``ok`` false are
    moved far below zero so that every tap's bounds test rejects them."""
    if TRANSPOSED:  # dest = input pixel, source = output pixel: (dh + pad - kh * dil) / stride
        base_h = dh + PAD_H
        base_w = dw + PAD_W
    else:  # dh * stride - pad + kh * dil
        base_h = dh * STRIDE_H - PAD_H
        base_w = dw * STRIDE_W - PAD_W
    return tl.where(ok, base_h, -(1 << 30)), base_w


@triton.jit
def _source_pixel(base_h, base_w, kh, kw, SH, SW, STRIDE_H, STRIDE_W, DIL_H, DIL_W, TRANSPOSED: tl.constexpr):
    """Source pixel feeding a dest pixel through tap (kh, kw), and whether it exists."""
    if TRANSPOSED:
        th = base_h - kh * DIL_H
        tw = base_w - kw * DIL_W
        sh = th // STRIDE_H
        sw = tw // STRIDE_W
        ok = (th >= 0) & (tw >= 0) & (th % STRIDE_H == 0) & (tw % STRIDE_W == 0) & (sh < SH) & (sw < SW)
    else:
        sh = base_h + kh * DIL_H
        sw = base_w + kw * DIL_W
        ok = (sh >= 0) & (sh < SH) & (sw >= 0) & (sw < SW)
    return sh, sw, ok


@triton.jit
def _w_base(row, IDX_COL: tl.constexpr, OFF_COL: tl.constexpr, HAS_IDX: tl.constexpr):
    """Where a subnet's W channels come from: its index-list pointer, or its prefix offset."""
    if HAS_IDX:
        base = tl.load(row + IDX_COL).to(tl.pointer_type(tl.int64))
    else:
        base = tl.load(row + OFF_COL)
    return base


@triton.jit
def _w_index(base, r, mask, HAS_IDX: tl.constexpr):
    """W channel of local channels r: index list entry or prefix offset + r (int64)."""
    if HAS_IDX:
        w = tl.load(base + r, mask=mask, other=0)
    else:
        w = base + r
    return w


@triton.jit
def _off(v, OFF64: tl.constexpr):
    """Offsets in int64 only when some tensor spans >= 2**31 elements (int32 halves the registers)."""
    if OFF64:
        v = v.to(tl.int64)
    else:
        v = v.to(tl.int32)
    return v


@triton.jit
def _local_channel(inv_ptr, wi, W_DIM, width, off, HAS_IDX: tl.constexpr):
    """Local channel of W channels wi for one subnet, or -1 where the subnet does not use them."""
    if HAS_IDX:
        loc = tl.load(inv_ptr + wi, mask=wi < W_DIM, other=-1)
    else:
        loc = wi - off
        loc = tl.where((loc >= 0) & (loc < width), loc, -1)
    return loc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv_igemm_kernel(
    meta_ptr, S, w_ptr, bias_ptr,
    SH, SW, DH, DW, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    sw_red, sw_col, sw_kh, sw_kw,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RED_IDX: tl.constexpr, HAS_COL_IDX: tl.constexpr,
    OFF64: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_UNIT: tl.constexpr = False, C_UNIT: tl.constexpr = False, VEC: tl.constexpr = 1,
):  # fmt: skip
    """C[b, col, dh, dw] = sum_{kh, kw, red} A[b, red, src(dh, kh), src(dw, kw)] * W[.., .., kh, kw] (+ bias).

    ``A_UNIT`` / ``C_UNIT``: every subnet's A / C has channel stride 1 (channels-last), so the loads
    and stores run along a unit-stride axis Triton can see (the table's strides are opaque to it).
    ``VEC`` > 1 (then both are unit): A/C pointers are 16-byte aligned and their pixel strides, the
    widths and the W column offsets are multiples of VEC elements -- ``tl.multiple_of`` hints that
    allow 16-byte vector accesses (see ``_common.vec``).
    """
    row, rn, mask_m, mask_n, b, dh, dw = _tile_setup(meta_ptr, S, DH, DW, BLOCK_M, BLOCK_N, VEC)
    elem = w_ptr.dtype.element_ty
    a_ptr = tl.load(row + _A).to(tl.pointer_type(elem))
    c_ptr = tl.load(row + _C).to(tl.pointer_type(elem))
    red = tl.load(row + _RED).to(tl.int32)
    if VEC > 1:
        a_ptr = tl.multiple_of(a_ptr, 16)
        c_ptr = tl.multiple_of(c_ptr, 16)
        red = tl.multiple_of(red, VEC)
    sa_b, sa_c = _off(tl.load(row + _SA), OFF64), _off(tl.load(row + _SA + 1), OFF64)
    sa_h, sa_w = _off(tl.load(row + _SA + 2), OFF64), _off(tl.load(row + _SA + 3), OFF64)
    sc_b, sc_c = tl.load(row + _SC), tl.load(row + _SC + 1)
    sc_h, sc_w = tl.load(row + _SC + 2), tl.load(row + _SC + 3)
    c_row_off = b * sc_b + dh * sc_h + dw * sc_w
    if VEC > 1:
        c_row_off = tl.multiple_of(c_row_off, VEC)
    c_rows = c_ptr + c_row_off
    col_w = _w_index(_w_base(row, _COL_IDX, _COL_OFF, HAS_COL_IDX), rn, mask_n, HAS_COL_IDX)
    if VEC > 1 and not HAS_COL_IDX:  # prefix columns: a contiguous run starting at a multiple of VEC
        col_w = tl.max_contiguous(tl.multiple_of(col_w, VEC), BLOCK_N)
    col_off = _off(col_w, OFF64) * sw_col
    red_base = _w_base(row, _RED_IDX, _RED_OFF, HAS_RED_IDX)
    # Per-row state kept across the loop is 3 integer vectors (each costs up to BLOCK_M / num_warps
    # registers per thread): the batch offset and the first source row/column, rows past the end
    # pushed far out of range so the bounds test also masks them.
    b_off = _off(b, OFF64) * sa_b
    base_h, base_w = _source_base(dh, dw, mask_m, STRIDE_H, STRIDE_W, PAD_H, PAD_W, TRANSPOSED)
    num_k = tl.cdiv(red, BLOCK_K)

    # The accumulator starts at the bias: keeping bias offsets alive across the loop spilled
    # registers on sm_90 (ptxas of Triton 3.9, compiled ahead of time without a GPU).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col_w, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # One flat loop over (tap, channel block), as inductor's conv template does.
    for it in range(0, KH * KW * num_k):
        kk = it // num_k
        kh = kk // KW
        kw = kk % KW
        rk = (it - kk * num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rk < red
        sh, sw, ok = _source_pixel(base_h, base_w, kh, kw, SH, SW, STRIDE_H, STRIDE_W, DIL_H, DIL_W, TRANSPOSED)
        a_row = b_off + sh * sa_h + sw * sa_w
        if A_UNIT:
            if VEC > 1:
                a_row = tl.multiple_of(a_row, VEC)
            a_off = a_row[:, None] + rk[None, :]
        else:
            a_off = a_row[:, None] + rk[None, :] * sa_c
        a = tl.load(a_ptr + a_off, mask=ok[:, None] & mask_k[None, :], other=0.0)
        red_w = _off(_w_index(red_base, rk, mask_k, HAS_RED_IDX), OFF64)
        w_off = red_w[:, None] * sw_red + col_off[None, :] + (kh * sw_kh + kw * sw_kw)
        w = tl.load(w_ptr + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    if C_UNIT:
        c_ptrs = c_rows[:, None] + rn[None, :]
    else:
        c_ptrs = c_rows[:, None] + rn[None, :] * sc_c
    tl.store(c_ptrs, acc.to(elem), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_wgrad_kernel(
    meta_ptr, S, inv_red_ptr, inv_col_ptr, out_ptr, w_ptr,
    W_RED, W_COL, SH, SW, DH, DW, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    so_col, so_red, so_kh, so_kw, so_split, SPLIT,
    HAS_RED_IDX: tl.constexpr, HAS_COL_IDX: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    A_UNIT: tl.constexpr = False, C_UNIT: tl.constexpr = False, VEC: tl.constexpr = 1,
):  # fmt: skip
    """out[j, o, i, kh, kw] = sum_s sum_{pixels of split j} dy_s[b, lo_s(o), oh, ow] * x_s[b, li_s(i), ih, iw].

    Grid: (W tiles over (C_out, C_in/groups), KH*KW taps, SPLIT).  A = x_s, C = dy_s in the table.
    ``A_UNIT`` / ``C_UNIT`` / ``VEC``: as in ``_conv_igemm_kernel`` (x_s / dy_s channel stride 1; alignment).
    """
    pid = tl.program_id(0)
    kk = tl.program_id(1)
    j = tl.program_id(2)
    num_n = tl.cdiv(W_RED, BLOCK_N)
    ro = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # W rows: output channels
    ri = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # W columns: input channels
    kh = kk // KW
    kw = kk % KW
    elem = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):  # fixed order: deterministic
        row = meta_ptr + s * _NF
        lo = _local_channel(inv_col_ptr + s * W_COL, ro, W_COL, tl.load(row + _COL), tl.load(row + _COL_OFF),
                            HAS_COL_IDX)  # fmt: skip
        li = _local_channel(inv_red_ptr + s * W_RED, ri, W_RED, tl.load(row + _RED), tl.load(row + _RED_OFF),
                            HAS_RED_IDX)  # fmt: skip
        pixels = (tl.load(row + _NB) * DH * DW).to(tl.int32)
        if (tl.max(lo) >= 0) & (tl.max(li) >= 0) & (pixels > 0):
            x_ptr = tl.load(row + _A).to(tl.pointer_type(elem))
            g_ptr = tl.load(row + _C).to(tl.pointer_type(elem))
            sa_b, sa_c = tl.load(row + _SA), tl.load(row + _SA + 1)
            sa_h, sa_w = tl.load(row + _SA + 2), tl.load(row + _SA + 3)
            sc_b, sc_c = tl.load(row + _SC), tl.load(row + _SC + 1)
            sc_h, sc_w = tl.load(row + _SC + 2), tl.load(row + _SC + 3)
            chunk = tl.cdiv(tl.cdiv(pixels, SPLIT), BLOCK_P) * BLOCK_P
            p_lo = j * chunk
            p_hi = tl.minimum(pixels, p_lo + chunk)
            ok_o = lo >= 0
            ok_i = li >= 0
            # Addresses of prefix subnets use the unmasked local channel (a contiguous run Triton can see).
            lo_a = lo if HAS_COL_IDX else ro - tl.load(row + _COL_OFF).to(tl.int32)
            li_a = li if HAS_RED_IDX else ri - tl.load(row + _RED_OFF).to(tl.int32)
            if VEC > 1:
                x_ptr = tl.multiple_of(x_ptr, 16)
                g_ptr = tl.multiple_of(g_ptr, 16)
                if not HAS_COL_IDX:
                    lo_a = tl.max_contiguous(tl.multiple_of(lo_a, VEC), BLOCK_M)
                    ok_o = (lo_a >= 0) & (lo_a < tl.multiple_of(tl.load(row + _COL).to(tl.int32), VEC))
                if not HAS_RED_IDX:
                    li_a = tl.max_contiguous(tl.multiple_of(li_a, VEC), BLOCK_N)
                    ok_i = (li_a >= 0) & (li_a < tl.multiple_of(tl.load(row + _RED).to(tl.int32), VEC))
            if C_UNIT:
                g_rows = g_ptr + lo_a[:, None]
            else:
                g_rows = g_ptr + lo_a[:, None] * sc_c
            if A_UNIT:
                x_cols = x_ptr + li_a[None, :]
            else:
                x_cols = x_ptr + li_a[None, :] * sa_c
            for p0 in range(p_lo, p_hi, BLOCK_P):
                rp = p0 + tl.arange(0, BLOCK_P)
                mask_p = rp < p_hi
                b = rp // (DH * DW)
                dh = (rp % (DH * DW)) // DW
                dw = rp % DW
                base_h, base_w = _source_base(dh, dw, mask_p, STRIDE_H, STRIDE_W, PAD_H, PAD_W, False)
                sh, sw, ok = _source_pixel(base_h, base_w, kh, kw, SH, SW, STRIDE_H, STRIDE_W, DIL_H, DIL_W, False)
                g_off = b * sc_b + dh * sc_h + dw * sc_w
                x_off = b * sa_b + sh * sa_h + sw * sa_w
                if VEC > 1:
                    g_off = tl.multiple_of(g_off, VEC)
                    x_off = tl.multiple_of(x_off, VEC)
                g = tl.load(g_rows + g_off[None, :], mask=ok_o[:, None] & ok[None, :], other=0.0)
                x = tl.load(x_cols + x_off[:, None], mask=ok[:, None] & ok_i[None, :], other=0.0)
                if UPCAST:
                    g = g.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(g, x, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + j.to(tl.int64) * so_split + ro[:, None] * so_col + ri[None, :] * so_red + kh * so_kh + kw * so_kw
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ro < W_COL)[:, None] & (ri < W_RED)[None, :])


@triton.jit
def _dw_conv_kernel(
    meta_ptr, S, w_ptr, bias_ptr,
    SH, SW, DH, DW, KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    sw_c, sw_kh, sw_kw,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Depthwise: C[b, c, dh, dw] = sum_{kh, kw} A[b, c, src(dh, kh), src(dw, kw)] * W[w(c), 0, kh, kw] (+ bias)."""
    row, rn, mask_m, mask_n, b, dh, dw = _tile_setup(meta_ptr, S, DH, DW, BLOCK_M, BLOCK_N)
    elem = w_ptr.dtype.element_ty
    a_ptr = tl.load(row + _A).to(tl.pointer_type(elem))
    c_ptr = tl.load(row + _C).to(tl.pointer_type(elem))
    sa_b, sa_c = tl.load(row + _SA), tl.load(row + _SA + 1)
    sa_h, sa_w = tl.load(row + _SA + 2), tl.load(row + _SA + 3)
    chan_w = _w_index(_w_base(row, _COL_IDX, _COL_OFF, HAS_IDX), rn, mask_n, HAS_IDX)
    w_chan = w_ptr + chan_w * sw_c
    a_chan = a_ptr + rn[None, :] * sa_c
    b_off = b * sa_b
    base_h, base_w = _source_base(dh, dw, mask_m, STRIDE_H, STRIDE_W, PAD_H, PAD_W, TRANSPOSED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, KH * KW):
        kh = kk // KW
        kw = kk % KW
        sh, sw, ok = _source_pixel(base_h, base_w, kh, kw, SH, SW, STRIDE_H, STRIDE_W, DIL_H, DIL_W, TRANSPOSED)
        a = tl.load(a_chan + (b_off + sh * sa_h + sw * sa_w)[:, None], mask=ok[:, None] & mask_n[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_chan + kh * sw_kh + kw * sw_kw, mask=mask_n, other=0.0)
        acc += a.to(tl.float32) * w.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan_w, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    sc_b, sc_c = tl.load(row + _SC), tl.load(row + _SC + 1)
    sc_h, sc_w = tl.load(row + _SC + 2), tl.load(row + _SC + 3)
    c_ptrs = c_ptr + (b * sc_b + dh * sc_h + dw * sc_w)[:, None] + rn[None, :] * sc_c
    tl.store(c_ptrs, acc.to(elem), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dw_wgrad_kernel(
    meta_ptr, S, inv_ptr, out_ptr, w_ptr,
    C, SH, SW, DH, DW, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    so_c, so_kh, so_kw, so_split, SPLIT,
    HAS_IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Depthwise grad W: out[j, c, 0, kh, kw] = sum_s sum_{pixels of split j} dy_s[b, l(c), ..] * x_s[b, l(c), ..]."""
    pid = tl.program_id(0)
    kk = tl.program_id(1)
    j = tl.program_id(2)
    rc = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kh = kk // KW
    kw = kk % KW
    elem = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s in range(0, S):  # fixed order: deterministic
        row = meta_ptr + s * _NF
        lc = _local_channel(inv_ptr + s * C, rc, C, tl.load(row + _COL), tl.load(row + _COL_OFF), HAS_IDX)
        pixels = (tl.load(row + _NB) * DH * DW).to(tl.int32)
        if (tl.max(lc) >= 0) & (pixels > 0):
            x_ptr = tl.load(row + _A).to(tl.pointer_type(elem))
            g_ptr = tl.load(row + _C).to(tl.pointer_type(elem))
            sa_b, sa_c = tl.load(row + _SA), tl.load(row + _SA + 1)
            sa_h, sa_w = tl.load(row + _SA + 2), tl.load(row + _SA + 3)
            sc_b, sc_c = tl.load(row + _SC), tl.load(row + _SC + 1)
            sc_h, sc_w = tl.load(row + _SC + 2), tl.load(row + _SC + 3)
            chunk = tl.cdiv(tl.cdiv(pixels, SPLIT), BLOCK_P) * BLOCK_P
            p_lo = j * chunk
            p_hi = tl.minimum(pixels, p_lo + chunk)
            ok_c = lc >= 0
            for p0 in range(p_lo, p_hi, BLOCK_P):
                rp = p0 + tl.arange(0, BLOCK_P)
                mask_p = rp < p_hi
                b = rp // (DH * DW)
                dh = (rp % (DH * DW)) // DW
                dw = rp % DW
                base_h, base_w = _source_base(dh, dw, mask_p, STRIDE_H, STRIDE_W, PAD_H, PAD_W, False)
                sh, sw, ok = _source_pixel(base_h, base_w, kh, kw, SH, SW, STRIDE_H, STRIDE_W, DIL_H, DIL_W, False)
                mask = ok[:, None] & ok_c[None, :]
                g = tl.load(g_ptr + (b * sc_b + dh * sc_h + dw * sc_w)[:, None] + lc[None, :] * sc_c, mask=mask,
                            other=0.0)  # fmt: skip
                x = tl.load(x_ptr + (b * sa_b + sh * sa_h + sw * sa_w)[:, None] + lc[None, :] * sa_c, mask=mask,
                            other=0.0)  # fmt: skip
                acc += g.to(tl.float32) * x.to(tl.float32)
    total = tl.sum(acc, axis=0)
    out = out_ptr + j.to(tl.int64) * so_split + rc * so_c + kh * so_kh + kw * so_kw
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=rc < C)


@triton.jit
def _split_sum_kernel(ws_ptr, out_ptr, numel, SPLIT, BLOCK: tl.constexpr):
    """out[e] = sum_j ws[j, e] in the fixed order j = 0, 1, ... (flat over a dense tensor's storage)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ws = ws_ptr + offs
    for _ in range(0, SPLIT):
        acc += tl.load(ws, mask=mask, other=0.0)
        ws += numel  # pointer arithmetic is 64-bit: no overflow of split * numel
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side: subnet descriptions, tile heuristics, launches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride/padding/dilation and the input (h, w) / output (oh, ow) spatial sizes."""

    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    h: int
    w: int
    oh: int
    ow: int

    @classmethod
    def of(cls, weight: Tensor, h: int, w: int, stride, padding, dilation) -> ConvGeometry:
        kh, kw = weight.shape[2], weight.shape[3]
        st, pd, dl = tuple(int(v) for v in stride), tuple(int(v) for v in padding), tuple(int(v) for v in dilation)
        oh = (h + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
        ow = (w + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"conv2d: output size ({oh}, {ow}) is empty for input ({h}, {w}) and kernel ({kh}, {kw})")
        return cls(kh, kw, st, pd, dl, h, w, oh, ow)

    def args(self, transposed: bool) -> tuple[int, ...]:
        """SH, SW, DH, DW (source / destination spatial sizes), then the kernel and conv parameters."""
        src, dst = ((self.oh, self.ow), (self.h, self.w)) if transposed else ((self.h, self.w), (self.oh, self.ow))
        return (*src, *dst, self.kh, self.kw, *self.stride, *self.padding, *self.dilation)


@dataclasses.dataclass
class SubnetConv:
    """One subnet's convolution: x [B, k, H, W] (or grad x), y [B, n, OH, OW] (or grad out).

    W rows are ``out_idx`` (int64, contiguous) or ``out_off + arange(n)``; W columns ``in_idx`` or
    ``in_off + arange(k)``.  Depthwise subnets use ``out_idx``/``out_off`` for the weight row.
    """

    x: Tensor
    y: Tensor
    k: int
    n: int
    in_idx: Tensor | None = None
    out_idx: Tensor | None = None
    in_off: int = 0
    out_off: int = 0


def index_arg(idx: Tensor | None) -> Tensor | None:
    """Index lists as the kernels read them: int64 and contiguous."""
    return None if idx is None else idx.to(torch.int64).contiguous()


def new_activation(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uninitialised output: channels-last when x is (and is not also plain contiguous), else NCHW."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def check_dtype(x: Tensor, op: str) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: the Triton kernels support float32, float16 and bfloat16, got {x.dtype}")


_interpreted = interpreted
_block = block


def _precision(x: Tensor) -> str:
    """fp32 convolutions use TF32 exactly when cuDNN's would (PyTorch's conv TF32 setting)."""
    return input_precision(x.dtype, x.device, "conv")


def _upcast(x: Tensor) -> bool:
    return _interpreted() and x.dtype == torch.bfloat16


def _fill_missing_indices(subs: list[SubnetConv]) -> None:
    """If some subnets carry index lists and others prefixes, give the latter explicit ranges."""
    for field, off, width in (("in_idx", "in_off", "k"), ("out_idx", "out_off", "n")):
        if any(getattr(s, field) is not None for s in subs):
            for s in subs:
                if getattr(s, field) is None:
                    lo = getattr(s, off)
                    setattr(s, field, torch.arange(lo, lo + getattr(s, width), device=s.x.device))


def _needs_int64(tensors: list[Tensor]) -> bool:
    """Whether some element offset reaches 2**31 (then the kernels compute offsets in int64)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) >= 2**31 for t in tensors)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _table(subs: list[SubnetConv], transposed: bool, dest_pixels: int, block_m: int, block_n: int):
    """The int64 [S, NF] metadata table and the total tile count of the grouped schedule."""
    rows, start = [], 0
    for s in subs:
        if transposed:  # grad x: A = grad out, C = grad x, reduce over output channels
            a, c, red, col, ridx, cidx, roff, coff = s.y, s.x, s.n, s.k, s.out_idx, s.in_idx, s.out_off, s.in_off
        else:
            a, c, red, col, ridx, cidx, roff, coff = s.x, s.y, s.k, s.n, s.in_idx, s.out_idx, s.in_off, s.out_off
        nb = s.x.shape[0]
        if nb * max(dest_pixels, s.x.shape[2] * s.x.shape[3], 1) >= 2**31:
            raise ValueError("conv2d (Triton): B*H*W must stay below 2**31")
        rows.append([a.data_ptr(), c.data_ptr(), nb, red, col, *a.stride(), *c.stride(), _ptr(ridx), _ptr(cidx),
                     roff, coff, start])  # fmt: skip
        start += triton.cdiv(nb * dest_pixels, block_m) * triton.cdiv(col, block_n)
    return device_table(rows, subs[0].x.device), start


def max_warps(taps: int) -> int:
    """The most warps the implicit-GEMM kernel may use for a kernel with ``taps`` = KH*KW taps.

    Inductor caps its conv template (the same flat (tap, channel-block) loop) at 4 warps for non-1x1
    kernels because 8 warps gave wrong results there (triton#1254; torch/_inductor/kernel/conv.py), so
    this kernel does too until a GPU A/B check (benchmarks/gpu_check.py, "warps") proves 8 warps right:
    ``STP_FAST_CONV_WARPS=8`` lifts the cap (for that check and for timing).
    """
    if taps == 1:
        return 8
    return 8 if os.environ.get("STP_FAST_CONV_WARPS", "4").strip() == "8" else 4


def _gemm_tiles(rows: int, cols: int, red: int, dtype: torch.dtype, taps: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the implicit-GEMM kernel; all >= 16 (tl.dot minimum).

    GPU sizes are the largest that ptxas (sm_90, compiled ahead of time, checked with cuobjdump) fits
    without register spills: 128x64 / 64x128 need 8 warps (with 4 they spill 150-240 B of stack per
    thread), so under the 4-warp cap of :func:`max_warps` the tile is at most 64x64 (160-255 registers,
    no spill); BLOCK_K = 32 (BLOCK_K = 64, 128x128 and 128x32 spilled).  Not yet timed on a GPU.
    """
    if _interpreted():  # ~ms per program and K step whatever the tile size: as few programs as possible
        return _block(rows, 16, 128), _block(cols, 16, 64), _block(red, 16, 64), 4
    small = torch.empty((), dtype=dtype).element_size() <= 2
    bk = _block(red, 16, 32)
    if max_warps(taps) < 8:
        bn = _block(cols, 16, 64)
        return _block(rows, 32, 64), bn, bk, 4
    bn = _block(cols, 16, 128 if small else 64)
    bm = _block(rows, 32, 128 if bn == 64 else 64)
    return bm, bn, bk, 8 if bm * bn >= 128 * 64 else 4


def coalesced_weight(weight: Tensor, transposed: bool) -> Tensor:
    """W for the implicit GEMM, its column axis (C_out forward, C_in for grad x) made unit-stride.

    An OIHW weight has strides (C_in*KH*KW, KH*KW, KW, 1): the kernel's W tile [BLOCK_K, BLOCK_N] then
    reads each element from its own 32-byte sector (review item 9).  A weight whose column or reduction
    axis already has stride 1 (channels-last, 1x1 kernels) is used as it is; otherwise it is repacked
    once per launch to [KH, KW, red, col] storage (a copy of the parameter-sized weight), returned as a
    view with W's logical shape, so the kernel code is unchanged.
    """
    col_dim, red_dim = (1, 0) if transposed else (0, 1)
    if weight.stride(col_dim) == 1 or weight.stride(red_dim) == 1 or weight.numel() == 0:
        return weight
    packed = weight.permute(2, 3, red_dim, col_dim).contiguous()
    return packed.permute(2, 3, 0, 1) if transposed else packed.permute(3, 2, 0, 1)  # [C_out, C_in, KH, KW]


def _dw_tiles(rows: int, cols: int) -> tuple[int, int]:
    if _interpreted():
        return _block(rows, 16, 256), _block(cols, 16, 64)
    return _block(rows, 16, 64), _block(cols, 16, 32)  # 128x32 spilled on sm_90


def _launch_conv(subs: list[SubnetConv], weight: Tensor, bias: Tensor | None, geom: ConvGeometry,
                 depthwise: bool, transposed: bool) -> None:  # fmt: skip
    """Forward (transposed=False) or grad x (True) of every subnet in one grouped launch."""
    if not subs:
        return
    _fill_missing_indices(subs)
    dest = geom.h * geom.w if transposed else geom.oh * geom.ow
    rows = max(s.x.shape[0] * dest for s in subs)
    cols = max(s.k if transposed else s.n for s in subs)
    conv_args = geom.args(transposed)
    if depthwise:
        bm, bn = _dw_tiles(rows, cols)
        meta, tiles = _table(subs, transposed, dest, bm, bn)
        if tiles == 0:
            return
        _dw_conv_kernel[(tiles,)](
            meta, len(subs), weight, bias if bias is not None else weight, *conv_args,
            weight.stride(0), weight.stride(2), weight.stride(3),
            TRANSPOSED=transposed, HAS_BIAS=bias is not None, HAS_IDX=subs[0].out_idx is not None,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )  # fmt: skip
        return
    red = max(s.n if transposed else s.k for s in subs)
    bm, bn, bk, warps = _gemm_tiles(rows, cols, red, weight.dtype, geom.kh * geom.kw)
    meta, tiles = _table(subs, transposed, dest, bm, bn)
    if tiles == 0:
        return
    w = coalesced_weight(weight, transposed)
    s_out, s_in, s_kh, s_kw = w.stride()
    a_tensors = [s.y if transposed else s.x for s in subs]
    c_tensors = [s.x if transposed else s.y for s in subs]
    a_unit, c_unit, v = _unit_and_vec(subs, a_tensors, c_tensors, w, transposed)
    _conv_igemm_kernel[(tiles,)](
        meta, len(subs), w, bias if bias is not None else w, *conv_args,
        s_out if transposed else s_in, s_in if transposed else s_out, s_kh, s_kw,
        TRANSPOSED=transposed, HAS_BIAS=bias is not None,
        HAS_RED_IDX=(subs[0].out_idx if transposed else subs[0].in_idx) is not None,
        HAS_COL_IDX=(subs[0].in_idx if transposed else subs[0].out_idx) is not None,
        OFF64=_needs_int64([*a_tensors, w]),
        UPCAST=_upcast(weight), INPUT_PRECISION=_precision(weight),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, A_UNIT=a_unit, C_UNIT=c_unit, VEC=v, num_warps=warps,
    )  # fmt: skip


def _unit_and_vec(subs: list[SubnetConv], a_tensors: list[Tensor], c_tensors: list[Tensor], w: Tensor | None,
                  transposed: bool) -> tuple[bool, bool, int]:  # fmt: skip
    """(A_UNIT, C_UNIT, VEC) of an implicit-GEMM or grad-W launch (see ``_conv_igemm_kernel``); ``w`` is
    the weight the implicit GEMM reads (its column axis must be unit-stride for VEC), None for grad W."""
    unit = lambda ts: all(t.stride(1) == 1 or t.shape[1] <= 1 for t in ts)
    a_unit, c_unit = unit(a_tensors), unit(c_tensors)
    if not (a_unit and c_unit):  # (the hints are no-ops under the interpreter, which still runs the VEC code)
        return a_unit, c_unit, 1
    widths = [v for s in subs for v in (s.k, s.n)]
    offsets = [v for s in subs for v in (s.in_off, s.out_off)]
    pixel_strides = [st for t in (*a_tensors, *c_tensors) for st in (t.stride(0), t.stride(2), t.stride(3))]
    col_ok = w is None or w.stride(1 if transposed else 0) == 1
    ptrs = [t.data_ptr() for t in (*a_tensors, *c_tensors)]
    v = vec(ptrs, [*pixel_strides, *widths, *offsets], a_tensors[0].element_size())
    return a_unit, c_unit, v if col_ok else 1


def grouped_conv_forward(subs: list[SubnetConv], weight: Tensor, bias: Tensor | None, geom: ConvGeometry,
                         depthwise: bool) -> None:  # fmt: skip
    """Write every ``s.y`` (allocated by the caller) = conv(s.x, W sliced for s) + bias, one launch."""
    _launch_conv(subs, weight, bias, geom, depthwise, transposed=False)


def grouped_conv_grad_input(subs: list[SubnetConv], weight: Tensor, geom: ConvGeometry, depthwise: bool) -> None:
    """Write every ``s.x`` (the grad x buffer, allocated by the caller) from ``s.y`` (grad out), one launch."""
    _launch_conv(subs, weight, None, geom, depthwise, transposed=True)


def _inverse_map(idxs: list[Tensor | None], width: int, device: torch.device) -> Tensor | None:
    """[S, width] int64: W channel -> local position in subnet s, or -1 (None when all are prefixes)."""
    if all(i is None for i in idxs):
        return None
    inv = torch.full((len(idxs), width), -1, dtype=torch.int64, device=device)
    for s, idx in enumerate(idxs):
        inv[s, idx] = torch.arange(idx.shape[0], device=device)
    return inv


def _num_splits(active_tiles: int, pixels: int, block_p: int, device: torch.device) -> int:
    """Split the pixel reduction so ~2 programs per SM run, each keeping >= 8 pixel blocks."""
    if _interpreted() or device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    by_work = max(1, pixels // (8 * block_p))
    return max(1, min(triton.cdiv(target, max(active_tiles, 1)), by_work, 64))


def _wgrad_tiles(depthwise: bool, n: int, k: int, pixels: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_P, num_warps) for the grad-W kernels (dot operands >= 16); GPU sizes
    chosen, like ``_gemm_tiles``, as the largest without register spills on sm_90."""
    if _interpreted():
        return _block(n, 16, 64), _block(k, 16, 64), _block(pixels, 16, 256 if depthwise else 128), 4
    if depthwise:
        return 1, _block(n, 16, 32), 64, 4
    if torch.empty((), dtype=dtype).element_size() <= 2:
        return _block(n, 16, 64), _block(k, 16, 64), 64, 8
    return _block(n, 16, 64), _block(k, 16, 64), 32, 4


def grouped_conv_grad_weight(subs: list[SubnetConv], weight: Tensor, geom: ConvGeometry, depthwise: bool,
                             splits: int | None = None) -> Tensor:  # fmt: skip
    """Full-shaped grad W = sum over subnets (fixed order) of dy_s^T x_s; exact zeros where no subnet reads W.

    ``s.x`` is the subnet's input, ``s.y`` its grad out.  ``splits`` forces the split-K factor (tests).
    """
    gw = torch.empty_like(weight)  # dense (permuted strides at most): flat offsets cover [0, numel)
    if gw.numel() == 0:
        return gw
    if not subs:
        return gw.zero_()
    _fill_missing_indices(subs)
    dest = geom.oh * geom.ow
    pixels = sum(s.x.shape[0] for s in subs) * dest
    max_n, max_k = max(s.n for s in subs), max(s.k for s in subs)
    bm, bn, bp, warps = _wgrad_tiles(depthwise, max_n, max_k, pixels, weight.dtype)
    taps = geom.kh * geom.kw
    active = (triton.cdiv(max_n, bn) if depthwise else triton.cdiv(max_n, bm) * triton.cdiv(max_k, bn)) * taps
    split = splits or _num_splits(active, pixels, bp, weight.device)
    out = gw if split == 1 else torch.empty((split, gw.numel()), dtype=torch.float32, device=weight.device)
    meta, _ = _table(subs, False, dest, 1, 1)
    conv = (geom.h, geom.w, geom.oh, geom.ow, geom.kw, *geom.stride, *geom.padding, *geom.dilation)
    if depthwise:
        c = weight.shape[0]
        inv = _inverse_map([s.out_idx for s in subs], c, weight.device)
        _dw_wgrad_kernel[(triton.cdiv(c, bn), taps, split)](
            meta, len(subs), inv if inv is not None else meta, out, weight, c, *conv,
            gw.stride(0), gw.stride(2), gw.stride(3), gw.numel(), split,
            HAS_IDX=inv is not None, BLOCK_P=bp, BLOCK_N=bn, num_warps=warps,
        )  # fmt: skip
    else:
        w_col, w_red = weight.shape[0], weight.shape[1]
        inv_red = _inverse_map([s.in_idx for s in subs], w_red, weight.device)
        inv_col = _inverse_map([s.out_idx for s in subs], w_col, weight.device)
        a_unit, c_unit, v = _unit_and_vec(subs, [s.x for s in subs], [s.y for s in subs], None, False)
        _conv_wgrad_kernel[(triton.cdiv(w_col, bm) * triton.cdiv(w_red, bn), taps, split)](
            meta, len(subs), inv_red if inv_red is not None else meta, inv_col if inv_col is not None else meta,
            out, weight, w_red, w_col, *conv, *gw.stride(), gw.numel(), split,
            HAS_RED_IDX=inv_red is not None, HAS_COL_IDX=inv_col is not None,
            UPCAST=_upcast(weight), INPUT_PRECISION=_precision(weight),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, A_UNIT=a_unit, C_UNIT=c_unit, VEC=v, num_warps=warps,
        )  # fmt: skip
    if split > 1:
        block = _block(gw.numel(), 128, 4096 if _interpreted() else 1024)
        _split_sum_kernel[(triton.cdiv(gw.numel(), block),)](out, gw, gw.numel(), split, BLOCK=block, num_warps=4)
    return gw


def grouped_conv_grad_bias(subs: list[SubnetConv], num_out: int, like: Tensor) -> Tensor:
    """Full [C_out] grad bias: per-subnet column sums of grad out (``s.y``), added in subnet order in fp32."""
    gb = torch.zeros(num_out, dtype=torch.float32, device=like.device)
    for s in subs:
        if s.n == 0:
            continue
        col = s.y.sum(dim=(0, 2, 3), dtype=torch.float32)
        if s.out_idx is None:
            gb[s.out_off : s.out_off + s.n] += col
        else:
            gb[s.out_idx] += col
    return gb.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# masked_conv2d launchers
# ----------------------------------------------------------------------------------------------

OP = "masked_conv2d"


def _masked_subnets(x: Tensor, y: Tensor, weight: Tensor, in_index: Tensor | None, out_index: Tensor | None,
                    out_width: int, groups: int) -> tuple[list[SubnetConv], bool]:  # fmt: skip
    """masked_conv2d as subnet convolutions: (subnets, depthwise).  x/y may be the grad buffers."""
    k = x.shape[1]
    if groups == 1:
        return [SubnetConv(x, y, k, out_width, index_arg(in_index), index_arg(out_index))], False
    if weight.shape[1] == 1 and groups == k == out_width:
        idx = index_arg(out_index if out_index is not None else in_index)
        return [SubnetConv(x, y, k, k, idx, idx)], True
    c_in, c_out = weight.shape[1], weight.shape[0] // groups
    if in_index is not None or out_index is not None or k != c_in * groups or out_width != weight.shape[0]:
        raise NotImplementedError(
            f"{OP} (Triton): groups={groups} that is not depthwise needs full widths and no index lists"
        )
    return [
        SubnetConv(x[:, g * c_in : (g + 1) * c_in], y[:, g * c_out : (g + 1) * c_out], c_in, c_out, out_off=g * c_out)
        for g in range(groups)
    ], False


def masked_conv2d_fwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_width: int,
    stride,
    padding,
    dilation,
    groups: int,
) -> Tensor:
    """y (B, n, OH, OW) = conv2d(x (B, k, H, W), W[out_index][:, in_index], bias[out_index], ...), W read in-kernel."""
    check_dtype(x, OP)
    geom = ConvGeometry.of(weight, x.shape[2], x.shape[3], stride, padding, dilation)
    y = new_activation(x, (x.shape[0], out_width, geom.oh, geom.ow))
    subs, depthwise = _masked_subnets(x, y, weight, in_index, out_index, out_width, groups)
    grouped_conv_forward(subs, weight, bias, geom, depthwise)
    return y


def masked_conv2d_bwd_triton(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    in_index: Tensor | None,
    out_index: Tensor | None,
    out_width: int,
    stride,
    padding,
    dilation,
    groups: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x like x's layout, grad_weight (full shape, zero outside the active block), grad_bias (C_out,))."""
    check_dtype(x, OP)
    grad_out = grad_out.to(x.dtype)
    geom = ConvGeometry.of(weight, x.shape[2], x.shape[3], stride, padding, dilation)
    subs, depthwise = _masked_subnets(x, grad_out, weight, in_index, out_index, out_width, groups)
    gx = gw = gb = None
    if need_x:
        gx = new_activation(x, tuple(x.shape))
        gx_subs, _ = _masked_subnets(gx, grad_out, weight, in_index, out_index, out_width, groups)
        grouped_conv_grad_input(gx_subs, weight, geom, depthwise)
    if need_weight:
        gw = grouped_conv_grad_weight(subs, weight, geom, depthwise)
    if need_bias:
        gb = grouped_conv_grad_bias(subs, weight.shape[0], weight)
    return gx, gw, gb
