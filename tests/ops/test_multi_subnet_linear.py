"""multi_subnet_linear: equals the list of single-subnet results on every backend, forward and backward."""

from __future__ import annotations

import pytest
import torch

from stp_fast.ops import force_backend, masked_linear_ref, multi_subnet_linear
from stp_fast.testing import backend_device, check_against_reference, skip_unless_backend

OP = "multi_subnet_linear"
BACKENDS = ("reference", "cpu", "triton", "cuda")
N, K = 23, 19

# S subnets as (rows M_s, in width k_s, out width n_s): any order, repeats, a full-width subnet.
SUBNETS = {
    1: [(5, K, N)],
    2: [(4, 7, 9), (6, K, N)],
    3: [(3, 10, 12), (3, 10, 12), (2, 1, 1)],
    4: [(7, K, N), (5, 12, 4), (1, 3, 20), (3, 15, 15)],
    6: [(2, 5, 5), (4, K, N), (3, 9, 17), (6, 2, 8), (1, 18, 3), (5, 11, 11)],
}


def _make(spec, indexed, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, k, generator=gen, dtype=torch.float64) for m, k, _ in spec]
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    widths = [n for *_, n in spec]
    ins = outs = None
    if indexed:
        ins = [torch.randperm(K, generator=gen)[:k].sort().values for _, k, _ in spec]
        outs = [torch.randperm(N, generator=gen)[:n].sort().values for *_, n in spec]
    return xs, weight, bias, widths, ins, outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("count", sorted(SUBNETS))
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_equals_single_subnet_results(backend, count, indexed):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    xs, weight, bias, widths, ins, outs = _make(SUBNETS[count], indexed, seed=count)
    to = lambda lst: None if lst is None else [t.to(device) for t in lst]
    ins_d, outs_d = to(ins), to(outs)

    def fn(w, b, *xs_):
        return multi_subnet_linear(list(xs_), w, b, widths, in_indices=ins_d, out_indices=outs_d)

    def ref(w, b, *xs_):
        return [masked_linear_ref(x, w, b, None if ins_d is None else ins_d[s],
                                  None if outs_d is None else outs_d[s], widths[s])
                for s, x in enumerate(xs_)]  # fmt: skip

    _, grads = check_against_reference(fn, ref, [weight, bias, *xs], backend=backend, dtype=torch.float32,
                                       device=device, seed=count)  # fmt: skip
    # weight entries no subnet uses get exactly zero gradient
    used = torch.zeros(N, K, dtype=torch.bool, device=device)
    for s, (_m, k, n) in enumerate(SUBNETS[count]):
        r = outs_d[s] if outs_d else torch.arange(n, device=device)
        c = ins_d[s] if ins_d else torch.arange(k, device=device)
        used[r.unsqueeze(1), c.unsqueeze(0)] = True
    assert torch.all(grads[0][~used] == 0)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_batch_dims_noncontiguous_no_bias_low_precision(backend):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(N, K, generator=gen, dtype=torch.float64)
    xs = [torch.randn(2, 3, 2 * 8, generator=gen, dtype=torch.float64), torch.randn(4, K, generator=gen).double()]
    fn = lambda w, a, b: multi_subnet_linear([a[..., ::2], b], w, None, [5, N])
    ref = lambda w, a, b: [masked_linear_ref(a[..., ::2], w, None, None, None, 5), masked_linear_ref(b, w)]
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(fn, ref, [weight, *xs], backend=backend, dtype=dtype, device=device)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_backend(OP, backend, "cpu")
    xs, weight, bias, widths, ins, outs = _make(SUBNETS[3], True, seed=0)
    leaves = [t.requires_grad_() for t in (weight, bias, *xs)]
    with force_backend(backend):
        f = lambda w, b, *xs_: multi_subnet_linear(list(xs_), w, b, widths, in_indices=ins, out_indices=outs)
        assert torch.autograd.gradcheck(f, leaves)
        g = lambda w, b, *xs_: multi_subnet_linear(list(xs_), w, b, widths)
        assert torch.autograd.gradcheck(g, leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unused_output_and_empty_batch(backend):
    skip_unless_backend(OP, backend, "cpu")
    w = torch.randn(N, K, requires_grad=True)
    xs = [torch.randn(3, K, requires_grad=True), torch.randn(0, 5, requires_grad=True)]
    with force_backend(backend):
        ys = multi_subnet_linear(xs, w, None, [N, 4])
        assert ys[1].shape == (0, 4)
        ys[0].sum().backward()  # the second output takes no part
    torch.testing.assert_close(w.grad, torch.ones(3, N).T @ xs[0].detach())


def test_opcheck():
    w, b = torch.randn(N, K, requires_grad=True), torch.randn(N, requires_grad=True)
    xs = [torch.randn(3, K, requires_grad=True), torch.randn(2, 6, requires_grad=True)]
    torch.library.opcheck(torch.ops.stp_fast.multi_subnet_linear.default, (xs, w, b, [N, 4], None, None))
    ins, outs = [torch.arange(K), torch.tensor([0, 1, 5, 7, 9, 18])], [torch.arange(N), torch.tensor([2, 3, 4, 20])]
    torch.library.opcheck(torch.ops.stp_fast.multi_subnet_linear.default, (xs, w, None, [N, 4], ins, outs))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    w = torch.randn(N, K, requires_grad=True)
    f = lambda a, b: sum(y.sum() for y in multi_subnet_linear([a, b], w, None, [N, 7]))
    a, b = torch.randn(3, K), torch.randn(2, 10)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    torch.testing.assert_close(out_c, f(a, b))


W = torch.randn(N, K)
BAD = [
    (dict(xs=[], out_widths=[]), ValueError, r"xs is empty"),
    (dict(xs=torch.randn(3, K), out_widths=[1]), TypeError, r"xs must be a list"),
    (dict(xs=[torch.randn(3, K)], out_widths=[N + 1]), ValueError, r"out_widths\[0\]=24 must lie in \[0, 23\]"),
    (dict(xs=[torch.randn(3, K)], out_widths=[-1]), ValueError, r"out_widths\[0\]=-1"),
    (dict(xs=[torch.randn(3, K + 1)], out_widths=[2]), ValueError, r"xs\[0\] has 20 features"),
    (dict(xs=[torch.randn(3, K)], out_widths=[2, 3]), ValueError, r"out_widths has 2 entries but xs has 1"),
    (dict(xs=[torch.randn(3, K), torch.randn(3, 4).double()], out_widths=[2, 3]), TypeError, r"xs\[1\] has dtype"),
    (dict(xs=[torch.randn(3, 4)], out_widths=[2], in_indices=[torch.tensor([0, 1, 3, 2])]), ValueError,
     r"in_indices\[0\] must be sorted"),
    (dict(xs=[torch.randn(3, 4)], out_widths=[2], in_indices=[torch.tensor([0, 1, 3])]), ValueError,
     r"in_indices\[0\] has 3 entries but subnet 0 has width 4"),
    (dict(xs=[torch.randn(3, 4)], out_widths=[2], out_indices=[torch.tensor([0, 23])]), ValueError,
     r"out_indices\[0\] entries must lie in \[0, 23\)"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(backend, kwargs, exc, msg):
    skip_unless_backend(OP, backend, "cpu")
    with force_backend(backend), pytest.raises(exc, match=msg):
        multi_subnet_linear(kwargs["xs"], W, None, kwargs["out_widths"], in_indices=kwargs.get("in_indices"),
                            out_indices=kwargs.get("out_indices"))  # fmt: skip


def test_bad_input_mixed_devices():
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        multi_subnet_linear([torch.randn(3, K)], torch.empty(N, K, device="meta"), None, [2])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gpu_at_model_shapes(backend, dtype):
    device = "cuda"
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(0)
    n_full, k_full = 1000, 2048  # resnet50 classifier; subnets keep 100/75/50/25% of its input features
    spec = [(128, k_full, n_full), (128, 1536, n_full), (128, 1024, n_full), (128, 512, n_full), (128, 256, n_full)]
    xs = [torch.randn(m, k, generator=gen, dtype=torch.float64) for m, k, _ in spec]
    weight = torch.randn(n_full, k_full, generator=gen, dtype=torch.float64) / k_full**0.5
    widths = [n for *_, n in spec]
    fn = lambda w, *xs_: multi_subnet_linear(list(xs_), w, None, widths)
    ref = lambda w, *xs_: [masked_linear_ref(x, w, None, None, None, n) for x, n in zip(xs_, widths)]
    check_against_reference(fn, ref, [weight, *xs], backend=backend, dtype=dtype, device=device)
