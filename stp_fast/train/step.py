"""``STPStep``: stimulative training as a step-level object for the user's own training loop.

One engine for every loop: ``STPTrainer`` and ``stp-fast prune`` run on it, and so can a plain
PyTorch loop, AMP, gradient accumulation, DDP or Lightning::

    step = stp_fast.STPStep(net, flops_target=0.15, total_steps=epochs * len(loader))
    for x, y in loader:
        archs = step.plan()                      # [full, subnet_1..K]; the same on every DDP rank
        outputs = model(x, archs=archs)          # ONE forward of all of them (model = net or DDP(net))
        loss = step.loss(outputs, y)             # task loss of the full net + the subnets' distillation
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        step.update()                            # pool scores (averaged over ranks), schedules
    best = step.select(calib=train_loader, holdout=held_out_loader)
    small = net.export(best[0].arch, calib=train_loader)

What a step trains (``ALGORITHMS.md`` section 2; every choice the paper leaves open is a
:class:`~stp_fast.train.config.STPConfig` knob): the full network learns from the labels; K subnets
distil from its detached output.  Budget subnets come from one architecture pool per FLOPs budget
(KD-loss scores; periodic drop-worst / mutate-best / random refill; exploration by mutation), each
optionally preceded by an expanded superset of it (subnet mutating expansion).  In the focus phase
(the last part of training) the pools stop changing and the steps train their best archs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.space import Arch
from stp_fast.train.config import STPConfig
from stp_fast.train.losses import kd_loss
from stp_fast.train.pool import ArchPool


@dataclass
class Planned:
    """One subnet of a step: its arch, the position it distils from (0 = the full net), and the budget
    whose pool it is scored in (None: an expansion or a random subnet, not scored)."""

    arch: Arch
    teacher: int
    budget: int | None


@dataclass
class Selection:
    """The chosen arch of one budget and the re-scored candidates it was chosen from."""

    budget: float  # kept fraction of the full MACs
    arch: Arch
    macs: int
    params: int
    candidates: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)


class STPStep:
    """Plan, loss and bookkeeping of STP/ST steps for any loop (see the module docstring).

    Args:
        net: a supernet: ``stp_fast.convert(model, x)`` or ``stp_fast.models.create(...)``.
        config: an :class:`STPConfig` (its ``flops_target``, ``subnets_per_step``, pool, expansion, KD
            and focus knobs); keywords override its fields (``STPStep(net, flops_target=[0.15, 0.05])``).
        total_steps: optimizer steps of the whole run (the expansion anneal, KD ramp and focus phase are
            fractions of it).  Needed by ``expansion="progressive"``, ``kd_ramp`` and ``focus_start``.
        input_size: the image size MACs are counted at (default: the net's space's).
    """

    def __init__(self, net: nn.Module, config: STPConfig | None = None, *, total_steps: int | None = None,
                 input_size: Sequence[int] | None = None, **overrides) -> None:  # fmt: skip
        if not hasattr(net, "space") or not hasattr(net, "forward_many"):
            raise TypeError("STPStep: net must be an stp_fast supernet (stp_fast.convert(model, x) or "
                            f"stp_fast.models.create(...)), got {type(net).__name__}")  # fmt: skip
        cfg = config if config is not None else STPConfig()
        if overrides:
            cfg = STPConfig.from_dict(cfg.to_dict() | overrides)
        self.config = cfg.validate()
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):  # fmt: skip
            raise ValueError(f"STPStep: total_steps must be a positive int, got {total_steps!r}")
        needs = [n for n, on in (("expansion='progressive'", cfg.method == "stp" and cfg.expansion == "progressive"),
                                 ("kd_ramp", cfg.kd_ramp > 0), ("focus_start", cfg.focus_start < 1)) if on]
        if needs and total_steps is None:
            raise ValueError(f"STPStep: {', '.join(needs)} need total_steps= (the run's optimizer steps); pass it, "
                             "or turn those knobs off")  # fmt: skip
        self.net, self.space = net, net.space
        self.total_steps = total_steps
        self.input_size = tuple(input_size or self.space.input_size)
        self.full = self.space.full()
        self.full_macs = self.space.macs(self.full, self.input_size)
        self.targets = cfg.targets()
        self.budgets = [t * self.full_macs for t in self.targets]
        self.rng = random.Random(cfg.seed)
        self.pools: list[ArchPool] = []
        if cfg.method in ("stp", "st"):
            self.pools = [ArchPool(self.space, b, cfg.pool_size, self.rng, input_size=self.input_size,
                                   tolerance=cfg.budget_tolerance, sampling=cfg.sampling, mutate_prob=cfg.mutate_prob,
                                   init=cfg.pool_init, baseline=cfg.score_baseline) for b in self.budgets]  # fmt: skip
        self.steps = 0
        self._plan: list[Planned] | None = None
        self._pending: Tensor | None = None
        self._count = 0
        self.last: dict = {}

    # ------------------------------------------------------------------ schedule
    @property
    def progress(self) -> float:
        """Fraction of the run done (0 when total_steps is unknown)."""
        return min(1.0, self.steps / self.total_steps) if self.total_steps else 0.0

    @property
    def focusing(self) -> bool:
        return self.config.focus_start < 1 and self.progress >= self.config.focus_start

    def kd_scale(self) -> float:
        """The KD weight of this step (``kd_weight``, ramped up over the first ``kd_ramp`` of training)."""
        cfg = self.config
        ramp = min(1.0, self.progress / cfg.kd_ramp) if cfg.kd_ramp > 0 else 1.0
        return cfg.kd_weight * ramp

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[Arch]:
        """The archs of this step: the full net first, then ``subnets_per_step`` subnets."""
        if self._pending is not None:
            raise RuntimeError("STPStep.plan: the previous step's loss() was not followed by update()")
        cfg = self.config
        planned: list[Planned] = []
        k = cfg.subnets_per_step
        slot = 0
        while len(planned) < k:
            if cfg.method == "st":
                b = (self.steps + slot) % len(self.pools)
                planned.append(Planned(self._st_subnet(b), 0, None))
            else:
                b = (self.steps + slot) % len(self.pools) if self.pools else None
                a = self._draw(b)
                big = self._expanded(a, b)
                if big is not None and big != a and len(planned) + 2 <= k:
                    planned.append(Planned(big, 0, None))
                    teacher = len(planned) if cfg.expansion == "assistant" else 0
                else:
                    teacher = 0
                planned.append(Planned(a, teacher, b))
            slot += 1
        self._plan = planned
        return [self.full] + [p.arch for p in planned]

    def _draw(self, b: int) -> Arch:
        pool = self.pools[b]
        if self.focusing:
            top = pool.ranked()[: max(1, self.config.focus_top)]
            return self.rng.choice(top).arch
        return pool.draw(self.config.pool_sample_prob)

    def _st_subnet(self, b: int) -> Arch:
        """Plain ST: a uniformly random subnet in the budget's MACs band (not the whole space)."""
        return self.pools[b].random_arch()

    def _expanded(self, arch: Arch, b: int) -> Arch | None:
        cfg = self.config
        if cfg.expansion == "off" or cfg.method != "stp":
            return None
        budget = self.budgets[b]
        if cfg.expansion == "assistant":
            target = self.rng.uniform(budget, self.full_macs)
        else:
            left = max(0.0, 1.0 - self.progress / cfg.expansion_anneal) if cfg.expansion_anneal > 0 else 0.0
            target = budget + (cfg.expansion_start * self.full_macs - budget) * left
            if left <= 0.0 or target <= self.pools[b].macs(arch):
                return None
        return self.space.canonical(self.space.expand(arch, target, self.rng, self.input_size))

    # ------------------------------------------------------------------ loss
    def loss(self, outputs: Sequence[Tensor], target=None, *, criterion: Callable | None = None,
             distill: Callable | None = None) -> Tensor:  # fmt: skip
        """The step's loss: ``criterion(outputs[0], target)`` for the full net plus the subnets' distillation.

        Args:
            outputs: the outputs of ``plan()``'s archs, in order (what ``net(x, archs=archs)`` returns).
            target: the labels (passed to ``criterion``; None for a label-free criterion).
            criterion: the task loss (default: cross-entropy with the config's label smoothing).
            distill: ``distill(student, teacher)`` for non-classification outputs (teacher is detached);
                default: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.
        Returns:
            a scalar: task loss + kd_weight x (sum or mean over the subnets of the distillation) [+ the
            subnets' own task loss with ``subnet_ce_weight``].  Backward it; then call :meth:`update`.
            Gradient accumulation: call ``loss`` once per micro-batch of one ``plan()`` (the archs of a
            step are the same for all its micro-batches), then ``update()`` once.
        """
        if self._plan is None:
            raise RuntimeError("STPStep.loss: call plan() first (it decides the archs of the step)")
        cfg = self.config
        if len(outputs) != len(self._plan) + 1:
            raise ValueError(f"STPStep.loss: got {len(outputs)} outputs for {len(self._plan) + 1} planned archs")
        if criterion is None:
            def criterion(z, y):
                return F.cross_entropy(z.float(), y, label_smoothing=cfg.label_smoothing)
        distill = distill or (lambda s, t: kd_loss(s, t, cfg.kd_temperature, norm=cfg.norm_kd))
        task = criterion(outputs[0], target)
        kds = [distill(z, outputs[p.teacher].detach()) for z, p in zip(outputs[1:], self._plan)]
        total = task
        if kds:
            stacked = torch.stack([k.float().reshape(()) for k in kds])
            kd = stacked.mean() if cfg.kd_reduction == "mean" else stacked.sum()
            total = total + self.kd_scale() * kd
            if cfg.subnet_ce_weight > 0:
                subs = torch.stack([criterion(z, target).float().reshape(()) for z in outputs[1:]])
                total = total + cfg.subnet_ce_weight * (subs.mean() if cfg.kd_reduction == "mean" else subs.sum())
            values = torch.cat([total.detach().reshape(1).float(), task.detach().reshape(1).float(), stacked.detach()])
        else:
            values = torch.stack([total.detach().float().reshape(()), task.detach().float().reshape(())])
        # several loss() calls per plan (micro-batches of one optimizer step) are averaged
        self._pending = values if self._pending is None else self._pending + values
        self._count += 1
        return total

    # ------------------------------------------------------------------ update
    def update(self) -> dict:
        """After the backward: fold the subnets' KD losses into their pools' scores (averaged over DDP
        ranks first, so every rank keeps the same pools), update the pools when due, advance the
        schedule.  Returns the step's values ``{"loss", "ce", "kd": [...]}`` (one host sync)."""
        if self._pending is None:
            raise RuntimeError("STPStep.update: call loss() first")
        stats = self._pending / self._count
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stats = stats.clone()
            dist.all_reduce(stats)
            stats = stats / dist.get_world_size()
        values = stats.tolist()
        kd = values[2:]
        self.last = {"loss": values[0], "ce": values[1], "kd": kd}
        if not all(math.isfinite(v) for v in values):
            self._pending, self._count = None, 0
            return self.last  # the caller decides (STPTrainer stops with TrainingDiverged)
        cfg = self.config
        if cfg.method == "stp" and not self.focusing:
            for value, p in zip(kd, self._plan):
                if p.budget is not None:
                    self.pools[p.budget].observe(p.arch, value, cfg.score_ema)
        self._pending, self._plan, self._count = None, None, 0
        self.steps += 1
        interval = cfg.pool_update_interval
        if cfg.method == "stp" and interval and self.steps % interval == 0 and not self.focusing:
            self.update_pools()
        return self.last

    def end_epoch(self) -> None:
        """Call at the end of each epoch: with ``pool_update_interval=0`` the pools update here."""
        if self.config.method == "stp" and not self.config.pool_update_interval and not self.focusing:
            self.update_pools()

    def update_pools(self) -> None:
        cfg = self.config
        for pool in self.pools:
            pool.update(cfg.pool_replace_fraction, cfg.pool_mutate_share)

    # ------------------------------------------------------------------ selection
    def select(self, calib: Iterable, holdout: Iterable | None = None, *, forward: Callable | None = None,
               device: torch.device | str | None = None, candidates: int | None = None,
               evaluate: Callable[[nn.Module], dict] | None = None) -> list[Selection]:  # fmt: skip
        """The best arch of every budget, no fine-tuning: the pool's best ``final_candidates`` archs are
        extracted, BatchNorm-recalibrated on ``calib`` and re-scored on ``holdout`` (KL to the recalibrated
        full model, or held-out top-1 with ``select_by="top1"``); the lowest score wins.

        ``calib``/``holdout`` yield image batches or (images, labels) pairs (``holdout`` None: ``calib``).
        ``forward(model, x)`` overrides how a model is called (default ``model(x)``, through a converted
        net's ``outputs=`` selector); ``evaluate(model) -> dict`` adds entries to each candidate's record
        (e.g. its test top-1).  The chosen plain models are in ``Selection.model`` (eval mode, BN
        recalibrated)."""
        from stp_fast.nn.bn import recalibrate_bn
        from stp_fast.train.evaluate import kd_score_batches

        if not self.pools:
            raise RuntimeError("STPStep.select: method 'dense' has no pool")
        cfg = self.config
        device = device or next(self.net.parameters()).device
        holdout = holdout if holdout is not None else calib
        pick = getattr(self.net, "outputs", None) or (lambda out: out)  # converted nets: the outputs= selector
        call = forward or (lambda m, x: pick(m(x)))
        dense = self.net.extract(self.full).to(device)
        recalibrate_bn(dense, calib, cfg.calib_images, forward=call)
        results = []
        for target, pool in zip(self.targets, self.pools):
            best = None
            chosen = Selection(target, pool.entries[0].arch, 0, 0)
            for e in pool.ranked()[: candidates or cfg.final_candidates]:
                plain = self.net.extract(e.arch).to(device)
                recalibrate_bn(plain, calib, cfg.calib_images, forward=call)
                kd, top1 = kd_score_batches(plain, dense, holdout, device, temperature=cfg.kd_temperature,
                                            forward=call)  # fmt: skip
                cand = {"arch": e.arch.to_dict(), "macs": e.macs, "macs_ratio": e.macs / self.full_macs,
                        "params": self.space.params(e.arch), "pool_score": None if math.isinf(e.score) else e.score,
                        "holdout_kd": kd, "holdout_top1": top1}  # fmt: skip
                if evaluate is not None:
                    cand |= evaluate(plain)
                chosen.candidates.append(cand)
                key = kd if cfg.select_by == "kd" else -(top1 if top1 is not None else 0.0)
                if best is None or key < best[0]:
                    best = (key, e.arch, cand, plain)
            _, chosen.arch, cand, chosen.model = best
            chosen.macs, chosen.params = cand["macs"], cand["params"]
            results.append(chosen)
        self.dense_model = dense
        return results

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Pools, RNG and step count (plain Python values: saves with ``torch.save`` and loads with
        ``weights_only=True``)."""
        version, internal, gauss = self.rng.getstate()
        return {"steps": self.steps, "rng": [version, list(internal), gauss], "targets": list(self.targets),
                "pools": [p.state_dict() for p in self.pools], "config": self.config.to_dict()}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("targets", [])) != list(self.targets):
            raise ValueError(f"STPStep.load_state_dict: the state is for flops targets {state.get('targets')}, "
                             f"this step has {self.targets}")  # fmt: skip
        self.steps = int(state["steps"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for pool, s in zip(self.pools, state["pools"]):
            pool.load_state_dict(s)
        self._plan, self._pending, self._count = None, None, 0
