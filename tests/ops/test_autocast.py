"""Every op under ``torch.autocast("cpu", torch.bfloat16)`` against the same computation done by hand.

Conv/linear ops behave like ``F.conv2d`` / ``F.linear`` under autocast: fp32 inputs are cast to bf16,
the output is bf16 and fp32 master weights get fp32 gradients.  ``multi_subnet_batch_norm`` behaves
like PyTorch's BatchNorm: the input's dtype is kept, affine parameters and statistics stay fp32 and
the running statistics are updated in fp32.  Checked on every backend that runs here (the Triton
kernels under the interpreter), through the eager fast path, the custom ops called directly (their
autocast kernels), ``torch.compile`` and ``opcheck``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stp_fast.ops import (
    force_backend,
    masked_conv2d,
    masked_conv2d_ref,
    masked_linear,
    masked_linear_ref,
    multi_subnet_batch_norm,
    multi_subnet_conv2d,
    multi_subnet_linear,
)
from stp_fast.testing import backend_device, check_under_autocast, skip_unless_backend

BACKENDS = ("reference", "cpu", "triton", "cuda")
BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _idx(full: int, n: int, gen, device="cpu") -> torch.Tensor:
    return torch.randperm(full, generator=gen)[:n].sort().values.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_masked_linear(backend, indexed):
    device = backend_device(backend)
    skip_unless_backend("masked_linear", backend, device)
    g = _gen(1)
    x, w, b = _randn(3, 5, 7, gen=g), _randn(13, 11, gen=g), _randn(13, gen=g)
    ii, oi = (_idx(11, 7, g, device), _idx(13, 6, g, device)) if indexed else (7, 6)
    it = ii if indexed else torch.arange(7, device=device)
    ot = oi if indexed else torch.arange(6, device=device)
    check_under_autocast(lambda x, w, b: masked_linear(x, w, b, in_index=ii, out_index=oi),
                         lambda x, w, b: masked_linear_ref(x, w, b, it, ot), [x, w, b],
                         backend=backend, device=device)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_masked_conv2d(backend, indexed):
    device = backend_device(backend)
    skip_unless_backend("masked_conv2d", backend, device)
    g = _gen(2)
    x, w, b = _randn(2, 5, 6, 7, gen=g), _randn(9, 7, 3, 3, gen=g), _randn(9, gen=g)
    ii, oi = (_idx(7, 5, g, device), _idx(9, 6, g, device)) if indexed else (5, 6)
    it = ii if indexed else torch.arange(5, device=device)
    ot = oi if indexed else torch.arange(6, device=device)
    conv = dict(stride=2, padding=1)
    check_under_autocast(lambda x, w, b: masked_conv2d(x, w, b, in_index=ii, out_index=oi, **conv),
                         lambda x, w, b: masked_conv2d_ref(x, w, b, it, ot, 6, [2, 2], [1, 1]), [x, w, b],
                         backend=backend, device=device)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_conv2d_depthwise(backend):
    device = backend_device(backend)
    skip_unless_backend("masked_conv2d", backend, device)
    g = _gen(3)
    x, w = _randn(2, 5, 6, 5, gen=g), _randn(8, 1, 3, 3, gen=g)
    idx = _idx(8, 5, g, device)
    check_under_autocast(lambda x, w: masked_conv2d(x, w, in_index=idx, padding=1, groups=5),
                         lambda x, w: masked_conv2d_ref(x, w, None, idx, idx, 5, [1, 1], [1, 1], [1, 1], 5), [x, w],
                         backend=backend, device=device)  # fmt: skip


SUBNETS = [(2, 7, 9), (1, 4, 5), (2, 3, 2)]  # (batch, in channels, out channels)


def _multi_inputs(gen, spatial):
    xs = [_randn(b, k, *spatial, gen=gen) for b, k, _ in SUBNETS]
    return xs, [n for *_, n in SUBNETS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_multi_subnet_linear(backend, indexed):
    device = backend_device(backend)
    skip_unless_backend("multi_subnet_linear", backend, device)
    g = _gen(4)
    xs, widths = _multi_inputs(g, ())
    w, b = _randn(9, 7, gen=g), _randn(9, gen=g)
    ins = [_idx(7, x.shape[1], g, device) for x in xs] if indexed else None
    outs = [_idx(9, n, g, device) for n in widths] if indexed else None

    def fn(xs, w, b):
        return multi_subnet_linear(xs, w, b, widths, in_indices=ins, out_indices=outs)

    def by_hand(xs, w, b):
        return [masked_linear_ref(x, w, b, None if ins is None else ins[s], None if outs is None else outs[s],
                                  widths[s]) for s, x in enumerate(xs)]  # fmt: skip

    check_under_autocast(fn, by_hand, [xs, w, b], backend=backend, device=device)


def _conv_by_hand(widths, ins, outs, conv):
    def by_hand(xs, w, b):
        return [masked_conv2d_ref(x, w, b, None if ins is None else ins[s], None if outs is None else outs[s],
                                  widths[s], *conv) for s, x in enumerate(xs)]  # fmt: skip

    return by_hand


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_multi_subnet_conv2d(backend, indexed):
    device = backend_device(backend)
    skip_unless_backend("multi_subnet_conv2d", backend, device)
    g = _gen(5)
    xs, widths = _multi_inputs(g, (5, 6))
    xs[1] = xs[1].contiguous(memory_format=torch.channels_last)
    w, b = _randn(9, 7, 3, 3, gen=g), _randn(9, gen=g)
    ins = [_idx(7, x.shape[1], g, device) for x in xs] if indexed else None
    outs = [_idx(9, n, g, device) for n in widths] if indexed else None

    def fn(xs, w, b):
        return multi_subnet_conv2d(xs, w, b, widths, in_indices=ins, out_indices=outs, padding=1)

    by_hand = _conv_by_hand(widths, ins, outs, ([1, 1], [1, 1], [1, 1]))
    check_under_autocast(fn, by_hand, [xs, w, b], backend=backend, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_subnet_conv2d_depthwise(backend):
    device = backend_device(backend)
    skip_unless_backend("multi_subnet_conv2d", backend, device)
    g = _gen(6)
    xs = [_randn(2, 6, 5, 5, gen=g), _randn(1, 3, 5, 5, gen=g)]
    w = _randn(6, 1, 3, 3, gen=g)

    def fn(xs, w):
        return multi_subnet_conv2d(xs, w, None, [6, 3], stride=2, padding=1, groups=6)

    def by_hand(xs, w):
        return [F.conv2d(x, w[: x.shape[1]], None, 2, 1, 1, x.shape[1]) for x in xs]

    check_under_autocast(fn, by_hand, [xs, w], backend=backend, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_multi_subnet_batch_norm(backend, relu, indexed):
    """bf16 activations (what a conv gives under autocast), fp32 affine parameters and running stats."""
    device = backend_device(backend)
    skip_unless_backend("multi_subnet_batch_norm", backend, device)
    g = _gen(7)
    xs = [_randn(3, 6, 4, 5, gen=g) * 3 + 1, _randn(2, 4, 4, 5, gen=g).contiguous(memory_format=torch.channels_last)]
    w, b = _randn(6, gen=g), _randn(6, gen=g)
    idx = [torch.arange(6, device=device), _idx(6, 4, g, device)] if indexed else None

    def fn(xs, w, b):
        return multi_subnet_batch_norm(xs, w, b, training=True, relu=relu, indices=idx)

    def by_hand(xs, w, b):
        outs = []
        for s, x in enumerate(xs):
            ch = idx[s] if idx is not None else torch.arange(x.shape[1], device=x.device)
            y = F.batch_norm(x, None, None, w[ch], b[ch], training=True)
            outs.append(F.relu(y) if relu else y)
        return outs

    check_under_autocast(fn, by_hand, [xs, w, b], backend=backend, device=device,
                         input_dtypes=[BF16, torch.float32, torch.float32],
                         hand_dtypes=[BF16, torch.float32, torch.float32])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_running_stats_fp32(backend):
    """The owner's running statistics are updated in fp32 from bf16 inputs, as nn.BatchNorm2d does."""
    device = backend_device(backend)
    skip_unless_backend("multi_subnet_batch_norm", backend, device)
    x = torch.randn(4, 6, 3, 3).to(device, BF16)
    bn = torch.nn.BatchNorm2d(6).to(device)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    with torch.autocast(device, BF16), force_backend(backend):
        ys = multi_subnet_batch_norm([x[:, :3], x], bn.weight, bn.bias, rm, rv, stats_subnet=1, momentum=0.1)
        y_native = bn(x)
    assert ys[1].dtype == BF16 and rm.dtype == rv.dtype == torch.float32
    torch.testing.assert_close(ys[1], y_native, atol=0.02, rtol=0.02)
    torch.testing.assert_close(rm, bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv, bn.running_var, atol=1e-6, rtol=1e-5)


def test_direct_op_calls_follow_autocast():
    """The custom ops themselves (their autocast kernels), called with fp32 inputs inside autocast."""
    w = torch.randn(9, 7, requires_grad=True)
    x = torch.randn(4, 5)
    wc = torch.randn(6, 5, 3, 3, requires_grad=True)
    xc = torch.randn(2, 5, 6, 6)
    idx = torch.tensor([0, 2, 3, 5, 6])
    with torch.autocast("cpu", BF16):
        y = torch.ops.stp_fast.masked_linear.default(x, w, None, idx, None, 4)
        yc = torch.ops.stp_fast.masked_conv2d.default(xc, wc, None, None, None, 6, [1, 1], [1, 1], [1, 1], 1)
        ys = torch.ops.stp_fast.multi_subnet_linear.default([x, x[:, :3]], w, None, [9, 2], None, None)
        ycs = torch.ops.stp_fast.multi_subnet_conv2d.default([xc], wc, None, [3], None, None, [1, 1], [0, 0],
                                                             [1, 1], 1)  # fmt: skip
        expected = masked_linear(x, w, in_index=idx, out_index=4)
    assert all(t.dtype == BF16 for t in (y, yc, *ys, *ycs))
    torch.testing.assert_close(y, expected)
    (y.float().sum() + yc.float().sum() + ycs[0].float().sum()).backward()
    assert w.grad.dtype == wc.grad.dtype == torch.float32


def test_float64_is_not_cast():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with torch.autocast("cpu", BF16):
        assert masked_linear(x, w).dtype == torch.float64
        assert multi_subnet_linear([x], w, None, [5])[0].dtype == torch.float64


def test_mixed_dtypes_outside_autocast_still_raise():
    x, w = torch.randn(3, 4, dtype=BF16), torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"weight has dtype torch\.float32 but x has torch\.bfloat16"):
        masked_linear(x, w)
    with pytest.raises(TypeError, match=r"weight has dtype torch\.float64 but xs\[0\] has torch\.bfloat16"):
        multi_subnet_batch_norm([x.view(3, 4, 1, 1)], torch.ones(4, dtype=torch.float64), None)


def test_opcheck_under_autocast():
    w = torch.randn(11, 9, requires_grad=True)
    wc = torch.randn(6, 5, 3, 3, requires_grad=True)
    xs = [torch.randn(2, 5, 5, 5, requires_grad=True), torch.randn(1, 3, 5, 5, requires_grad=True)]
    with torch.autocast("cpu", BF16):
        torch.library.opcheck(torch.ops.stp_fast.masked_linear.default,
                              (torch.randn(5, 3, requires_grad=True), w, None, torch.tensor([0, 4, 8]), None, 4))
        torch.library.opcheck(torch.ops.stp_fast.multi_subnet_conv2d.default,
                              (xs, wc, None, [6, 2], None, None, [1, 1], [1, 1], [1, 1], 1))  # fmt: skip


def test_compiled_step_matches_eager():
    """A fullgraph-compiled multi-subnet sequence under autocast equals eager (values and fp32 gradients)."""
    g = _gen(8)
    x = _randn(2, 3, 5, 5, gen=g).float().requires_grad_()
    params = [_randn(*s, gen=g).float().requires_grad_() for s in ((4, 3, 3, 3), (4,), (4,), (5, 4))]

    def step(x, wc, bw, bb, wl):
        with torch.autocast("cpu", BF16):
            ys = multi_subnet_conv2d([x, x[:, :2]], wc, None, [4, 2], padding=1)
            zs = multi_subnet_batch_norm(ys, bw, bb, relu=True)
            z = masked_conv2d(zs[1], wc, in_index=2, out_index=3, padding=1)
            ls = multi_subnet_linear([zs[0].mean((2, 3)), z.mean((2, 3))], wl, None, [5, 2])
        return sum(t.float().sum() for t in ls)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(x, *params), step(x, *params)
    torch.testing.assert_close(out_c, out_e)
    grads_c = torch.autograd.grad(out_c, (x, *params))
    grads_e = torch.autograd.grad(out_e, (x, *params))
    for gc, ge in zip(grads_c, grads_e):
        assert gc.dtype == torch.float32
        torch.testing.assert_close(gc, ge)
