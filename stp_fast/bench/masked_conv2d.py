"""Benchmark of ``masked_conv2d`` against plain PyTorch at 25/50/75/100% channel density.

Density d keeps round(d*C_in) input and round(d*C_out) output channels (ideal cost d^2 of dense).
Providers: ``stp_fast`` (index lists), ``stp_fast_prefix`` (int prefixes), ``sliced`` (``F.conv2d``
on a weight sliced and made contiguous outside the timed region: the compact dense convolution) and
``masked`` (dense ``F.conv2d`` at full width with the weight multiplied by a 0/1 mask each call).
Inputs are channels-last (the fast layout for oneDNN and cuDNN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stp_fast.bench._table import render as render_table
from stp_fast.bench._table import sweep
from stp_fast.ops import masked_conv2d

PROVIDERS = ("stp_fast", "stp_fast_prefix", "sliced", "masked")
MODES = ("fwd", "fwd+bwd")
DENSITIES = (0.25, 0.5, 0.75, 1.0)
CL = torch.channels_last


@dataclass(frozen=True)
class Case:
    batch: int
    channels: int  # C_in = C_out
    size: int  # H = W
    kernel: int
    density: float

    @property
    def label(self) -> str:
        return f"B{self.batch}-C{self.channels}-{self.size}px-k{self.kernel}-d{self.density:g}"


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    if device.startswith("cuda"):
        shapes = [(128, 64, 32, 3), (64, 256, 14, 3), (64, 64, 56, 1)]
    else:
        shapes = [(32, 64, 16, 3)] if quick else [(64, 32, 32, 3), (16, 128, 14, 3)]
    return [Case(*s, d) for s in shapes for d in DENSITIES]


def flops(case: Case, mode: str) -> float:
    k = n = round(case.density * case.channels)
    useful = 2 * case.batch * case.size**2 * n * k * case.kernel**2
    return useful * (3 if mode == "fwd+bwd" else 1)


def setup(case: Case, provider: str, mode: str, *, device: str = "cpu", dtype=torch.float32) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    c, kk = case.channels, case.kernel
    act = max(1, round(case.density * c))
    pad = kk // 2
    weight = (torch.randn(c, c, kk, kk, generator=g) / (c * kk * kk) ** 0.5).to(device, dtype)
    in_idx = torch.randperm(c, generator=g)[:act].sort().values.to(device)
    out_idx = torch.randperm(c, generator=g)[:act].sort().values.to(device)
    x = torch.randn(case.batch, act, case.size, case.size, generator=g).to(device, dtype).contiguous(memory_format=CL)
    train = mode == "fwd+bwd"
    weight.requires_grad_(train)
    x.requires_grad_(train)
    if provider == "stp_fast":
        run = lambda: masked_conv2d(x, weight, in_index=in_idx, out_index=out_idx, padding=pad)
    elif provider == "stp_fast_prefix":
        run = lambda: masked_conv2d(x, weight, in_index=act, out_index=act, padding=pad)
    elif provider == "sliced":
        w_c = weight.detach()[out_idx][:, in_idx].contiguous(memory_format=CL).requires_grad_(train)
        run = lambda: F.conv2d(x, w_c, None, 1, pad)
    elif provider == "masked":
        in_mask = torch.zeros(c, device=device, dtype=dtype).index_fill_(0, in_idx, 1)
        out_mask = torch.zeros(c, device=device, dtype=dtype).index_fill_(0, out_idx, 1)
        mask = (out_mask[:, None] * in_mask[None, :])[:, :, None, None]
        x_full = torch.zeros(case.batch, c, case.size, case.size, device=device, dtype=dtype)
        x_full[:, in_idx] = x.detach()
        x_full = x_full.contiguous(memory_format=CL).requires_grad_(train)
        run = lambda: F.conv2d(x_full, weight * mask, None, 1, pad)
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if not train:
        return lambda: _no_grad(run)
    return lambda: run().sum().backward()


def _no_grad(fn: Callable) -> None:
    with torch.no_grad():
        fn()


def run(quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[dict]:
    return sweep("masked_conv2d", cases(quick, device), PROVIDERS, MODES, setup, flops, device=device, dtype=dtype,
                 quick=quick)  # fmt: skip


def render(rows: list[dict]) -> str:
    return render_table(rows, PROVIDERS, ours=("stp_fast", "stp_fast_prefix"), baselines=("sliced", "masked"))
