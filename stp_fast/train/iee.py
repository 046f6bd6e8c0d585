"""IEE -- iterative exploitation-exploration sparse training (arXiv 2502.03658, ``ALGORITHMS.md``
section 5) for weights (unstructured, ERK) and channels (the supernet's channel groups under a MACs
budget), with two baselines in the same code path: RigL-style (magnitude prune, gradient grow) and
one-shot pruning followed by fine-tuning.

The paper's code was never published and its method section could not be retrieved: every choice
below beyond the abstract is a reconstruction ([I] in ALGORITHMS.md) and a knob of :class:`IEEConfig`.

One training run of ``T`` steps (one cosine learning-rate schedule) goes::

    step 0 (iee, rigl): prune to the target by the criterion (per layer top-k at the ERK counts,
        or the budgeted global channel ranking)
    every cycle of C steps until (1 - final_fraction) T:
        iee:  C - t_exp steps of exploitation (masked updates), then t_exp steps of reactivation
              (the inactive entries back at their stored values and trained alone, the active part
              frozen bit for bit), then ONE top-k decision over both sets by the same criterion with
              at most swap_fraction(t) swaps (annealed); grown entries keep what reactivation taught
              them, their momentum starts at zero; pruned entries are stored and zeroed.  A cycle whose
              annealed cap rounds to 0 swaps has no window and no decision (only exploitation).
              Channels default to Taylor on BN accumulated over the window (active and reactivated
              channels scored on the same batches and model state): by magnitude, channels trained
              for t_exp steps cannot compete with channels trained all along (ALGORITHMS.md gotcha 11)
        rigl: C steps of exploitation, then drop the swap_fraction(t) smallest-|w| active entries and
              grow as many inactive ones by |dL/dw| on the step's batch (RigL)
    oneshot: dense training until (1 - final_fraction) T, then one prune by the criterion
    the rest (final_fraction of the steps): training with a fixed mask.

Exploitation and the fixed phase use :class:`~stp_fast.train.sparsity.MaskedSGD`: inactive entries
get no gradient, no weight decay and no momentum, and the mask is re-applied after every step
(ALGORITHMS.md gotcha 9).  At the end the unstructured result is the full model with its zeros;
the channel result is extracted to a plain model (active channels moved to the front of every
group, then ``net.extract``), and BN is recalibrated in both cases.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stp_fast.arch.space import Arch
from stp_fast.nn.bn import recalibrate_bn
from stp_fast.train import checkpoint as ckpt
from stp_fast.train import distributed as dist_utils
from stp_fast.train import sparsity as sp
from stp_fast.train.config import STPConfig
from stp_fast.train.evaluate import evaluate
from stp_fast.train.iee_decide import Decisions
from stp_fast.train.progress import Progress, log
from stp_fast.train.sources import as_source
from stp_fast.train.sparsity import extract_channels
from stp_fast.train.trainer import CHECKPOINT, STPResult, TrainingDiverged, _cosine, train_epochs

__all__ = ["IEEConfig", "IEEResult", "IEETrainer", "extract_channels", "render_markdown", "report_extra"]

IEE_METHODS = ("iee", "rigl", "oneshot")
STRUCTURES = ("unstructured", "channel")
REGROW_INITS = ("auto", "restore", "zero")
ANNEALS = ("cosine", "linear", "constant")
LAYER_RULES = ("erk", "dense")
SCORE_NORMS = ("mean", "none")
EXPLORE_NORMS = ("auto", "none", "set")
# the defaults of the "auto"/0 knobs per structure, chosen by the ablation in benchmarks/accuracy_iee.py
AUTO_EXPLORE_FRACTION = {"unstructured": 0.1, "channel": 0.3}
AUTO_CRITERION = {"unstructured": "magnitude", "channel": "taylor"}  # of IEE; rigl and oneshot: magnitude
AUTO_EXPLORE_NORM = {"unstructured": "set", "channel": "none"}


@dataclass
class IEEConfig(STPConfig):
    """Configuration of :class:`IEETrainer`: the training knobs of :class:`STPConfig` (epochs, lr,
    batch_size, momentum, weight_decay, ..., ``flops_target`` for channels; its pool/KD/search fields
    are unused) plus these, all [I] reconstructions unless noted:

        method: ``"iee"``, ``"rigl"`` (RigL-style baseline) or ``"oneshot"`` (dense, one prune, fine-tune).
        structure: ``"unstructured"`` (weights, ERK per layer) or ``"channel"`` (the net's channel groups,
            global ranking under ``flops_target`` x the dense MACs; groups whose channels are not single
            tensor slices, e.g. whole attention heads, stay full).
        sparsity: unstructured target, the zero fraction over all conv/linear weights, in [0, 1); 0 = dense.
        criterion: importance, one of ``sparsity.CRITERIA`` (``register_criterion`` adds more):
            ``"magnitude"``, ``"taylor"`` (first order, channels on the BN affine parameters, accumulated
            over the reactivation window: the active and the reactivated channels are scored on the same
            batches and the same model state), ``"taylor_weights"``, or ``"auto"`` (default: IEE on
            channels taylor, everything else magnitude; ``AUTO_CRITERION``).  IEE uses it for both prune
            and grow; rigl ignores it (magnitude for the first prune and for dropping, |dL/dw| for
            growing).
        cycle_steps: steps per cycle (0 = one epoch).
        explore_steps: t_exp, reactivation steps at the end of each IEE cycle (0 = ``explore_fraction`` of
            the cycle, at least 1); must be smaller than the cycle.  Also the batches a gradient criterion
            is estimated on before a prune that follows no reactivation.
        explore_fraction: t_exp as a fraction of the cycle when ``explore_steps`` is 0, in [0, 1); 0 = auto
            (``AUTO_EXPLORE_FRACTION``: a tenth for unstructured, 0.3 for channels: a reactivated channel
            needs more than a few steps to show what it can do).
        explore_norm: how IEE's decision compares the active and the reactivated entries: ``"none"`` (raw
            criterion scores), ``"set"`` (each unit's scores divided by the mean of their set: an entry
            competes by how it ranks among the entries trained as long as itself; with
            ``regrow_init="zero"`` the reactivated weights' magnitudes are then their summed updates over
            the window, a multi-batch gradient preview), or ``"auto"`` (``AUTO_EXPLORE_NORM``: set for
            unstructured, none for channels, whose Taylor scores already compete).
        swap_fraction: cap of the swaps per decision, as a fraction of the active entries of a layer
            (unstructured) or of all active channels (channel); RigL's drop fraction (default 0.3 as RigL).
        swap_anneal: ``"cosine"`` (RigL), ``"linear"`` or ``"constant"`` decay of the cap to 0 at the end
            of exploration.
        final_fraction: share of the training steps with a fixed mask at the end (oneshot: fine-tuning).
        regrow_init: value of reactivated (iee) / grown (rigl) entries: ``"restore"`` their stored values
            (the values they had when pruned; ALGORITHMS.md gotcha 10), ``"zero"`` (RigL's choice; not for
            channels: a zeroed channel gets no gradient through its BN and ReLU), or ``"auto"`` (default:
            zero for unstructured iee and rigl -- with ``explore_norm="set"`` IEE then ranks the growth by
            what the window's updates taught the reactivated weights --, restore for channels).
        erk_first_layer, erk_classifier: ``"erk"`` (RigL's default: ERK for every layer) or ``"dense"``
            (kept at density 1; still counted, so the whole net has ``sparsity``).
        erk_power: exponent of the ERK raw density (RigL ``erk_power_scale``).
        channel_score_norm: ``"mean"`` divides each group's channel scores by their mean before the
            global ranking (layers of different scale compete fairly), or ``"none"``.
    """

    method: str = "iee"
    holdout: float = 0.0
    structure: str = "unstructured"
    sparsity: float = 0.9
    criterion: str = "auto"
    cycle_steps: int = 0
    explore_steps: int = 0
    explore_fraction: float = 0.0
    explore_norm: str = "auto"
    swap_fraction: float = 0.3
    swap_anneal: str = "cosine"
    final_fraction: float = 0.25
    regrow_init: str = "auto"
    erk_first_layer: str = "erk"
    erk_classifier: str = "erk"
    erk_power: float = 1.0
    channel_score_norm: str = "mean"

    def validate(self) -> IEEConfig:
        """Raise ValueError naming the first bad field; return self."""
        for name, choices in (("method", IEE_METHODS), ("structure", STRUCTURES), ("criterion", ("auto", *sp.CRITERIA)),
                              ("regrow_init", REGROW_INITS), ("swap_anneal", ANNEALS),
                              ("erk_first_layer", LAYER_RULES), ("erk_classifier", LAYER_RULES),
                              ("channel_score_norm", SCORE_NORMS), ("explore_norm", EXPLORE_NORMS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"IEEConfig.{name} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {getattr(self, name)!r}")  # fmt: skip
        STPConfig.validate(dataclasses.replace(self, method="st"))  # the shared training knobs
        _check("sparsity", self.sparsity, 0.0 <= _num(self.sparsity) < 1.0, "a fraction in [0, 1)")
        _check("final_fraction", self.final_fraction, 0.0 <= _num(self.final_fraction) < 1.0, "a fraction in [0, 1)")
        _check("swap_fraction", self.swap_fraction, 0.0 <= _num(self.swap_fraction) <= 1.0, "a fraction in [0, 1]")
        _check("erk_power", self.erk_power, 0.0 < _num(self.erk_power) < math.inf, "a positive number")
        _check("explore_fraction", self.explore_fraction, 0.0 <= _num(self.explore_fraction) < 1.0,
               "a fraction in [0, 1)")  # fmt: skip
        for name in ("cycle_steps", "explore_steps"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
        if self.structure == "channel" and self.regrow_init == "zero":
            raise ValueError("IEEConfig.regrow_init='zero' cannot revive channels (a zeroed channel gets no gradient "
                             "through its BN and ReLU); use 'restore' or 'auto'")  # fmt: skip
        if self.method == "iee" and self.cycle_steps and self.explore_steps >= self.cycle_steps:
            raise ValueError(f"IEEConfig.explore_steps (t_exp={self.explore_steps}) must be smaller than "
                             f"cycle_steps ({self.cycle_steps}): a cycle needs exploitation steps")  # fmt: skip
        return self


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"IEEConfig.{name} must be {what}, got {value!r}")


@dataclass
class IEEResult(STPResult):
    """:class:`STPResult` (``pruned``: top1, macs -- for unstructured the multiply-accumulates with a
    nonzero weight --, params -- nonzero --, arch) plus the IEE specifics."""

    structure: str = "unstructured"
    densities: dict = field(default_factory=dict)
    cycles: list = field(default_factory=list)
    skipped_groups: dict = field(default_factory=dict)
    full_top1_of: str = ""


class IEETrainer(Decisions):
    """Sparse training of ``net`` (an stp_fast supernet) by IEE, RigL or one-shot pruning.

    Args as :class:`~stp_fast.train.STPTrainer` (``config`` an :class:`IEEConfig`), plus
    ``on_event(name, info)``, called with ``"pruned"`` (the first prune), ``"reactivated"`` (before the
    first reactivation step of a cycle), ``"explored"`` (after the last one, before the decision) and
    ``"decided"`` (after a decision; ``info`` is the cycle record).
    """

    def __init__(self, net: nn.Module, train_set, val_set, config: IEEConfig | None = None, *,
                 out_dir: str | Path | None = None, resume: bool = False, init: str | Path | None = None,
                 progress: str = "auto", on_epoch: Callable[[dict], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None) -> None:  # fmt: skip
        if config is not None and not isinstance(config, IEEConfig):
            raise TypeError(f"IEETrainer: config must be an IEEConfig, got {type(config).__name__}")
        cfg = self.config = (config or IEEConfig()).validate()
        if not hasattr(net, "space") or not hasattr(net, "extract"):
            raise TypeError("IEETrainer: net must be an stp_fast supernet (stp_fast.models.create)")
        self.net, self.progress, self.on_epoch, self.on_event = net, progress, on_epoch, on_event
        self.out_dir = Path(out_dir) if out_dir else None
        self.rank, self.world_size, self.device = dist_utils.setup(cfg.device)
        self.train, self.val = as_source(train_set), as_source(val_set)
        self.data_id = ckpt.data_identity(self.train, self.val)  # recorded in checkpoints; resume checks it
        if len(self.train) < cfg.batch_size * self.world_size:
            raise ValueError(f"batch_size={cfg.batch_size}: the training set has only {len(self.train)} images "
                             f"(x {self.world_size} ranks)")  # fmt: skip
        x0, _ = next(iter(self.train.loader(1)))
        self.input_size = tuple(int(s) for s in x0.shape[1:])
        if init is not None:
            data = ckpt.load(init)
            ckpt.check_identity(data, init, net)
            ckpt.load_weights(net, data, init)
        self.from_init = init is not None
        net.to(self.device)
        self.space, self.full_arch = net.space, net.space.full()
        self.full_macs = self.space.macs(self.full_arch, self.input_size)
        self.steps_per_epoch = len(self.train) // (cfg.batch_size * self.world_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.cycle = cfg.cycle_steps or self.steps_per_epoch
        frac = cfg.explore_fraction or AUTO_EXPLORE_FRACTION[cfg.structure]
        self.t_exp = cfg.explore_steps or max(1, int(frac * self.cycle + 1e-9))
        if cfg.method == "iee" and self.t_exp >= self.cycle:
            raise ValueError(f"IEEConfig.explore_steps (t_exp={self.t_exp}) must be smaller than the cycle "
                             f"({self.cycle} steps{'' if cfg.cycle_steps else ' = one epoch'})")  # fmt: skip
        self.explore_end = int((1.0 - cfg.final_fraction) * self.total_steps)
        self.prune_step = self.explore_end if cfg.method == "oneshot" else 0
        self.regrow = cfg.regrow_init if cfg.regrow_init != "auto" else \
            ("zero" if cfg.structure == "unstructured" and cfg.method in ("rigl", "iee") else "restore")  # fmt: skip
        self._build_units()
        self.params = dict(net.named_parameters())
        self.state = sp.MaskState(net, self.units)
        self.explore_norm = cfg.explore_norm if cfg.explore_norm != "auto" else AUTO_EXPLORE_NORM[cfg.structure]
        self.criterion_name = cfg.criterion if cfg.criterion != "auto" else \
            (AUTO_CRITERION[cfg.structure] if cfg.method == "iee" else "magnitude")  # fmt: skip
        self.criterion = sp.make_criterion("magnitude" if cfg.method == "rigl" else self.criterion_name)
        self.model = dist_utils.wrap_ddp(net, self.device) if self.world_size > 1 else net
        self.optimizer = sp.MaskedSGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _cosine(s, self.total_steps, warm))
        self.epoch, self.history, self.cycles, self.wall_before = 0, [], [], 0.0
        self.pruned, self.dense_top1 = False, None
        if resume:
            self._resume()

    def _build_units(self) -> None:
        cfg = self.config
        self.skipped: dict[str, str] = {}
        if cfg.structure == "unstructured":
            self.units = sp.weight_units(self.net)
            first, clf = sp.first_and_classifier(self.net)
            dense = {n for n, rule in ((first, cfg.erk_first_layer), (clf, cfg.erk_classifier)) if rule == "dense"}
            shapes = {u.name: u.shapes[u.name] for u in self.units}
            self.targets = sp.erk_counts(shapes, cfg.sparsity, dense, cfg.erk_power)
            self.layer_macs = sp.layer_macs(self.net.extract(self.full_arch), self.input_size)
            self.budget = self._sparse_macs(self.targets)
        else:
            self.units, self.skipped = sp.channel_units(self.net)
            self.budget = cfg.flops_target * self.full_macs
            self.channels = sp.ChannelBudget({u.name: u.size for u in self.units}, self._channel_macs, self.budget)

    def _channel_macs(self, counts: dict[str, int]) -> float:
        widths = self.full_arch.widths | counts
        return self.space.macs(Arch.make(self.full_arch.depth, widths), self.input_size)

    def _sparse_macs(self, active: dict[str, int]) -> float:
        """Dense MACs minus those of the zero weights (each weight's MACs = its layer's / its size)."""
        cut = sum(self.layer_macs[u.name] * (1 - active[u.name] / u.size) for u in self.units)
        return self.full_macs - cut

    # ------------------------------------------------------------------ public
    def fit(self) -> IEEResult:
        """Train the remaining epochs, then extract (channels), recalibrate BN and evaluate."""
        if self.epoch == 0 and self.dense_top1 is None and self.config.method != "oneshot":
            self.dense_top1 = self._dense_top1()
        return self._finish(train_epochs(self))

    def stats(self) -> dict:
        """The current sparsity (unstructured) or kept MACs fraction and channels (channel)."""
        counts = {k: int(m.sum()) for k, m in self.state.unit_masks.items()}
        if self.config.structure == "unstructured":
            total = sum(u.size for u in self.units)
            return {"sparsity": 1.0 - sum(counts.values()) / total, "active": sum(counts.values())}
        return {"macs_ratio": self._channel_macs(counts) / self.full_macs, "channels": counts}

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.net.train()
        loader = self.train.loader(cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, epoch=epoch,
                                   rank=self.rank, world_size=self.world_size, drop_last=True)  # fmt: skip
        bar = Progress(epoch, cfg.epochs, self.steps_per_epoch, mode=self.progress if self.rank == 0 else "off")
        loss_sum, steps, decisions = 0.0, 0, len(self.cycles)
        try:
            for x, y in loader:
                if steps >= self.steps_per_epoch:
                    break
                loss = self._step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                                  epoch * self.steps_per_epoch + steps)  # fmt: skip
                loss_sum += loss
                steps += 1
                bar.update(x.shape[0] * self.world_size, loss=loss, lr=self.scheduler.get_last_lr()[0])
        finally:
            bar.close()
        if self.world_size > 1:
            dist_utils.sync_buffers(self.net)
        record = {"epoch": epoch + 1, "steps": steps, "loss": loss_sum / max(steps, 1),
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": bar.images_per_s,
                  "decisions": len(self.cycles) - decisions,
                  "grown": sum(c.get("grown", 0) for c in self.cycles[decisions:])}  # fmt: skip
        record |= {k: v for k, v in self.stats().items() if k != "channels"}
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            record["val_top1"] = self._masked_top1()
        shown = [k for k in ("loss", "sparsity", "macs_ratio", "val_top1") if k in record]
        summary = " ".join(f"{k}={record[k]:.4g}" for k in shown)
        log(f"epoch {epoch + 1}/{cfg.epochs} ({cfg.method}): {summary}", mode="off" if self.rank else self.progress)
        return record

    @torch.no_grad()
    def _masked_top1(self) -> float:
        """Validation top-1 of the masked net (also when an epoch ends inside a reactivation window)."""
        live = {n: self.params[n].detach().clone() for n in self.state.param_masks()}
        self.state.apply()
        try:
            return evaluate(self.net, self.val, self.device, batch_size=256)
        finally:
            for n, v in live.items():
                self.params[n].copy_(v)

    def _phase(self, step: int) -> str:
        if not self.pruned:
            return "dense"
        if self.config.method == "iee":
            end = (step // self.cycle + 1) * self.cycle
            if end <= self.explore_end and step >= end - self.t_exp and self._will_swap(end - 1):
                return "explore"
        return "exploit"

    def _step(self, x: Tensor, y: Tensor, step: int) -> float:
        cfg = self.config
        if step == self.prune_step and not self.pruned:
            self._first_prune(step)
        phase = self._phase(step)
        if phase == "explore" and step % self.cycle == self.cycle - self.t_exp:
            self.state.reactivate(self.regrow)
            self.criterion.reset()
            self._emit("reactivated", {"step": step})
        loss = self._forward_backward(x, y, step)
        if phase == "explore" and self.criterion.needs_grad:
            self.criterion.accumulate(self.units, self.params)
        masks = self._update_masks(phase)
        for p, m in masks.items():
            if p.grad is not None:
                if isinstance(m, Tensor):
                    p.grad.mul_(m)
                else:
                    p.grad.zero_()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.optimizer.update_masks = masks
        self.optimizer.step()
        self.scheduler.step()
        if phase == "exploit":
            self.state.apply()
        done = step + 1
        if (self.pruned and cfg.method in ("iee", "rigl") and done % self.cycle == 0 and done <= self.explore_end
                and self.state.inactive_count() and (phase == "explore" or cfg.method == "rigl")):  # fmt: skip
            self._decide(step, x, y, phase == "explore")
        return loss

    def _forward_backward(self, x: Tensor, y: Tensor, step: int) -> float:
        cfg = self.config
        amp = cfg.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        value = loss.detach().reshape(1)
        if self.world_size > 1:
            value = dist_utils.all_mean(value)
        value = float(value)
        if not math.isfinite(value):
            where = f"{self.out_dir / CHECKPOINT}" if self.out_dir and self.epoch > 0 else None
            kept = f"the last good checkpoint (epoch {self.epoch}) is kept at {where}" if where else \
                "no checkpoint had been written yet"  # fmt: skip
            raise TrainingDiverged(f"the loss became {value} at step {step + 1}; {kept}. Lower the learning rate "
                                   f"(lr={cfg.lr}) or enable grad_clip.")  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return value

    def _update_masks(self, phase: str) -> dict[Tensor, Tensor | bool]:
        """Which entries the optimizer may change: all (dense), the active ones (exploit), or only the
        inactive ones with everything else frozen (explore)."""
        if phase == "dense":
            return {}
        masks = {self.params[n]: m for n, m in self.state.param_masks().items()}
        if phase == "exploit":
            return masks
        return {p: ~masks[p] if p in masks else False for p in self.net.parameters()}

    def _emit(self, name: str, info: dict) -> None:
        if self.on_event is not None:
            self.on_event(name, info)

    # ------------------------------------------------------------------ end of training
    def _calib(self):
        cfg = self.config
        return self.train.loader(min(256, cfg.calib_images), shuffle=True, seed=cfg.seed, epoch=10**6)

    def _dense_top1(self) -> float:
        dense = self.net.extract(self.full_arch).to(self.device)
        recalibrate_bn(dense, self._calib(), self.config.calib_images)
        return evaluate(dense, self.val, self.device)

    def _finish(self, wall_s: float) -> IEEResult:
        cfg = self.config
        if not self.pruned:  # oneshot with final_fraction = 0: prune at the very end, no fine-tuning
            self._first_prune(self.total_steps)
        counts = {k: int(m.sum()) for k, m in self.state.unit_masks.items()}
        densities = {}
        if cfg.structure == "unstructured":
            self.state.apply()
            plain, arch = self.net.extract(self.full_arch).to(self.device), self.full_arch
            densities = {u.name: counts[u.name] / u.size for u in self.units}
            macs = self._sparse_macs(counts)
            params = self.space.params(arch) - sum(u.size - counts[u.name] for u in self.units)
        else:
            plain, arch = extract_channels(self.net, self.units, self.state.unit_masks)
            plain = plain.to(self.device)
            macs, params = self.space.macs(arch, self.input_size), self.space.params(arch)
        recalibrate_bn(plain, self._calib(), cfg.calib_images)
        full = {"top1": self.dense_top1, "macs": self.full_macs, "params": self.space.params(self.full_arch)}
        top1 = evaluate(plain, self.val, self.device)
        pruned = {"top1": top1, "macs": macs, "params": params, "arch": arch.to_dict()}
        if cfg.structure == "unstructured":
            pruned |= {"sparsity": self.stats()["sparsity"], "densities": densities}
        of = "the dense net at the prune point" if cfg.method == "oneshot" else \
            ("the --init checkpoint" if self.from_init else UNTRAINED)  # fmt: skip
        return IEEResult(arch, full, pruned, [], [], self.history, self.budget, self.input_size, str(self.device),
                         wall_s, pruned_model=plain, structure=cfg.structure, densities=densities,
                         cycles=self.cycles, skipped_groups=self.skipped, full_top1_of=of)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _state(self, wall_s: float) -> dict:
        iee = {"masks": self.state.state_dict(), "criterion": self.criterion.state_dict(), "pruned": self.pruned,
               "cycles": self.cycles, "dense_top1": self.dense_top1}  # fmt: skip
        return ckpt.run_state(self.net, self.config, epoch=self.epoch, optimizer=self.optimizer,
                              scheduler=self.scheduler, history=self.history, wall_s=wall_s, data_id=self.data_id,
                              iee=iee)  # fmt: skip

    def _save(self, wall_s: float) -> None:
        if self.out_dir is not None:
            ckpt.save_atomic(self._state(wall_s), self.out_dir / CHECKPOINT)

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resume=True needs out_dir (where the checkpoint is)")
        path = self.out_dir / CHECKPOINT
        data = ckpt.restore_run(path, self.net, self.config, self.optimizer, self.scheduler, require="iee",
                                data_id=self.data_id)  # fmt: skip
        iee = data["iee"]
        self.state.load_state_dict(iee["masks"])
        self.criterion.load_state_dict(iee["criterion"])
        self.pruned, self.cycles, self.dense_top1 = bool(iee["pruned"]), list(iee["cycles"]), iee["dense_top1"]
        self.epoch, self.history = int(data["epoch"]), list(data["history"])
        self.wall_before = float(data["wall_s"])
        log(f"resumed {path} at epoch {self.epoch}/{self.config.epochs}",
            mode=self.progress if self.rank == 0 else "off")


# ---------------------------------------------------------------------------------------------- reports
def report_extra(result: IEEResult, config: IEEConfig) -> dict:
    """Keys ``stp-fast prune`` adds to ``report.json`` for IEE runs."""
    return {"structure": result.structure, "fine_tuned": config.method == "oneshot",
            "full_top1_of": result.full_top1_of, "cycles": result.cycles, "skipped_groups": result.skipped_groups,
            "macs_convention": "multiply-accumulates per image, Torch-Pruning counting rules"
                               + ("; unstructured: those with a nonzero weight" if result.structure == "unstructured"
                                  else "")}  # fmt: skip


UNTRAINED = "the initial (untrained) net"


def full_row_label(rep: dict) -> str:
    """The name of a report's "full" row: IEE trains no dense model of its own, so without ``--init``
    that row is the untrained start net -- never called "dense" then."""
    of = rep.get("full_top1_of")
    if of == UNTRAINED:
        return "untrained start"
    return f"dense ({of})" if of else "dense"


def full_row_note(rep: dict) -> str | None:
    """The sentence under the table that says plainly when there is no trained dense model to compare with."""
    if rep.get("full_top1_of") != UNTRAINED:
        return None
    return ("No dense model was trained with this recipe: the first row is the network before training. "
            "For a dense reference train one (`stp-fast train`) and prune from it with --init.")


def render_markdown(rep: dict) -> str:
    """``report.md`` of an IEE/RigL/one-shot run: summary, protocol, and per-layer densities or the arch."""
    full, pruned = rep["full"], rep["pruned"]
    unstructured = rep["structure"] == "unstructured"
    target = f"sparsity {100 * rep['config']['sparsity']:.1f}% (ERK)" if unstructured else \
        f"MACs target {100 * rep['flops_target']:.1f}% of dense"  # fmt: skip
    lines = [
        f"# stp_fast prune: {rep['model']} on {rep['dataset']} ({rep['method']}, {rep['structure']})", "",
        "| model | top-1 | MACs | params |", "|---|---:|---:|---:|",
        f"| {full_row_label(rep)} | {100 * full['top1']:.2f}% | {full['macs'] / 1e6:.3f}M | {full['params']} |",
        f"| pruned | {100 * pruned['top1']:.2f}% | {pruned['macs'] / 1e6:.3f}M "
        f"({100 * pruned['macs'] / full['macs']:.1f}%) | {pruned['params']} |", "",
        f"{target}; MACs reduction {100 * rep['flops_reduction']:.1f}%; "
        f"{'fine-tuned' if rep['fine_tuned'] else 'no fine-tuning'}, BN recalibrated; "
        f"{len([c for c in rep['cycles'] if c['event'] == 'decide'])} prune-and-grow decisions; "
        f"{rep['wall_s']:.0f} s on {rep['device']}.", "",
    ]  # fmt: skip
    if full_row_note(rep):
        lines += [full_row_note(rep), ""]
    if unstructured:
        lines += [f"Achieved sparsity {100 * pruned['sparsity']:.2f}%.", "", "| layer | density |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in pruned["densities"].items()]
    else:
        lines += [f"Arch: `{json.dumps(pruned['arch'], sort_keys=True)}`"]
        if rep["skipped_groups"]:
            lines += ["", f"Groups kept full: {', '.join(sorted(rep['skipped_groups']))}"]
    return "\n".join(lines) + "\n"
