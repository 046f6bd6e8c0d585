"""Per-step metadata without host syncs (GPU review, items 2 and 6).

* Launch metadata tables are cached on the device by content (``stp_fast.kernels._common.device_table``).
* Index-tensor value checks follow ``STP_FAST_CHECK_INDICES`` (default "once": one check per tensor).
* On a GPU (marked ``cuda``): a warm multi-subnet step runs under ``torch.cuda.set_sync_debug_mode("error")``,
  and op sequences can be captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import pytest
import torch

from stp_fast.ops import (
    _checks,
    force_backend,
    masked_conv2d,
    multi_subnet_batch_norm,
    multi_subnet_conv2d,
    multi_subnet_linear,
)


def test_device_table_is_cached_by_content():
    from stp_fast.kernels import _common

    rows = [[1, 2, 3], [4, 5, 6]]
    first = _common.device_table(rows, torch.device("cpu"))
    assert _common.device_table([list(r) for r in rows], torch.device("cpu")) is first
    other = _common.device_table([[1, 2, 3], [4, 5, 7]], torch.device("cpu"))
    assert other is not first and other.tolist() == [[1, 2, 3], [4, 5, 7]]
    assert first.dtype == torch.int64 and first.tolist() == rows


def _count_checks(monkeypatch) -> list:
    calls = []
    real = _checks._index_stats
    monkeypatch.setattr(_checks, "_index_stats", lambda t: calls.append(1) or real(t))
    return calls


def _conv(idx):
    w = torch.randn(6, 5, 3, 3)
    return masked_conv2d(torch.randn(1, idx.shape[0], 4, 4), w, in_index=idx, out_index=2, padding=1)


def test_index_checks_once_per_tensor(monkeypatch):
    monkeypatch.delenv("STP_FAST_CHECK_INDICES", raising=False)
    calls = _count_checks(monkeypatch)
    idx = torch.tensor([0, 2, 3])
    for _ in range(3):
        _conv(idx)
    assert len(calls) == 1, "an unchanged index tensor is checked once"
    idx[2] = 4  # in place: the version counter moves, the tensor is checked again
    _conv(idx)
    assert len(calls) == 2
    idx[1] = 9  # out of range (weight has 5 input channels): caught after the in-place change
    with pytest.raises(ValueError, match="in_index entries must lie in"):
        _conv(idx)
    with pytest.raises(ValueError, match="must be sorted"):  # a fresh bad tensor fails on its first use
        _conv(torch.tensor([2, 1, 3]))


@pytest.mark.parametrize("mode,expected", [("always", 3), ("1", 3), ("never", 0), ("0", 0)])
def test_index_check_modes(monkeypatch, mode, expected):
    monkeypatch.setenv("STP_FAST_CHECK_INDICES", mode)
    calls = _count_checks(monkeypatch)
    idx = torch.tensor([0, 2, 3])
    for _ in range(3):
        _conv(idx)
    assert len(calls) == expected


def test_index_check_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv("STP_FAST_CHECK_INDICES", "sometimes")
    with pytest.raises(ValueError, match="STP_FAST_CHECK_INDICES"):
        _conv(torch.tensor([0, 1, 2]))


def _step(x, params, widths, idx):
    w1, w2, bw, bb, fc = params
    h = multi_subnet_conv2d([x] * len(widths), w1, None, widths, padding=1)
    h = multi_subnet_batch_norm(h, bw, bb, relu=True)
    h = multi_subnet_conv2d(h, w2, None, widths, out_indices=idx, padding=1)
    return multi_subnet_linear([t.mean((2, 3)) for t in h], fc, None, [10] * len(widths))


def _cuda_inputs(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    shapes = ((32, 3, 3, 3), (32, 32, 3, 3), (32,), (32,), (10, 32))
    params = [torch.randn(*s, generator=gen).cuda().requires_grad_() for s in shapes]
    x = torch.randn(8, 3, 16, 16, generator=gen).cuda().to(memory_format=torch.channels_last)
    widths = [32, 24, 16]
    idx = [torch.arange(32, device="cuda"), torch.arange(0, 48, 2, device="cuda"), torch.arange(16, device="cuda")]
    return x, params, widths, idx


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_warm_step_has_no_host_sync(backend):
    """After one warm-up step (first-time index checks, Triton JIT), a bf16-autocast forward + backward of
    a multi-subnet sequence issues no synchronizing CUDA call."""
    x, params, widths, idx = _cuda_inputs()
    with force_backend(backend):
        for warm in (True, False):
            if not warm:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", torch.bfloat16):
                    loss = sum(t.float().square().sum() for t in _step(x, params, widths, idx))
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    """A forward of the multi-subnet ops captured in a CUDA graph replays to the eager result."""
    x, params, widths, idx = _cuda_inputs()
    params = [p.detach() for p in params]
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            _step(static_x, params, widths, idx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outs = _step(static_x, params, widths, idx)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        expected = _step(static_x, params, widths, idx)
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e)
