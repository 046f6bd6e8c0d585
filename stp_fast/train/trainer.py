"""``STPTrainer``: stimulative training of a supernet, KD-guided architecture search, extraction,
BN recalibration and evaluation -- no fine-tuning (``ALGORITHMS.md`` section 2, SPEC section 5).

The trainer is a loop around :class:`~stp_fast.train.step.STPStep` -- the same step object a user's own
loop uses: every step runs the full net and K subnets in ONE ``forward_many`` pass (one batched
multi-subnet op per layer), adds the full net's cross-entropy and the subnets' KD losses, and takes
one optimizer step.  Under ``torchrun`` the supernet runs in DistributedDataParallel: one backward per
step, so no ``no_sync`` juggling is needed, and the KD scores are averaged over ranks so every rank
keeps the same pools.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from stp_fast.arch.space import Arch
from stp_fast.nn.bn import recalibrate_bn
from stp_fast.train import checkpoint as ckpt
from stp_fast.train import distributed as dist_utils
from stp_fast.train.config import STPConfig
from stp_fast.train.evaluate import evaluate
from stp_fast.train.progress import Progress, log
from stp_fast.train.sources import as_source
from stp_fast.train.step import STPStep

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class STPResult:
    """What :meth:`STPTrainer.fit` returns (models are plain ``torch.nn`` modules in eval mode).

    ``chosen``/``pruned``/``pool``/``candidates``/``pruned_model`` describe the first budget;
    ``budgets`` holds one dict per budget of a multi-budget run (``flops_target=[...]``), in order:
    ``{"target", "arch", "top1", "macs", "params", "pool", "candidates"}``, and ``pruned_models`` the
    chosen model of each."""

    chosen: Arch | None
    full: dict
    pruned: dict | None
    pool: list[dict]
    candidates: list[dict]
    history: list[dict]
    budget_macs: float
    input_size: tuple[int, ...]
    device: str
    wall_s: float
    dense_model: nn.Module | None = field(default=None, repr=False)
    pruned_model: nn.Module | None = field(default=None, repr=False)
    budgets: list[dict] = field(default_factory=list)
    pruned_models: list[nn.Module] = field(default_factory=list, repr=False)


class _Many(nn.Module):
    """``forward(x, archs) = net.forward_many(x, archs)``, so DDP can wrap the batched pass."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, archs: list[Arch]) -> list[Tensor]:
        return self.net.forward_many(x, archs)


class STPTrainer:
    """Train ``net`` (an stp_fast supernet) with STP/ST, search the budget arch, extract it.

    Args:
        net: a supernet from :func:`stp_fast.models.create`.
        train_set: training images (an ``stp_fast.data`` source or a torch Dataset); a ``holdout``
            share of it is kept out of training for the final re-scoring.
        val_set: images the dense and pruned top-1 are reported on.
        config: :class:`STPConfig` (defaults when None).
        out_dir: where ``checkpoint.pt`` (every epoch, atomic) and ``metrics.jsonl`` go (None: nowhere).
        resume: continue from ``out_dir/checkpoint.pt`` -- bit-for-bit the run that wrote it.
        init: a dense checkpoint (``stp-fast train``) to start from; the channels are then sorted
            by importance once (``net.sort_channels()``) so prefixes keep the strongest ones.
        progress: ``"auto"`` | ``"bar"`` | ``"log"`` | ``"off"``.
        on_epoch: ``callback(record)`` after each epoch (rank 0).
    """

    def __new__(cls, net=None, train_set=None, val_set=None, config: STPConfig | None = None, **kw):
        """``STPTrainer(..., IEEConfig(...))`` is the ``iee`` method (SPEC 5): an IEETrainer."""
        from stp_fast.train.iee import IEEConfig, IEETrainer

        if cls is STPTrainer and isinstance(config, IEEConfig):
            return IEETrainer(net, train_set, val_set, config, **kw)
        return super().__new__(cls)

    def __init__(self, net: nn.Module, train_set, val_set, config: STPConfig | None = None, *,
                 out_dir: str | Path | None = None, resume: bool = False, init: str | Path | None = None,
                 progress: str = "auto", on_epoch: Callable[[dict], None] | None = None) -> None:  # fmt: skip
        self.config = (config or STPConfig()).validate()
        if not hasattr(net, "forward_many") or not hasattr(net, "space"):
            raise TypeError("STPTrainer: net must be an stp_fast supernet (stp_fast.models.create)")
        self.net, self.progress, self.on_epoch = net, progress, on_epoch
        self.out_dir = Path(out_dir) if out_dir else None
        self.rank, self.world_size, self.device = dist_utils.setup(self.config.device)
        cfg = self.config
        source = as_source(train_set)
        self.val = as_source(val_set)
        self.data_id = ckpt.data_identity(source, self.val)  # recorded in checkpoints; resume checks it
        n_hold = _holdout_count(cfg.holdout, len(source))
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(cfg.seed + 7919))
        self.holdout = source.subset(order[:n_hold]) if n_hold else None
        self.train = source.subset(order[n_hold:]) if n_hold else source
        if len(self.train) < cfg.batch_size * self.world_size:
            raise ValueError(f"batch_size={cfg.batch_size}: the training set has only {len(self.train)} images "
                             f"after holding out {n_hold} (x {self.world_size} ranks)")  # fmt: skip
        x0, _ = next(iter(self.train.loader(1)))
        self.input_size = tuple(int(s) for s in x0.shape[1:])
        if init is not None:
            self._load_init(init)
        self.net.to(self.device)
        self.space = net.space
        self.full_arch = self.space.full()
        self.full_macs = self.space.macs(self.full_arch, self.input_size)
        self.steps_per_epoch = len(self.train) // (cfg.batch_size * self.world_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if self.total_steps < 1:
            raise ValueError(f"batch_size={cfg.batch_size}: no full batch per epoch ({len(self.train)} images)")
        self.step = STPStep(net, cfg, total_steps=self.total_steps, input_size=self.input_size)
        self.budget = self.step.budgets[0] if self.step.budgets else cfg.targets()[0] * self.full_macs
        self.model = _Many(self.net)
        if self.world_size > 1:
            self.model = dist_utils.wrap_ddp(self.model, self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _cosine(s, self.total_steps, warm))
        self.epoch, self.history, self.wall_before = 0, [], 0.0
        if resume:
            self._resume()

    @property
    def pool(self):
        """The (first budget's) architecture pool; None for dense training."""
        return self.step.pools[0] if self.step.pools else None

    # ------------------------------------------------------------------ public
    def fit(self) -> STPResult:
        """Train the remaining epochs, then select, extract, recalibrate and evaluate."""
        return self._finish(train_epochs(self))

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.net.train()
        loader = self.train.loader(cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, epoch=epoch,
                                   rank=self.rank, world_size=self.world_size, drop_last=True)  # fmt: skip
        bar = Progress(epoch, cfg.epochs, self.steps_per_epoch, mode=self.progress if self.rank == 0 else "off")
        sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
        steps = 0
        try:
            for x, y in loader:
                if steps >= self.steps_per_epoch:
                    break
                values = self._step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                    epoch, steps)  # fmt: skip
                for k in sums:
                    sums[k] += values[k]
                steps += 1
                bar.update(x.shape[0] * self.world_size, loss=values["loss"], lr=self.scheduler.get_last_lr()[0])
        finally:
            bar.close()
        self.step.end_epoch()
        if self.world_size > 1:
            dist_utils.sync_buffers(self.net)
        record = {"epoch": epoch + 1, "steps": steps, **{k: v / max(steps, 1) for k, v in sums.items()},
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": bar.images_per_s}  # fmt: skip
        if self.pool is not None:
            best = self.pool.ranked()[0]
            record |= {"pool_best_score": None if math.isinf(best.score) else best.score,
                       "pool_best_macs_ratio": best.macs / self.full_macs}  # fmt: skip
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record["val_top1_full"] = evaluate(self.net, self.val, self.device, batch_size=256)
        summary = " ".join(f"{k}={record[k]:.4g}" for k in ("loss", "ce", "kd", "val_top1_full") if k in record)
        log(f"epoch {epoch + 1}/{cfg.epochs}: {summary}", mode=self.progress if self.rank == 0 else "off")
        return record

    def _step(self, x: Tensor, y: Tensor, epoch: int, step_in_epoch: int) -> dict:
        """One optimizer step through :class:`STPStep`: plan, one forward of every arch, loss, backward,
        update.  A NaN/inf loss (the same on every rank: the values are averaged first) stops the run."""
        cfg = self.config
        archs = self.step.plan()
        amp = cfg.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            logits = self.model(x, archs)
        loss = self.step.loss(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        values = self.step.update()
        if not all(math.isfinite(v) for v in (values["loss"], values["ce"], *values["kd"])):
            where = f"{self.out_dir / CHECKPOINT}" if self.out_dir and self.epoch > 0 else None
            kept = f"the last good checkpoint (epoch {self.epoch}) is kept at {where}" if where else \
                "no checkpoint had been written yet"  # fmt: skip
            raise TrainingDiverged(f"the loss became {values['loss']} at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                                   f"{kept}. Lower the learning rate (lr={cfg.lr}) or enable grad_clip.")  # fmt: skip
        kd = values["kd"]
        return {"loss": values["loss"], "ce": values["ce"], "kd": sum(kd) / len(kd) if kd else 0.0}

    # ------------------------------------------------------------------ end of training
    def _finish(self, wall_s: float) -> STPResult:
        """Select every budget's arch (no fine-tuning: extraction, BN recalibration, re-scoring on the
        held-out images) and evaluate the dense and the chosen models on ``val_set``."""
        cfg = self.config
        calib = self.train.loader(min(256, cfg.calib_images), shuffle=True, seed=cfg.seed, epoch=10**6)
        dense = self.net.extract(self.full_arch).to(self.device)
        recalibrate_bn(dense, calib, cfg.calib_images, forward=self._call)
        full = {"top1": evaluate(self._wrap(dense), self.val, self.device), "macs": self.full_macs,
                "params": self.space.params(self.full_arch)}  # fmt: skip
        result = STPResult(None, full, None, [], [], self.history, self.budget, self.input_size, str(self.device),
                           wall_s, dense_model=dense)  # fmt: skip
        if not self.step.pools:
            return result
        score_set = self.holdout if self.holdout is not None else self.train
        holdout = score_set.loader(256)

        def on_candidate(model: nn.Module) -> dict:
            return {"top1": evaluate(self._wrap(model), self.val, self.device)}

        selections = self.step.select(calib, holdout, forward=self._call, device=self.device, evaluate=on_candidate)
        for target, sel, pool in zip(self.step.targets, selections, self.step.pools):
            cand = next(c for c in sel.candidates if c["arch"] == sel.arch.to_dict())
            result.budgets.append({"target": target, "arch": sel.arch.to_dict(), "top1": cand["top1"],
                                   "macs": sel.macs, "params": sel.params, "candidates": sel.candidates,
                                   "pool": _pool_rows(pool, self.full_macs)})  # fmt: skip
            result.pruned_models.append(sel.model)
        first = result.budgets[0]
        result.chosen = selections[0].arch
        result.pruned = {"top1": first["top1"], "macs": first["macs"], "params": first["params"],
                         "arch": first["arch"]}  # fmt: skip
        result.pool, result.candidates = first["pool"], first["candidates"]
        result.pruned_model = result.pruned_models[0]
        return result

    def _call(self, model: nn.Module, x: Tensor) -> Tensor:
        """How an extracted model is called: its logits (a converted model's ``outputs=`` selector)."""
        pick = getattr(self.net, "outputs", None)
        out = model(x)
        return pick(out) if pick is not None else out

    def _wrap(self, model: nn.Module) -> nn.Module:
        return _Logits(model, self.net.outputs) if getattr(self.net, "outputs", None) is not None else model

    # ------------------------------------------------------------------ checkpoints
    def _state(self, wall_s: float) -> dict:
        return ckpt.run_state(self.net, self.config, epoch=self.epoch, optimizer=self.optimizer,
                              scheduler=self.scheduler, history=self.history, wall_s=wall_s,
                              data_id=self.data_id, stp=self.step.state_dict())  # fmt: skip

    def _save(self, wall_s: float) -> None:
        if self.out_dir is not None:
            ckpt.save_atomic(self._state(wall_s), self.out_dir / CHECKPOINT)

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        path = self.out_dir / CHECKPOINT
        data = ckpt.restore_run(path, self.net, self.config, self.optimizer, self.scheduler, require="stp",
                                data_id=self.data_id)  # fmt: skip
        self.step.load_state_dict(data["stp"])
        self.epoch, self.history = int(data["epoch"]), list(data["history"])
        self.wall_before = float(data["wall_s"])
        log(f"resumed {path} at epoch {self.epoch}/{self.config.epochs}",
            mode=self.progress if self.rank == 0 else "off")

    def _load_init(self, path: str | Path) -> None:
        data = ckpt.load(path)
        ckpt.check_identity(data, path, self.net)
        ckpt.load_weights(self.net, data, path)
        if hasattr(self.net, "sort_channels"):
            self.net.sort_channels()


class _Logits(nn.Module):
    """A converted model's prediction tensor (its ``outputs=`` selector applied), for evaluation."""

    def __init__(self, model: nn.Module, pick) -> None:
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, x: Tensor) -> Tensor:
        return self.pick(self.model(x))


def _pool_rows(pool, full_macs: float) -> list[dict]:
    return [{"arch": e.arch.to_dict(), "macs": e.macs, "macs_ratio": e.macs / full_macs,
             "score": None if math.isinf(e.score) else e.score, "seen": e.seen} for e in pool.ranked()]  # fmt: skip


def train_epochs(trainer) -> float:
    """Run ``trainer._train_epoch`` for the epochs left, record each epoch's history, checkpoint and
    call ``on_epoch`` after it (rank 0); return the run's wall time so far (resumed runs included).
    A fresh run seeds torch's RNG with ``config.seed`` first.  Shared by STPTrainer and IEETrainer."""
    start = time.perf_counter() - trainer.wall_before
    if trainer.epoch == 0:  # a fresh run: what draws from torch's RNG (dropout...) follows the seed; a resumed
        torch.manual_seed(trainer.config.seed)  # one has the RNG state its checkpoint saved
    for epoch in range(trainer.epoch, trainer.config.epochs):
        record = trainer._train_epoch(epoch)
        record["wall_s"] = time.perf_counter() - start
        trainer.history.append(record)
        trainer.epoch = epoch + 1
        if trainer.rank == 0:
            trainer._save(record["wall_s"])
            if trainer.on_epoch:
                trainer.on_epoch(record)
    return time.perf_counter() - start


def _holdout_count(holdout: float, n: int) -> int:
    count = int(holdout) if holdout >= 1 else round(holdout * n)
    if count >= n:
        raise ValueError(f"STPConfig.holdout={holdout} leaves no training images (the set has {n})")
    return count


def _cosine(step: int, total: int, warmup: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

