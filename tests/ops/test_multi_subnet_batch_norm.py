"""multi_subnet_batch_norm: per-subnet batch statistics, running statistics owned by one subnet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stp_fast.ops import force_backend, multi_subnet_batch_norm
from stp_fast.testing import backend_device, check_against_reference, skip_unless_backend

OP = "multi_subnet_batch_norm"
BACKENDS = ("reference", "cpu", "triton", "cuda")
C = 13


def _ref(xs, weight, bias, rm, rv, idx, training, relu, eps=1e-5):
    """Per subnet F.batch_norm on the sliced parameters, then ReLU (running stats never updated)."""
    outs = []
    for s, x in enumerate(xs):
        ch = idx[s] if idx is not None else torch.arange(x.shape[1], device=x.device)
        rm_s, rv_s, w_s, b_s = (None if t is None else t[ch] for t in (rm, rv, weight, bias))
        y = F.batch_norm(x, rm_s, rv_s, w_s, b_s, training, 0.0, eps)
        outs.append(F.relu(y) if relu else y)
    return outs


def _make(spatial, indexed, seed, counts=(3, 13, 7, 1)):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2 + s, c, *spatial, generator=gen, dtype=torch.float64) * (s + 1) + s for s, c in
          enumerate(counts)]  # fmt: skip
    w = torch.randn(C, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    rm = torch.randn(C, generator=gen, dtype=torch.float64)
    rv = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    idx = [torch.randperm(C, generator=gen)[:c].sort().values for c in counts] if indexed else None
    return xs, w, b, rm, rv, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(), (4, 3)], ids=["2d", "4d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_equals_per_subnet_batch_norm(backend, spatial, training, relu, indexed):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    xs, w, b, rm, rv, idx = _make(spatial, indexed, seed=len(spatial) + 2 * relu)
    rm_d, rv_d = rm.to(device, torch.float32), rv.to(device, torch.float32)
    idx_d = None if idx is None else [t.to(device) for t in idx]

    def fn(w_, b_, *xs_):
        return multi_subnet_batch_norm(list(xs_), w_, b_, rm_d, rv_d, training=training, relu=relu, indices=idx_d)

    def ref(w_, b_, *xs_):
        return _ref(list(xs_), w_, b_, rm_d.to(w_.dtype), rv_d.to(w_.dtype), idx_d, training, relu)

    check_against_reference(fn, ref, [w, b, *xs], backend=backend, dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_no_affine(backend):
    device = backend_device(backend)
    skip_unless_backend(OP, backend, device)
    xs, _, _, rm, rv, _ = _make((3, 5), False, seed=9)
    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    fn = lambda *xs_: multi_subnet_batch_norm(list(xs_), None, None, rm.float().to(device), rv.float().to(device))
    ref = lambda *xs_: _ref(list(xs_), None, None, None, None, None, True, False)
    check_against_reference(fn, ref, xs, backend=backend, dtype=torch.float32, device=device)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_running_stats_owned_by_one_subnet(backend):
    """Only the stats subnet updates the running stats, exactly like nn.BatchNorm2d would."""
    skip_unless_backend(OP, backend, "cpu")
    bn = torch.nn.BatchNorm2d(C)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    xs = [torch.randn(4, C, 3, 3), torch.randn(2, 5, 3, 3) * 10 + 3]
    with force_backend(backend):
        for _ in range(3):
            multi_subnet_batch_norm(xs, bn.weight, bn.bias, rm, rv, stats_subnet=0)
            bn(xs[0])
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
        before = rm.clone(), rv.clone()
        multi_subnet_batch_norm(xs, bn.weight, bn.bias, rm, rv, stats_subnet=None)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        multi_subnet_batch_norm(xs, bn.weight, bn.bias, rm, rv, stats_subnet=1)  # a subnet owns them: prefix only
        assert torch.equal(rm[5:], before[0][5:]) and not torch.equal(rm[:5], before[0][:5])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_backend(OP, backend, "cpu")
    xs, w, b, rm, rv, idx = _make((2, 2), True, seed=1, counts=(4, 2))
    leaves = [t.requires_grad_() for t in (w, b, *xs)]
    with force_backend(backend):
        for training in (True, False):

            def f(w_, b_, *xs_, training=training):
                return multi_subnet_batch_norm(list(xs_), w_, b_, rm, rv, training=training, relu=True, indices=idx)

            assert torch.autograd.gradcheck(f, leaves)


def test_opcheck():
    xs = [torch.randn(3, C, 2, 2, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)]
    w, b = torch.randn(C, requires_grad=True), torch.randn(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    torch.library.opcheck(
        torch.ops.stp_fast.multi_subnet_batch_norm.default, (xs, w, b, rm, rv, None, True, 1e-5, True)
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("indexed", [False, True], ids=["prefix", "index"])
def test_eager_function_equals_custom_op(training, indexed):
    """On the CPU the public function runs the op's eager twin (a torch.autograd.Function calling the same
    backend, without the custom-op dispatch): outputs and gradients equal the custom op's bit for bit."""
    skip_unless_backend(OP, "cpu", "cpu")
    xs, weight, bias, rm, rv, idx = _make((4, 3), indexed, seed=6)
    results = []
    for eager in (True, False):
        w, b = weight.float().requires_grad_(), bias.float().requires_grad_()
        xs_ = [x.float().contiguous(memory_format=torch.channels_last).requires_grad_() for x in xs]
        if eager:
            ys = multi_subnet_batch_norm(xs_, w, b, rm.float(), rv.float(), training=training, relu=True,
                                         indices=idx)  # fmt: skip
            assert type(ys[0].grad_fn).__name__.startswith("MultiSubnetBatchNormFunction")
        else:
            ys = torch.ops.stp_fast.multi_subnet_batch_norm(xs_, w, b, rm.float(), rv.float(), idx, training, 1e-5,
                                                            True)[0]  # fmt: skip
        grads = torch.autograd.grad(sum((y * y).sum() for y in ys[1:]), [w, b, *xs_])  # ys[0] gets no gradient
        results.append([*ys, *grads])
    assert all(torch.equal(a, c) for a, c in zip(*results))


BAD = [
    (dict(xs=[]), ValueError, r"xs is empty"),
    (dict(xs=[torch.randn(3, C + 1)]), ValueError, r"xs\[0\] has 14 channels but the layer has only 13"),
    (dict(xs=[torch.randn(3)]), ValueError, r"must be \[B, C\]"),
    (dict(xs=[torch.randn(3, 4)], stats_subnet=2), ValueError, r"stats_subnet=2"),
    (dict(xs=[torch.randn(3, 4)], training=False, running=False), ValueError, r"eval mode"),
    (dict(xs=[torch.randn(3, 4)], indices=[torch.tensor([0, 1, 2])]), ValueError, r"indices\[0\] has 3 entries"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(backend, kwargs, exc, msg):
    skip_unless_backend(OP, backend, "cpu")
    kwargs = dict(kwargs)
    xs, running = kwargs.pop("xs"), kwargs.pop("running", True)
    rm, rv = (torch.zeros(C), torch.ones(C)) if running else (None, None)
    with force_backend(backend), pytest.raises(exc, match=msg):
        multi_subnet_batch_norm(xs, torch.ones(C), torch.zeros(C), rm, rv, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_resnet_shapes(backend):
    device = "cuda"
    skip_unless_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(0)
    widths = [64, 48, 32, 32, 16]
    xs = [torch.randn(128, c, 32, 32, generator=gen, dtype=torch.float64) for c in widths]
    w, b = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)
    fn = lambda w_, b_, *xs_: multi_subnet_batch_norm(list(xs_), w_, b_, None, None, relu=True)
    ref = lambda w_, b_, *xs_: _ref(list(xs_), w_, b_, None, None, None, True, True)
    check_against_reference(fn, ref, [w, b, *xs], backend=backend, dtype=torch.float32, device=device)


# --- the CPU kernels for float32 channels-last inputs (csrc/multi_subnet_batch_norm/bn_rows_cpu.cpp) ---
# Shapes: odd channel counts (the chunk length is a multiple of lcm(C, 16)), a last partial chunk,
# more channels than one chunk's minimum (2048), one element, and data far from zero mean.
ROWS_CASES = {
    "odd-C": ([(4, 13, 6, 5), (3, 5, 6, 5), (2, 29, 6, 5)], 1.0, 0.0),
    "partial-chunk": ([(3, 7, 7, 7), (1, 16, 3, 3)], 1.0, 0.0),
    "wide": ([(3, 2048, 1, 1), (2, 1000, 2, 1)], 1.0, 0.0),
    "single": ([(1, 1, 1, 2), (2, 1, 1, 1)], 1.0, 0.0),
    "offset": ([(8, 13, 4, 4), (5, 3, 4, 4)], 50.0, 1e3),
}


def _rows_inputs(case: str, seed: int = 0):
    shapes, scale, offset = ROWS_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    c = max(s[1] for s in shapes)
    xs = [(torch.randn(*s, generator=gen, dtype=torch.float64) * scale + offset).contiguous(
        memory_format=torch.channels_last) for s in shapes]  # fmt: skip
    return xs, torch.randn(c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("case", list(ROWS_CASES))
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_channels_last_float32_kernels(case, relu):
    """Training-mode outputs and gradients (x, weight, bias) of the channels-last float32 path against the
    float64 reference by the 2x rule -- through the public function (eager) and the custom op."""
    skip_unless_backend(OP, "cpu", "cpu")
    xs, w, b = _rows_inputs(case)
    fn = lambda w_, b_, *xs_: multi_subnet_batch_norm(list(xs_), w_, b_, None, None, relu=relu)
    ref = lambda w_, b_, *xs_: _ref(list(xs_), w_, b_, None, None, None, True, relu)
    check_against_reference(fn, ref, [w, b, *xs], backend="cpu", dtype=torch.float32, device="cpu")

    def via_op(w_, b_, *xs_):
        return torch.ops.stp_fast.multi_subnet_batch_norm(list(xs_), w_, b_, None, None, None, True, 1e-5, relu)[0]

    check_against_reference(via_op, ref, [w, b, *xs], backend="cpu", dtype=torch.float32, device="cpu")


def test_channels_last_relu_mask_recomputed_exactly():
    """The extension's backward with relu=True recomputes the forward's output bit for bit: its gradients
    equal those of masking grad_out with the actual outputs (many outputs sit right at 0)."""
    skip_unless_backend(OP, "cpu", "cpu")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 13, 9, 9, generator=gen)
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.3, x.round(decimals=1), x)  # ties around the mean
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(13, generator=gen) + 0.5, torch.zeros(13)
    fwd = torch.ops.stp_fast._multi_subnet_batch_norm_fwd
    bwd = torch.ops.stp_fast._multi_subnet_batch_norm_bwd
    (y,), means, invstds = fwd([x], w, b, None, None, None, True, 1e-5, True)
    g = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    fused = bwd([g], [x], w, b, means, invstds, None, True, True, True, True, True)
    masked = bwd([torch.ops.aten.threshold_backward(g, y, 0)], [x], w, b, means, invstds, None, True, False, True,
                 True, True)  # fmt: skip
    for a, m in zip([*fused[0], fused[1], fused[2]], [*masked[0], masked[1], masked[2]]):
        assert torch.equal(a, m)
    assert y.is_contiguous(memory_format=torch.channels_last) and fused[0][0].is_contiguous(
        memory_format=torch.channels_last)  # fmt: skip


def test_channels_last_kernels_are_deterministic():
    skip_unless_backend(OP, "cpu", "cpu")
    xs, w, b = _rows_inputs("odd-C")
    xs, w, b = [x.float() for x in xs], w.float().requires_grad_(), b.float().requires_grad_()
    runs = []
    for _ in range(2):
        ys = multi_subnet_batch_norm(xs, w, b, None, None, relu=True)
        gw, gb = torch.autograd.grad(sum((y * y).sum() for y in ys), (w, b))
        runs.append([*ys, gw, gb])
    assert all(torch.equal(a, c) for a, c in zip(*runs))
