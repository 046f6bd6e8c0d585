"""masked_conv2d: every backend against the float64 reference, forward and all gradients."""

from __future__ import annotations

import pytest
import torch

from stp_fast.ops import BackendUnavailableError, force_backend, masked_conv2d, masked_conv2d_ref
from stp_fast.testing import backend_device, check_against_reference, skip_unless_backend

OP = "masked_conv2d"
BACKENDS = ("reference", "cpu", "triton", "cuda")

# (B, C_in, C_out, H, W, kernel, stride, padding, dilation)
CASES = [
    (2, 7, 9, 6, 6, 3, 1, 1, 1),
    (1, 5, 6, 7, 5, 1, 2, 0, 1),
    (2, 4, 5, 8, 8, 5, 2, 2, 1),
    (1, 6, 7, 7, 7, 3, 1, 2, 2),
]
IDS = ["3x3", "1x1-s2", "5x5-s2-p2", "3x3-dil2"]


def _index(kind: str, full: int, active: int, gen):
    if kind == "int":
        return active
    if kind == "none":
        return None
    return torch.randperm(full, generator=gen)[:active].sort().values


def _inputs(case, in_kind, out_kind, layout, seed=0, bias=True):
    b, c_in, c_out, h, w, kk, *_ = case
    gen = torch.Generator().manual_seed(seed)
    k = c_in if in_kind == "none" else max(1, c_in - 2)
    n = c_out if out_kind == "none" else max(1, c_out - 3)
    x = torch.randn(b, 2 * k if layout == "strided" else k, h, w, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, kk, kk, generator=gen, dtype=torch.float64)
    bias_t = torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None
    return x, weight, bias_t, _index(in_kind, c_in, k, gen), _index(out_kind, c_out, n, gen)


def _run_case(backend, dtype, case, in_kind, out_kind, layout, seed=0, bias=True):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    x, weight, b, in_index, out_index = _inputs(case, in_kind, out_kind, layout, seed, bias)
    *_, stride, padding, dilation = case
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    view = (lambda t: t[:, ::2]) if layout == "strided" else (lambda t: t)
    in_t = in_index.to(device) if isinstance(in_index, torch.Tensor) else in_index
    out_t = out_index.to(device) if isinstance(out_index, torch.Tensor) else out_index

    def fn(x_, w_, b_=None):
        return masked_conv2d(view(x_), w_, b_, in_index=in_t, out_index=out_t, **conv)

    def ref(x_, w_, b_=None):
        ii = in_t if isinstance(in_t, torch.Tensor) else None
        oo = out_t if isinstance(out_t, torch.Tensor) else None
        n = oo.shape[0] if oo is not None else (out_t if isinstance(out_t, int) else w_.shape[0])
        return masked_conv2d_ref(view(x_), w_, b_, ii, oo, n, [stride] * 2, [padding] * 2, [dilation] * 2)

    inputs = [x, weight] + ([b] if bias else [])
    (y,), grads = check_against_reference(fn, ref, inputs, backend=backend, dtype=dtype, device=device, seed=seed)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "channels-last input gave an NCHW output"
    # pruned weight entries get exactly zero gradient
    keep = torch.zeros(weight.shape[:2], dtype=torch.bool, device=device)
    rows = out_t if isinstance(out_t, torch.Tensor) else torch.arange(out_t if out_t is not None else weight.shape[0])
    cols = in_t if isinstance(in_t, torch.Tensor) else torch.arange(in_t if in_t is not None else weight.shape[1])
    keep[rows.to(device).unsqueeze(1), cols.to(device).unsqueeze(0)] = True
    assert torch.all(grads[1][~keep] == 0), "gradient leaked into pruned weight entries"


KINDS = [("tensor", "tensor"), ("int", "int"), ("none", "none"), ("tensor", "int")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("in_kind,out_kind", KINDS, ids=[f"{a}-{b}" for a, b in KINDS])
def test_matches_reference_f32(backend, case, in_kind, out_kind):
    _run_case(backend, torch.float32, case, in_kind, out_kind, "nchw")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(backend, layout):
    _run_case(backend, torch.float32, CASES[0], "tensor", "tensor", layout, bias=False)
    _run_case(backend, torch.float32, CASES[2], "int", "tensor", layout, seed=1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64(backend):
    for case in CASES:
        _run_case(backend, torch.float64, case, "tensor", "tensor", "nchw")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision(backend, dtype):
    _run_case(backend, dtype, CASES[0], "tensor", "tensor", "nchw")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tensor", "int", "none"])
def test_depthwise(backend, kind):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(9, 1, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(9, generator=gen, dtype=torch.float64)
    idx = {"tensor": torch.tensor([0, 2, 3, 7, 8]), "int": 5, "none": None}[kind]
    k = 9 if idx is None else 5
    x = torch.randn(2, k, 6, 5, generator=gen, dtype=torch.float64)
    idx_d = idx.to(device) if isinstance(idx, torch.Tensor) else idx
    fn = lambda x_, w_, b_: masked_conv2d(x_, w_, b_, in_index=idx_d, out_index=idx_d, padding=1, stride=(1, 2),
                                          groups=k)  # fmt: skip
    rows = idx_d if isinstance(idx_d, torch.Tensor) else None
    ref = lambda x_, w_, b_: masked_conv2d_ref(x_, w_, b_, rows, rows, k, [1, 2], [1, 1], [1, 1], k)
    check_against_reference(fn, ref, [x, weight, b], backend=backend, dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_full_width(backend):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    fn = lambda x_, w_: masked_conv2d(x_, w_, groups=2, padding=1)
    ref = lambda x_, w_: torch.nn.functional.conv2d(x_, w_, None, 1, 1, 1, 2)
    check_against_reference(fn, ref, [x, weight], backend=backend, dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes(backend):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    w = torch.randn(6, 5, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    with force_backend(backend):
        y = masked_conv2d(torch.randn(0, 3, 5, 5, device=device, requires_grad=True), w, b, in_index=3, padding=1)
        assert y.shape == (0, 6, 5, 5)
        y.sum().backward()
        assert torch.all(w.grad == 0) and torch.all(b.grad == 0)
        y = masked_conv2d(torch.randn(2, 0, 5, 5, device=device), w, b, in_index=0, out_index=2)
        torch.testing.assert_close(y, b.detach()[:2].view(1, 2, 1, 1).expand(2, 2, 3, 3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_backend(OP, backend, "cpu")
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ii, oi = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    with force_backend(backend):
        f = lambda x, w, b: masked_conv2d(x, w, b, in_index=ii, out_index=oi, stride=2, padding=1, dilation=1)
        assert torch.autograd.gradcheck(f, (x, w, b))
        wd = torch.randn(6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        f = lambda x, w: masked_conv2d(x, w, in_index=ii, out_index=ii, groups=3, padding=1)
        assert torch.autograd.gradcheck(f, (x, wd))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    """Schema, fake (incl. the grad-W strides of a channels-last weight: review item 7), autograd, AOT."""
    skip_unless_backend(OP, backend, "cpu")
    w = torch.randn(7, 6, 3, 3, requires_grad=True)
    w_cl = torch.randn(7, 6, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(7, requires_grad=True)
    ii, oi = torch.tensor([0, 2, 5]), torch.tensor([1, 4, 6])
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    samples = [
        (x, w, b, ii, oi, 3, [1, 1], [1, 1], [1, 1], 1),
        (x_cl, w, None, None, None, 7, [2, 2], [0, 0], [1, 1], 1),
        (x, w_cl, b, ii, oi, 3, [1, 1], [1, 1], [1, 1], 1),
        (x_cl, w_cl, None, ii, None, 7, [2, 2], [1, 1], [1, 1], 1),
        (x, torch.randn(6, 1, 3, 3, requires_grad=True), None, ii, ii, 3, [1, 1], [1, 1], [2, 2], 3),
    ]
    with force_backend(backend):
        for args in samples:
            torch.library.opcheck(torch.ops.stp_fast.masked_conv2d.default, args)
        g = torch.randn(2, 3, 6, 6)
        bwd = (g, x.detach(), w_cl.detach(), ii, oi, 3, [1, 1], [1, 1], [1, 1], 1, True, True, True)
        torch.library.opcheck(torch.ops.stp_fast.masked_conv2d_backward.default, bwd)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    w = torch.randn(8, 6, 3, 3, requires_grad=True)
    ii = torch.tensor([0, 1, 4, 5])

    def f(x):
        h = masked_conv2d(x, w, in_index=ii, out_index=5, padding=1)
        return masked_conv2d(torch.relu(h), w, in_index=5, out_index=ii, stride=2).mean()

    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out_c, f(x))
    torch.testing.assert_close(torch.autograd.grad(out_c, x)[0], torch.autograd.grad(f(x), x)[0])


X, W = torch.randn(2, 4, 6, 6), torch.randn(8, 6, 3, 3)
BAD = [
    (dict(x=X[0], weight=W, in_index=4), ValueError, r"x must be 4-D"),
    (dict(x=X, weight=W[0], in_index=4), ValueError, r"weight must be 4-D"),
    (dict(x=X.double(), weight=W, in_index=4), TypeError, r"weight has dtype"),
    (dict(x=X, weight=W), ValueError, r"x has 4 channels but weight has 6"),
    (dict(x=X, weight=W, in_index=torch.tensor([0, 2, 1, 3])), ValueError, r"in_index must be sorted"),
    (dict(x=X, weight=W, in_index=torch.tensor([0, 1, 2, 6])), ValueError, r"in_index entries must lie in \[0, 6\)"),
    (dict(x=X, weight=W, in_index=4, stride=0), ValueError, r"stride must be >= 1"),
    (dict(x=X, weight=W, in_index=4, padding=-1), ValueError, r"padding must be >= 0"),
    (dict(x=X, weight=W, in_index=4, stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
    (dict(x=X[:, :, :2, :2], weight=W, in_index=4), ValueError, r"too small for kernel"),
    (dict(x=X, weight=torch.randn(8, 1, 3, 3), in_index=4, out_index=5, groups=4), ValueError, r"depthwise"),
    (dict(x=X, weight=W, in_index=4, groups=2), ValueError, r"needs all channels active"),
    (dict(x=X, weight=W, bias=torch.randn(7), in_index=4), ValueError, r"bias must have shape \(8,\)"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(backend, kwargs, exc, msg):
    skip_unless_backend(OP, backend, "cpu")
    kwargs = dict(kwargs)
    x, weight, bias = kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias", None)
    with force_backend(backend), pytest.raises(exc, match=msg):
        masked_conv2d(x, weight, bias, **kwargs)


def test_forced_unavailable_backend_raises():
    with force_backend("cuda"), pytest.raises(BackendUnavailableError, match="cpu tensors"):
        masked_conv2d(X, W, in_index=4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "case",
    [(64, 16, 16, 32, 32, 3, 1, 1, 1), (64, 64, 64, 8, 8, 3, 2, 1, 1), (32, 256, 64, 56, 56, 1, 1, 0, 1),
     (32, 128, 128, 28, 28, 3, 1, 1, 1), (32, 512, 512, 7, 7, 3, 1, 1, 1)],
    ids=["r20-s1", "r20-s3-down", "r50-1x1-56", "r50-3x3-28", "r50-3x3-7"],
)  # fmt: skip
def test_gpu_at_model_shapes(backend, dtype, case):
    for kinds in (("tensor", "tensor"), ("int", "int")):
        _run_case(backend, dtype, case, *kinds, "channels_last")
