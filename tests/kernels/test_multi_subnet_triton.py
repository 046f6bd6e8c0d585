"""Kernel-level tests of the multi-subnet Triton launchers (linear and batch norm + ReLU).

Every launcher is called directly and compared with a float64 pure-PyTorch oracle (the weight sliced per
subnet, ``F.linear`` / ``F.batch_norm`` per subnet, autograd for the gradients):

* GEMM-like results (linear outputs and all linear gradients): the FlashAttention 2x rule of
  ``stp_fast.testing`` against the same-dtype PyTorch computation.
* Batch norm: relative 1e-5 in float32, the 2x rule against PyTorch's own fp16/bf16 batch norm.
* Exact zeros of grad_weight/grad_bias outside the union of the subnets' active positions, and bitwise
  identical weight gradients across two runs (no atomics, fixed subnet order).

Shapes are TINY on purpose: without a GPU this runs in the Triton interpreter (~ms per program and step).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import stp_fast.kernels.multi_subnet_batch_norm as msbn
import stp_fast.kernels.multi_subnet_linear as msl
import torch.nn.functional as F
from stp_fast.kernels.multi_subnet_batch_norm import (
    multi_subnet_batch_norm_bwd_triton,
    multi_subnet_batch_norm_fwd_triton,
)
from stp_fast.kernels.multi_subnet_linear import (
    _grad_weight_bias,
    multi_subnet_linear_bwd_triton,
    multi_subnet_linear_fwd_triton,
)

from stp_fast.testing import assert_gemm_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _subset(full: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(full, generator=gen)[:k].sort().values


# --------------------------------------------------------------------------------------------------
# multi_subnet_linear
# --------------------------------------------------------------------------------------------------


def _linear_problem(Ms, widths, N, K, *, in_index, out_index, bias, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    b = torch.randn(N, generator=gen, dtype=torch.float64) if bias else None
    ins = [_subset(K, k, gen) for k, _ in widths] if in_index else None
    outs = [_subset(N, n, gen) for _, n in widths] if out_index else None
    # strided: x_s is every other column of a wider buffer (a non-contiguous view).
    xbufs = [
        torch.randn(m, 2 * k if strided else k, generator=gen, dtype=torch.float64) for m, (k, _) in zip(Ms, widths)
    ]
    gs = [torch.randn(m, n, generator=gen, dtype=torch.float64) for m, (_, n) in zip(Ms, widths)]
    return W, b, ins, outs, xbufs, gs


def _linear_reference(W, b, ins, outs, xbufs, gs, widths, dtype, device, strided):
    """Per-subnet F.linear on the sliced weight in ``dtype``; returns (ys, grad_xs, grad_w, grad_b)."""
    Wd = W.to(device, dtype).requires_grad_(True)
    bd = b.to(device, dtype).requires_grad_(True) if b is not None else None
    xd = [(x.to(device, dtype)[:, ::2] if strided else x.to(device, dtype)).requires_grad_(True) for x in xbufs]
    ys, loss = [], 0
    for s, (k, n) in enumerate(widths):
        ii = ins[s].to(device) if ins is not None else torch.arange(k, device=device)
        oo = outs[s].to(device) if outs is not None else torch.arange(n, device=device)
        y = F.linear(xd[s], Wd[oo][:, ii], bd[oo] if bd is not None else None)
        ys.append(y.detach())
        loss = loss + (y * gs[s].to(device, dtype)).sum()
    params = [*xd, Wd] + ([bd] if bd is not None else [])
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    S = len(widths)
    return ys, list(grads[:S]), grads[S], grads[S + 1] if bd is not None else None


def _union_masks(ins, outs, widths, N, K):
    mw = torch.zeros(N, K, dtype=torch.bool)
    mb = torch.zeros(N, dtype=torch.bool)
    for s, (k, n) in enumerate(widths):
        ii = ins[s] if ins is not None else torch.arange(k)
        oo = outs[s] if outs is not None else torch.arange(n)
        mw[oo[:, None], ii[None, :]] = True
        mb[oo] = True
    return mw, mb


def _check_linear(Ms, widths, N, K, *, in_index=False, out_index=False, bias=True, dtype=torch.float32, seed=0,
                  strided=False, weight_t=False):  # fmt: skip
    W, b, ins, outs, xbufs, gs = _linear_problem(
        Ms, widths, N, K, in_index=in_index, out_index=out_index, bias=bias, seed=seed, strided=strided
    )
    oracle = _linear_reference(W, b, ins, outs, xbufs, gs, widths, torch.float64, "cpu", strided)
    base = _linear_reference(W, b, ins, outs, xbufs, gs, widths, dtype, DEVICE, strided)

    # weight_t: the weight is a transposed view (strides (1, N)), read in place by the kernels.
    weight = W.T.contiguous().to(DEVICE, dtype).T if weight_t else W.to(DEVICE, dtype)
    bias_t = b.to(DEVICE, dtype) if b is not None else None
    xs = [x.to(DEVICE, dtype)[:, ::2] if strided else x.to(DEVICE, dtype) for x in xbufs]
    grads = [g.to(DEVICE, dtype) for g in gs]
    ins_d = [i.to(DEVICE) for i in ins] if ins is not None else None
    outs_d = [o.to(DEVICE) for o in outs] if outs is not None else None
    n_widths = [n for _, n in widths]

    ys = multi_subnet_linear_fwd_triton(xs, weight, bias_t, n_widths, ins_d, outs_d)
    gx, gw, gb = multi_subnet_linear_bwd_triton(grads, xs, weight, n_widths, ins_d, outs_d, True, True, bias)
    for s in range(len(widths)):
        assert_gemm_close(ys[s], base[0][s], oracle[0][s], name=f"y[{s}]")
        assert_gemm_close(gx[s], base[1][s], oracle[1][s], name=f"grad_x[{s}]")
    assert_gemm_close(gw, base[2], oracle[2], name="grad_weight")
    assert gw.shape == weight.shape
    if bias:
        assert_gemm_close(gb, base[3], oracle[3], name="grad_bias")
    else:
        assert gb is None

    mw, mb = _union_masks(ins, outs, widths, N, K)
    assert (gw.cpu()[~mw] == 0).all(), "grad_weight must be exactly zero outside the active blocks"
    if bias:
        assert (gb.cpu()[~mb] == 0).all(), "grad_bias must be exactly zero outside the active rows"
    # Bitwise reproducible: W-tile owners sum the subnets in a fixed order, no atomics.
    _, gw2, gb2 = multi_subnet_linear_bwd_triton(grads, xs, weight, n_widths, ins_d, outs_d, False, True, bias)
    assert torch.equal(gw, gw2)
    if bias:
        assert torch.equal(gb, gb2)


def _random_widths(S, N, K, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    Ms = torch.randint(1, 41, (S,), generator=gen).tolist()
    widths = [(int(torch.randint(1, K + 1, (1,), generator=gen)), int(torch.randint(1, N + 1, (1,), generator=gen)))
              for _ in range(S)]  # fmt: skip
    return Ms, widths


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_random_subnets(S, index):
    N, K = 37, 29  # odd sizes
    Ms, widths = _random_widths(S, N, K, S)
    _check_linear(Ms, widths, N, K, in_index=index, out_index=index, bias=S % 2 == 1, seed=S)


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_mixed_order_equal_and_full_widths(index):
    # widths in no particular order, two equal subnets and one full-width subnet, different batches.
    widths = [(30, 50), (50, 70), (11, 19), (50, 70), (30, 50)]
    _check_linear([7, 40, 1, 13, 22], widths, 70, 50, in_index=index, out_index=index, seed=7)


@pytest.mark.parametrize("in_index,out_index", [(True, False), (False, True)], ids=["in_only", "out_only"])
def test_linear_one_sided_index(in_index, out_index):
    _check_linear([9, 17, 3], [(20, 33), (7, 12), (29, 40)], 41, 29, in_index=in_index, out_index=out_index, seed=3)


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_empty_batch_and_zero_widths(index):
    # subnet 0: empty batch; subnet 1: no active inputs (y = bias); subnet 2: no active outputs.
    _check_linear([0, 5, 3, 6], [(10, 20), (0, 7), (13, 0), (17, 24)], 24, 17, in_index=index, out_index=index,
                  seed=4)  # fmt: skip


def test_linear_strided_inputs_and_transposed_weight():
    _check_linear([6, 11, 4], [(9, 30), (21, 8), (16, 16)], 33, 21, in_index=True, out_index=True, seed=5,
                  strided=True, weight_t=True)  # fmt: skip


@pytest.mark.parametrize(
    "dtype,index",
    [(torch.float16, False), (torch.bfloat16, True), (torch.bfloat16, False)],
    ids=["f16", "bf16-i", "bf16"],
)
def test_linear_half_precision(dtype, index):
    _check_linear([12, 30, 5], [(40, 24), (17, 50), (40, 50)], 50, 40, in_index=index, out_index=index, dtype=dtype,
                  seed=6)  # fmt: skip


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_uncovered_weight_tiles(index):
    # A weight much larger than every subnet: most W tiles are owned by no subnet and must be written as zeros.
    _check_linear([5, 9], [(20, 60), (35, 12)], 150, 70, in_index=index, out_index=index, seed=9)


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_small_tiles(index, monkeypatch):
    # 16-wide tiles: several row/column tiles per subnet (grouped ordering, masked tails, many W tiles).
    monkeypatch.setattr(msl, "_gemm_tiles", lambda *_: (16, 16, 16, 4))
    monkeypatch.setattr(msl, "_wgrad_tiles", lambda *_: (16, 16, 16, 4))
    _check_linear([40, 3, 21], [(37, 50), (9, 5), (20, 33)], 50, 40, in_index=index, out_index=index, seed=10)


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
def test_linear_need_flags_and_split(index):
    N, K = 45, 33
    widths = [(20, 45), (33, 10), (5, 31)]
    Ms = [13, 29, 40]
    W, b, ins, outs, xbufs, gs = _linear_problem(Ms, widths, N, K, in_index=index, out_index=index, bias=True, seed=8)
    _, ogx, ogw, ogb = _linear_reference(W, b, ins, outs, xbufs, gs, widths, torch.float64, "cpu", False)
    _, bgx, bgw, bgb = _linear_reference(W, b, ins, outs, xbufs, gs, widths, torch.float32, DEVICE, False)
    weight = W.to(DEVICE, torch.float32)
    xs = [x.to(DEVICE, torch.float32) for x in xbufs]
    grads = [g.to(DEVICE, torch.float32) for g in gs]
    ins_d = [i.to(DEVICE) for i in ins] if ins is not None else None
    outs_d = [o.to(DEVICE) for o in outs] if outs is not None else None
    nw = [n for _, n in widths]

    gx, gw, gb = multi_subnet_linear_bwd_triton(grads, xs, weight, nw, ins_d, outs_d, False, False, True)
    assert gx is None and gw is None
    assert_gemm_close(gb, bgb, ogb, name="grad_bias only")
    gx, gw, gb = multi_subnet_linear_bwd_triton(grads, xs, weight, nw, ins_d, outs_d, True, False, False)
    assert gw is None and gb is None
    for s in range(3):
        assert_gemm_close(gx[s], bgx[s], ogx[s], name=f"grad_x[{s}] only")
    # Rows of every subnet cut into 3 chunks: fp32 partial tiles summed in fixed order.
    gw3, gb3 = _grad_weight_bias(grads, xs, weight, nw, ins_d, outs_d, True, True, split=3)
    assert_gemm_close(gw3, bgw, ogw, name="grad_weight split=3")
    assert_gemm_close(gb3, bgb, ogb, name="grad_bias split=3")
    mw, mb = _union_masks(ins, outs, widths, N, K)
    assert (gw3.cpu()[~mw] == 0).all() and (gb3.cpu()[~mb] == 0).all()
    gw3b, _ = _grad_weight_bias(grads, xs, weight, nw, ins_d, outs_d, True, False, split=3)
    assert torch.equal(gw3, gw3b)


# --------------------------------------------------------------------------------------------------
# multi_subnet_batch_norm (+ ReLU)
# --------------------------------------------------------------------------------------------------

EPS = 1e-5


def _bn_input(buf: torch.Tensor, kind: str) -> torch.Tensor:
    """Lay out a float buffer [B, c, 2H, 2W] (or [B, 2c] for 2-D kinds) as the tested memory format."""
    if kind == "2d":
        return buf[:, : buf.shape[1] // 2].contiguous()
    if kind == "2d_strided":  # channel stride 2
        return buf[:, ::2]
    H, W = buf.shape[2] // 2, buf.shape[3] // 2
    if kind == "nchw":
        return buf[:, :, :H, :W].contiguous()
    if kind == "cl":
        return buf[:, :, :H, :W].contiguous(memory_format=torch.channels_last)
    if kind == "strided_w":  # (h, w) collapse to one axis of stride 2
        return buf[:, :, :H, ::2]
    if kind == "strided_h":  # (h, w) do not collapse: the launcher copies
        return buf[:, :, ::2, :W]
    raise ValueError(kind)


def _bn_problem(Bs, widths, C, kind, *, index, seed, H=5, W=6):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "weight": torch.randn(C, generator=gen, dtype=torch.float64),
        "bias": torch.randn(C, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(C, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(C, generator=gen, dtype=torch.float64) + 0.5,
    }
    ind = [_subset(C, c, gen) for c in widths] if index else None
    two_d = kind.startswith("2d")
    bufs, gbufs = [], []
    for B, c in zip(Bs, widths):
        shape = (B, 2 * c) if two_d else (B, c, 2 * H, 2 * W)
        # Offset mean so that two-pass statistics matter.
        bufs.append(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 3)
        gbufs.append(torch.randn(*shape, generator=gen, dtype=torch.float64))
    return params, ind, bufs, gbufs


def _bn_reference(params, ind, xs, gs, widths, training, relu, affine, dtype):
    """Per-subnet F.batch_norm (+relu) in ``dtype`` on CPU: (ys, means, invstds, grad_xs, grad_w, grad_b)."""
    w = params["weight"].to(dtype).requires_grad_(True) if affine[0] else None
    b = params["bias"].to(dtype).requires_grad_(True) if affine[1] else None
    ys, means, invstds, xd, loss = [], [], [], [], 0
    for s, c in enumerate(widths):
        ii = ind[s] if ind is not None else torch.arange(c)
        x = xs[s].detach().cpu().to(dtype).requires_grad_(True)
        xd.append(x)
        if x.shape[0] == 0 or c == 0:  # PyTorch rejects empty batches: nothing to compare
            ys.append(None)
            means.append(None)
            invstds.append(None)
            continue
        rm, rv = params["running_mean"][ii].to(dtype), params["running_var"][ii].to(dtype)
        y = F.batch_norm(x, rm.clone(), rv.clone(), w[ii] if w is not None else None, b[ii] if b is not None else None,
                         training, 0.1, EPS)  # fmt: skip
        if relu:
            y = F.relu(y)
        dims = [0, *range(2, x.dim())]
        xx = x.detach().double()
        if training:
            means.append(xx.mean(dims))
            invstds.append((xx.var(dims, unbiased=False) + EPS).rsqrt())
        else:
            means.append(rm.double())
            invstds.append((rv.double() + EPS).rsqrt())
        ys.append(y.detach())
        loss = loss + (y * gs[s].detach().cpu().to(dtype)).sum()
    params_ = xd + [t for t in (w, b) if t is not None]
    grads = torch.autograd.grad(loss, params_, allow_unused=True, materialize_grads=True)
    S = len(widths)
    gw = grads[S] if w is not None else None
    gb = grads[S + (w is not None)] if b is not None else None
    return ys, means, invstds, list(grads[:S]), gw, gb


def _assert_rel(actual, oracle, name, rtol=1e-5):
    scale = max(1.0, oracle.double().abs().max().item()) if oracle.numel() else 1.0
    err = (actual.double().cpu() - oracle.double()).abs().max().item() if oracle.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"


def _check_bn(Bs, widths, C, kind, *, training, relu, index, affine=(True, True), dtype=torch.float32, seed=0,
              grad_kind=None):  # fmt: skip
    params, ind, bufs, gbufs = _bn_problem(Bs, widths, C, kind, index=index, seed=seed)
    params = {k: v.to(dtype).double() for k, v in params.items()}  # the oracle sees the rounded parameters
    xs = [_bn_input(buf.to(DEVICE, dtype), kind) for buf in bufs]
    gs = [_bn_input(g.to(DEVICE, dtype), grad_kind or kind) for g in gbufs]
    oracle = _bn_reference(params, ind, xs, gs, widths, training, relu, affine, torch.float64)
    weight = params["weight"].to(DEVICE, dtype) if affine[0] else None
    bias = params["bias"].to(DEVICE, dtype) if affine[1] else None
    rm, rv = params["running_mean"].to(DEVICE, dtype), params["running_var"].to(DEVICE, dtype)
    rm0, rv0 = rm.clone(), rv.clone()
    ind_d = [i.to(DEVICE) for i in ind] if ind is not None else None

    ys, means, invstds = multi_subnet_batch_norm_fwd_triton(xs, weight, bias, rm, rv, ind_d, training, EPS, relu)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "running statistics must not be mutated"
    gx, gw, gb = multi_subnet_batch_norm_bwd_triton(
        gs, xs, weight, bias, means, invstds, ind_d, training, relu, True, weight is not None, bias is not None
    )
    base = None if dtype == torch.float32 else _bn_reference(params, ind, xs, gs, widths, training, relu, affine, dtype)

    def close(actual, i, name, s=None):
        ref = oracle[i] if s is None else oracle[i][s]
        if base is None:
            _assert_rel(actual, ref, name)
        else:
            bl = base[i] if s is None else base[i][s]
            assert_gemm_close(actual.cpu(), bl, ref, name=name)

    for s, x in enumerate(xs):
        assert ys[s].shape == x.shape and gx[s].shape == x.shape and ys[s].dtype == dtype
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        for t in (ys[s], gx[s]):
            assert t.is_contiguous(memory_format=torch.channels_last) if cl else t.is_contiguous()
        assert means[s].dtype == invstds[s].dtype == torch.float32 and means[s].shape == (widths[s],)
        if oracle[0][s] is None:  # empty batch: documented statistics, zero contribution
            assert (means[s] == 0).all() and torch.allclose(invstds[s].cpu(), torch.full((widths[s],), EPS**-0.5))
            continue
        close(ys[s], 0, f"y[{s}]", s)
        _assert_rel(means[s], oracle[1][s], f"mean[{s}]")
        _assert_rel(invstds[s], oracle[2][s], f"invstd[{s}]")
        close(gx[s], 3, f"grad_x[{s}]", s)
    used = torch.zeros(C, dtype=torch.bool)
    for s, c in enumerate(widths):
        if xs[s].shape[0] > 0:
            used[ind[s] if ind is not None else torch.arange(c)] = True
    for t, i, name in ((gw, 4, "grad_weight"), (gb, 5, "grad_bias")):
        if oracle[i] is None:
            assert t is None
            continue
        close(t, i, name)
        assert (t.cpu()[~used] == 0).all(), f"{name} must be exactly zero at unused channels"
    # Bitwise reproducible (fixed-order sum over subnets).
    _, gw2, gb2 = multi_subnet_batch_norm_bwd_triton(
        gs, xs, weight, bias, means, invstds, ind_d, training, relu, False, weight is not None, bias is not None
    )
    assert gw is None or torch.equal(gw, gw2)
    assert gb is None or torch.equal(gb, gb2)


BN_BS, BN_WIDTHS, BN_C = [3, 2, 4, 2], [12, 24, 5, 12], 24  # order mixed, equal widths, a full-width subnet


@pytest.mark.parametrize("index", [False, True], ids=["prefix", "index"])
@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["2d", "nchw", "cl"])
def test_bn_layouts(kind, training, relu, index):
    _check_bn(BN_BS, BN_WIDTHS, BN_C, kind, training=training, relu=relu, index=index, seed=1)


@pytest.mark.parametrize("kind", ["2d_strided", "strided_w", "strided_h"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_strided_views(kind, training):
    _check_bn(BN_BS, BN_WIDTHS, BN_C, kind, training=training, relu=True, index=training, seed=2)


def test_bn_mixed_grad_layout():
    # x channels-last, dy contiguous NCHW: different strides per tensor in one launch.
    _check_bn(BN_BS, BN_WIDTHS, BN_C, "cl", training=True, relu=True, index=True, seed=3, grad_kind="nchw")


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)], ids=["none", "w", "b"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_affine_off(affine, training):
    _check_bn(BN_BS, BN_WIDTHS, BN_C, "nchw", training=training, relu=True, index=False, affine=affine, seed=4)


@pytest.mark.parametrize("S", [1, 2, 3, 5, 6])
def test_bn_subnet_counts_and_unused_channels(S):
    gen = torch.Generator().manual_seed(50 + S)
    C = 40  # wider than any subnet: unused channels must get exact-zero grads
    widths = torch.randint(1, 31, (S,), generator=gen).tolist()
    Bs = torch.randint(2, 5, (S,), generator=gen).tolist()
    _check_bn(Bs, widths, C, "nchw" if S % 2 else "cl", training=True, relu=S > 2, index=S % 3 == 0, seed=S)


@pytest.mark.parametrize("kind", ["2d", "nchw"])
def test_bn_empty_batch(kind):
    _check_bn([3, 0, 2], [12, 20, 7], 24, kind, training=True, relu=True, index=True, seed=6)


@pytest.mark.parametrize(
    "dtype,kind,training,index",
    [(torch.float16, "nchw", True, False), (torch.bfloat16, "cl", True, True), (torch.bfloat16, "2d", False, False)],
    ids=["f16-nchw-train", "bf16-cl-train-index", "bf16-2d-eval"],
)
def test_bn_half_precision(dtype, kind, training, index):
    _check_bn(BN_BS, BN_WIDTHS, BN_C, kind, training=training, relu=True, index=index, dtype=dtype, seed=7)


@pytest.mark.parametrize("blocks", [(4, 16), (1, 32)], ids=["c4r16", "c1r32"])
@pytest.mark.parametrize("kind", ["2d", "nchw", "cl"])
def test_bn_small_blocks(kind, blocks, monkeypatch):
    # Several channel blocks per subnet and several reduction steps per pass (the GPU regime).
    monkeypatch.setattr(msbn, "_blocks", lambda *_: (*blocks, 4))
    _check_bn([3, 2, 4], [12, 7, 9], 16, kind, training=True, relu=True, index=kind == "cl", seed=11)


def test_bn_need_flags():
    params, ind, bufs, gbufs = _bn_problem(BN_BS, BN_WIDTHS, BN_C, "nchw", index=True, seed=8)
    xs = [_bn_input(b, "nchw").float() for b in bufs]
    gs = [_bn_input(g, "nchw").float() for g in gbufs]
    xs, gs = [x.to(DEVICE) for x in xs], [g.to(DEVICE) for g in gs]
    weight, bias = params["weight"].float().to(DEVICE), params["bias"].float().to(DEVICE)
    ind_d = [i.to(DEVICE) for i in ind]
    _, means, invstds = multi_subnet_batch_norm_fwd_triton(xs, weight, bias, None, None, ind_d, True, EPS, True)
    full = multi_subnet_batch_norm_bwd_triton(gs, xs, weight, bias, means, invstds, ind_d, True, True, True, True, True)
    only_x = multi_subnet_batch_norm_bwd_triton(gs, xs, weight, bias, means, invstds, ind_d, True, True, True, False,
                                                False)  # fmt: skip
    assert only_x[1] is None and only_x[2] is None
    assert all(torch.equal(a, b) for a, b in zip(full[0], only_x[0]))
    only_b = multi_subnet_batch_norm_bwd_triton(gs, xs, weight, bias, means, invstds, ind_d, True, True, False, False,
                                                True)  # fmt: skip
    assert only_b[0] is None and only_b[1] is None and torch.equal(only_b[2], full[2])
    with pytest.raises(ValueError, match="running_mean"):
        multi_subnet_batch_norm_fwd_triton(xs, weight, bias, None, None, ind_d, False, EPS, True)


# --------------------------------------------------------------------------------------------------
# Alignment hints (VEC) and the mixed-precision BN parameters (fp32 affine, 16-bit inputs)
# --------------------------------------------------------------------------------------------------


def _spy_vec(monkeypatch, module):
    seen = []
    real = module.vec
    monkeypatch.setattr(module, "vec", lambda *a: seen.append(real(*a)) or seen[-1])
    return seen


def test_linear_aligned_widths_take_vec_path(monkeypatch):
    """Widths and strides that are multiples of 4 fp32 elements (16 bytes) run the hinted code path."""
    seen = _spy_vec(monkeypatch, msl)
    _check_linear([5, 3], [(8, 12), (4, 16)], 16, 12, bias=True)
    assert seen and max(seen) == 4, seen


def test_bn_aligned_take_vec_path(monkeypatch):
    """Channels-last with channel counts that are multiples of 4 (fp32): hinted path; NCHW with an odd
    spatial plane (5x6): no hints."""
    seen = _spy_vec(monkeypatch, msbn)
    _check_bn([2, 1], [8, 4], 8, "cl", training=True, relu=True, index=False)
    assert seen and min(seen) == 4, seen
    seen.clear()
    _check_bn([2, 1], [8, 4], 8, "nchw", training=True, relu=True, index=False)
    assert seen and max(seen) == 1, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bn_float32_affine_with_half_inputs(dtype):
    """Autocast's BatchNorm: 16-bit activations, fp32 weight/bias; gradients come back in fp32."""
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 6, 4, 5, generator=gen), torch.randn(2, 4, 4, 5, generator=gen)]
    xs = [x.to(DEVICE, dtype) for x in xs]
    gs = [torch.randn(x.shape, generator=gen).to(DEVICE, dtype) for x in xs]
    w = torch.randn(6, generator=gen).to(DEVICE)
    b = torch.randn(6, generator=gen).to(DEVICE)
    ys, means, invstds = multi_subnet_batch_norm_fwd_triton(xs, w, b, None, None, None, True, 1e-5, False)
    _gxs, gw, gb = multi_subnet_batch_norm_bwd_triton(gs, xs, w, b, means, invstds, None, True, False, True, True, True)
    assert gw.dtype == gb.dtype == torch.float32 and all(y.dtype == dtype for y in ys)
    ref_w, ref_b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loss = 0
    for x, g, y in zip(xs, gs, ys):
        c = x.shape[1]
        yr = F.batch_norm(x.double(), None, None, ref_w[:c].double(), ref_b[:c].double(), training=True)
        torch.testing.assert_close(y.double(), yr.detach(), atol=0.05, rtol=0.02)
        loss = loss + (yr * g.double()).sum()
    loss.backward()
    torch.testing.assert_close(gw, ref_w.grad, atol=1e-2 * ref_w.grad.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(gb, ref_b.grad, atol=1e-2 * ref_b.grad.abs().max().item(), rtol=1e-2)


_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import stp_fast.kernels.multi_subnet_linear as msl
import stp_fast.kernels.multi_subnet_batch_norm as msbn
import stp_fast.kernels.masked_linear as ml

def build(fn, ptrs, consts, warps):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    sig.update({n: "fp32" for n in ("eps",) if n in sig})
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

for dtype, name in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
    prec = "tf32" if dtype == torch.float32 else "ieee"
    vec = 16 // dtype.itemsize
    bi, bj, bp, w = msl._gemm_tiles(4096, 512, dtype.itemsize)
    for unit, v in ((False, 1), (True, vec)):
        build(msl._multi_subnet_linear_fwd_kernel, {"meta_ptr": "*i64", "w_ptr": name, "bias_ptr": name},
              dict(HAS_BIAS=True, HAS_BP=False, HAS_BJ=False, UPCAST=False, INPUT_PRECISION=prec, BLOCK_I=bi,
                   BLOCK_J=bj, BLOCK_P=bp, GROUP_I=8, NF=msl._FWD_FIELDS, A_UNIT=unit, C_UNIT=unit, VEC=v), w)
    ptrs = {"a_ptr": name, "b_ptr": name, "c_ptr": "*fp32", "bias_ptr": name, "bp_idx_ptr": "*i64",
            "bj_idx_ptr": "*i64", "ci_idx_ptr": "*i64", "cj_idx_ptr": "*i64"}
    bi, bj, bp, w = ml.gemm_tiles(768, 768, 8192, dtype.itemsize)
    build(ml._gathered_gemm_kernel, ptrs, dict(HAS_BIAS=False, HAS_BP=False, HAS_BJ=False, HAS_CI=False, HAS_CJ=False,
          UPCAST=False, INPUT_PRECISION=prec, BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bp, GROUP_I=8), w)
    bn = {"meta_ptr": "*i64", "x0_ptr": name, "w_ptr": "*fp32", "b_ptr": "*fp32", "rm_ptr": "*fp32", "rv_ptr": "*fp32"}
    for sp, cu, v in ((True, False, vec), (False, True, vec), (False, False, 1)):
        build(msbn._multi_subnet_batch_norm_fwd_kernel, bn, dict(HAS_W=True, HAS_B=True, HAS_IDX=False, TRAINING=True,
              RELU=True, SP_INNER=sp, HAS_SPATIAL=True, C_UNIT=cu, BLOCK_C=16 if cu else 2, BLOCK_R=128 if cu else 1024,
              NF=msbn._FWD_FIELDS, VEC=v), 4)
        bnb = {"meta_ptr": "*i64", "x0_ptr": name, "w_ptr": "*fp32", "b_ptr": "*fp32", "ws_ptr": "*fp32"}
        build(msbn._multi_subnet_batch_norm_bwd_kernel, bnb, dict(HAS_W=True, HAS_B=True, HAS_IDX=False,
              TRAINING=True, RELU=True, NEED_X=True, NEED_SUMS=True, STORE_SUMS=True, SP_INNER=sp, HAS_SPATIAL=True,
              C_UNIT=cu, BLOCK_C=16 if cu else 2, BLOCK_R=128 if cu else 1024, NF=msbn._BWD_FIELDS, VEC=v), 4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """The linear and BN kernels (incl. the VEC variants) compile to sm_90 cubins with the bundled ptxas."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import stp_fast.kernels.multi_subnet_linear as m; m._interpreted = lambda: False\n" + _AOT_SCRIPT
    code = code.replace("import stp_fast.kernels.masked_linear as ml\n",
                        "import stp_fast.kernels.masked_linear as ml\nml._interpreted = lambda: False\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-6000:]
