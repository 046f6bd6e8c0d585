"""Benchmark of ``masked_linear``: the op against plain PyTorch at several channel densities.

Providers (same shapes, same active channels; density d keeps round(d*K) inputs and round(d*N)
outputs, so the ideal cost is d^2 of dense):

* ``stp_fast``        -- ``masked_linear`` with index lists (random sorted channel subsets);
* ``stp_fast_prefix`` -- ``masked_linear`` with int prefixes (the layout STP trains with);
* ``sliced``          -- ``F.linear`` on a weight sliced and made contiguous *outside* the timed
  region: the compact dense GEMM, i.e. the best plain PyTorch can do when slicing is free;
* ``masked``          -- dense ``F.linear`` on the full width with the weight multiplied by a 0/1
  mask on every call (how masked pruning is usually trained): the cost of not skipping work.

Modes: ``fwd`` (forward) and ``fwd+bwd`` (forward, then backward for x, weight and bias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stp_fast.bench._table import render as render_table
from stp_fast.bench._table import sweep
from stp_fast.ops import masked_linear

PROVIDERS = ("stp_fast", "stp_fast_prefix", "sliced", "masked")
MODES = ("fwd", "fwd+bwd")
DENSITIES = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Case:
    m: int  # rows (batch x tokens)
    n: int  # full output features
    k: int  # full input features
    density: float

    @property
    def label(self) -> str:
        return f"M{self.m}-N{self.n}-K{self.k}-d{self.density:g}"


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    if device.startswith("cuda"):
        shapes = [(8192, 4096, 4096), (16384, 768, 3072)]
    else:
        shapes = [(1024, 512, 512)] if quick else [(2048, 768, 768), (512, 256, 1024)]
    return [Case(m, n, k, d) for (m, n, k) in shapes for d in DENSITIES]


def setup(case: Case, provider: str, mode: str, *, device: str = "cpu", dtype=torch.float32) -> Callable[[], None]:
    """Build inputs for one measurement and return the closure to time."""
    g = torch.Generator().manual_seed(0)
    kk, nn = max(1, round(case.density * case.k)), max(1, round(case.density * case.n))
    weight = torch.randn(case.n, case.k, generator=g).div_(case.k**0.5).to(device, dtype)
    bias = torch.randn(case.n, generator=g).to(device, dtype)
    in_idx = torch.randperm(case.k, generator=g)[:kk].sort().values.to(device)
    out_idx = torch.randperm(case.n, generator=g)[:nn].sort().values.to(device)
    x = torch.randn(case.m, kk, generator=g).to(device, dtype)
    train = mode == "fwd+bwd"
    if train:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        x.requires_grad_(True)

    if provider == "stp_fast":
        run = lambda: masked_linear(x, weight, bias, in_index=in_idx, out_index=out_idx)
    elif provider == "stp_fast_prefix":
        run = lambda: masked_linear(x, weight, bias, in_index=kk, out_index=nn)
    elif provider == "sliced":
        w_c = weight.detach()[out_idx][:, in_idx].contiguous().requires_grad_(train)
        b_c = bias.detach()[out_idx].contiguous().requires_grad_(train)
        run = lambda: F.linear(x, w_c, b_c)
    elif provider == "masked":
        in_mask = torch.zeros(case.k, device=device, dtype=dtype).index_fill_(0, in_idx, 1)
        out_mask = torch.zeros(case.n, device=device, dtype=dtype).index_fill_(0, out_idx, 1)
        mask2d = out_mask[:, None] * in_mask[None, :]
        x_full = torch.zeros(case.m, case.k, device=device, dtype=dtype)
        x_full[:, in_idx] = x.detach()
        x_full.requires_grad_(train)
        run = lambda: F.linear(x_full, weight * mask2d, bias * out_mask)
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")

    if not train:

        def fwd() -> None:
            with torch.no_grad():
                run()

        return fwd

    def fwd_bwd() -> None:
        y = run()
        y.backward(torch.ones_like(y))

    return fwd_bwd


def flops(case: Case, mode: str) -> float:
    useful = 2 * case.m * round(case.density * case.n) * round(case.density * case.k)
    return useful * (3 if mode == "fwd+bwd" else 1)


def run(quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[dict]:
    """Measure every case x provider x mode; returns rows with p50/p20/p80 in ms."""
    return sweep("masked_linear", cases(quick, device), PROVIDERS, MODES, setup, flops, device=device, dtype=dtype,
                 quick=quick)  # fmt: skip


def render(rows: list[dict]) -> str:
    return render_table(rows, PROVIDERS, ours=("stp_fast", "stp_fast_prefix"), baselines=("sliced", "masked"))
