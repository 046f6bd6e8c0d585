"""The STP training-step benchmark of SPEC section 7: forward of the full network + 4 seeded random
width/depth subnets on one batch, the KD losses, backward -- stp_fast against two plain-PyTorch
baselines in the same run.

One step: logits of every arch; loss = CE(full logits, labels) + sum over the subnets of
KL(softmax(full.detach() / T) || softmax(sub / T)) (batchmean) * T^2 with T = 1; backward.  Providers:

* ``stp_fast``: ``net.forward_many(x, archs)`` -- one batched pass through the multi-subnet ops;
* ``masked``: the dense network once per arch, pruned channels zeroed by masks after BN and dropped
  blocks' residual branches multiplied by 0 (full MACs per subnet);
* ``sliced``: each arch its own pass with weights sliced from the supernet (``w[:out, :in]`` views,
  sliced BN, dropped blocks skipped) -- what one writes without stp_fast.

(See :mod:`stp_fast.bench._resnet_baselines`; tests check both compute ``net(x, arch=a)``.)  The ideal
speed-up over masked is the MACs ratio 5 x full / sum of the archs' MACs.  Targets: CPU (resnet20,
32x32, batch 64, float32): >= 80% of the ideal over masked and >= 1.1x over sliced; GPU (resnet50,
224x224, batch 128, ``--dtype bfloat16``): >= 2x over masked, with TFLOP/s against the measured
bf16 matmul ceiling.  A 16-bit ``--dtype`` means mixed precision as training runs it: fp32 master
weights, the step under ``torch.autocast`` (see :func:`setup`).

stp_fast runs channels-last on the CPU by itself, the baselines as written (NCHW); for information a
full run also times them after the usual channels-last recipe (``masked_cl``, ``sliced_cl``).  On the
CPU the providers' steps are timed in turn (interleaved rounds), so a slow phase of a shared machine
hits all of them alike; on a GPU each is timed with ``do_bench``.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stp_fast import models
from stp_fast.arch.space import Arch
from stp_fast.bench import _resnet_baselines as base
from stp_fast.bench._table import sweep
from stp_fast.bench._timing import measure, quantiles

PROVIDERS = ("stp_fast", "masked", "sliced")
EXTRA_PROVIDERS = ("masked_cl", "sliced_cl")  # for information: the baselines with channels-last tensors
# for information (CPU, resnet20): the hand-written resnet20 supernet the engine replaced (same weights and archs);
# the generic engine is meant to stay within 10% of it
HANDWRITTEN = "handwritten"
MODES = ("step",)
KD_TEMPERATURE = 1.0
TARGET_OF_IDEAL = 0.8  # CPU: stp_fast over masked reaches this fraction of the MACs-ideal speed-up
TARGET_VS_SLICED = 1.1  # CPU: stp_fast at least this much faster than sliced
TARGET_VS_MASKED_GPU = 2.0


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    size: int
    subnets: int = 4
    num_classes: int = 10

    @property
    def label(self) -> str:
        return f"{self.model}-B{self.batch}-{self.size}px-full+{self.subnets}"


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    if device.startswith("cuda"):
        return [Case("resnet50", 32 if quick else 128, 224, num_classes=1000)]
    return [Case("resnet20", 16 if quick else 64, 32)]


def _net_archs(case: Case):
    """The supernet (seeded, float32, CPU, train mode) and the full arch + ``case.subnets`` seeded samples."""
    torch.manual_seed(0)
    net = models.create(case.model, case.num_classes).train()
    base.check_supported(net)
    rng = random.Random(0)
    return net, [net.space.full()] + [net.space.sample(rng) for _ in range(case.subnets)]


def _setup_net(case: Case, device: str, dtype: torch.dtype):
    net, archs = _net_archs(case)
    net = net.to(device, dtype)
    x = torch.randn(case.batch, 3, case.size, case.size, device=device, dtype=dtype)
    labels = torch.randint(0, case.num_classes, (case.batch,), device=device)
    return net, archs, x, labels


@functools.cache
def _arch_macs(case: Case) -> tuple[int, ...]:
    net, archs = _net_archs(case)
    return tuple(net.space.macs(a, (3, case.size, case.size)) for a in archs)


def ideal(case: Case) -> float:
    """MACs-ideal speed-up over masked: (subnets + 1) x full MACs / sum of the archs' MACs."""
    macs = _arch_macs(case)
    return len(macs) * macs[0] / sum(macs)


def flops(case: Case, mode: str) -> float:
    """Useful FLOPs of one step: 2 x batch x the archs' MACs, x3 for forward + backward."""
    return 3 * 2 * case.batch * sum(_arch_macs(case))


def stp_loss(logits: list[Tensor], labels: Tensor, temperature: float = KD_TEMPERATURE) -> Tensor:
    """CE of the full network (``logits[0]``) + the subnets' KD losses towards it (teacher detached)."""
    full = logits[0].float()
    loss = F.cross_entropy(full, labels)
    teacher = F.log_softmax(full.detach() / temperature, 1)
    for sub in logits[1:]:
        student = F.log_softmax(sub.float() / temperature, 1)
        loss = loss + F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
    return loss


def forward_fn(provider: str, net, archs, x: Tensor) -> Callable[[], list[Tensor]]:
    """The provider's forward: ``() -> logits of every arch`` (the first arch owns the BN statistics).
    ``*_cl``: the baseline after the usual channels-last recipe (model and input ``.to(memory_format=
    torch.channels_last)``) -- stp_fast runs channels-last on the CPU by itself."""
    if provider.endswith("_cl"):
        net.to(memory_format=torch.channels_last)
        return forward_fn(provider[: -len("_cl")], net, archs, x.contiguous(memory_format=torch.channels_last))
    if provider == "stp_fast":
        return lambda: net.forward_many(x, archs)
    if provider == HANDWRITTEN:
        hand, hand_archs = _handwritten(net, archs)
        return lambda: hand.forward_many(x, hand_archs)
    if provider == "masked":
        plans = [base.MaskedPlan(net, a, x) for a in archs]
        return lambda: [base.masked_forward(net, x, p, owner=s == 0) for s, p in enumerate(plans)]
    if provider == "sliced":
        return lambda: [base.sliced_forward(net, x, a, owner=s == 0) for s, a in enumerate(archs)]
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS + EXTRA_PROVIDERS}")


def _handwritten(net, archs):
    """The hand-written resnet20/56 supernet holding ``net``'s weights (the same keys), and ``archs`` in its
    group names (``s{i}.b{j}.mid`` for the engine's ``stages.{i}.{j}.conv1``)."""
    from stp_fast.bench import _handwritten_resnet as hw

    if net.model_name not in ("resnet20", "resnet56") or net.model_kwargs.get("prune_residual"):
        raise ValueError("the hand-written reference covers resnet20/56 without residual pruning")
    blocks = len(net.model.stages[0])
    hand = hw.ResNetCifar(blocks, net.num_classes, net.in_chans).to(next(net.parameters()).device)
    hand.load_state_dict(net.state_dict())
    hand.train(net.training)

    def convert(a):
        return Arch.make(a.depth, {f"s{i}.b{j}.mid": a.widths[f"stages.{i}.{j}.conv1"] for i in range(3)
                                   for j in range(blocks)})  # fmt: skip

    return hand, [convert(a) for a in archs]


AMP_DTYPES = (torch.bfloat16, torch.float16)


def setup(case: Case, provider: str, mode: str, *, device: str = "cpu", dtype=torch.float32) -> Callable[[], None]:
    """One training step of ``provider``.  16-bit ``dtype``: mixed precision as training runs it -- fp32
    master weights and input, forward and loss under ``torch.autocast(device, dtype)``, backward outside
    (never a model converted to 16 bits)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    amp = dtype in AMP_DTYPES
    net, archs, x, labels = _setup_net(case, device, torch.float32 if amp else dtype)
    forward = forward_fn(provider, net, archs, x)
    device_type = torch.device(device).type

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=amp):
            loss = stp_loss(forward(), labels)
        loss.backward()

    return step


def _matmul_ceiling(device: str, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of a large matmul in ``dtype`` (the GPU ceiling the step is compared with)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device)
    return 2 * n**3 / (t["p50"] * 1e9)


def run(quick: bool = False, device: str = "cpu", dtype=torch.float32) -> list[dict]:
    """Rows (p50/p20/p80 ms, GFLOP/s, the ideal) of every provider; the channels-last baselines unless quick."""
    cs = cases(quick, device)
    providers = PROVIDERS if quick else PROVIDERS + EXTRA_PROVIDERS
    if not device.startswith("cuda") and not quick:
        providers += (HANDWRITTEN,)
    if device.startswith("cuda"):
        rows = sweep("step", cs, providers, MODES, setup, flops, device=device, dtype=dtype, quick=quick)
    else:
        rows = [row for c in cs for row in _interleaved(c, providers, dtype, rounds=3 if quick else 15)]
    ideals = {c.label: ideal(c) for c in cs}
    ceiling = _matmul_ceiling(device, dtype) if device.startswith("cuda") else None
    for r in rows:
        r["ideal"] = ideals[r["case"]]
        if ceiling is not None:
            r["matmul_tflops"] = ceiling
    return rows


def _interleaved(case: Case, providers: tuple[str, ...], dtype: torch.dtype, rounds: int) -> list[dict]:
    """CPU: the providers' steps in turn, ``rounds`` times after two warm-up steps each -- one slow phase of
    a shared machine (or of the allocator) then hits every provider alike; rows as ``_table.sweep``'s."""
    steps = {p: setup(case, p, "step", device="cpu", dtype=dtype) for p in providers}
    for fn in steps.values():
        fn()
        fn()
    times: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(rounds):
        for p, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[p].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for p in providers:
        t = quantiles(times[p])
        rows.append({"family": "step", "case": case.label, "mode": "step", "provider": p,
                     "dtype": str(dtype).replace("torch.", ""), **t,
                     "gflops": flops(case, "step") / (t["p50"] * 1e6)})  # fmt: skip
    return rows


def _cells(times: dict[str, float], names: tuple[str, ...]) -> str:
    return " ".join(f"{times[p]:>9.1f} ms" if p in times else f"{'':>12}" for p in names)


def _ratios(times: dict[str, float], ours: float, ideal_: float, suffix: str = "") -> str:
    masked, sliced = times.get("masked" + suffix), times.get("sliced" + suffix)
    m = f"{masked / ours:>10.2f}x {masked / ours / ideal_:>9.0%}" if masked else f"{'-':>11} {'-':>9}"
    return f" {m} " + (f"{sliced / ours:>10.2f}x" if sliced else f"{'-':>11}")


def render(rows: list[dict]) -> str:
    """p50 per provider, the MACs-ideal speed-up, the achieved ratios and the fraction of the ideal; a second
    line per case for the channels-last baselines when they ran."""
    width = max(26, *(len(r["case"]) + 1 for r in rows))
    lines = [f"{'case':<{width}} " + " ".join(f"{p:>12}" for p in PROVIDERS)
             + f" {'ideal':>7} {'masked/stp':>11} {'of ideal':>9} {'sliced/stp':>11}"]  # fmt: skip
    gpu = any("matmul_tflops" in r for r in rows)
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        got = {r["provider"]: r for r in rows if (r["case"], r["mode"]) == (case, mode)}
        times = {p: r["p50"] for p, r in got.items()}
        line = f"{case:<{width}} {_cells(times, PROVIDERS)}"
        if "stp_fast" in got:
            ours, ideal_ = times["stp_fast"], got["stp_fast"]["ideal"]
            line += f" {ideal_:>6.2f}x" + _ratios(times, ours, ideal_)
            if gpu:
                r = got["stp_fast"]
                line += f"   {r['gflops'] / 1e3:.1f} TFLOP/s of {r['matmul_tflops']:.0f} (matmul ceiling)"
        lines.append(line)
        if "stp_fast" in got and any(p in times for p in EXTRA_PROVIDERS):
            cl = {p[: -len("_cl")]: times[p] for p in EXTRA_PROVIDERS if p in times}
            label = "  baselines channels-last"
            lines.append(f"{label:<{width}} {_cells(cl, PROVIDERS)} {'':>7}" + _ratios(cl, ours, ideal_))
        if "stp_fast" in got and HANDWRITTEN in times:
            lines.append(f"{'  hand-written supernet':<{width}} {times[HANDWRITTEN]:>9.1f} ms   engine / hand-written "
                         f"= {ours / times[HANDWRITTEN]:.2f}x (the generic engine's cost; target <= 1.10x)")  # fmt: skip
    if gpu:
        lines.append(f"target (GPU): masked/stp >= {TARGET_VS_MASKED_GPU:.1f}x")
    else:
        lines.append(f"targets (CPU): of ideal >= {TARGET_OF_IDEAL:.0%}, sliced/stp >= {TARGET_VS_SLICED:.2f}x "
                     "(against the plain NCHW baselines)")  # fmt: skip
    lines.append("ideal: 5 x full MACs / sum of the archs' MACs (masked pays full MACs for every subnet); "
                 "X/stp: time of X / time of stp_fast; channels-last: model and input in torch.channels_last "
                 "(stp_fast runs channels-last on the CPU by itself)")  # fmt: skip
    return "\n".join(lines)
