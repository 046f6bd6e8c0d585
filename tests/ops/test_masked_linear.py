"""masked_linear: every backend against the float64 pure-PyTorch reference, forward and gradients."""

from __future__ import annotations

import re

import pytest
import torch

import stp_fast
from stp_fast import _ext
from stp_fast.ops import BackendUnavailableError, _backend, force_backend, masked_linear, masked_linear_ref
from stp_fast.testing import assert_gemm_close

OP = "masked_linear"
BACKENDS = ("reference", "cpu", "triton", "cuda")


def _device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_unavailable(backend: str, device: str) -> None:
    why = _backend.reasons(OP, backend, device)
    if why:
        pytest.skip(f"{backend} backend unavailable: {'; '.join(why)}")


def _index(kind: str, full: int, active: int, gen: torch.Generator):
    """An index argument of the given kind selecting ``active`` of ``full`` channels."""
    if kind == "none":
        return None
    if kind == "int":
        return active
    return torch.randperm(full, generator=gen)[:active].sort().values


def _as_tensor(index, full: int, device) -> torch.Tensor:
    if index is None:
        index = full
    if isinstance(index, int):
        return torch.arange(index, device=device)
    return index.to(device)


def _check_against_reference(backend, device, dtype, m_shape, n, k_full, n_full, in_kind, out_kind, *,
                             bias=True, noncontig=False, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    k = k_full if in_kind == "none" else (k_full + 1) // 2 if k_full > 1 else k_full
    n = n_full if out_kind == "none" else n
    in_index = _index(in_kind, k_full, k, gen)
    out_index = _index(out_kind, n_full, n, gen)
    weight = torch.randn(n_full, k_full, generator=gen, dtype=torch.float64)
    b = torch.randn(n_full, generator=gen, dtype=torch.float64) if bias else None
    # With noncontig, x is a strided view: every other column of a wider buffer.
    x_buf = torch.randn(*m_shape, 2 * k if noncontig else k, generator=gen, dtype=torch.float64)
    grad = torch.randn(*m_shape, n, generator=gen, dtype=torch.float64)
    to_dev = lambda t, dt: None if t is None else t.to(device, dt).requires_grad_(True)
    in_t = in_index.to(device) if isinstance(in_index, torch.Tensor) else in_index
    out_t = out_index.to(device) if isinstance(out_index, torch.Tensor) else out_index

    def run(fn, dt, backend_name=None):
        ws, bs = to_dev(weight, dt), to_dev(b, dt)
        xs = x_buf.to(device, dt)
        xs = (xs[..., ::2] if noncontig else xs).requires_grad_(True)
        assert xs.is_contiguous() != noncontig or xs.numel() <= 1
        with force_backend(backend_name):
            y = fn(xs, ws, bs)
            inputs = [t for t in (xs, ws, bs) if t is not None]
            grads = torch.autograd.grad(y, inputs, grad.to(device, dt))
        return (y, *grads)

    ii, oo = _as_tensor(in_index, k_full, device), _as_tensor(out_index, n_full, device)
    ref = lambda xs, ws, bs: masked_linear_ref(xs, ws, bs, ii, oo)
    oracle = run(ref, torch.float64)
    baseline = run(ref, dtype)
    actual = run(lambda xs, ws, bs: masked_linear(xs, ws, bs, in_index=in_t, out_index=out_t), dtype, backend)
    names = ["y", "grad_x", "grad_weight"] + (["grad_bias"] if bias else [])
    for name, a, bl, o in zip(names, actual, baseline, oracle):
        assert_gemm_close(a, bl, o, name=f"{backend}/{name}")
    # Pruned weight/bias positions get exactly zero gradient.
    keep = torch.zeros(n_full, k_full, dtype=torch.bool, device=device)
    keep[oo.unsqueeze(1), ii.unsqueeze(0)] = True
    assert torch.all(actual[2][~keep] == 0), "gradient leaked into pruned weight entries"
    if bias:
        keep_b = torch.zeros(n_full, dtype=torch.bool, device=device)
        keep_b[oo] = True
        assert torch.all(actual[3][~keep_b] == 0), "gradient leaked into pruned bias entries"


KINDS = [("tensor", "tensor"), ("int", "int"), ("none", "none"), ("tensor", "int"), ("none", "tensor")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("in_kind,out_kind", KINDS, ids=[f"{a}-{b}" for a, b in KINDS])
def test_matches_reference(backend, dtype, in_kind, out_kind):
    device = _device_for(backend)
    _skip_unavailable(backend, device)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels do not take float64 (see test_forced_backend_reasons)")
    # Odd, non-power-of-2 sizes; several seeds give fresh random inputs and index sets.
    for seed, (m, n, k_full, n_full) in enumerate([(13, 5, 29, 37), (1, 1, 1, 3), (33, 17, 70, 17)]):
        _check_against_reference(backend, device, dtype, (m,), n, k_full, n_full, in_kind, out_kind, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_noncontiguous_and_no_bias(backend):
    device = _device_for(backend)
    _skip_unavailable(backend, device)
    _check_against_reference(backend, device, torch.float32, (2, 3, 5), 6, 19, 11, "tensor", "tensor",
                             noncontig=True, bias=False)  # fmt: skip
    _check_against_reference(backend, device, torch.float32, (4, 7), 6, 9, 11, "int", "tensor", noncontig=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dim_input_and_empty_sizes(backend):
    device = _device_for(backend)
    _skip_unavailable(backend, device)
    w = torch.randn(8, 6, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    with force_backend(backend):
        x1 = torch.randn(6, device=device)
        torch.testing.assert_close(masked_linear(x1, w, b), masked_linear_ref(x1, w, b))
        # M = 0 rows
        y = masked_linear(torch.randn(0, 3, device=device, requires_grad=True), w, b, in_index=3, out_index=5)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert torch.all(w.grad == 0) and torch.all(b.grad == 0)
        # k = 0 active inputs: the output is the active bias
        y = masked_linear(
            torch.randn(4, 0, device=device), w, b, in_index=0, out_index=torch.tensor([1, 6], device=device)
        )
        torch.testing.assert_close(y, b.detach()[[1, 6]].expand(4, 2))
        # n = 0 active outputs
        x = torch.randn(4, 6, device=device, requires_grad=True)
        y = masked_linear(x, w, b, out_index=0)
        assert y.shape == (4, 0)
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.all(gx == 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    _skip_unavailable(backend, "cpu")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ii, oi = torch.tensor([0, 2, 5, 8]), torch.tensor([1, 3, 6])
    with force_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, b, in_index=ii, out_index=oi), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, b, in_index=4, out_index=5), (x, w, b))


def _opcheck_samples(device="cpu"):
    w = torch.randn(11, 9, device=device, requires_grad=True)
    b = torch.randn(11, device=device, requires_grad=True)
    idx_in, idx_out = torch.tensor([0, 4, 8], device=device), torch.tensor([2, 3, 10], device=device)
    return [
        (torch.randn(5, 3, device=device, requires_grad=True), w, b, idx_in, idx_out, 3),
        (torch.randn(2, 4, 9, device=device, requires_grad=True), w, None, None, None, 11),
        (torch.randn(5, 3, device=device, requires_grad=True), w, b, None, idx_out, 3),
        (torch.randn(5, 3, device=device), w, b, idx_in, None, 6),
    ]


def test_opcheck():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.stp_fast.masked_linear.default, args)
    w = torch.randn(11, 9)
    torch.library.opcheck(
        torch.ops.stp_fast.masked_linear_backward.default,
        (torch.randn(5, 3), torch.randn(5, 4), w, torch.tensor([0, 1, 2, 7]), None, 3, True, True, False),
    )


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    w = torch.randn(16, 12, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    ii, oi = torch.tensor([1, 2, 5, 7, 11]), torch.tensor([0, 3, 4, 9])

    def f(x, w, b):
        h = masked_linear(x, w, b, in_index=ii, out_index=oi)
        return masked_linear(torch.relu(h), w, None, in_index=oi, out_index=6).sum(-1)

    x = torch.randn(3, 5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(x, w, b), f(x, w, b)
    torch.testing.assert_close(out_c, out_e)
    grads_c = torch.autograd.grad(out_c.sum(), (x, w, b))
    grads_e = torch.autograd.grad(out_e.sum(), (x, w, b))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_torch_compile_inductor_matches_eager():
    torch._dynamo.reset()
    w = torch.randn(10, 8)
    f = lambda x: torch.tanh(masked_linear(x, w, in_index=5, out_index=torch.tensor([0, 2, 9])))
    x = torch.randn(4, 5)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


# ------------------------------------------------------------------------------------- bad input
W, B, X = torch.randn(10, 8), torch.randn(10), torch.randn(4, 5)
IDX5 = torch.tensor([0, 1, 2, 3, 7])

BAD_PY = [
    (dict(x=X.int(), weight=W), TypeError, r"x must be float32"),
    (dict(x=X.double(), weight=W), TypeError, r"weight has dtype torch.float32 but x has torch.float64"),
    (dict(x=X, weight=W, bias=B.double(), in_index=5), TypeError, r"bias has dtype"),
    (dict(x=X, weight=W[None]), ValueError, r"weight must be 2-D"),
    (dict(x=X, weight=W), ValueError, r"x has 5 features but weight has 8"),
    (dict(x=X, weight=W, in_index=6), ValueError, r"x has 5 features but in_index selects 6"),
    (dict(x=X, weight=W, in_index=9), ValueError, r"in_index=9 must lie in \[0, 8\]"),
    (dict(x=X, weight=W, in_index=IDX5, out_index=11), ValueError, r"out_index=11 must lie in \[0, 10\]"),
    (dict(x=X, weight=W, in_index=IDX5.int()), TypeError, r"in_index must be an int64 tensor"),
    (dict(x=X, weight=W, in_index=[0, 1, 2, 3, 4]), TypeError, r"in_index must be None, an int or a 1-D"),
    (dict(x=X, weight=W, in_index=IDX5[None]), ValueError, r"in_index must be 1-D"),
    (dict(x=X, weight=W, in_index=torch.tensor([0, 1, 3, 2, 4])), ValueError, r"in_index must be sorted"),
    (dict(x=X, weight=W, in_index=torch.tensor([0, 1, 1, 2, 4])), ValueError, r"in_index must be sorted"),
    (dict(x=X, weight=W, in_index=torch.tensor([0, 1, 2, 3, 8])), ValueError, r"in_index entries must lie in \[0, 8\)"),
    (dict(x=X, weight=W, in_index=torch.tensor([-1, 1, 2, 3, 4])), ValueError, r"in_index entries must lie"),
    (
        dict(x=X, weight=W, in_index=5, out_index=torch.tensor([3, 10])),
        ValueError,
        r"out_index entries must lie in \[0, 10\)",
    ),
    (dict(x=X, weight=W, bias=B[:9], in_index=5), ValueError, r"bias must have shape \(10,\)"),
    (dict(x=X, weight=W, in_index=5, out_index=True), TypeError, r"out_index must be None, an int"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,exc,msg", BAD_PY, ids=[m for _, _, m in BAD_PY])
def test_bad_input_raises_named_error(backend, kwargs, exc, msg):
    _skip_unavailable(backend, "cpu")
    kwargs = dict(kwargs)
    x, weight = kwargs.pop("x"), kwargs.pop("weight")
    bias = kwargs.pop("bias", None)
    with force_backend(backend), pytest.raises(exc, match=msg):
        masked_linear(x, weight, bias, **kwargs)


def test_bad_input_mixed_devices():
    meta_w = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        masked_linear(X, meta_w, in_index=5)
    with pytest.raises(ValueError, match=r"in_index is on meta but x is on cpu"):
        masked_linear(X, W, in_index=torch.empty(5, dtype=torch.long, device="meta"))


BAD_EXT = [
    ((X.int(), W, None, None, None, 10), TypeError, r"dtype|Float|float"),
    ((X, W.double(), None, None, None, 10), TypeError, r"weight"),
    ((X, W[None], None, None, None, 10), ValueError, r"weight must be 2-D"),
    ((X, W, None, IDX5.int(), None, 10), TypeError, r"in_index must be int64"),
    ((X, W, None, torch.tensor([0, 2, 1, 3, 4]), None, 10), ValueError, r"in_index must be sorted"),
    ((X, W, None, torch.tensor([0, 1, 2, 3, 9]), None, 10), ValueError, r"in_index entries must lie in \[0, 8\)"),
    ((X, W, None, torch.tensor([0, 1, 2, 3]), None, 10), ValueError, r"x has 5 features but in_index has 4"),
    ((X, W, None, None, None, 11), ValueError, r"out_width"),
    ((X, W, None, None, torch.tensor([1, 2]), 3), ValueError, r"out_width|out_index"),
    ((X, W, B[:3], None, None, 10), ValueError, r"bias"),
    ((torch.randn(4, 9), W, None, None, None, 10), ValueError, r"x has 9 features"),
]


@pytest.mark.parametrize("args,exc,msg", BAD_EXT, ids=[m for _, _, m in BAD_EXT])
def test_extension_rejects_bad_input_directly(args, exc, msg):
    """The C++ kernels validate on their own: calling the private op directly raises the same way."""
    if not _ext.has_kernel("_masked_linear_fwd", "cpu"):
        pytest.skip(f"stp_fast._C CPU kernels unavailable: {_ext.load_error() or 'not built'}")
    with pytest.raises(exc, match=msg):
        torch.ops.stp_fast._masked_linear_fwd(*args)
    if args[2] is not None:
        return  # the backward op takes no bias: nothing to check there
    g = torch.randn(4, 10)
    with pytest.raises(exc, match=msg):
        torch.ops.stp_fast._masked_linear_bwd(g, *args[:2], *args[3:], True, True, True)


def test_forced_backend_reasons():
    with force_backend("cuda"), pytest.raises(BackendUnavailableError, match=r"cuda.*cpu tensors"):
        masked_linear(X, W, in_index=5)
    with force_backend("triton"):
        if _backend.triton_interpreted():
            with pytest.raises(BackendUnavailableError, match=r"float64"):
                masked_linear(X.double(), W.double(), in_index=5)
    with force_backend("cpu"):
        if not _ext.has_kernel("_masked_linear_fwd", "cpu"):
            with pytest.raises(BackendUnavailableError, match=r"stp_fast._C"):
                masked_linear(X, W, in_index=5)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        with force_backend("fastest"):
            pass


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("STP_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=re.escape("STP_FAST_BACKEND=cuda")):
        masked_linear(X, W, in_index=5)
    monkeypatch.setenv("STP_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"STP_FAST_BACKEND must be one of"):
        masked_linear(X, W, in_index=5)
    monkeypatch.setenv("STP_FAST_BACKEND", "reference")
    torch.testing.assert_close(masked_linear(X, W, in_index=5), X @ W[:, :5].T)


def test_auto_selection_prefers_extension_on_cpu():
    expected = "cpu" if _ext.has_kernel("_masked_linear_fwd", "cpu") else "reference"
    assert _backend.pick(OP, "cpu").backend == expected
    assert stp_fast.ops.masked_linear is masked_linear


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(4096, 384, 1536), (1000, 777, 333), (8, 1000, 2048)], ids=str)
def test_gpu_backends_at_model_shapes(backend, dtype, shape):
    _skip_unavailable(backend, "cuda")
    m, n_full, k_full = shape
    for kinds in [("tensor", "tensor"), ("int", "int")]:
        _check_against_reference(backend, "cuda", dtype, (m,), n_full // 2, k_full, n_full, *kinds)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_within_twice_pytorch_error(backend, dtype):
    """bf16/fp16 accumulate in fp32: error at most 2x that of PyTorch's own op in that dtype."""
    device = _device_for(backend)
    _skip_unavailable(backend, device)
    _check_against_reference(backend, device, dtype, (21,), 9, 40, 23, "tensor", "tensor")
    _check_against_reference(backend, device, dtype, (21,), 9, 40, 23, "int", "none")
