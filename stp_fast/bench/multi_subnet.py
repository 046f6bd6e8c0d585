"""Benchmark of the multi-subnet ops: the full layer + 4 subnets in one call vs 5 sequential calls.

Widths: full, 75%, 50%, 50%, 25% of the layer's channels (in and out), one shared weight, the same
batch for every subnet (an STP step).  Providers:

* ``stp_fast``   -- ``multi_subnet_conv2d`` / ``multi_subnet_linear``: one op (one launch per
  direction on the GPU), one autograd node;
* ``sequential`` -- 5 ``F.conv2d`` / ``F.linear`` calls on weight prefixes sliced per call (what a
  plain-PyTorch slimmable supernet does), gradients accumulated by autograd;
* ``masked``     -- 5 dense calls at full width with the weight multiplied by a 0/1 channel mask.

Layer shapes: resnet20 (CIFAR, 32x32) and resnet50 (ImageNet, 56/28/14/7 px) 3x3 convolutions,
and a resnet50-classifier-sized linear layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stp_fast.bench._table import render as render_table
from stp_fast.bench._table import sweep
from stp_fast.ops import multi_subnet_conv2d, multi_subnet_linear

PROVIDERS = ("stp_fast", "sequential", "masked")
MODES = ("fwd", "fwd+bwd")
FRACTIONS = (1.0, 0.75, 0.5, 0.5, 0.25)
CL = torch.channels_last


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    size: int  # 0: a linear layer (channels = in = out features)
    kernel: int = 3

    @property
    def label(self) -> str:
        what = f"{self.size}px-k{self.kernel}" if self.size else "linear"
        return f"{self.name}-B{self.batch}-C{self.channels}-{what}"


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    if device.startswith("cuda"):
        return [Case("r20", 128, 16, 32), Case("r20", 128, 64, 8), Case("r50", 64, 64, 56), Case("r50", 64, 128, 28),
                Case("r50", 64, 256, 14), Case("r50", 64, 512, 7), Case("fc", 256, 2048, 0)]  # fmt: skip
    if quick:
        return [Case("r20", 32, 16, 32), Case("fc", 64, 512, 0)]
    return [Case("r20", 64, 16, 32), Case("r20", 64, 64, 8), Case("r50", 8, 64, 56), Case("r50", 8, 128, 28),
            Case("r50", 8, 256, 14), Case("r50", 8, 512, 7), Case("fc", 128, 2048, 0)]  # fmt: skip


def widths(case: Case) -> list[int]:
    return [max(1, round(f * case.channels)) for f in FRACTIONS]


def flops(case: Case, mode: str) -> float:
    per_pixel = sum(w * w for w in widths(case)) * case.kernel**2 if case.size else sum(w * w for w in widths(case))
    useful = 2 * case.batch * max(1, case.size) ** 2 * per_pixel
    return useful * (3 if mode == "fwd+bwd" else 1)


def setup(case: Case, provider: str, mode: str, *, device: str = "cpu", dtype=torch.float32) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    c, ws, conv = case.channels, widths(case), case.size > 0
    shape = (c, c, case.kernel, case.kernel) if conv else (c, c)
    fan_in = c * (case.kernel**2 if conv else 1)
    weight = (torch.randn(*shape, generator=g) / fan_in**0.5).to(device, dtype)
    spatial = (case.size, case.size) if conv else ()
    fmt = CL if conv else torch.contiguous_format
    xs = [torch.randn(case.batch, w, *spatial, generator=g).to(device, dtype).contiguous(memory_format=fmt)
          for w in ws]  # fmt: skip
    train = mode == "fwd+bwd"
    weight.requires_grad_(train)
    for x in xs:
        x.requires_grad_(train)
    pad = case.kernel // 2
    layer = (lambda x, w: F.conv2d(x, w, None, 1, pad)) if conv else (lambda x, w: F.linear(x, w))
    if provider == "stp_fast":
        run = (
            (lambda: multi_subnet_conv2d(xs, weight, None, ws, padding=pad))
            if conv
            else (lambda: multi_subnet_linear(xs, weight, None, ws))
        )
    elif provider == "sequential":
        run = lambda: [layer(x, weight[:w, :w]) for x, w in zip(xs, ws)]
    elif provider == "masked":
        masks, fulls = [], []
        for x, w in zip(xs, ws):
            m = torch.zeros(c, device=device, dtype=dtype)
            m[:w] = 1
            masks.append((m[:, None] * m[None, :]).view(c, c, *([1, 1] if conv else [])))
            full = torch.zeros(case.batch, c, *spatial, device=device, dtype=dtype)
            full[:, :w] = x.detach()
            fulls.append(full.contiguous(memory_format=fmt).requires_grad_(train))
        run = lambda: [layer(xf, weight * m) for xf, m in zip(fulls, masks)]
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if not train:
        return lambda: _no_grad(run)
    return lambda: torch.autograd.backward([y.sum() for y in run()])


def _no_grad(fn: Callable) -> None:
    with torch.no_grad():
        fn()


def run(quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[dict]:
    return sweep("multi_subnet", cases(quick, device), PROVIDERS, MODES, setup, flops, device=device, dtype=dtype,
                 quick=quick)  # fmt: skip


def render(rows: list[dict]) -> str:
    return render_table(rows, PROVIDERS, ours=("stp_fast",), baselines=("sequential", "masked"))
