"""Triton kernels for ``multi_subnet_batch_norm`` (+ optional ReLU), installed as
``stp_fast.kernels.multi_subnet_batch_norm``.

S subnets each normalise their own compact activation ``x_s[B_s, c_s, *spatial]`` (2-D [B, C] or
4-D NCHW / channels-last / any strides) over channels ``indices[s]`` (or the prefix c_s) of a shared
BatchNorm (weight/bias/running stats of size C, weight/bias optional):
``y = (x - mean) * invstd * weight + bias`` then ReLU if asked.  Training: per-subnet batch statistics
over (batch, spatial), biased variance, ``invstd = 1 / sqrt(var + eps)``; eval: the running statistics.

Algorithm.

* Forward, ONE launch: one program per (subnet, block of BLOCK_C channels).  In training it makes
  three passes over its [BLOCK_C, B_s * H * W] slab: the mean (fp32 sum), the biased variance as
  sum((x - mean)^2) (two-pass: exact to fp32 rounding even when |mean| >> std, unlike E[x^2]-E[x]^2),
  then the normalisation (+ReLU) and the store.  Partial sums are kept per lane in a
  [BLOCK_C, BLOCK_R] fp32 accumulator and reduced once at the end (pairwise-like accuracy).  Means and
  invstds are written as fp32 [c_s] per subnet; the running statistics are only read (eval).
* Backward, ONE launch: per (subnet, channel block) one pass computes ``sum(dy')`` and
  ``sum(dy' * xhat)`` with ``dy' = dy * (y > 0)`` when relu (y recomputed from x, mean, invstd,
  weight, bias in fp32), then a second pass writes
  ``dx = weight * invstd * (dy' - sum(dy') / R - xhat * sum(dy' xhat) / R)`` (eval: ``dy' * weight *
  invstd``, and the first pass runs only when grad_weight/grad_bias are wanted).  The per-(subnet,
  channel) sums go to a zeroed fp32 workspace [2, S, C] at the channel's position in the FULL
  parameter; grad_weight/grad_bias = one torch ``sum`` over S (fixed order, no atomics: bitwise
  reproducible), exactly zero at channels no subnet uses.

Tiling.  Reduction positions r = (b, h, w) are enumerated in one of three ways (constexpr flags):
NCHW-like inputs whose (h, w) collapse to one unit-stride axis ("SP_INNER") step over (b, spatial
block) with contiguous vector loads along the spatial axis and no integer division per element;
otherwise r is flattened and split as b = r // HW (int32) unless HW == 1 (2-D inputs); when every
tensor has channel stride 1 (channels-last, contiguous 2-D) the channel axis is the contiguous one
("C_UNIT").  A (h, w) pair that does not collapse to one stride (exotic views) is made contiguous by
the launcher.  GPU tiles hold ~2048 elements; BLOCK_C (1..64) is chosen so that there are ~2 programs
per SM where the channel count allows, but at least one 32-byte sector of channels when channels are
the contiguous axis; SP_INNER is used from H*W >= 256.  Interpreter tiles hold ~8192 elements.
Parallelism is only sum_s ceil(c_s / BLOCK_C) programs, each streaming its channels' whole batch
(e.g. CIFAR 4 subnets x 64 channels = 256 programs of 128x8x8 elements): fine for STP layers, a
split reduction (partial sums per (channel block, batch chunk) + a fixed-order combine) is the
upgrade for few channels and huge B*H*W.

Limits.  float32/float16/bfloat16 activations, fp32 statistics and accumulation; running statistics
may have any float dtype.  B_s * H * W < 2**31 per subnet.  An empty subnet batch (R = 0) yields
mean 0 and invstd 1/sqrt(eps) (PyTorch rejects empty batches) and zero weight/bias gradients; zero
channels launch nothing.  The metadata table is built on the host and cached on the device by content
(``_common.device_table``: no host sync, nothing copied when addresses repeat).  Channels-last / NCHW
inputs whose pointers, strides and unit-axis extent are 16-byte multiples get ``VEC`` alignment hints.

Verified: under ``TRITON_INTERPRET=1`` (tests/kernels/test_multi_subnet_triton.py) against float64
``F.batch_norm`` per subnet (+relu), training and eval, forward, statistics and all gradients, 2-D,
NCHW, channels-last and strided inputs, prefix and index lists, affine off, empty batch,
fp32/fp16/bf16, several channel blocks and reduction steps per subnet (small forced tiles).  Not yet
run on a GPU; every constexpr variant used was compiled for sm_90 (triton.compile + ptxas, no device).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from stp_fast.kernels._common import device_table, vec
from stp_fast.kernels._common import num_sms as _num_sms

# Forward table columns: x, y, mean, invstd, idx, B, c_s, HW, x strides (b, c, s), y strides, first block.
_FWD_FIELDS = 15
# Backward table columns: x, dy, dx, mean, invstd, idx, B, c_s, HW, x/dy/dx strides (b, c, s), ws row, first block.
_BWD_FIELDS = 20


@triton.jit
def _find_group(meta_ptr, num_groups, pid, NF: tl.constexpr, START: tl.constexpr):
    """Row of the subnet owning program ``pid``: the last row whose first block is <= pid."""
    g = pid * 0
    for t in range(1, num_groups):
        g += (pid >= tl.load(meta_ptr + t * NF + START)).to(tl.int32)
    return meta_ptr + g.to(tl.int64) * NF


@triton.jit
def _positions(t, ar, HW, nsb, R, SP_INNER: tl.constexpr, HAS_SPATIAL: tl.constexpr, BLOCK_R: tl.constexpr):
    """Step t of the reduction loop -> (batch index b, spatial index sp, valid lanes)."""
    if SP_INNER:
        b = t // nsb
        sp = (t - b * nsb) * BLOCK_R + ar
        valid = sp < HW
    else:
        r = t * BLOCK_R + ar
        valid = r < R
        if HAS_SPATIAL:
            b = r // HW
            sp = r - b * HW
        else:
            b = r
            sp = r * 0
    return b, sp, valid


@triton.jit
def _offsets(b, sp, cl, sb, sc, ss, SP_INNER: tl.constexpr, HAS_SPATIAL: tl.constexpr, C_UNIT: tl.constexpr):
    """int64 element offsets [BLOCK_C, BLOCK_R] of channels cl at positions (b, sp) for strides (sb, sc, ss)."""
    if SP_INNER:
        r_off = b.to(tl.int64) * sb + sp.to(tl.int64)
    elif HAS_SPATIAL:
        r_off = b.to(tl.int64) * sb + sp.to(tl.int64) * ss
    else:
        r_off = b.to(tl.int64) * sb
    if C_UNIT:
        c_off = cl.to(tl.int64)
    else:
        c_off = cl.to(tl.int64) * sc
    return c_off[:, None] + r_off[None, :]


@triton.jit
def _hint_strides(sb, sc, ss, VEC: tl.constexpr, SP_INNER: tl.constexpr, HAS_SPATIAL: tl.constexpr,
                  C_UNIT: tl.constexpr):  # fmt: skip
    """The strides ``_offsets`` multiplies by, promised to be multiples of VEC (``_vec`` checked them)."""
    sb = tl.multiple_of(sb, VEC)
    if not C_UNIT:
        sc = tl.multiple_of(sc, VEC)
    if HAS_SPATIAL and not SP_INNER:
        ss = tl.multiple_of(ss, VEC)
    return sb, sc, ss


@triton.jit
def _multi_subnet_batch_norm_fwd_kernel(
    meta_ptr, num_groups, x0_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IDX: tl.constexpr, TRAINING: tl.constexpr,
    RELU: tl.constexpr, SP_INNER: tl.constexpr, HAS_SPATIAL: tl.constexpr, C_UNIT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, NF: tl.constexpr, VEC: tl.constexpr = 1,
):  # fmt: skip
    """``VEC`` > 1: activation pointers 16-byte aligned, the strides used and the unit-stride axis's extent
    (C with C_UNIT, H*W with SP_INNER) multiples of VEC: hints for 16-byte accesses (``_vec``)."""
    pid = tl.program_id(0)
    row = _find_group(meta_ptr, num_groups, pid, NF, 14)
    dtype = x0_ptr.dtype.element_ty
    x_ptr = tl.load(row + 0).to(tl.pointer_type(dtype))
    y_ptr = tl.load(row + 1).to(tl.pointer_type(dtype))
    mean_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    invstd_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    B = tl.load(row + 5).to(tl.int32)
    C = tl.load(row + 6)
    HW = tl.load(row + 7).to(tl.int32)
    sxb, sxc, sxs = tl.load(row + 8), tl.load(row + 9), tl.load(row + 10)
    syb, syc, sys_ = tl.load(row + 11), tl.load(row + 12), tl.load(row + 13)
    blk = pid - tl.load(row + 14)
    if VEC > 1:
        x_ptr = tl.multiple_of(x_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        sxb, sxc, sxs = _hint_strides(sxb, sxc, sxs, VEC, SP_INNER, HAS_SPATIAL, C_UNIT)
        syb, syc, sys_ = _hint_strides(syb, syc, sys_, VEC, SP_INNER, HAS_SPATIAL, C_UNIT)
        if C_UNIT:
            C = tl.multiple_of(C, VEC)
        if SP_INNER:
            HW = tl.multiple_of(HW, VEC)

    cl = blk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cl < C
    if HAS_IDX:
        idx_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int64))
        ch = tl.load(idx_ptr + cl, mask=cmask, other=0)
    else:
        ch = cl
    ar = tl.arange(0, BLOCK_R)
    R = B * HW
    nsb = tl.cdiv(HW, BLOCK_R)
    if SP_INNER:
        steps = B * nsb
    else:
        steps = tl.cdiv(R, BLOCK_R)

    if TRAINING:
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for t in range(0, steps):
            b, sp, valid = _positions(t, ar, HW, nsb, R, SP_INNER, HAS_SPATIAL, BLOCK_R)
            m = cmask[:, None] & valid[None, :]
            offs = _offsets(b, sp, cl, sxb, sxc, sxs, SP_INNER, HAS_SPATIAL, C_UNIT)
            acc += tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        count = tl.maximum(R, 1).to(tl.float32)
        mean = tl.sum(acc, axis=1) / count
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for t in range(0, steps):
            b, sp, valid = _positions(t, ar, HW, nsb, R, SP_INNER, HAS_SPATIAL, BLOCK_R)
            m = cmask[:, None] & valid[None, :]
            offs = _offsets(b, sp, cl, sxb, sxc, sxs, SP_INNER, HAS_SPATIAL, C_UNIT)
            d = tl.where(m, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - mean[:, None], 0.0)
            acc += d * d
        var = tl.sum(acc, axis=1) / count
    else:
        mean = tl.load(rm_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    invstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(mean_ptr + cl, mean, mask=cmask)
    tl.store(invstd_ptr + cl, invstd, mask=cmask)

    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(0, steps):
        b, sp, valid = _positions(t, ar, HW, nsb, R, SP_INNER, HAS_SPATIAL, BLOCK_R)
        m = cmask[:, None] & valid[None, :]
        xv = tl.load(x_ptr + _offsets(b, sp, cl, sxb, sxc, sxs, SP_INNER, HAS_SPATIAL, C_UNIT), mask=m, other=0.0)
        y = (xv.to(tl.float32) - mean[:, None]) * scale[:, None] + shift[:, None]
        if RELU:
            y = tl.maximum(y, 0.0)
        offs = _offsets(b, sp, cl, syb, syc, sys_, SP_INNER, HAS_SPATIAL, C_UNIT)
        tl.store(y_ptr + offs, y.to(dtype), mask=m)


@triton.jit
def _multi_subnet_batch_norm_bwd_kernel(
    meta_ptr, num_groups, x0_ptr, w_ptr, b_ptr, ws_ptr, ws_stride,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IDX: tl.constexpr, TRAINING: tl.constexpr,
    RELU: tl.constexpr, NEED_X: tl.constexpr, NEED_SUMS: tl.constexpr, STORE_SUMS: tl.constexpr,
    SP_INNER: tl.constexpr, HAS_SPATIAL: tl.constexpr, C_UNIT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, NF: tl.constexpr, VEC: tl.constexpr = 1,
):  # fmt: skip
    """``VEC``: as in the forward kernel (x, dy and dx)."""
    pid = tl.program_id(0)
    row = _find_group(meta_ptr, num_groups, pid, NF, 19)
    dtype = x0_ptr.dtype.element_ty
    x_ptr = tl.load(row + 0).to(tl.pointer_type(dtype))
    dy_ptr = tl.load(row + 1).to(tl.pointer_type(dtype))
    dx_ptr = tl.load(row + 2).to(tl.pointer_type(dtype))
    mean_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    invstd_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    B = tl.load(row + 6).to(tl.int32)
    C = tl.load(row + 7)
    HW = tl.load(row + 8).to(tl.int32)
    sxb, sxc, sxs = tl.load(row + 9), tl.load(row + 10), tl.load(row + 11)
    sgb, sgc, sgs = tl.load(row + 12), tl.load(row + 13), tl.load(row + 14)
    sdb, sdc, sds = tl.load(row + 15), tl.load(row + 16), tl.load(row + 17)
    ws_row = tl.load(row + 18)
    blk = pid - tl.load(row + 19)
    if VEC > 1:
        x_ptr = tl.multiple_of(x_ptr, 16)
        dy_ptr = tl.multiple_of(dy_ptr, 16)
        dx_ptr = tl.multiple_of(dx_ptr, 16)
        sxb, sxc, sxs = _hint_strides(sxb, sxc, sxs, VEC, SP_INNER, HAS_SPATIAL, C_UNIT)
        sgb, sgc, sgs = _hint_strides(sgb, sgc, sgs, VEC, SP_INNER, HAS_SPATIAL, C_UNIT)
        sdb, sdc, sds = _hint_strides(sdb, sdc, sds, VEC, SP_INNER, HAS_SPATIAL, C_UNIT)
        if C_UNIT:
            C = tl.multiple_of(C, VEC)
        if SP_INNER:
            HW = tl.multiple_of(HW, VEC)

    cl = blk * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cl < C
    if HAS_IDX:
        idx_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int64))
        ch = tl.load(idx_ptr + cl, mask=cmask, other=0)
    else:
        ch = cl
    mean = tl.load(mean_ptr + cl, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cl, mask=cmask, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + ch, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full((BLOCK_C,), 1.0, dtype=tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    ar = tl.arange(0, BLOCK_R)
    R = B * HW
    nsb = tl.cdiv(HW, BLOCK_R)
    if SP_INNER:
        steps = B * nsb
    else:
        steps = tl.cdiv(R, BLOCK_R)

    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if NEED_SUMS:
        acc_g = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for t in range(0, steps):
            b, sp, valid = _positions(t, ar, HW, nsb, R, SP_INNER, HAS_SPATIAL, BLOCK_R)
            m = cmask[:, None] & valid[None, :]
            xv = tl.load(x_ptr + _offsets(b, sp, cl, sxb, sxc, sxs, SP_INNER, HAS_SPATIAL, C_UNIT), mask=m, other=0.0)
            g = tl.load(dy_ptr + _offsets(b, sp, cl, sgb, sgc, sgs, SP_INNER, HAS_SPATIAL, C_UNIT), mask=m, other=0.0)
            g = g.to(tl.float32)
            xhat = (xv.to(tl.float32) - mean[:, None]) * invstd[:, None]
            if RELU:
                g = tl.where(xhat * w[:, None] + bias[:, None] > 0.0, g, 0.0)
            acc_g += g
            acc_gx += tl.where(m, g * xhat, 0.0)
        sum_g = tl.sum(acc_g, axis=1)
        sum_gx = tl.sum(acc_gx, axis=1)
        if STORE_SUMS:  # per-(subnet, channel) partials of grad_weight / grad_bias at the full channel index
            tl.store(ws_ptr + ws_row + ch, sum_gx, mask=cmask)
            tl.store(ws_ptr + ws_stride + ws_row + ch, sum_g, mask=cmask)

    if NEED_X:
        count = tl.maximum(R, 1).to(tl.float32)
        scale = w * invstd
        mean_g = sum_g / count
        mean_gx = sum_gx / count
        for t in range(0, steps):
            b, sp, valid = _positions(t, ar, HW, nsb, R, SP_INNER, HAS_SPATIAL, BLOCK_R)
            m = cmask[:, None] & valid[None, :]
            g = tl.load(dy_ptr + _offsets(b, sp, cl, sgb, sgc, sgs, SP_INNER, HAS_SPATIAL, C_UNIT), mask=m, other=0.0)
            g = g.to(tl.float32)
            if RELU or TRAINING:
                xv = tl.load(
                    x_ptr + _offsets(b, sp, cl, sxb, sxc, sxs, SP_INNER, HAS_SPATIAL, C_UNIT), mask=m, other=0.0
                )
                xhat = (xv.to(tl.float32) - mean[:, None]) * invstd[:, None]
                if RELU:
                    g = tl.where(xhat * w[:, None] + bias[:, None] > 0.0, g, 0.0)
                if TRAINING:
                    g = g - mean_g[:, None] - xhat * mean_gx[:, None]
            dx = g * scale[:, None]
            offs = _offsets(b, sp, cl, sdb, sdc, sds, SP_INNER, HAS_SPATIAL, C_UNIT)
            tl.store(dx_ptr + offs, dx.to(dtype), mask=m)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _like(x: Tensor) -> Tensor:
    """Output/grad buffer for x: channels-last when x is, else contiguous."""
    if _is_channels_last(x):
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _collapse(x: Tensor) -> tuple[Tensor, int, tuple[int, int, int]]:
    """(x or a contiguous copy, H*W, strides (batch, channel, spatial)) with (h, w) as ONE strided axis."""
    if x.dim() == 2:
        return x, 1, (x.stride(0), x.stride(1), 0)
    if x.dim() != 4:
        raise ValueError(f"multi_subnet_batch_norm: inputs must be 2-D or 4-D, got {x.dim()}-D")
    h, w = x.shape[2], x.shape[3]
    if h > 1 and w > 1 and x.stride(2) != w * x.stride(3):
        x = x.contiguous()
    ss = x.stride(3) if w > 1 else x.stride(2)
    return x, h * w, (x.stride(0), x.stride(1), ss)


def _layout_flags(items: list[tuple[int, tuple[tuple[int, int, int], ...]]]) -> tuple[bool, bool, bool]:
    """(SP_INNER, HAS_SPATIAL, C_UNIT) valid for every (HW, stride triples) of the launch.

    SP_INNER (loop over (b, spatial block), no division) only pays when a spatial plane fills a good
    part of a tile: from H*W >= 256 (CIFAR 16x16 and 32x32); smaller planes use the flattened loop.
    """
    max_hw = max(hw for hw, _ in items)
    has_spatial = max_hw > 1
    unit = all(all(st[2] == 1 for st in sts) for _, sts in items)
    sp_inner = has_spatial and unit and (max_hw >= 256 or _interpreted())
    c_unit = all(all(st[1] == 1 for st in sts) for _, sts in items)
    return sp_inner, has_spatial, c_unit


def _vec(tensors: list[Tensor], items, widths: list[int], flags: tuple[bool, bool, bool]) -> int:
    """VEC of a launch (see the kernels): pointers, the strides ``_offsets`` uses and the unit axis's extent."""
    sp_inner, has_spatial, c_unit = flags
    strides = []
    for hw, sts in items:
        for sb, sc, ss in sts:
            strides.append(sb)
            if not c_unit:
                strides.append(sc)
            if has_spatial and not sp_inner:
                strides.append(ss)
        if sp_inner:
            strides.append(hw)
    if c_unit:
        strides += widths
    return vec([t.data_ptr() for t in tensors], strides, tensors[0].element_size())


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _blocks(
    widths: list[int], max_hw: int, sp_inner: bool, c_unit: bool, elsize: int, device: torch.device
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_R, num_warps): the contiguous axis gets the long side of the tile.

    GPU: ~2048-element tiles and BLOCK_C small enough for ~2 programs per SM (one program per channel
    block streams the channel's whole batch), but >= one 32-byte sector of channels when channels are
    the contiguous axis.  Interpreter: 8192-element tiles and as few programs as possible.
    """
    cpow = triton.next_power_of_2(max(max(widths), 1))
    if _interpreted():
        block_r = max(16, min(4096, triton.next_power_of_2(max(max_hw, 1)))) if sp_inner else 64
        block_c = max(2, min(cpow, 8192 // block_r))
        return block_c, block_r, 4
    per_prog = _pow2_floor(sum(widths) // (2 * _num_sms(device)))
    if sp_inner:
        block_r = min(1024, triton.next_power_of_2(max_hw))
        block_c = min(per_prog, 2048 // block_r)
    elif c_unit:
        block_c = max(32 // elsize, min(per_prog, 64))
    else:
        block_c = min(per_prog, 16)
    block_c = max(1, min(block_c, cpow))
    if not sp_inner:
        block_r = max(16, 2048 // block_c)
    return block_c, block_r, 8 if block_c * block_r >= 4096 else 4


def _schedule(counts: list[tuple[int, int]], block_c: int) -> tuple[list[int], list[int], int]:
    """Order (largest reduction first) and first program of each subnet; counts = (c_s, R_s)."""
    order = sorted((s for s, (c, _) in enumerate(counts) if c > 0), key=lambda s: -counts[s][1])
    starts, start = [], 0
    for s in order:
        starts.append(start)
        start += triton.cdiv(counts[s][0], block_c)
    return order, starts, start


def _index_tensor(indices: list[Tensor] | None, s: int) -> Tensor | None:
    if indices is None or indices[s] is None:
        return None
    return indices[s].to(torch.int64).contiguous()


def _uniform_indices(indices: list[Tensor] | None, widths: list[int], device: torch.device) -> list[Tensor] | None:
    """None when every subnet is a prefix, else S index tensors (an arange for a None entry)."""
    if indices is None or all(i is None for i in indices):
        return None
    return [_index_tensor(indices, s) if indices[s] is not None else torch.arange(widths[s], device=device)
            for s in range(len(widths))]  # fmt: skip


def multi_subnet_batch_norm_fwd_triton(
    xs: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    indices: list[Tensor] | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """BatchNorm (+ReLU) of every subnet in one launch.

    Args:
        xs: S tensors [B_s, c_s] or [B_s, c_s, H, W] (any strides), float32/float16/bfloat16.
        weight, bias: (C,) or None (affine off).  running_mean/running_var: (C,), read in eval mode only.
        indices: None (prefixes) or S sorted unique int64 channel lists (len c_s).
    Returns:
        (ys like xs (channels-last when x is, else contiguous), means, invstds): fp32 (c_s,) per subnet,
        the batch statistics in training, the running ones used in eval.  Nothing is mutated.
    """
    device = xs[0].device
    if not training and (running_mean is None or running_var is None):
        raise ValueError("multi_subnet_batch_norm: eval mode needs running_mean and running_var")
    widths = [x.shape[1] for x in xs]
    indices = _uniform_indices(indices, widths, device)
    ys, means, invstds, items, cols = [], [], [], [], []
    for s, x in enumerate(xs):
        y = _like(x)
        xc, hw, sx = _collapse(x)
        _, _, sy = _collapse(y)
        ys.append(y)
        means.append(torch.empty(widths[s], dtype=torch.float32, device=device))
        invstds.append(torch.empty(widths[s], dtype=torch.float32, device=device))
        items.append((hw, (sx, sy)))
        cols.append((xc, y, hw, sx, sy))
    live = [s for s in range(len(xs)) if widths[s] > 0]
    if not live:
        return ys, means, invstds
    sp_inner, has_spatial, c_unit = _layout_flags([items[s] for s in live])
    block_c, block_r, num_warps = _blocks(
        [widths[s] for s in live], max(items[s][0] for s in live), sp_inner, c_unit, xs[0].element_size(), device
    )
    order, starts, grid = _schedule([(widths[s], xs[s].shape[0] * items[s][0]) for s in range(len(xs))], block_c)
    rows = []
    for s, start in zip(order, starts):
        xc, y, hw, sx, sy = cols[s]
        assert xc.shape[0] * hw < 2**31, "multi_subnet_batch_norm: B * H * W must be < 2**31 per subnet"
        idx = indices[s].data_ptr() if indices is not None else 0
        rows.append([xc.data_ptr(), y.data_ptr(), means[s].data_ptr(), invstds[s].data_ptr(), idx,
                     xc.shape[0], widths[s], hw, *sx, *sy, start])  # fmt: skip
    meta = device_table(rows, device)
    flags = (sp_inner, has_spatial, c_unit)
    v = _vec([t for s in live for t in cols[s][:2]], [items[s] for s in live], [widths[s] for s in live], flags)
    dummy = xs[0]
    _multi_subnet_batch_norm_fwd_kernel[(grid,)](
        meta, len(rows), xs[0],
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if running_mean is not None else dummy, running_var if running_var is not None else dummy,
        float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_IDX=indices is not None, TRAINING=bool(training),
        RELU=bool(relu), SP_INNER=sp_inner, HAS_SPATIAL=has_spatial, C_UNIT=c_unit,
        BLOCK_C=block_c, BLOCK_R=block_r, NF=_FWD_FIELDS, VEC=v, num_warps=num_warps,
    )  # fmt: skip
    return ys, means, invstds


def multi_subnet_batch_norm_bwd_triton(
    grads: list[Tensor],
    xs: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    means: list[Tensor],
    invstds: list[Tensor],
    indices: list[Tensor] | None,
    training: bool,
    relu: bool,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[list[Tensor] | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`multi_subnet_batch_norm_fwd_triton` (one launch + a fixed-order sum over S).

    Args:
        grads: S tensors shaped like xs (any strides); means/invstds: the fp32 (c_s,) statistics of the
            forward; weight/bias: (C,) or None (bias is needed to recompute the ReLU mask).
    Returns:
        (S grad_x like xs | None, grad_weight (C,) | None, grad_bias (C,) | None); grad_weight and
        grad_bias sum the subnets and are exactly zero at channels no subnet uses.
    """
    device = xs[0].device
    widths = [x.shape[1] for x in xs]
    indices = _uniform_indices(indices, widths, device)
    store_sums = need_weight or need_bias
    need_sums = store_sums or (need_x and training)
    C = 0
    for t in (weight, bias):
        if t is not None:
            C = t.shape[0]
    if store_sums and (weight if need_weight else bias) is None:
        raise ValueError("multi_subnet_batch_norm: grad_weight/grad_bias asked for but weight/bias is None")
    S = len(xs)
    # Zeroed: channels that no subnet uses keep exact zeros.
    ws = torch.zeros(2, S, C, dtype=torch.float32, device=device) if store_sums else None
    gxs = [_like(x) for x in xs] if need_x else None
    items, cols = [], []
    for s, x in enumerate(xs):
        xc, hw, sx = _collapse(x)
        gc, _, sg = _collapse(grads[s])
        dx = gxs[s] if gxs is not None else xc
        _, _, sd = _collapse(dx)
        items.append((hw, (sx, sg, sd)))
        cols.append((xc, gc, dx, hw, sx, sg, sd))
    live = [s for s in range(S) if widths[s] > 0]
    if live and (need_x or need_sums):
        sp_inner, has_spatial, c_unit = _layout_flags([items[s] for s in live])
        block_c, block_r, num_warps = _blocks(
            [widths[s] for s in live], max(items[s][0] for s in live), sp_inner, c_unit, xs[0].element_size(), device
        )
        order, starts, grid = _schedule([(widths[s], xs[s].shape[0] * items[s][0]) for s in range(S)], block_c)
        rows = []
        for s, start in zip(order, starts):
            xc, gc, dx, hw, sx, sg, sd = cols[s]
            assert xc.shape[0] * hw < 2**31, "multi_subnet_batch_norm: B * H * W must be < 2**31 per subnet"
            idx = indices[s].data_ptr() if indices is not None else 0
            rows.append([xc.data_ptr(), gc.data_ptr(), dx.data_ptr(), means[s].data_ptr(), invstds[s].data_ptr(),
                         idx, xc.shape[0], widths[s], hw, *sx, *sg, *sd, s * C, start])  # fmt: skip
        meta = device_table(rows, device)
        flags = (sp_inner, has_spatial, c_unit)
        v = _vec([t for s in live for t in cols[s][:3]], [items[s] for s in live], [widths[s] for s in live], flags)
        dummy = xs[0]
        _multi_subnet_batch_norm_bwd_kernel[(grid,)](
            meta, len(rows), xs[0],
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            ws if ws is not None else means[0], S * C if ws is not None else 0,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_IDX=indices is not None,
            TRAINING=bool(training), RELU=bool(relu), NEED_X=bool(need_x), NEED_SUMS=need_sums, STORE_SUMS=store_sums,
            SP_INNER=sp_inner, HAS_SPATIAL=has_spatial, C_UNIT=c_unit,
            BLOCK_C=block_c, BLOCK_R=block_r, NF=_BWD_FIELDS, VEC=v, num_warps=num_warps,
        )  # fmt: skip
    gw = gb = None
    if need_weight or need_bias:
        # Fixed-order reductions over the subnets; two separate tensors (custom-op outputs may not alias).
        gw = ws[0].sum(0).to(weight.dtype) if need_weight else None  # fp32 parameters of 16-bit inputs stay fp32
        gb = ws[1].sum(0).to(bias.dtype) if need_bias else None
    return gxs, gw, gb
