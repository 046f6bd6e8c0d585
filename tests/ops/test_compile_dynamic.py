"""torch.compile(fullgraph=True) of op sequences does not recompile per width combination.

Widths reach the ops as ``SymInt``s (the op schemas say ``SymInt`` / ``SymInt[]``), so once dynamo has
made them dynamic (automatically after the first change, or from the start with ``dynamic=True``) new
width combinations reuse the compiled graph.  STP draws new subnet widths every step; without this,
dynamo would recompile every step and fall back to eager after ``cache_size_limit`` (GPU review, item 6).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from stp_fast.ops import masked_conv2d, masked_linear, multi_subnet_batch_norm, multi_subnet_conv2d, multi_subnet_linear

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTHS = [[16, 8, 4], [16, 12, 6], [16, 10, 5], [16, 7, 3], [16, 9, 2]]


def _params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((16, 3, 3, 3), (16, 16, 3, 3), (16,), (16,), (10, 16))
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def _multi_step(x, widths, w1, w2, bw, bb, fc):
    xs = [x] * len(widths)
    h = multi_subnet_conv2d(xs, w1, None, widths, padding=1)
    h = multi_subnet_batch_norm(h, bw, bb, relu=True)
    h = multi_subnet_conv2d(h, w2, None, widths, padding=1)
    logits = multi_subnet_linear([t.mean((2, 3)) for t in h], fc, None, [10] * len(widths))
    return sum(t.square().sum() for t in logits)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_multi_subnet_step_compiles_once_for_all_widths(dynamic):
    torch._dynamo.reset()
    counters.clear()
    params = _params()
    compiled = torch.compile(_multi_step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    x = torch.randn(2, 3, 8, 8)
    for widths in WIDTHS:
        out_c = compiled(x, widths, *params)
        out_e = _multi_step(x, widths, *params)
        torch.testing.assert_close(out_c, out_e)
        for gc, ge in zip(torch.autograd.grad(out_c, params), torch.autograd.grad(out_e, params)):
            torch.testing.assert_close(gc, ge)
    # automatic dynamic: one static graph, then one with dynamic widths for every later combination
    assert _graphs() == (1 if dynamic else 2), f"{_graphs()} graphs for {len(WIDTHS)} width combinations"


def test_masked_ops_prefix_widths_compile_once():
    torch._dynamo.reset()
    counters.clear()
    w, wc = torch.randn(16, 12, requires_grad=True), torch.randn(8, 6, 3, 3, requires_grad=True)

    def f(x, xc, n, m):
        y = masked_linear(x, w, in_index=x.shape[-1], out_index=n)
        return y.sum() + masked_conv2d(xc, wc, in_index=xc.shape[1], out_index=m, padding=1).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for k, n, kc, m in [(12, 16, 6, 8), (7, 9, 5, 3), (5, 11, 2, 6), (9, 3, 4, 4)]:
        x, xc = torch.randn(3, k), torch.randn(2, kc, 5, 5)
        torch.testing.assert_close(compiled(x, xc, n, m), f(x, xc, n, m))
    assert _graphs() == 2
