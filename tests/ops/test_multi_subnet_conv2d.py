"""multi_subnet_conv2d: equals the list of single-subnet convolutions on every backend."""

from __future__ import annotations

import pytest
import torch

from stp_fast.ops import force_backend, masked_conv2d_ref, multi_subnet_conv2d
from stp_fast.testing import backend_device, check_against_reference, skip_unless_backend

OP = "multi_subnet_conv2d"
BACKENDS = ("reference", "cpu", "triton", "cuda")
C_OUT, C_IN, H, W = 11, 9, 6, 5

# S subnets as (batch B_s, in channels k_s, out channels n_s): any order, repeats, a full-width subnet.
SUBNETS = {
    1: [(2, C_IN, C_OUT)],
    2: [(1, 4, 6), (2, C_IN, C_OUT)],
    4: [(2, C_IN, C_OUT), (1, 5, 3), (2, 5, 3), (1, 1, 10)],
    6: [(1, 3, 3), (2, C_IN, C_OUT), (1, 7, 2), (1, 2, 9), (2, 8, 8), (1, 6, 5)],
}
CONVS = {"3x3-p1": (3, 1, 1, 1), "1x1-s2": (1, 2, 0, 1), "5x5-s2-p2": (5, 2, 2, 1), "3x3-dil2": (3, 1, 2, 2)}


def _make(spec, kernel, indexed, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, k, H, W, generator=gen, dtype=torch.float64) for b, k, _ in spec]
    if layout == "channels_last":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    weight = torch.randn(C_OUT, C_IN, kernel, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(C_OUT, generator=gen, dtype=torch.float64)
    ins = outs = None
    if indexed:
        ins = [torch.randperm(C_IN, generator=gen)[:k].sort().values for _, k, _ in spec]
        outs = [torch.randperm(C_OUT, generator=gen)[:n].sort().values for *_, n in spec]
    return xs, weight, bias, [n for *_, n in spec], ins, outs


def _check(backend, count, conv, indexed, layout, dtype=torch.float32):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    kernel, stride, padding, dilation = CONVS[conv]
    xs, weight, bias, widths, ins, outs = _make(SUBNETS[count], kernel, indexed, layout, seed=count)
    to = lambda lst: None if lst is None else [t.to(device) for t in lst]
    ins_d, outs_d = to(ins), to(outs)
    kw = dict(stride=stride, padding=padding, dilation=dilation)

    def fn(w, b, *xs_):
        return multi_subnet_conv2d(list(xs_), w, b, widths, in_indices=ins_d, out_indices=outs_d, **kw)

    def ref(w, b, *xs_):
        return [masked_conv2d_ref(x, w, b, None if ins_d is None else ins_d[s], None if outs_d is None else outs_d[s],
                                  widths[s], [stride] * 2, [padding] * 2, [dilation] * 2)
                for s, x in enumerate(xs_)]  # fmt: skip

    outputs, _ = check_against_reference(fn, ref, [weight, bias, *xs], backend=backend, dtype=dtype, device=device,
                                         seed=count)  # fmt: skip
    if layout == "channels_last":
        assert all(y.is_contiguous(memory_format=torch.channels_last) for y in outputs if y.shape[1] > 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", sorted(SUBNETS))
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_equals_single_subnet_results(backend, count, indexed):
    _check(backend, count, "3x3-p1", indexed, "nchw")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conv", ["1x1-s2", "5x5-s2-p2", "3x3-dil2"])
def test_conv_params_channels_last(backend, conv):
    _check(backend, 2, conv, False, "channels_last")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_low_precision(backend):
    _check(backend, 2, "3x3-p1", False, "nchw", dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_depthwise(backend, indexed):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(5)
    widths = [9, 4, 6, 4]
    weight = torch.randn(9, 1, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(9, generator=gen, dtype=torch.float64)
    xs = [torch.randn(1 + s % 2, k, 5, 6, generator=gen, dtype=torch.float64) for s, k in enumerate(widths)]
    idx = [torch.randperm(9, generator=gen)[:k].sort().values.to(device) for k in widths] if indexed else None

    def fn(w, b, *xs_):
        return multi_subnet_conv2d(list(xs_), w, b, widths, out_indices=idx, groups=9, padding=1, stride=(2, 1))

    def ref(w, b, *xs_):
        return [masked_conv2d_ref(x, w, b, None if idx is None else idx[s], None if idx is None else idx[s],
                                  widths[s], [2, 1], [1, 1], [1, 1], widths[s]) for s, x in enumerate(xs_)]  # fmt: skip

    check_against_reference(fn, ref, [weight, bias, *xs], backend=backend, dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_backend(OP, backend, "cpu")
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 4, 5, 4, generator=gen, dtype=torch.float64), torch.randn(2, 2, 5, 4, generator=gen,
                                                                                    dtype=torch.float64)]  # fmt: skip
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (w, b, *xs)]
    with force_backend(backend):
        f = lambda w, b, *xs_: multi_subnet_conv2d(list(xs_), w, b, [5, 3], stride=2, padding=1)
        assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    """Schema, fake (incl. the grad-W strides of a channels-last weight: review item 7), autograd, AOT."""
    skip_unless_backend(OP, backend, "cpu")
    w, b = torch.randn(C_OUT, C_IN, 3, 3, requires_grad=True), torch.randn(C_OUT, requires_grad=True)
    w_cl = torch.randn(C_OUT, C_IN, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    xs = [torch.randn(2, C_IN, H, W, requires_grad=True), torch.randn(1, 4, H, W, requires_grad=True)]
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with force_backend(backend):
        for weight in (w, w_cl):
            args = (xs, weight, b, [C_OUT, 5], None, None, *conv)
            torch.library.opcheck(torch.ops.stp_fast.multi_subnet_conv2d.default, args)
            grads = [torch.randn(2, C_OUT, H, W), torch.randn(1, 5, H, W)]
            bwd = (grads, [x.detach() for x in xs], weight.detach(), [C_OUT, 5], None, None, *conv, True, True, True)
            torch.library.opcheck(torch.ops.stp_fast.multi_subnet_conv2d_backward.default, bwd)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    w = torch.randn(C_OUT, C_IN, 3, 3, requires_grad=True)
    f = lambda a, b: sum(y.sum() for y in multi_subnet_conv2d([a, b], w, None, [C_OUT, 4], padding=1))
    a, b = torch.randn(2, C_IN, H, W), torch.randn(1, 3, H, W)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(a, b), f(a, b))


@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_eager_function_equals_custom_op(indexed):
    """On the CPU the public function runs the op's eager twin (a torch.autograd.Function calling the same
    backend, without the custom-op dispatch): outputs and gradients equal the custom op's bit for bit."""
    skip_unless_backend(OP, "cpu", "cpu")
    xs, weight, bias, widths, ins, outs = _make(SUBNETS[4], 3, indexed, "channels_last", seed=4)
    results = []
    for eager in (True, False):
        w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
        xs_ = [x.float().requires_grad_() for x in xs]
        if eager:
            ys = multi_subnet_conv2d(xs_, w, b, widths, in_indices=ins, out_indices=outs, padding=1)
            assert type(ys[0].grad_fn).__name__.startswith("MultiSubnetConv2dFunction")
        else:
            ys = torch.ops.stp_fast.multi_subnet_conv2d(xs_, w, b, widths, ins, outs, [1, 1], [1, 1], [1, 1], 1)
        grads = torch.autograd.grad(sum((y * y).sum() for y in ys[1:]), [w, b, *xs_])  # ys[0] gets no gradient
        results.append([*ys, *grads])
    assert all(torch.equal(a, c) for a, c in zip(*results))


WT = torch.randn(C_OUT, C_IN, 3, 3)
BAD = [
    (dict(xs=[]), ValueError, r"xs is empty"),
    (dict(xs=[torch.randn(2, C_IN, H, W), torch.randn(2, 3, H + 1, W)]), ValueError, r"spatial size"),
    (dict(xs=[torch.randn(2, C_IN + 1, H, W)]), ValueError, r"xs\[0\] has 10 channels"),
    (dict(xs=[torch.randn(C_IN, H, W)]), ValueError, r"must be 4-D"),
    (dict(xs=[torch.randn(2, C_IN, H, W)], out_widths=[C_OUT + 1]), ValueError, r"out_widths\[0\]=12"),
    (dict(xs=[torch.randn(2, C_IN, H, W)], groups=3), ValueError, r"groups must be 1"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(backend, kwargs, exc, msg):
    skip_unless_backend(OP, backend, "cpu")
    kwargs = dict(kwargs)
    xs = kwargs.pop("xs")
    with force_backend(backend), pytest.raises(exc, match=msg):
        multi_subnet_conv2d(xs, WT, None, kwargs.pop("out_widths", None), **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 64, 32, 3), (32, 256, 56, 1), (32, 128, 28, 3), (32, 512, 7, 3)], ids=str)
def test_gpu_full_plus_four_subnets(backend, dtype, shape):
    device = "cuda"
    skip_unless_backend(OP, backend, device)
    batch, channels, size, kernel = shape
    gen = torch.Generator().manual_seed(0)
    widths = [channels, channels * 3 // 4, channels // 2, channels // 2, channels // 4]
    xs = [torch.randn(batch, k, size, size, generator=gen, dtype=torch.float64) for k in widths]
    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    weight = torch.randn(channels, channels, kernel, kernel, generator=gen, dtype=torch.float64) / channels**0.5
    pad = kernel // 2
    fn = lambda w, *xs_: multi_subnet_conv2d(list(xs_), w, None, widths, padding=pad)
    ref = lambda w, *xs_: [masked_conv2d_ref(x, w, None, None, None, n, [1, 1], [pad] * 2) for x, n in zip(xs_, widths)]
    check_against_reference(fn, ref, [weight, *xs], backend=backend, dtype=dtype, device=device)
