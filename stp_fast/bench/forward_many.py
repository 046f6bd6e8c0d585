"""Benchmark of a supernet's batched pass: ``net.forward_many(x, archs)`` against the Python loop
``[net(x, arch=a) for a in archs]`` -- the full network + 4 seeded random subnets, forward and
forward+backward, in train mode (each subnet with its own BN batch statistics)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stp_fast import models
from stp_fast.bench._table import render as render_table
from stp_fast.bench._table import sweep

PROVIDERS = ("forward_many", "loop")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    size: int
    subnets: int = 4

    @property
    def label(self) -> str:
        return f"{self.model}-B{self.batch}-{self.size}px-full+{self.subnets}"


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    if device.startswith("cuda"):
        return [Case("resnet20", 128, 32), Case("resnet56", 128, 32)]
    return [Case("resnet20", 16 if quick else 64, 32)]


def _setup_net(case: Case, device: str, dtype):
    torch.manual_seed(0)
    net = models.create(case.model, 10).to(device, dtype).train()
    rng = random.Random(0)
    archs = [net.space.full()] + [net.space.sample(rng) for _ in range(case.subnets)]
    x = torch.randn(case.batch, 3, case.size, case.size, device=device, dtype=dtype)
    return net, archs, x


def flops(case: Case, mode: str) -> float:
    net, archs, _ = _setup_net(case, "cpu", torch.float32)
    useful = 2 * case.batch * sum(net.space.macs(a) for a in archs)
    return useful * (3 if mode == "fwd+bwd" else 1)


def setup(case: Case, provider: str, mode: str, *, device: str = "cpu", dtype=torch.float32) -> Callable[[], None]:
    net, archs, x = _setup_net(case, device, dtype)
    if provider == "forward_many":
        run = lambda: net.forward_many(x, archs)
    elif provider == "loop":
        run = lambda: [net(x, arch=a) for a in archs]
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                run()

        return fwd

    def fwd_bwd() -> None:
        net.zero_grad(set_to_none=True)
        torch.autograd.backward([y.float().square().mean() for y in run()])

    return fwd_bwd


def run(quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[dict]:
    return sweep("forward_many", cases(quick, device), PROVIDERS, MODES, setup, flops, device=device, dtype=dtype,
                 quick=quick)  # fmt: skip


def render(rows: list[dict]) -> str:
    return render_table(rows, PROVIDERS, ours=("forward_many",), baselines=("loop",))
