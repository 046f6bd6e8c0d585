"""Triton masked_linear launchers called directly: the split-K weight gradient (review item 13)."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

if not torch.cuda.is_available():  # must be set before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from stp_fast.kernels import masked_linear as ml

from stp_fast.testing import assert_gemm_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [("prefix", "prefix"), ("index", "index"), ("index", "prefix"), ("prefix", "index")]


@pytest.mark.parametrize("in_kind,out_kind", KINDS, ids=[f"{a}-{b}" for a, b in KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_split_k_grad_weight(in_kind, out_kind, dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    m, n_full, k_full, n, k = 150, 21, 19, 13, 11
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w = torch.zeros(n_full, k_full, dtype=dtype, device=DEVICE)
    ii = torch.randperm(k_full, generator=gen)[:k].sort().values if in_kind == "index" else None
    oi = torch.randperm(n_full, generator=gen)[:n].sort().values if out_kind == "index" else None
    rows = oi if oi is not None else torch.arange(n)
    cols = ii if ii is not None else torch.arange(k)

    def full(block: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_full, k_full, dtype=block.dtype)
        out[rows[:, None], cols[None, :]] = block
        return out

    oracle = full(g.T @ x)
    base = full((g.to(dtype).T @ x.to(dtype)).to(dtype))
    dev = lambda t: None if t is None else t.to(DEVICE)
    runs = []
    for split in (1, 3, 3):
        _, gw, _ = ml.masked_linear_bwd_triton(dev(g.to(dtype)), dev(x.to(dtype)), w, dev(ii), dev(oi), n, False, True,
                                               False, split=split)  # fmt: skip
        runs.append(gw.cpu())
        assert_gemm_close(gw.cpu(), base, oracle, name=f"grad_weight split={split}")
        assert (gw.cpu()[oracle == 0] == 0).all(), "grad_weight must be exactly zero outside the active block"
    assert torch.equal(runs[1], runs[2]), "split-K grad_weight differs between runs"


def test_wgrad_splits_heuristic(monkeypatch) -> None:
    monkeypatch.setattr(ml, "_interpreted", lambda: False)
    monkeypatch.setattr(ml, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    # 768x768 fp32 (64x64 tiles: 144 >= 132 programs) needs no split; 256x256 bf16 (4 tiles) does.
    assert ml.wgrad_splits(768, 768, 8192, 4, cuda) == 1
    assert ml.wgrad_splits(256, 256, 8192, 2, cuda) == 32
    assert ml.wgrad_splits(256, 256, 300, 2, cuda) == 1  # too few rows per split
    assert ml.wgrad_splits(256, 256, 8192, 2, torch.device("cpu")) == 1
