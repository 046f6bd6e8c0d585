"""CPU kernels of the compiled extension for the issue-3 ops, called directly through their private ops.

``torch.ops.stp_fast._masked_conv2d_{fwd,bwd}``, ``_multi_subnet_{linear,conv2d,batch_norm}_{fwd,bwd}``
against float64 pure-PyTorch references (F.conv2d / F.linear / F.batch_norm per subnet on sliced
parameters, autograd for the gradients).  GEMM-like results use the FlashAttention rule of
stp_fast.testing (error <= 2x the same-dtype PyTorch error + a small floor); pruned gradient
entries must be exactly zero; the outputs keep x's memory format.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stp_fast import _ext
from stp_fast.testing import ATOL_SCALE, GEMM_ERROR_FACTOR, max_err

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"stp_fast._C not loaded: {_ext.load_error()}")

OPS = torch.ops.stp_fast
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
CL = torch.channels_last


# ----------------------------------------------------------------------------------------- helpers
def close(actual, baseline, oracle, name, extra_rtol=0.0):
    """FA rule (stp_fast.testing.assert_gemm_close) with an optional extra relative slack."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert actual.dtype == baseline.dtype, f"{name}: dtype {actual.dtype} != {baseline.dtype}"
    scale = oracle.double().abs().max().item() if oracle.numel() else 0.0
    atol = (ATOL_SCALE[actual.dtype] + extra_rtol) * max(scale, 1.0)
    err, base = max_err(actual, oracle), max_err(baseline, oracle)
    assert err <= GEMM_ERROR_FACTOR * base + atol, f"{name}: max error {err:.3g} > 2 x {base:.3g} + {atol:.3g}"


def selection(kind, full, active, gen):
    """(index tensor or None for a prefix, the selected channels as a tensor)."""
    if kind == "prefix":
        return None, torch.arange(active)
    idx = torch.randperm(full, generator=gen)[:active].sort().values
    return idx, idx


def layout(x, kind):
    """x as contiguous NCHW, channels-last, or a non-contiguous strided view with the same values."""
    if kind == "cl":
        return x.contiguous(memory_format=CL)
    if kind == "noncontig":
        b, c, h, w = x.shape
        buf = x.new_zeros(b, 2 * c, h, w + 3)
        view = buf[:, ::2, :, 1 : w + 1]
        view.copy_(x)
        return view
    return x.contiguous()


def expected_format(x):
    return CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format


def autograd_ref(fn, leaves, grads, dtype):
    """Run fn on copies of `leaves` cast to dtype; return (outputs, grads of the leaves)."""
    ins = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in leaves]
    outs = fn(*ins)
    live = [t for t in ins if t is not None]
    loss = sum((o * g.to(dtype)).sum() for o, g in zip(outs, grads))
    gs = torch.autograd.grad(loss, live, allow_unused=True)
    gs = [torch.zeros_like(t) if g is None else g for t, g in zip(live, gs)]
    it = iter(gs)
    return outs, [None if t is None else next(it) for t in ins]


def keep_mask(shape, rows, cols=None):
    m = torch.zeros(shape, dtype=torch.bool)
    if cols is None:
        m[rows] = True
    else:
        m[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    return m


# ---------------------------------------------------------------------------------- masked_conv2d
def conv_block(w, b, rows, cols):
    """The active (weight, bias) block: rows of dim 0, cols (or all) of dim 1."""
    wc = w.index_select(0, rows)
    if cols is not None:
        wc = wc.index_select(1, cols)
    return wc, (None if b is None else b.index_select(0, rows))


CONV1 = ((1, 1), (1, 1), (1, 1))  # stride, padding, dilation

# (B, C_in, C_out, k, n, kh, kw, stride, padding, dilation, in_kind, out_kind, layout)
CONV_CASES = [
    (2, 7, 9, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), "prefix", "prefix", "nchw"),
    (2, 7, 9, 5, 4, 3, 3, (2, 2), (1, 1), (1, 1), "index", "index", "cl"),
    (1, 5, 6, 3, 6, 1, 1, (1, 1), (0, 0), (1, 1), "index", "prefix", "noncontig"),
    (2, 6, 5, 6, 3, 5, 5, (2, 1), (2, 1), (1, 1), "prefix", "index", "cl"),
    (2, 7, 9, 7, 9, 3, 3, (1, 1), (2, 2), (2, 2), "prefix", "prefix", "nchw"),
    (1, 11, 13, 6, 7, 3, 5, (2, 2), (1, 2), (1, 2), "index", "index", "noncontig"),
    (3, 4, 3, 4, 3, 1, 1, (2, 2), (0, 0), (1, 1), "prefix", "prefix", "cl"),
]


def run_masked_conv(x, w, b, in_idx, out_idx, n, stride, padding, dilation, groups, g):
    args = (in_idx, out_idx, n, list(stride), list(padding), list(dilation), groups)
    y = OPS._masked_conv2d_fwd(x, w, b, *args)
    gx, gw, gb = OPS._masked_conv2d_bwd(g, x, w, *args, True, True, b is not None)
    return y, gx, gw, gb


def check_masked_conv(x, w, b, in_idx, out_idx, rows, cols, n, conv, groups, gc, dtype, lay):
    """x, w, b: float64 masters; rows/cols: the selected weight block; gc: the compact conv's groups;
    lay: the layout of the x handed to the op."""
    stride, padding, dilation = conv
    ref_fn = lambda x_, w_, b_: [F.conv2d(x_, *conv_block(w_, b_, rows, cols), stride, padding, dilation, gc)]
    g = torch.randn(ref_fn(x, w, b)[0].shape, dtype=F64)
    oracle_y, oracle_g = autograd_ref(ref_fn, [x, w, b], [g], F64)
    base_y, base_g = autograd_ref(ref_fn, [x, w, b], [g], dtype)
    xin = layout(x.to(dtype), lay)
    fmt = expected_format(xin)
    y, gx, gw, gb = run_masked_conv(xin, w.to(dtype), None if b is None else b.to(dtype), in_idx, out_idx, n, stride,
                                    padding, dilation, groups, g.to(dtype).contiguous(memory_format=fmt))  # fmt: skip
    close(y, base_y[0], oracle_y[0], "y")
    close(gx, base_g[0], oracle_g[0], "grad_x")
    close(gw, base_g[1], oracle_g[1], "grad_weight")
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt), "memory format not kept"
    wkeep = keep_mask(w.shape[:2], rows, cols) if cols is not None else keep_mask(w.shape[:1], rows)
    assert torch.all(gw[~wkeep] == 0), "gradient leaked into pruned weight entries"
    if b is not None:
        close(gb, base_g[2], oracle_g[2], "grad_bias")
        assert torch.all(gb[~keep_mask(b.shape, rows)] == 0)
    else:
        assert gb.numel() == 0


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_masked_conv2d_general(case, dtype):
    B, C_in, C_out, k, n, kh, kw, stride, padding, dilation, ik, ok, lay = CONV_CASES[case]
    gen = torch.Generator().manual_seed(case)
    in_idx, cols = selection(ik, C_in, k, gen)
    out_idx, rows = selection(ok, C_out, n, gen)
    x = torch.randn(B, k, 9, 10, generator=gen, dtype=F64)
    w = torch.randn(C_out, C_in, kh, kw, generator=gen, dtype=F64)
    b = torch.randn(C_out, generator=gen, dtype=F64) if case % 3 else None
    check_masked_conv(x, w, b, in_idx, out_idx, rows, cols, n, (stride, padding, dilation), 1, 1, dtype, lay)


@pytest.mark.parametrize("kind,lay,kk", [("prefix", "nchw", 3), ("index", "cl", 5), ("index", "noncontig", 3),
                                         ("prefix", "cl", 1)])  # fmt: skip
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_masked_conv2d_depthwise(kind, lay, kk, dtype):
    gen = torch.Generator().manual_seed(7)
    C, k = 11, 6
    idx, rows = selection(kind, C, k, gen)
    x = torch.randn(2, k, 8, 7, generator=gen, dtype=F64)
    w = torch.randn(C, 1, kk, kk, generator=gen, dtype=F64)
    b = torch.randn(C, generator=gen, dtype=F64)
    check_masked_conv(x, w, b, idx, idx, rows, None, k, ((2, 1), (kk // 2, 1), (1, 1)), k, k, dtype, lay)


def test_masked_conv2d_grouped_full_width():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 7, generator=gen, dtype=F64)
    w = torch.randn(9, 2, 3, 3, generator=gen, dtype=F64)
    b = torch.randn(9, generator=gen, dtype=F64)
    for dtype in (F32, F64):
        check_masked_conv(x, w, b, None, None, torch.arange(9), torch.arange(2), 9, CONV1, 3, 3, dtype, "cl")


def test_masked_conv2d_channels_last_weight():
    """A channels-last weight (model.to(channels_last)) does not change the output's format: x's."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(8, 6, 3, 3, generator=gen, dtype=F64).contiguous(memory_format=CL)
    b = torch.randn(8, generator=gen, dtype=F64)
    idx, cols = selection("index", 6, 4, gen)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=F64)
    for lay in ("nchw", "cl"):
        check_masked_conv(x, w, b, idx, None, torch.arange(5), cols, 5, CONV1, 1, 1, F32, lay)
        check_masked_conv(x, w, b, None, None, torch.arange(5), torch.arange(4), 5, CONV1, 1, 1, F32, lay)
    gw = OPS._masked_conv2d_bwd(torch.randn(2, 5, 7, 7), x.float(), w.float(), None, None, 5, *CONV1, 1,
                                False, True, False)[1]  # fmt: skip
    assert gw.is_contiguous(memory_format=CL), "grad_weight takes the weight's memory format"


def test_masked_conv2d_bf16():
    gen = torch.Generator().manual_seed(5)
    in_idx, cols = selection("index", 12, 7, gen)
    out_idx, rows = selection("index", 10, 5, gen)
    x = torch.randn(2, 7, 8, 8, generator=gen, dtype=F64)
    w = torch.randn(10, 12, 3, 3, generator=gen, dtype=F64)
    b = torch.randn(10, generator=gen, dtype=F64)
    for lay in ("nchw", "cl"):
        check_masked_conv(x, w, b, in_idx, out_idx, rows, cols, 5, CONV1, 1, 1, BF16, lay)
    idx, rows = selection("index", 10, 4, gen)
    x4 = torch.randn(2, 4, 8, 8, generator=gen, dtype=F64)
    check_masked_conv(x4, torch.randn(10, 1, 3, 3, dtype=F64), b, idx, idx, rows, None, 4, CONV1, 4, 4, BF16, "cl")


def test_masked_conv2d_empty_sizes():
    w = torch.randn(6, 5, 3, 3)
    b = torch.randn(6)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    # B = 0
    x = torch.randn(0, 4, 5, 5)
    y = OPS._masked_conv2d_fwd(x, w, b, None, None, 3, *conv)
    assert y.shape == (0, 3, 5, 5)
    gx, gw, gb = OPS._masked_conv2d_bwd(torch.randn(0, 3, 5, 5), x, w, None, None, 3, *conv, True, True, True)
    assert gx.shape == x.shape and torch.all(gw == 0) and torch.all(gb == 0) and gw.shape == w.shape
    # k = 0 active inputs: the output is the active bias; grad_bias still flows
    x = torch.randn(2, 0, 5, 5)
    oi = torch.tensor([1, 4])
    y = OPS._masked_conv2d_fwd(x, w, b, torch.zeros(0, dtype=torch.long), oi, 2, *conv)
    torch.testing.assert_close(y, b[oi].view(1, 2, 1, 1).expand(2, 2, 5, 5))
    g = torch.randn(2, 2, 5, 5)
    gx, gw, gb = OPS._masked_conv2d_bwd(g, x, w, None, oi, 2, *conv, True, True, True)
    assert gx.shape == (2, 0, 5, 5) and torch.all(gw == 0)
    torch.testing.assert_close(gb[oi], g.sum((0, 2, 3)))
    # n = 0 active outputs (channels-last x keeps its format)
    x = torch.randn(2, 5, 5, 5).contiguous(memory_format=CL)
    y = OPS._masked_conv2d_fwd(x, w, b, None, None, 0, *conv)
    assert y.shape == (2, 0, 5, 5)
    gx, gw, gb = OPS._masked_conv2d_bwd(y, x, w, None, None, 0, *conv, True, True, False)
    assert torch.all(gx == 0) and gx.is_contiguous(memory_format=CL) and torch.all(gw == 0) and gb.numel() == 0


def test_masked_conv2d_not_requested_grads_are_empty():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    g = torch.randn(2, 4, 4, 4)
    gx, gw, gb = OPS._masked_conv2d_bwd(g, x, w, None, None, 4, [1, 1], [0, 0], [1, 1], 1, False, False, False)
    assert gx.numel() == gw.numel() == gb.numel() == 0


def _conv_call(x=None, w=None, b=None, ii=None, oi=None, n=4, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
               groups=1, g="fwd"):  # fmt: skip
    x = torch.randn(2, 3, 6, 6) if x is None else x
    w = torch.randn(5, 4, 3, 3) if w is None else w
    conv = (list(stride), list(padding), list(dilation), groups)
    if isinstance(g, str):
        return OPS._masked_conv2d_fwd(x, w, b, ii, oi, n, *conv)
    return OPS._masked_conv2d_bwd(g, x, w, ii, oi, n, *conv, True, True, True)


CONV_BAD = [
    (dict(x=torch.randn(2, 3, 6, 6, dtype=F64)), TypeError, "masked_conv2d: weight has dtype"),
    (dict(x=torch.ones(2, 3, 6, 6, dtype=torch.int32)), TypeError, "masked_conv2d: x must be float32"),
    (dict(b=torch.randn(5, dtype=F64)), TypeError, "masked_conv2d: bias has dtype"),
    (dict(x=torch.randn(3, 6, 6)), ValueError, "masked_conv2d: x must be 4-D"),
    (dict(w=torch.randn(5, 4, 3)), ValueError, "masked_conv2d: weight must be 4-D"),
    (dict(b=torch.randn(4)), ValueError, "masked_conv2d: bias must be 1-D"),
    (dict(stride=(0, 1)), ValueError, "masked_conv2d: stride must be >= 1"),
    (dict(padding=(-1, 0)), ValueError, "masked_conv2d: padding must be >= 0"),
    (dict(dilation=(1, 0)), ValueError, "masked_conv2d: dilation must be >= 1"),
    (dict(groups=0), ValueError, "masked_conv2d: groups must be >= 1"),
    (dict(ii=torch.tensor([2, 1, 3])), ValueError, "masked_conv2d: in_index must be sorted"),
    (dict(ii=torch.tensor([0, 1, 4])), ValueError, r"masked_conv2d: in_index entries must lie in \[0, 4\)"),
    (dict(ii=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError, "masked_conv2d: in_index must be int64"),
    (dict(ii=torch.tensor([0, 1])), ValueError, "masked_conv2d: x has 3 channels but in_index has 2"),
    (dict(oi=torch.tensor([0, 5]), n=2), ValueError, "masked_conv2d: out_index entries must lie"),
    (dict(oi=torch.tensor([0, 3]), n=3), ValueError, "masked_conv2d: out_width is 3 but out_index has 2"),
    (dict(n=6), ValueError, r"masked_conv2d: out_width must lie in \[0, 5\]"),
    (dict(n=-1), ValueError, r"masked_conv2d: out_width must lie in \[0, 5\]"),
    (dict(x=torch.randn(2, 5, 6, 6)), ValueError, "masked_conv2d: x has 5 channels but weight has only 4"),
    (dict(x=torch.randn(2, 3, 2, 6), padding=(0, 0)), ValueError, "masked_conv2d: x is too small"),
    (dict(x=torch.randn(2, 3, 0, 6)), ValueError, "masked_conv2d: x must have a non-zero spatial size"),
    (dict(w=torch.randn(5, 1, 3, 3), groups=3, n=3, ii=torch.tensor([0, 1, 2])), ValueError,
     "depthwise needs in_index and out_index"),
    (dict(w=torch.randn(5, 1, 3, 3), groups=3, n=3, ii=torch.tensor([0, 1, 2]), oi=torch.tensor([0, 1, 3])),
     ValueError, "depthwise needs in_index equal to out_index"),
    (dict(w=torch.randn(5, 1, 3, 3), groups=3, n=2), ValueError, "depthwise .* needs groups =="),
    (dict(x=torch.randn(2, 4, 6, 6), w=torch.randn(6, 2, 3, 3), groups=2, n=4), ValueError,
     "groups=2 .* needs all channels active"),
    (dict(x=torch.randn(2, 4, 6, 6), w=torch.randn(5, 2, 3, 3), groups=2, n=5), ValueError, "not divisible by groups"),
    (dict(g=torch.randn(2, 4, 5, 6)), ValueError, r"masked_conv2d: grad_out must have shape \[2, 4, 6, 6\]"),
    (dict(g=torch.randn(2, 4, 6, 6, dtype=F64)), TypeError, "masked_conv2d: grad_out has dtype"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs,exc,msg", CONV_BAD, ids=[m[:40] for _, _, m in CONV_BAD])
def test_masked_conv2d_bad_inputs(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        _conv_call(**kwargs)


# ----------------------------------------------------------------------------- multi-subnet linear
def make_subnets(gen, S, full_in, full_out, kind, *, shared=False, zero_sizes=False):
    """Per subnet (k, n, in_sel, out_sel, in_idx, out_idx); widths in any order, some equal, some full."""
    subs = []
    for s in range(S):
        k = [full_in, max(1, full_in // 2), full_in, max(1, full_in - 2)][s % 4] if not shared else full_in - 1
        n = [full_out // 3 + 1, full_out, full_out // 2, full_out // 3 + 1, 1, full_out][s % 6]
        if zero_sizes and s == 1:
            n = 0
        if zero_sizes and s == 2 and not shared:
            k = 0
        if shared and s > 0:  # the same input channels: the very same index tensor, or an equal copy
            in_idx, in_sel = subs[0][4] if s % 2 else (None if subs[0][4] is None else subs[0][4].clone()), subs[0][2]
        else:
            in_idx, in_sel = selection(kind, full_in, k, gen)
        out_idx, out_sel = selection("prefix" if shared else kind, full_out, n, gen)
        subs.append((k, n, in_sel, out_sel, in_idx, out_idx))
    return subs


def linear_ref(xs, w, b, subs):
    return [
        F.linear(x, w.index_select(0, os).index_select(1, is_), None if b is None else b.index_select(0, os))
        for x, (_, _, is_, os, _, _) in zip(xs, subs)
    ]


def check_multi_linear(xs, w, b, subs, dtype, kind):
    S = len(xs)
    out_widths = [n for _, n, *_ in subs]
    in_indices = None if all(s[4] is None for s in subs) else [s[4] for s in subs]
    out_indices = None if all(s[5] is None for s in subs) else [s[5] for s in subs]
    fn = lambda w_, b_, *xs_: linear_ref(xs_, w_, b_, subs)
    y64 = fn(w, b, *xs)
    gs = [torch.randn(y.shape, dtype=F64) for y in y64]
    oracle_y, oracle_g = autograd_ref(fn, [w, b, *xs], gs, F64)
    base_y, base_g = autograd_ref(fn, [w, b, *xs], gs, dtype)
    # xs that are the very same tensor stay the same tensor (exercises the shared-input path).
    cast = {}
    xs_t = [cast.setdefault(id(x), x.to(dtype)) for x in xs]
    w_t, b_t = w.to(dtype), None if b is None else b.to(dtype)
    ys = OPS._multi_subnet_linear_fwd(xs_t, w_t, b_t, out_widths, in_indices, out_indices)
    gxs, gw, gb = OPS._multi_subnet_linear_bwd([g.to(dtype) for g in gs], xs_t, w_t, out_widths, in_indices,
                                               out_indices, True, True, b is not None)  # fmt: skip
    assert len(ys) == len(gxs) == S
    for s in range(S):
        close(ys[s], base_y[s], oracle_y[s], f"ys[{s}]")
        close(gxs[s], base_g[2 + s], oracle_g[2 + s], f"grad_xs[{s}]")
    close(gw, base_g[0], oracle_g[0], "grad_weight")
    keep = torch.zeros(w.shape, dtype=torch.bool)
    for _, _, is_, os, _, _ in subs:
        keep |= keep_mask(w.shape, os, is_)
    assert torch.all(gw[~keep] == 0), "gradient leaked into pruned weight entries"
    if b is not None:
        close(gb, base_g[1], oracle_g[1], "grad_bias")
        keep_b = torch.zeros(b.shape, dtype=torch.bool)
        for _, _, _, os, _, _ in subs:
            keep_b[os] = True
        assert torch.all(gb[~keep_b] == 0)
    # Outputs never alias each other or the inputs.
    ptrs = [y.data_ptr() for y in ys if y.numel()]
    assert len(set(ptrs)) == len(ptrs)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["prefix", "index"])
@pytest.mark.parametrize("S", [1, 2, 3, 6])
def test_multi_subnet_linear(S, kind, dtype):
    gen = torch.Generator().manual_seed(S)
    N, K = 13, 11
    subs = make_subnets(gen, S, K, N, kind)
    xs = [torch.randn(3 + 2 * s, k, generator=gen, dtype=F64) for s, (k, *_) in enumerate(subs)]
    w = torch.randn(N, K, generator=gen, dtype=F64)
    b = torch.randn(N, generator=gen, dtype=F64) if S != 2 else None
    check_multi_linear(xs, w, b, subs, dtype, kind)


@pytest.mark.parametrize("kind", ["prefix", "index"])
def test_multi_subnet_linear_shared_input_and_sizes(kind):
    gen = torch.Generator().manual_seed(11)
    N, K = 17, 9
    w, b = torch.randn(N, K, dtype=F64), torch.randn(N, dtype=F64)
    # Five subnets on one x (same tensor, same input channels, prefix outputs of widths
    # 1/3+, 0, 1/2, 1/3+, 1): one shared-input group computed at the widest width.
    subs = make_subnets(gen, 5, K, N, kind, shared=True, zero_sizes=True)
    x = torch.randn(7, K - 1, generator=gen, dtype=F64)
    for dtype in (F32, F64, BF16):
        check_multi_linear([x] * 5, w, b, subs, dtype, kind)
    # Mixed: zero rows, zero inputs, zero outputs; batch dims [2, 3, k]; a non-contiguous x.
    subs = make_subnets(gen, 4, K, N, kind, zero_sizes=True)
    xs = [torch.randn(0, subs[0][0], dtype=F64), torch.randn(2, 3, subs[1][0], dtype=F64),
          torch.randn(4, subs[2][0], dtype=F64), torch.randn(5, 2 * subs[3][0], dtype=F64)[:, ::2]]  # fmt: skip
    check_multi_linear(xs, w, b, subs, F32, kind)


def test_multi_subnet_linear_bad_inputs():
    w, b = torch.randn(6, 5), torch.randn(6)
    x = torch.randn(3, 4)
    fwd = OPS._multi_subnet_linear_fwd
    bwd = OPS._multi_subnet_linear_bwd
    op = "multi_subnet_linear"
    cases = [
        (lambda: fwd([], w, b, [], None, None), ValueError, f"{op}: xs must hold at least one tensor"),
        (lambda: fwd([x, x], w, b, [2], None, None), ValueError, f"{op}: out_widths must have one entry per subnet"),
        (lambda: fwd([x], w, b, [7], None, None), ValueError, rf"{op}: out_widths\[0\] must lie in \[0, 6\]"),
        (lambda: fwd([x, x], w, b, [2, -1], None, None), ValueError, rf"{op}: out_widths\[1\] must lie"),
        (lambda: fwd([x, torch.randn(2, 6)], w, b, [2, 2], None, None), ValueError,
         rf"{op}: xs\[1\] has 6 features but weight has only 5"),
        (lambda: fwd([x, x.double()], w, b, [2, 2], None, None), TypeError, rf"{op}: xs\[1\] has dtype Double"),
        (lambda: fwd([x], w.double(), b, [2], None, None), TypeError, f"{op}: weight has dtype Double"),
        (lambda: fwd([x], w, b, [2], [torch.arange(4), torch.arange(4)], None), ValueError,
         f"{op}: in_indices must have one entry per subnet"),
        (lambda: fwd([x], w, b, [2], [torch.tensor([0, 1, 2, 5])], None), ValueError,
         rf"{op}: in_indices\[0\] entries must lie in \[0, 5\)"),
        (lambda: fwd([x], w, b, [2], None, [torch.tensor([1, 1])]), ValueError,
         rf"{op}: out_indices\[0\] must be sorted"),
        (lambda: fwd([x], w, b, [3], None, [torch.tensor([1, 2])]), ValueError,
         rf"{op}: out_widths\[0\] is 3 but out_indices\[0\] has 2"),
        (lambda: bwd([torch.randn(3, 2)], [x, x], w, [2, 2], None, None, True, True, True), ValueError,
         f"{op}: grads must have one entry per subnet"),
        (lambda: bwd([torch.randn(3, 2), torch.randn(4, 2)], [x, x], w, [2, 2], None, None, True, True, True),
         ValueError, rf"{op}: grads\[1\] must have shape \[3, 2\]"),
        (lambda: bwd([torch.randn(3, 2).double()], [x], w, [2], None, None, True, True, True), TypeError,
         rf"{op}: grads\[0\] has dtype Double"),
    ]  # fmt: skip
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_multi_subnet_linear_deterministic():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 48, generator=gen)
    xs = [torch.randn(33, k, generator=gen) for k in (48, 24, 40, 48)]
    widths = [64, 32, 50, 17]
    gs = [torch.randn(33, n, generator=gen) for n in widths]
    r1 = OPS._multi_subnet_linear_bwd(gs, xs, w, widths, None, None, True, True, True)
    r2 = OPS._multi_subnet_linear_bwd(gs, xs, w, widths, None, None, True, True, True)
    assert torch.equal(r1[1], r2[1]) and torch.equal(r1[2], r2[2])


# ------------------------------------------------------------------------------ multi-subnet conv2d
def check_multi_conv(xs, w, b, subs, dtype, kind, conv, depthwise=False, lays=None):
    stride, padding, dilation = conv
    S = len(xs)
    out_widths = [n for _, n, *_ in subs]
    in_indices = None if kind == "prefix" else [s[4] for s in subs]
    out_indices = None if kind == "prefix" else [s[5] for s in subs]
    groups = w.shape[0] if depthwise else 1

    def fn(w_, b_, *xs_):
        out = []
        for x, (k, n, is_, os, _, _) in zip(xs_, subs):
            wc = w_.index_select(0, os) if depthwise else w_.index_select(0, os).index_select(1, is_)
            bc = None if b_ is None else b_.index_select(0, os)
            if x.shape[1] == 0 or n == 0:  # F.conv2d cannot do zero channels: the output is the bias
                oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (w_.shape[2] - 1) - 1) // stride[0] + 1
                ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (w_.shape[3] - 1) - 1) // stride[1] + 1
                y = x.new_zeros(x.shape[0], n, oh, ow) + (0 if bc is None else bc.view(1, -1, 1, 1)) + 0 * x.sum()
                out.append(y + 0 * wc.sum())
            else:
                out.append(F.conv2d(x, wc, bc, stride, padding, dilation, k if depthwise else 1))
        return out

    y64 = fn(w, b, *xs)
    gs = [torch.randn(y.shape, dtype=F64) for y in y64]
    oracle_y, oracle_g = autograd_ref(fn, [w, b, *xs], gs, F64)
    base_y, base_g = autograd_ref(fn, [w, b, *xs], gs, dtype)
    lays = lays or ["nchw"] * S
    xs_t = [layout(x.to(dtype), lay) for x, lay in zip(xs, lays)]
    w_t, b_t = w.to(dtype), None if b is None else b.to(dtype)
    args = (out_widths, in_indices, out_indices, list(stride), list(padding), list(dilation), groups)
    ys = OPS._multi_subnet_conv2d_fwd(xs_t, w_t, b_t, *args)
    gts = [g.to(dtype).contiguous(memory_format=expected_format(x)) for g, x in zip(gs, xs_t)]
    gxs, gw, gb = OPS._multi_subnet_conv2d_bwd(gts, xs_t, w_t, *args, True, True, b is not None)
    for s in range(S):
        close(ys[s], base_y[s], oracle_y[s], f"ys[{s}]")
        close(gxs[s], base_g[2 + s], oracle_g[2 + s], f"grad_xs[{s}]")
        fmt = expected_format(xs_t[s])
        assert ys[s].is_contiguous(memory_format=fmt) and gxs[s].is_contiguous(memory_format=fmt)
    close(gw, base_g[0], oracle_g[0], "grad_weight")
    keep = torch.zeros(w.shape[:2], dtype=torch.bool)
    for _, _, is_, os, _, _ in subs:
        keep |= keep_mask(w.shape[:1], os).unsqueeze(1) if depthwise else keep_mask(w.shape[:2], os, is_)
    assert torch.all(gw[~keep] == 0), "gradient leaked into pruned weight entries"
    if b is not None:
        close(gb, base_g[1], oracle_g[1], "grad_bias")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["prefix", "index"])
@pytest.mark.parametrize("S", [1, 3, 5])
def test_multi_subnet_conv2d(S, kind, dtype):
    gen = torch.Generator().manual_seed(20 + S)
    C_out, C_in = 9, 7
    subs = make_subnets(gen, S, C_in, C_out, kind)
    xs = [torch.randn(1 + s % 2, k, 7, 6, generator=gen, dtype=F64) for s, (k, *_) in enumerate(subs)]
    w = torch.randn(C_out, C_in, 3, 3, generator=gen, dtype=F64)
    b = torch.randn(C_out, generator=gen, dtype=F64)
    lays = [("nchw", "cl", "noncontig")[s % 3] for s in range(S)]
    conv = ((1, 2), (1, 1), (1, 1)) if S != 3 else ((2, 2), (2, 1), (2, 1))
    check_multi_conv(xs, w, b, subs, dtype, kind, conv, lays=lays)


@pytest.mark.parametrize("kind", ["prefix", "index"])
def test_multi_subnet_conv2d_depthwise_and_sizes(kind):
    gen = torch.Generator().manual_seed(4)
    C = 10
    w = torch.randn(C, 1, 3, 3, generator=gen, dtype=F64)
    b = torch.randn(C, generator=gen, dtype=F64)
    subs = []
    for k in (10, 1, 0, 6, 3, 6):  # full, one, zero, equal widths
        idx, sel = selection(kind, C, k, gen)
        subs.append((k, k, sel, sel, idx, idx))
    xs = [torch.randn(2, k, 6, 6, generator=gen, dtype=F64) for k, *_ in subs]
    lays = ["cl", "nchw", "nchw", "noncontig", "cl", "nchw"]
    for dtype in (F32, F64):
        check_multi_conv(xs, w, b, subs, dtype, kind, ((1, 1), (1, 1), (1, 1)), depthwise=True, lays=lays)
    # groups == 1 with zero batch, zero inputs and zero outputs; bf16
    wg = torch.randn(8, 5, 1, 1, generator=gen, dtype=F64)
    subs = make_subnets(gen, 4, 5, 8, kind, zero_sizes=True)
    xs = [torch.randn(0 if s == 3 else 2, k, 5, 5, generator=gen, dtype=F64) for s, (k, *_) in enumerate(subs)]
    check_multi_conv(xs, wg, b[:8], subs, F32, kind, ((1, 1), (0, 0), (1, 1)), lays=["cl"] * 4)
    check_multi_conv(xs, wg, b[:8], subs, BF16, kind, ((2, 2), (0, 0), (1, 1)))


def test_multi_subnet_conv2d_bad_inputs():
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    x = torch.randn(2, 3, 8, 8)
    conv = ([1, 1], [1, 1], [1, 1])
    fwd, bwd = OPS._multi_subnet_conv2d_fwd, OPS._multi_subnet_conv2d_bwd
    op = "multi_subnet_conv2d"
    cases = [
        (lambda: fwd([], w, b, [], None, None, *conv, 1), ValueError, f"{op}: xs must hold at least one tensor"),
        (lambda: fwd([x, torch.randn(2, 3, 8, 7)], w, b, [2, 2], None, None, *conv, 1), ValueError,
         rf"{op}: xs\[1\] has spatial size \(8, 7\) but xs\[0\] has \(8, 8\)"),
        (lambda: fwd([x], w, b, [2, 2], None, None, *conv, 1), ValueError, f"{op}: out_widths must have one entry"),
        (lambda: fwd([x], w, b, [7], None, None, *conv, 1), ValueError, rf"{op}: out_widths\[0\] must lie"),
        (lambda: fwd([x, x.double()], w, b, [2, 2], None, None, *conv, 1), TypeError, rf"{op}: xs\[1\] has dtype"),
        (lambda: fwd([x], w, b, [2], None, None, *conv, 2), ValueError, f"{op}: groups must be 1, or weight.size"),
        (lambda: fwd([torch.randn(2, 5, 8, 8)], w, b, [2], None, None, *conv, 1), ValueError,
         rf"{op}: xs\[0\] has 5 channels but weight has only 4"),
        (lambda: fwd([x], w, b, [2], [torch.tensor([0, 1])], None, *conv, 1), ValueError,
         rf"{op}: xs\[0\] has 3 channels but in_indices\[0\] has 2"),
        (lambda: fwd([x], torch.randn(6, 1, 3, 3), b, [2], None, None, *conv, 6), ValueError,
         rf"{op}: depthwise .* needs groups == xs\[0\].size\(1\) == out_widths\[0\]"),
        (lambda: bwd([torch.randn(3, 2, 8, 8)], [x], w, [2], None, None, *conv, 1, True, True, True), ValueError,
         rf"{op}: grads\[0\] must have shape \[2, 2, 8, 8\]"),
        (lambda: bwd([torch.randn(2, 2, 8, 8)] * 2, [x], w, [2], None, None, *conv, 1, True, True, True),
         ValueError, f"{op}: grads must have one entry per subnet"),
    ]  # fmt: skip
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


# ------------------------------------------------------------------------- multi-subnet batch norm
def bn_ref(xs, w, b, rm, rv, sels, training, eps, relu):
    out = []

    def take(t, sel):
        return None if t is None else t.index_select(0, sel)

    for x, sel in zip(xs, sels):
        params = [take(t, sel) for t in (rm, rv, w, b)]
        y = F.batch_norm(x, *params, training, 0.0, eps) if x.numel() else x * 1
        out.append(F.relu(y) if relu else y)
    return out


def check_multi_bn(xs, w, b, rm, rv, sels, idx, training, relu, dtype, lays=None):
    eps = 1e-5
    S = len(xs)
    fn = lambda w_, b_, *xs_: bn_ref(xs_, w_, b_, rm.to(xs_[0].dtype), rv.to(xs_[0].dtype), sels, training, eps, relu)
    y64 = fn(w, b, *xs)
    gs = [torch.randn(y.shape, dtype=F64) for y in y64]
    oracle_y, oracle_g = autograd_ref(fn, [w, b, *xs], gs, F64)
    base_y, base_g = autograd_ref(fn, [w, b, *xs], gs, dtype)
    lays = lays or ["nchw"] * S
    xs_t = [layout(x.to(dtype), lay) if x.dim() == 4 else x.to(dtype) for x, lay in zip(xs, lays)]
    cast = lambda t: None if t is None else t.to(dtype)
    stats = lambda t: None if t is None else t.float()  # running stats may be float32
    ys, means, invstds = OPS._multi_subnet_batch_norm_fwd(xs_t, cast(w), cast(b), stats(rm), stats(rv), idx,
                                                           training, eps, relu)  # fmt: skip
    gxs, gw, gb = OPS._multi_subnet_batch_norm_bwd([g.to(dtype) for g in gs], xs_t, cast(w), cast(b), means, invstds,
                                                   idx, training, relu, True, True, True)  # fmt: skip
    # float64 inputs get float64 statistics; only eval mode, fed float32 running stats here, rounds.
    slack = 2e-6 if dtype == F64 and not training else 0.0
    for s in range(S):
        close(ys[s], base_y[s], oracle_y[s], f"ys[{s}]", slack)
        close(gxs[s], base_g[2 + s], oracle_g[2 + s], f"grad_xs[{s}]", 10 * slack)
        stat_dtype = F64 if dtype == F64 else F32
        assert means[s].dtype == invstds[s].dtype == stat_dtype and means[s].shape == (len(sels[s]),)
        x64 = xs[s]
        if training and x64.numel():
            dims = [0, *range(2, x64.dim())]
            var, mean = torch.var_mean(x64, dims, correction=0)
            torch.testing.assert_close(
                means[s],
                mean.to(stat_dtype),
                rtol=1e-2 if dtype == BF16 else 1e-5,
                atol=1e-2 if dtype == BF16 else 1e-5,
            )
            torch.testing.assert_close(
                invstds[s], (var + eps).rsqrt().to(stat_dtype), rtol=2e-2 if dtype == BF16 else 1e-4, atol=1e-4
            )
        elif not training:
            torch.testing.assert_close(means[s], rm[sels[s]].to(stat_dtype))
            torch.testing.assert_close(invstds[s], (rv[sels[s]].float() + eps).rsqrt().to(stat_dtype))
        if x64.dim() == 4 and xs_t[s].numel():
            fmt = expected_format(xs_t[s])
            assert ys[s].is_contiguous(memory_format=fmt)
    for got, bl, o, t, name in (
        (gw, base_g[0], oracle_g[0], w, "grad_weight"),
        (gb, base_g[1], oracle_g[1], b, "grad_bias"),
    ):
        if t is None:
            assert got.numel() == 0
            continue
        close(got, bl, o, name, 10 * slack)
        keep = torch.zeros(t.shape, dtype=torch.bool)
        for sel in sels:
            keep[sel] = True
        assert torch.all(got[~keep] == 0)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["prefix", "index"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_multi_subnet_batch_norm(dtype, kind, training, relu):
    gen = torch.Generator().manual_seed(31)
    C = 13
    widths = [7, 13, 4, 7, 1, 10]  # any order, equal, full
    sels, idx = [], []
    for c in widths:
        i, sel = selection(kind, C, c, gen)
        sels.append(sel)
        idx.append(i)
    idx = None if kind == "prefix" else idx
    xs = [torch.randn(2 + s % 3, c, 4, 3, generator=gen, dtype=F64) * 2 + 1 for s, c in enumerate(widths)]
    xs[3] = torch.randn(5, widths[3], generator=gen, dtype=F64)  # a 2-D subnet
    w, b = torch.randn(C, generator=gen, dtype=F64), torch.randn(C, generator=gen, dtype=F64)
    rm, rv = torch.randn(C, generator=gen, dtype=F64), torch.rand(C, generator=gen, dtype=F64) + 0.5
    lays = ["nchw", "cl", "noncontig", "nchw", "cl", "nchw"]
    check_multi_bn(xs, w, b, rm, rv, sels, idx, training, relu, dtype, lays)


def test_multi_subnet_batch_norm_affine_off_sizes_and_bf16():
    gen = torch.Generator().manual_seed(8)
    C = 9
    sels = [torch.arange(9), torch.tensor([1, 2, 6]), torch.arange(0), torch.arange(5)]
    xs = [torch.randn(3, len(s), 5, 5, generator=gen, dtype=F64) for s in sels]
    xs[3] = torch.randn(0, 5, 5, 5, dtype=F64)  # empty batch
    rm, rv = torch.randn(C, dtype=F64), torch.rand(C, dtype=F64) + 0.5
    w, b = torch.randn(C, dtype=F64), torch.randn(C, dtype=F64)
    for training in (True, False):
        check_multi_bn(xs, None, None, rm, rv, sels, list(sels), training, True, F32, ["cl"] * 4)
        check_multi_bn(xs, w, None, rm, rv, sels, list(sels), training, False, F32)
    for training in (True, False):
        check_multi_bn(xs[:2], w, b, rm, rv, sels[:2], sels[:2], training, True, BF16, ["cl", "nchw"])
        check_multi_bn(xs[:2], None, None, rm, rv, sels[:2], sels[:2], training, False, BF16)
    # Empty batch in training: statistics of "no data" are mean 0, invstd 1/sqrt(eps).
    _, m, i = OPS._multi_subnet_batch_norm_fwd([torch.randn(0, 3)], None, None, None, None, None, True, 0.25, False)
    assert torch.equal(m[0], torch.zeros(3)) and torch.equal(i[0], torch.full((3,), 2.0))


def test_multi_subnet_batch_norm_does_not_mutate_running_stats():
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    xs = [torch.randn(4, 6, 3, 3), torch.randn(2, 4, 3, 3)]
    for training in (True, False):
        _, means, _ = OPS._multi_subnet_batch_norm_fwd(xs, None, None, rm, rv, None, training, 1e-5, False)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        assert means[0].data_ptr() != rm.data_ptr()


def test_multi_subnet_batch_norm_bad_inputs():
    x = torch.randn(4, 3, 2, 2)
    w = torch.randn(5)
    fwd, bwd = OPS._multi_subnet_batch_norm_fwd, OPS._multi_subnet_batch_norm_bwd
    op = "multi_subnet_batch_norm"
    m, i = [torch.zeros(3)], [torch.ones(3)]
    cases = [
        (lambda: fwd([], w, None, None, None, None, True, 1e-5, False), ValueError, f"{op}: xs must hold"),
        (lambda: fwd([x], w, None, None, None, None, False, 1e-5, False), ValueError,
         f"{op}: running_mean and running_var are required"),
        (lambda: fwd([x, torch.randn(2, 6)], w, None, None, None, None, True, 1e-5, False), ValueError,
         rf"{op}: xs\[1\] has 6 channels but the layer has only 5"),
        (lambda: fwd([x], w, torch.randn(4), None, None, None, True, 1e-5, False), ValueError,
         f"{op}: bias has 4 channels but weight has 5"),
        (lambda: fwd([x], w.double(), None, None, None, None, True, 1e-5, False), TypeError, f"{op}: weight has dtype"),
        (lambda: fwd([x], w, None, torch.zeros(5, dtype=torch.float16), torch.ones(5), None, False, 1e-5, False),
         TypeError, f"{op}: running_mean must have xs\\[0\\]'s dtype"),
        (lambda: fwd([x, x.double()], w, None, None, None, None, True, 1e-5, False), TypeError,
         rf"{op}: xs\[1\] has dtype"),
        (lambda: fwd([x], w, None, None, None, [torch.tensor([0, 1])], True, 1e-5, False), ValueError,
         rf"{op}: xs\[0\] has 3 channels but indices\[0\] has 2"),
        (lambda: fwd([x], w, None, None, None, [torch.tensor([0, 1, 5])], True, 1e-5, False), ValueError,
         rf"{op}: indices\[0\] entries must lie in \[0, 5\)"),
        (lambda: fwd([x], w, None, None, None, [torch.arange(3)] * 2, True, 1e-5, False), ValueError,
         f"{op}: indices must have one entry per subnet"),
        (lambda: fwd([torch.randn(4)], w, None, None, None, None, True, 1e-5, False), ValueError, r"at least 2-D"),
        (lambda: fwd([x], w, None, None, None, None, True, -1.0, False), ValueError, f"{op}: eps must be"),
        (lambda: bwd([torch.randn(4, 3, 2, 1)], [x], w, None, m, i, None, True, False, True, True, True), ValueError,
         rf"{op}: grads\[0\] must have the shape of xs\[0\]"),
        (lambda: bwd([x], [x], w, None, [torch.zeros(3, dtype=F64)], i, None, True, False, True, True, True), TypeError,
         rf"{op}: means\[0\] must be Float"),
        (lambda: bwd([x], [x], w, None, m, [torch.ones(4)], None, True, False, True, True, True), ValueError,
         rf"{op}: invstds\[0\] must be 1-D \[3\]"),
        (lambda: bwd([x], [x], w, None, m * 2, i, None, True, False, True, True, True), ValueError,
         f"{op}: means must have one entry per subnet"),
    ]  # fmt: skip
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_private_ops_schema_no_aliasing():
    """opcheck's schema test: no output aliases an input, nothing is mutated."""
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    x = torch.randn(2, 4, 5, 5)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    x2 = x[0, :, 0].t()  # [5, 4]
    wl = torch.randn(5, 4)
    rm, rv = torch.randn(4), torch.rand(4) + 1
    bn_fwd = OPS._multi_subnet_batch_norm_fwd([x, x[:, :2]], None, None, rm, rv, None, False, 1e-5, True)
    samples = [
        (OPS._masked_conv2d_fwd, (x, w, b, None, None, 6, *conv)),
        (OPS._masked_conv2d_bwd, (torch.randn(2, 6, 5, 5), x, w, None, None, 6, *conv, True, True, True)),
        (OPS._multi_subnet_linear_fwd, ([x2, x2], wl, None, [5, 3], None, None)),
        (OPS._multi_subnet_linear_bwd, ([x2, x2[:, :3]], [x2, x2], wl, [4, 3], None, None, True, True, True)),
        (OPS._multi_subnet_conv2d_fwd, ([x, x[:, :2]], w, b, [6, 3], None, None, *conv)),
        (OPS._multi_subnet_batch_norm_fwd, ([x, x[:, :2]], None, None, rm, rv, None, False, 1e-5, True)),
        (OPS._multi_subnet_batch_norm_bwd, ([x, x[:, :2]], [x, x[:, :2]], None, None, *bn_fwd[1:], None, True, True,
                                            True, False, False)),
    ]  # fmt: skip
    for op, args in samples:
        torch.library.opcheck(op.default, args, test_utils=("test_schema",))
