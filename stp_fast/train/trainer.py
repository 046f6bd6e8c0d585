"""``STPTrainer``: stimulative training of a supernet, KD-guided architecture search, extraction,
BN recalibration and evaluation -- no fine-tuning (``ALGORITHMS.md`` section 2, SPEC section 5).

Every step runs the full net and K subnets in ONE ``forward_many`` pass (one batched multi-subnet
op per layer), sums the full net's cross-entropy and the subnets' KL losses, and takes one optimizer
step.  Under ``torchrun`` the supernet runs in DistributedDataParallel: one backward per step, so no
``no_sync`` juggling is needed, and the KD scores are averaged over ranks so every rank keeps the
same pool.
"""

from __future__ import annotations

import math
import random
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
from stp_fast.train.evaluate import evaluate, kd_score
from stp_fast.train.losses import stp_losses
from stp_fast.train.pool import ArchPool
from stp_fast.train.progress import Progress, log
from stp_fast.train.sources import as_source

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class STPResult:
    """What :meth:`STPTrainer.fit` returns (models are plain ``torch.nn`` modules in eval mode)."""

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
        self.budget = cfg.flops_target * self.full_macs
        self.rng = random.Random(cfg.seed)
        self.pool = None
        if cfg.method != "dense":
            self.pool = ArchPool(self.space, self.budget, cfg.pool_size, self.rng, input_size=self.input_size,
                                 tolerance=cfg.budget_tolerance, sampling=cfg.sampling, mutate_prob=cfg.mutate_prob)
        self.model = _Many(self.net)
        if self.world_size > 1:
            self.model = dist_utils.wrap_ddp(self.model, self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self.train) // (cfg.batch_size * self.world_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warm = cfg.warmup_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _cosine(s, self.total_steps, warm))
        self.epoch, self.history, self.wall_before = 0, [], 0.0
        if resume:
            self._resume()

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
                interval = cfg.pool_update_interval
                done = epoch * self.steps_per_epoch + steps
                if self.pool is not None and cfg.method == "stp" and interval and done % interval == 0:
                    self.pool.update(cfg.pool_replace_fraction, cfg.pool_mutate_share)
        finally:
            bar.close()
        if self.pool is not None and cfg.method == "stp" and not cfg.pool_update_interval:
            self.pool.update(cfg.pool_replace_fraction, cfg.pool_mutate_share)
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

    def _plan(self, step: int) -> tuple[list[Arch], list[int], list[tuple[int, Arch]]]:
        """The archs of one step (full first), each subnet's teacher index, and the budget archs
        whose KD loss scores the pool: ``(archs, teachers, [(position, arch)])``."""
        cfg = self.config
        archs, teachers, scored = [self.full_arch], [], []
        if cfg.method == "st":
            while len(archs) <= cfg.subnets_per_step:
                archs.append(self._random_subnet())
                teachers.append(0)
            return archs, teachers, scored
        progress = step / max(self.total_steps, 1)
        while len(archs) <= cfg.subnets_per_step:
            a = self.pool.draw(cfg.pool_sample_prob)
            big = self._expanded(a, progress)
            if big is not None and big != a and len(archs) + 1 <= cfg.subnets_per_step:
                archs.append(big)
                teachers.append(0)
                teachers.append(len(archs) - 1 if cfg.expansion == "assistant" else 0)
            else:
                teachers.append(0)
            archs.append(a)
            scored.append((len(archs) - 1, a))
        return archs, teachers, scored

    def _expanded(self, arch: Arch, progress: float) -> Arch | None:
        cfg = self.config
        if cfg.expansion == "off":
            return None
        if cfg.expansion == "assistant":
            target = self.rng.uniform(self.budget, self.full_macs)
        else:
            left = max(0.0, 1.0 - progress / cfg.expansion_anneal) if cfg.expansion_anneal > 0 else 0.0
            target = self.budget + (cfg.expansion_start * self.full_macs - self.budget) * left
            if left <= 0.0 or target <= self.pool.macs(arch):  # annealed down to the budget: no expansion
                return None
        return self.space.canonical(self.space.expand(arch, target, self.rng, self.input_size))

    def _random_subnet(self) -> Arch:
        a = self.space.sample(self.rng)
        return Arch.make(a.depth, self.space.groups) if self.config.sampling == "depth" else a

    def _step(self, x: Tensor, y: Tensor, epoch: int, step_in_epoch: int) -> dict:
        cfg = self.config
        global_step = epoch * self.steps_per_epoch + step_in_epoch
        archs, teachers, scored = self._plan(global_step)
        amp = cfg.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            logits = self.model(x, archs)
        total, ce, kds = stp_losses(logits, y, teachers, temperature=cfg.kd_temperature, kd_weight=cfg.kd_weight,
                                    label_smoothing=cfg.label_smoothing, norm_kd=cfg.norm_kd)  # fmt: skip
        stats = torch.cat([total.detach().reshape(1).float(), ce.reshape(1), kds])
        if self.world_size > 1:
            stats = dist_utils.all_mean(stats)
        stats = stats.tolist()
        if not all(math.isfinite(v) for v in stats):
            where = f"{self.out_dir / CHECKPOINT}" if self.out_dir and self.epoch > 0 else None
            kept = f"the last good checkpoint (epoch {self.epoch}) is kept at {where}" if where else \
                "no checkpoint had been written yet"  # fmt: skip
            raise TrainingDiverged(f"the loss became {stats[0]} at epoch {epoch + 1}, step {step_in_epoch + 1}; "
                                   f"{kept}. Lower the learning rate (lr={cfg.lr}) or enable grad_clip.")  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        kd_values = stats[2:]
        if scored:
            mean = sum(kd_values[p - 1] for p, _ in scored) / len(scored) if cfg.score_normalize else 1.0
            for pos, arch in scored:
                self.pool.observe(arch, kd_values[pos - 1] / max(mean, 1e-12), cfg.score_ema)
        return {"loss": stats[0], "ce": stats[1], "kd": sum(kd_values) / len(kd_values) if kd_values else 0.0}

    # ------------------------------------------------------------------ end of training
    def _finish(self, wall_s: float) -> STPResult:
        cfg = self.config
        calib = self.train.loader(min(256, cfg.calib_images), shuffle=True, seed=cfg.seed, epoch=10**6)
        dense = self.net.extract(self.full_arch).to(self.device)
        recalibrate_bn(dense, calib, cfg.calib_images)
        full = {"top1": evaluate(dense, self.val, self.device), "macs": self.full_macs,
                "params": self.space.params(self.full_arch)}  # fmt: skip
        result = STPResult(None, full, None, [], [], self.history, self.budget, self.input_size, str(self.device),
                           wall_s, dense_model=dense)  # fmt: skip
        if self.pool is None:
            return result
        score_set = self.holdout if self.holdout is not None else self.train
        ranked = self.pool.ranked()
        result.pool = [{"arch": e.arch.to_dict(), "macs": e.macs, "macs_ratio": e.macs / self.full_macs,
                        "score": None if math.isinf(e.score) else e.score, "seen": e.seen} for e in ranked]  # fmt: skip
        chosen_model, best = None, None
        for e in ranked[: cfg.final_candidates]:
            plain = self.net.extract(e.arch).to(self.device)
            recalibrate_bn(plain, calib, cfg.calib_images)
            kd, top1_hold = kd_score(plain, dense, score_set, self.device, temperature=cfg.kd_temperature)
            cand = {"arch": e.arch.to_dict(), "macs": e.macs, "macs_ratio": e.macs / self.full_macs,
                    "params": self.space.params(e.arch), "pool_score": None if math.isinf(e.score) else e.score,
                    "holdout_kd": kd, "holdout_top1": top1_hold,
                    "top1": evaluate(plain, self.val, self.device)}  # fmt: skip
            result.candidates.append(cand)
            key = kd if cfg.select_by == "kd" else -top1_hold
            if best is None or key < best[0]:
                best, chosen_model = (key, e.arch, cand), plain
        _, result.chosen, cand = best
        result.pruned = {"top1": cand["top1"], "macs": cand["macs"], "params": cand["params"],
                         "arch": result.chosen.to_dict()}  # fmt: skip
        result.pruned_model = chosen_model
        return result

    # ------------------------------------------------------------------ checkpoints
    def _state(self, wall_s: float) -> dict:
        return ckpt.run_state(self.net, self.config, epoch=self.epoch, optimizer=self.optimizer,
                              scheduler=self.scheduler, history=self.history, wall_s=wall_s,
                              pool=self.pool.state_dict() if self.pool else None,
                              rng=_encode_rng(self.rng.getstate()))  # fmt: skip

    def _save(self, wall_s: float) -> None:
        if self.out_dir is not None:
            ckpt.save_atomic(self._state(wall_s), self.out_dir / CHECKPOINT)

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        path = self.out_dir / CHECKPOINT
        data = ckpt.restore_run(path, self.net, self.config, self.optimizer, self.scheduler,
                                require="pool" if self.pool is not None else None)  # fmt: skip
        if self.pool is not None:
            self.pool.load_state_dict(data["pool"])
        self.rng.setstate(_decode_rng(data["rng"]))
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


def train_epochs(trainer) -> float:
    """Run ``trainer._train_epoch`` for the epochs left, record each epoch's history, checkpoint and
    call ``on_epoch`` after it (rank 0); return the run's wall time so far (resumed runs included).
    Shared by STPTrainer and IEETrainer."""
    start = time.perf_counter() - trainer.wall_before
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


def _encode_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(data: list) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
