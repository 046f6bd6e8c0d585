"""Kernel-level tests of the Triton conv launchers (masked_conv2d, multi_subnet_conv2d).

The launchers are called directly and compared with a float64 ``F.conv2d`` reference on the sliced
weight (autograd for the gradients) under the error rule of ``stp_fast.testing`` (at most 2x the
error of the same-dtype PyTorch conv).  Without a GPU they run in the Triton interpreter, so every
shape is tiny (B <= 2, H, W <= 7, channels <= 20).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: its spinning threads slow the interpreter

import torch

if not torch.cuda.is_available():  # must be set before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import subprocess
import sys

import pytest
import torch.nn.functional as F
from stp_fast.kernels.masked_conv2d import (
    ConvGeometry,
    SubnetConv,
    grouped_conv_grad_weight,
    masked_conv2d_bwd_triton,
    masked_conv2d_fwd_triton,
)
from stp_fast.kernels.multi_subnet_conv2d import (
    multi_subnet_conv2d_bwd_triton,
    multi_subnet_conv2d_fwd_triton,
)

from stp_fast.testing import assert_gemm_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Case:
    """A convolution problem: ``subnets`` is a list of (B_s, k_s, n_s); one weight [c_out, c_in/groups, kh, kw]."""

    subnets: list[tuple[int, int, int]]
    c_in: int
    c_out: int
    ksize: tuple[int, int] = (3, 3)
    hw: tuple[int, int] = (5, 5)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1  # a plain grouped conv (full widths)
    depthwise: bool = False  # W [c_out, 1, kh, kw]; groups passed = k (masked) or c_out (multi-subnet)
    in_index: bool = False
    out_index: bool = False
    bias: bool = True
    layout: str = "nchw"  # nchw | cl (channels-last) | view (non-contiguous x and grad) | expand (grad stride 0)
    weight_cl: bool = False  # a channels-last weight, as after model.to(memory_format=torch.channels_last)
    dtype: torch.dtype = torch.float32


def _subset(full: int, active: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(full, generator=gen)[:active].sort().values


def _layout(t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "expand":  # what .sum().backward() hands over: one value broadcast everywhere
        return t.contiguous() if t.dim() == 0 else t.flatten()[:1].reshape(1, 1, 1, 1).expand(t.shape)
    if layout == "view":  # every other channel of a wider buffer, cropped spatially
        b, c, h, w = t.shape
        buf = torch.randn(b, 2 * c, h, w + 1, generator=gen, dtype=torch.float64).to(t.dtype)
        view = buf[:, ::2, :, :w]
        view.copy_(t)
        return view
    return t.contiguous()


def _make_inputs(case: Case, seed: int = 0):
    """Weight, bias, per-subnet (x, grad, in_idx, out_idx), all in case.dtype with case.layout."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = case.ksize
    dt = case.dtype
    weight = torch.randn(
        case.c_out, 1 if case.depthwise else case.c_in // case.groups, kh, kw, generator=gen, dtype=torch.float64
    ).to(dt)
    if case.weight_cl:
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(case.c_out, generator=gen, dtype=torch.float64).to(dt) if case.bias else None
    geom = ConvGeometry.of(weight, *case.hw, case.stride, case.padding, case.dilation)
    subs = []
    for b, k, n in case.subnets:
        in_idx = _subset(case.c_in, k, gen) if case.in_index else None
        out_idx = _subset(case.c_out, n, gen) if case.out_index else None
        if case.depthwise:
            in_idx = out_idx
        x_layout = "nchw" if case.layout == "expand" else case.layout
        x = _layout(torch.randn(b, k, *case.hw, generator=gen, dtype=torch.float64).to(dt), x_layout, gen)
        g = _layout(torch.randn(b, n, geom.oh, geom.ow, generator=gen, dtype=torch.float64).to(dt), case.layout, gen)
        subs.append((x, g, in_idx, out_idx))
    return weight, bias, subs


def _ref(case: Case, weight, bias, subs, dtype, device: str = "cpu"):
    """PyTorch conv per subnet in ``dtype`` on ``device``: outputs and (grad xs, summed grad W, summed grad bias).

    The same-dtype baseline runs on the kernels' device, so on a GPU it uses cuDNN under the same TF32
    setting as the Triton kernels (``torch.backends.cudnn.allow_tf32``); results come back on the CPU.
    """
    w = weight.detach().to(device, dtype).requires_grad_(True)
    b = bias.detach().to(device, dtype).requires_grad_(True) if bias is not None else None
    xs, ys, loss = [], [], 0
    for (x, g, in_idx, out_idx), (_, k, n) in zip(subs, case.subnets):
        xr = x.detach().to(device, dtype).requires_grad_(True)
        g = g.to(device)
        in_idx, out_idx = (None if i is None else i.to(device) for i in (in_idx, out_idx))
        rows = out_idx if out_idx is not None else torch.arange(n, device=device)
        if case.depthwise:
            ws, groups = w[rows], k
        elif case.groups == 1:
            cols = in_idx if in_idx is not None else torch.arange(k, device=device)
            ws, groups = w[rows][:, cols], 1
        else:
            ws, groups = w, case.groups
        bs = b[rows] if b is not None else None
        if k == 0 or n == 0:  # F.conv2d rejects empty weights: the output is the bias (or zero)
            oh, ow = g.shape[2], g.shape[3]
            y = xr.new_zeros(xr.shape[0], n, oh, ow) + (0 if bs is None else bs.view(1, -1, 1, 1))
        else:
            y = F.conv2d(xr, ws, bs, case.stride, case.padding, case.dilation, groups)
        loss = loss + (y * g.to(dtype)).sum()
        xs.append(xr)
        ys.append(y.detach().cpu())
    if torch.is_tensor(loss) and loss.requires_grad:
        loss.backward()
    gxs = [(x.grad if x.grad is not None else torch.zeros_like(x)).cpu() for x in xs]
    gw = (w.grad if w.grad is not None else torch.zeros_like(w)).cpu()
    gb = None if b is None else (b.grad if b.grad is not None else torch.zeros_like(b)).cpu()
    return ys, gxs, gw, gb


def _run_triton(case: Case, weight, bias, subs, multi: bool):
    dev = lambda t: None if t is None else t.to(DEVICE)
    w, b = dev(weight), dev(bias)
    if not multi:
        (x, g, in_idx, out_idx), (_, k, n) = subs[0], case.subnets[0]
        args = (case.stride, case.padding, case.dilation, k if case.depthwise else case.groups)
        y = masked_conv2d_fwd_triton(dev(x), w, b, dev(in_idx), dev(out_idx), n, *args)
        gx, gw, gb = masked_conv2d_bwd_triton(dev(g), dev(x), w, dev(in_idx), dev(out_idx), n, *args, True, True,
                                              bias is not None)  # fmt: skip
        return [y], [gx], gw, gb
    args = (case.stride, case.padding, case.dilation, case.c_out if case.depthwise else case.groups)
    xs = [dev(s[0]) for s in subs]
    in_idx = [dev(s[2]) for s in subs] if subs[0][2] is not None else None
    out_idx = [dev(s[3]) for s in subs] if subs[0][3] is not None else None
    widths = [n for _, _, n in case.subnets]
    ys = multi_subnet_conv2d_fwd_triton(xs, w, b, widths, in_idx, out_idx, *args)
    gxs, gw, gb = multi_subnet_conv2d_bwd_triton([dev(s[1]) for s in subs], xs, w, widths, in_idx, out_idx, *args,
                                                 True, True, bias is not None)  # fmt: skip
    return ys, gxs, gw, gb


def _union_mask(case: Case, weight, subs) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks of the W entries and bias entries that some subnet reads."""
    wm = torch.zeros(weight.shape, dtype=torch.bool)
    bm = torch.zeros(weight.shape[0], dtype=torch.bool)
    for (_, _, in_idx, out_idx), (_, k, n) in zip(subs, case.subnets):
        rows = out_idx if out_idx is not None else torch.arange(n)
        if case.groups == 1 and not case.depthwise:
            cols = in_idx if in_idx is not None else torch.arange(k)
            wm[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        else:
            wm[rows] = True
        bm[rows] = True
    return wm, bm


def _expected_layout(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def check_case(case: Case, multi: bool = True, seed: int = 0) -> None:
    weight, bias, subs = _make_inputs(case, seed)
    oracle = _ref(case, weight.double(), None if bias is None else bias.double(), subs, torch.float64)
    base = _ref(case, weight, bias, subs, case.dtype, DEVICE)
    ys, gxs, gw, gb = _run_triton(case, weight, bias, subs, multi)
    for s, (x, *_rest) in enumerate(subs):
        assert ys[s].dtype == case.dtype
        assert _expected_layout(ys[s]) == _expected_layout(x), f"y[{s}] layout"
        assert _expected_layout(gxs[s]) == _expected_layout(x), f"grad_x[{s}] layout"
        assert_gemm_close(ys[s].cpu(), base[0][s], oracle[0][s], name=f"y[{s}]")
        assert_gemm_close(gxs[s].cpu(), base[1][s], oracle[1][s], name=f"grad_x[{s}]")
    gw = gw.cpu()
    assert gw.shape == weight.shape
    assert_gemm_close(gw, base[2], oracle[2], name="grad_weight")
    wm, bm = _union_mask(case, weight, subs)
    assert (gw[~wm] == 0).all(), "grad_weight must be exactly zero outside the active blocks"
    if bias is not None:
        assert_gemm_close(gb.cpu(), base[3], oracle[3], name="grad_bias")
        assert (gb.cpu()[~bm] == 0).all(), "grad_bias must be exactly zero outside the active rows"


# ----------------------------------------------------------------------------------------------
# masked_conv2d (one subnet)
# ----------------------------------------------------------------------------------------------

MASKED_CASES = {
    "1x1_prefix": Case([(2, 5, 7)], 8, 9, ksize=(1, 1), hw=(4, 3)),
    "3x3_pad_index_cl": Case(
        [(2, 5, 6)], 9, 10, padding=(1, 1), in_index=True, out_index=True, layout="cl", weight_cl=True
    ),
    "3x3_grad_expanded": Case([(2, 4, 5)], 6, 7, hw=(4, 4), padding=(1, 1), layout="expand"),
    "5x5_stride2_odd": Case([(2, 3, 5)], 7, 11, ksize=(5, 5), hw=(7, 7), stride=(2, 2), padding=(2, 2), in_index=True),
    "3x3_dilation2_batch1": Case([(1, 7, 4)], 7, 9, hw=(7, 6), padding=(2, 1), dilation=(2, 2), out_index=True),
    "3x3_stride2_view": Case(
        [(2, 6, 5)], 8, 8, hw=(7, 7), stride=(2, 2), padding=(1, 1), layout="view", in_index=True, out_index=True
    ),
    "full_asym_nobias": Case([(2, 6, 7)], 6, 7, ksize=(3, 2), hw=(6, 5), stride=(2, 1), padding=(1, 0), bias=False),
    "depthwise_prefix": Case([(2, 7, 7)], 12, 12, padding=(1, 1), depthwise=True),
    "depthwise_index_cl_stride2": Case(
        [(2, 6, 6)], 10, 10, hw=(7, 7), stride=(2, 2), padding=(1, 1), depthwise=True, out_index=True, layout="cl"
    ),
    "groups2_full": Case([(2, 6, 8)], 6, 8, padding=(1, 1), groups=2),
    "empty_batch": Case([(0, 4, 5)], 6, 6, padding=(1, 1), in_index=True),
    "zero_in_channels": Case([(2, 0, 5)], 6, 6, padding=(1, 1)),
    "zero_out_channels": Case([(2, 4, 0)], 6, 6, out_index=True),
    "fp16_index": Case([(2, 5, 6)], 9, 10, padding=(1, 1), in_index=True, out_index=True, dtype=torch.float16),
    "bf16_cl": Case([(2, 6, 5)], 8, 8, padding=(1, 1), layout="cl", dtype=torch.bfloat16),
    "bf16_depthwise": Case([(2, 8, 8)], 8, 8, padding=(1, 1), depthwise=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(MASKED_CASES))
def test_masked_conv2d(name: str) -> None:
    check_case(MASKED_CASES[name], multi=False)


def test_masked_conv2d_grads_not_asked() -> None:
    case = MASKED_CASES["1x1_prefix"]
    weight, _, subs = _make_inputs(case)
    x, g, _, _ = subs[0]
    out = masked_conv2d_bwd_triton(g, x, weight, None, None, 7, (1, 1), (0, 0), (1, 1), 1, False, False, False)
    assert out == (None, None, None)


def test_masked_conv2d_grouped_with_index_is_not_implemented() -> None:
    x = torch.randn(1, 4, 5, 5)
    weight = torch.randn(8, 2, 3, 3)
    with pytest.raises(NotImplementedError, match="groups=2"):
        masked_conv2d_fwd_triton(x, weight, None, torch.arange(4), None, 8, (1, 1), (0, 0), (1, 1), 2)


# ----------------------------------------------------------------------------------------------
# multi_subnet_conv2d
# ----------------------------------------------------------------------------------------------

MULTI_CASES = {
    "s1_prefix": Case([(2, 6, 5)], 8, 8, padding=(1, 1)),
    "s2_index": Case([(2, 5, 6), (1, 8, 3)], 10, 9, padding=(1, 1), in_index=True, out_index=True),
    "s3_prefix_equal_widths": Case([(2, 4, 6), (2, 4, 6), (1, 7, 9)], 8, 9, ksize=(1, 1)),
    "s4_index_full_width_batches": Case(
        [(2, 12, 16), (1, 6, 5), (2, 9, 11), (1, 3, 2)],
        12,
        16,
        hw=(6, 6),
        stride=(2, 2),
        padding=(1, 1),
        in_index=True,
        out_index=True,
    ),
    "s5_prefix_cl_any_order": Case(
        [(1, 5, 9), (2, 10, 20), (1, 2, 4), (2, 7, 13), (1, 10, 20)], 10, 20, padding=(1, 1), layout="cl"
    ),
    "s6_5x5_dilation": Case(
        [(1, 3, 4), (1, 6, 7), (2, 2, 3), (1, 6, 8), (1, 5, 2), (1, 1, 1)],
        6,
        8,
        ksize=(5, 5),
        hw=(7, 7),
        padding=(2, 2),
        dilation=(1, 2),
        in_index=True,
    ),
    "s3_view_out_index": Case(
        [(2, 5, 4), (1, 3, 7), (2, 5, 7)], 5, 9, stride=(2, 2), padding=(1, 1), out_index=True, layout="view"
    ),
    "s3_empty_batch_zero_width": Case([(2, 4, 5), (0, 6, 6), (1, 0, 3)], 6, 6, padding=(1, 1)),
    "depthwise_prefix": Case([(2, 8, 8), (1, 4, 4), (2, 12, 12)], 12, 12, padding=(1, 1), depthwise=True),
    "depthwise_index_stride2": Case(
        [(2, 5, 5), (1, 9, 9)],
        10,
        10,
        hw=(7, 7),
        stride=(2, 2),
        padding=(1, 1),
        depthwise=True,
        out_index=True,
        layout="cl",
    ),
    "fp16_s3_index": Case(
        [(2, 6, 7), (1, 9, 4), (2, 3, 9)], 9, 9, padding=(1, 1), in_index=True, out_index=True, dtype=torch.float16
    ),
    "bf16_s2_prefix": Case([(2, 8, 6), (1, 4, 8)], 8, 8, padding=(1, 1), dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(MULTI_CASES))
def test_multi_subnet_conv2d(name: str) -> None:
    check_case(MULTI_CASES[name], multi=True)


def test_multi_subnet_conv2d_grad_weight_deterministic() -> None:
    """grad W is bitwise identical across runs, through the launcher and with a forced split-K."""
    case = Case([(2, 7, 9), (1, 3, 5), (2, 9, 4)], 9, 10, padding=(1, 1), in_index=True, out_index=True, weight_cl=True)
    weight, _, subs = _make_inputs(case, seed=3)
    geom = ConvGeometry.of(weight, *case.hw, case.stride, case.padding, case.dilation)
    oracle = _ref(case, weight.double(), None, subs, torch.float64)[2]
    base = _ref(case, weight, None, subs, case.dtype, DEVICE)[2]
    w = weight.to(DEVICE)
    xs, grads = [s[0].to(DEVICE) for s in subs], [s[1].to(DEVICE) for s in subs]
    idx = ([s[2].to(DEVICE) for s in subs], [s[3].to(DEVICE) for s in subs])
    widths = [n for _, _, n in case.subnets]
    args = (case.stride, case.padding, case.dilation, 1)
    first = multi_subnet_conv2d_bwd_triton(grads, xs, w, widths, *idx, *args, False, True, False)
    second = multi_subnet_conv2d_bwd_triton(grads, xs, w, widths, *idx, *args, False, True, False)
    assert first[0] is None and first[2] is None
    assert torch.equal(first[1], second[1]), "grad_weight differs between runs"

    def split_run() -> torch.Tensor:
        convs = [SubnetConv(x, g, k, n, i, o) for x, g, i, o, (_, k, n) in zip(xs, grads, *idx, case.subnets)]
        return grouped_conv_grad_weight(convs, w, geom, False, splits=3).cpu()

    split_first, split_second = split_run(), split_run()
    assert torch.equal(split_first, split_second), "split-K grad_weight differs between runs"
    assert_gemm_close(split_first, base, oracle, name="grad_weight splits=3")


def test_depthwise_grad_weight_split() -> None:
    case = Case([(2, 8, 8), (1, 4, 4)], 12, 12, padding=(1, 1), depthwise=True)
    weight, _, subs = _make_inputs(case, seed=5)
    geom = ConvGeometry.of(weight, *case.hw, case.stride, case.padding, case.dilation)
    oracle = _ref(case, weight.double(), None, subs, torch.float64)[2]
    base = _ref(case, weight, None, subs, case.dtype, DEVICE)[2]
    convs = [SubnetConv(x.to(DEVICE), g.to(DEVICE), k, n) for (x, g, _, _), (_, k, n) in zip(subs, case.subnets)]
    gw = grouped_conv_grad_weight(convs, weight.to(DEVICE), geom, True, splits=2).cpu()
    assert_gemm_close(gw, base, oracle, name="depthwise grad_weight splits=2")
    assert (gw[12:] == 0).all()


# Compiles every kernel with the GPU tile heuristics for sm_90 (H100/H200) without a GPU: catches what
# the interpreter lets through (tl.dot operands < 16, type errors in compiled control flow).  Runs in a
# subprocess because TRITON_INTERPRET must be unset before the kernel module is imported.
_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import stp_fast.kernels.masked_conv2d as m
m._interpreted = lambda: False  # the GPU tile heuristics

def build(fn, ptrs, consts, warps):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

for dtype, name in ((torch.float16, "*fp16"), (torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
    prec = "tf32" if dtype == torch.float32 else "ieee"
    conv = {"meta_ptr": "*i64", "w_ptr": name, "bias_ptr": name}
    vec = 16 // dtype.itemsize
    for cols, tr, taps, unit, v in ((256, False, 9, False, 1), (24, True, 9, True, vec), (256, False, 1, True, vec)):
        bm, bn, bk, w = m._gemm_tiles(4096, cols, 64, dtype, taps)
        build(m._conv_igemm_kernel, conv, dict(TRANSPOSED=tr, HAS_BIAS=not tr, HAS_RED_IDX=tr, HAS_COL_IDX=tr,
              OFF64=False, UPCAST=False, INPUT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
              A_UNIT=unit, C_UNIT=unit, VEC=v), w)
    bm, bn, bp, w = m._wgrad_tiles(False, 64, 64, 10**6, dtype)
    grad = {"meta_ptr": "*i64", "inv_red_ptr": "*i64", "inv_col_ptr": "*i64", "out_ptr": "*fp32", "w_ptr": name}
    for idx, unit, v in ((True, False, 1), (False, True, vec)):
        build(m._conv_wgrad_kernel, grad, dict(HAS_RED_IDX=idx, HAS_COL_IDX=False, UPCAST=False,
              INPUT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, A_UNIT=unit, C_UNIT=unit, VEC=v), w)
    bm, bn = m._dw_tiles(4096, 64)
    build(m._dw_conv_kernel, conv, dict(TRANSPOSED=True, HAS_BIAS=False, HAS_IDX=True, BLOCK_M=bm, BLOCK_N=bn), 4)
    _, bn, bp, w = m._wgrad_tiles(True, 64, 64, 10**6, dtype)
    dw = {"meta_ptr": "*i64", "inv_ptr": "*i64", "out_ptr": "*fp32", "w_ptr": name}
    build(m._dw_wgrad_kernel, dw, dict(HAS_IDX=False, BLOCK_P=bp, BLOCK_N=bn), w)
    build(m._split_sum_kernel, {"ws_ptr": "*fp32", "out_ptr": name}, dict(BLOCK=1024), 4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """Ahead-of-time compilation to an sm_90 cubin with the bundled ptxas (no GPU needed; ~1-3 min)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-6000:]


# ----------------------------------------------------------------------------------------------
# GPU-side choices checked on the CPU: coalesced weights, alignment hints, warps, TF32
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True], ids=["forward", "grad_x"])
@pytest.mark.parametrize("layout", ["oihw", "cl", "1x1"])
def test_coalesced_weight(transposed: bool, layout: str) -> None:
    """Same logical weight; the column axis of the implicit GEMM (C_out forward, C_in grad x) has
    stride 1 unless the weight already has a unit-stride channel axis (used as it is, no copy)."""
    from stp_fast.kernels.masked_conv2d import coalesced_weight

    w = torch.randn(7, 5, *((1, 1) if layout == "1x1" else (3, 3)))
    if layout == "cl":
        w = w.contiguous(memory_format=torch.channels_last)
    packed = coalesced_weight(w, transposed)
    assert torch.equal(packed, w)
    if layout == "oihw":
        assert packed.stride(1 if transposed else 0) == 1
    else:
        assert packed.data_ptr() == w.data_ptr()


def test_aligned_channels_last_uses_vector_hints(monkeypatch) -> None:
    """Channels-last activations with widths, strides and offsets that are multiples of 4 (fp32: 16 bytes)
    take the VEC path of the implicit GEMM and grad-W kernels (its hints are no-ops here, its code is not)."""
    import stp_fast.kernels.masked_conv2d as m

    seen = []
    real = m._unit_and_vec
    monkeypatch.setattr(m, "_unit_and_vec", lambda *a: seen.append(real(*a)) or seen[-1])
    check_case(Case([(2, 8, 12), (1, 4, 8), (2, 12, 4)], 12, 12, padding=(1, 1), layout="cl"), multi=True)
    assert seen and all(v == (True, True, 4) for v in seen), seen
    seen.clear()
    check_case(Case([(2, 6, 5)], 8, 8, padding=(1, 1), layout="cl"), multi=False)  # odd widths: no hints
    assert seen and all(v == (True, True, 1) for v in seen), seen


def test_gemm_tiles_cap_warps_for_non_1x1(monkeypatch) -> None:
    """Review item 5 (triton#1254): 4 warps and <= 64x64 tiles for KH*KW > 1 unless STP_FAST_CONV_WARPS=8."""
    import stp_fast.kernels.masked_conv2d as m

    monkeypatch.setattr(m, "_interpreted", lambda: False)
    monkeypatch.delenv("STP_FAST_CONV_WARPS", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        bm, bn, _, warps = m._gemm_tiles(10**5, 512, 512, dtype, taps=9)
        assert warps == 4 and bm <= 64 and bn <= 64
        assert m._gemm_tiles(10**5, 512, 512, dtype, taps=1)[3] == 8
    monkeypatch.setenv("STP_FAST_CONV_WARPS", "8")
    assert m._gemm_tiles(10**5, 512, 512, torch.bfloat16, taps=9)[3] == 8


def test_tf32_follows_pytorch_settings(monkeypatch) -> None:
    """fp32 Triton convs use TF32 exactly when cuDNN convs may, matmuls when cuBLAS may; never under the
    interpreter or for 16-bit inputs (the device only needs to be named, no GPU is touched)."""
    from stp_fast.kernels import _common

    cuda = torch.device("cuda")
    monkeypatch.setattr(_common, "interpreted", lambda: False)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=True):
        assert _common.input_precision(torch.float32, cuda, "conv") == "tf32"
        assert _common.input_precision(torch.bfloat16, cuda, "conv") == "ieee"
        assert _common.input_precision(torch.float32, torch.device("cpu"), "conv") == "ieee"
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        assert _common.input_precision(torch.float32, cuda, "conv") == "ieee"
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _common.input_precision(torch.float32, cuda, "matmul") == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert _common.input_precision(torch.float32, cuda, "matmul") == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    monkeypatch.setattr(_common, "interpreted", lambda: True)
    assert _common.input_precision(torch.float32, cuda, "conv") == "ieee"


@pytest.mark.cuda
@pytest.mark.parametrize("channels", [(5, 7), (64, 64)])
def test_tf32_conv_within_tolerance(allow_tf32, channels) -> None:
    """With TF32 allowed (PyTorch's default for convolutions) the fp32 Triton conv and its gradients are
    within ``TF32_REL_FRO`` of float64, at small odd and at tensor-core-friendly channel counts."""
    from stp_fast.testing import TF32_REL_FRO, rel_fro_err

    c_in, c_out = channels
    case = Case([(4, c_in, c_out)], c_in, c_out, hw=(12, 12), padding=(1, 1))
    weight, bias, subs = _make_inputs(case, seed=11)
    oracle = _ref(case, weight.double(), bias.double(), subs, torch.float64)
    ys, gxs, gw, _gb = _run_triton(case, weight, bias, subs, multi=True)
    for name, a, o in (("y", ys[0], oracle[0][0]), ("grad_x", gxs[0], oracle[1][0]), ("grad_w", gw, oracle[2])):
        err = rel_fro_err(a.cpu(), o)
        assert err <= TF32_REL_FRO, f"{name}: relative Frobenius error {err:.3g} > {TF32_REL_FRO}"
