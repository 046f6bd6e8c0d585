"""The prune-and-grow decisions of :class:`~stp_fast.train.iee.IEETrainer` (IEE, RigL, one-shot): the
first prune, IEE's top-k over the active and the reactivated units by one criterion, RigL's
magnitude-drop / gradient-grow, and the record of what each decision did and why.  A mixin: it
uses the trainer's ``config``, ``units``, ``params``, ``state``, ``criterion``, ``optimizer``,
``channels``/``targets`` and ``cycles``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stp_fast.train import sparsity as sp
from stp_fast.train.progress import log

if TYPE_CHECKING:
    from stp_fast.train.iee import IEEConfig


class Decisions:
    """Decision methods of :class:`~stp_fast.train.iee.IEETrainer`."""

    def _scores(self, criterion) -> dict[str, Tensor]:
        return {u.name: criterion(u, self.params) for u in self.units}

    def _swap_cap(self, step: int) -> float:
        cfg = self.config
        t = min(1.0, step / max(self.explore_end, 1))
        if cfg.swap_anneal == "cosine":
            return cfg.swap_fraction * 0.5 * (1 + math.cos(math.pi * t))
        return cfg.swap_fraction * ((1 - t) if cfg.swap_anneal == "linear" else 1.0)

    def _will_swap(self, step: int) -> bool:
        """Whether the decision at ``step`` may swap a unit at all: when the annealed cap rounds to 0 swaps
        (the last cycles of a cosine anneal) a reactivation window would freeze the active net for nothing,
        so IEE skips that cycle's window and decision."""
        if not self.state.inactive_count():
            return False
        frac = self._swap_cap(step)
        if self.config.structure == "unstructured":
            return any(int(frac * k) > 0 for k in self.targets.values())
        return int(frac * sum(int(m.sum()) for m in self.state.unit_masks.values())) > 0

    def _first_prune(self, step: int) -> None:
        """Prune the dense net to the target by the criterion (oneshot: after measuring the dense top-1)."""
        if self.config.method == "oneshot":
            self.dense_top1 = self._dense_top1()
        if self.criterion.needs_grad:
            self._estimate()
        scores = self._scores(self.criterion)
        if self.config.structure == "unstructured":
            new = {u.name: sp.topk_mask(scores[u.name], self.targets[u.name]) for u in self.units}
        else:
            new = self.channels.greedy(sp.normalize_scores(scores, self.config.channel_score_norm))
        self.state.set(new)
        for name, m in self.state.param_masks().items():
            self.optimizer.reset_momentum(self.params[name], ~m)
        self.pruned = True
        record = {"step": step, "event": "prune", **self.stats()}
        self.cycles.append(record)
        self._emit("pruned", record)

    def _estimate(self) -> None:
        """Accumulate a gradient criterion over ``t_exp`` batches without updating (before a first prune)."""
        cfg = self.config
        self.criterion.reset()
        loader = self.train.loader(cfg.batch_size, shuffle=True, augment=cfg.augment, seed=cfg.seed, epoch=10**6 + 1,
                                   rank=self.rank, world_size=self.world_size, drop_last=True)  # fmt: skip
        for i, (x, y) in enumerate(loader):
            if i >= self.t_exp:
                break
            self._forward_backward(x.to(self.device), y.to(self.device), -1)
            self.criterion.accumulate(self.units, self.params)
        self.optimizer.zero_grad(set_to_none=True)

    def _decide(self, step: int, x: Tensor, y: Tensor, explored: bool) -> None:
        cfg = self.config
        frac = self._swap_cap(step)
        old = {k: m.cpu() for k, m in self.state.unit_masks.items()}
        if cfg.method == "iee":
            self._emit("explored", {"step": step})
            raw = scores = self._scores(self.criterion)
            if self.explore_norm == "set":
                scores = sp.normalize_by_set(scores, old)
            if cfg.structure == "unstructured":
                new = {u.name: sp.swap_topk(scores[u.name], self.state.unit_masks[u.name], self.targets[u.name],
                                         int(frac * self.targets[u.name])) for u in self.units}  # fmt: skip
            else:
                cap = int(frac * sum(int(m.sum()) for m in old.values()))
                new = self.channels.swap_topk(sp.normalize_scores(scores, cfg.channel_score_norm), old, cap)
            fill = None
        else:
            keep = self._scores(sp.make_criterion("magnitude"))
            self._probe(x, y, restore=cfg.structure == "channel")
            grow = self._scores(sp.grad_magnitude)
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.structure == "unstructured":
                new = {u.name: sp.swap_rigl(keep[u.name], grow[u.name], self.state.unit_masks[u.name],
                                         int(frac * self.targets[u.name])) for u in self.units}  # fmt: skip
            else:
                n = int(frac * sum(int(m.sum()) for m in old.values()))
                norm = cfg.channel_score_norm
                new = self.channels.swap_rigl(sp.normalize_scores(keep, norm), sp.normalize_scores(grow, norm), old, n)
            fill = self.regrow
        grown = sum(int((new[k].cpu() & ~old[k]).sum()) for k in old)
        why = self._why(cfg, old, new, frac, scores if cfg.method == "iee" else grow)
        if cfg.method == "iee":
            why["score_ratio"] = _score_ratio(raw, old)  # of the raw criterion (before any set normalisation)
        if cfg.structure == "channel":
            self._fresh_bn_stats({k: new[k].cpu() & ~old[k] for k in old})
        grown_entries = self.state.set(new, fill=fill, explored=explored)
        for name, m in self.state.param_masks().items():
            self.optimizer.reset_momentum(self.params[name], grown_entries[name] | ~m)
        record = {"step": step, "event": "decide", "swap_cap": frac, "grown": grown, **why, **self.stats()}
        log(f"{cfg.method} decision at step {step + 1}: {grown} of {why['candidates']} inactive units grown "
            f"({why['reason']})", mode="off" if self.rank else self.progress)  # fmt: skip
        self.cycles.append(record)
        self._emit("decided", record)

    def _why(self, cfg: IEEConfig, old: dict, new: dict, frac: float, scores: dict) -> dict:
        """What a decision did and why: ``candidates`` (inactive units it could grow), ``wanted`` (how many of
        them the criterion ranks into the target set, before the swap cap), ``cap`` and ``reason``."""
        candidates = sum(int((~m).sum()) for m in old.values())
        active = sum(int(m.sum()) for m in old.values())
        if cfg.method != "iee":
            wanted = None
        elif cfg.structure == "unstructured":
            wanted = sum(int((sp.topk_mask(scores[u.name], self.targets[u.name]).cpu() & ~old[u.name]).sum())
                         for u in self.units)  # fmt: skip
        else:
            star = self.channels.greedy(sp.normalize_scores(scores, cfg.channel_score_norm))
            wanted = sum(int((star[k] & ~old[k]).sum()) for k in old)
        cap = int(frac * (sum(self.targets.values()) if cfg.structure == "unstructured" else active))
        grown = sum(int((new[k].cpu() & ~old[k]).sum()) for k in old)
        if cfg.method != "iee":
            reason = "rigl: drop the weakest by magnitude, grow by gradient"
        elif wanted == 0:
            reason = "no explored unit scores above the weakest active ones"
        elif grown < wanted:
            refill = f" (+{grown - cap} refilled into the MACs the swaps freed)" if grown > cap else ""
            reason = f"capped: {wanted} explored units rank in, the cap allows {cap} swaps{refill}"
        else:
            reason = "every explored unit that ranks in was grown"
        return {"candidates": candidates, "wanted": wanted, "cap": cap, "reason": reason,
                "score_ratio": _score_ratio(scores, old) if cfg.method == "iee" else None}

    @torch.no_grad()
    def _fresh_bn_stats(self, grown: dict[str, Tensor]) -> None:
        """Running mean 0 and variance 1 for grown channels: while masked, their BN saw constant zero
        inputs and its running variance decayed toward 0 (eval-mode outputs would blow up)."""
        buffers = dict(self.net.named_buffers())
        for u in self.units:
            g = grown[u.name]
            if g.any():
                for name, dim in u.slices:
                    if dim == 0 and name.endswith(("running_mean", "running_var")):
                        buffers[name][g.to(buffers[name].device)] = 0.0 if name.endswith("mean") else 1.0

    def _probe(self, x: Tensor, y: Tensor, restore: bool) -> None:
        """Gradients of the step's batch for RigL's growth score.  Zeroed channels have none (their
        ReLU inputs are 0), so in channel mode the inactive channels are briefly restored."""
        if restore:
            self.state.reactivate("restore")
        try:
            self._forward_backward(x, y, -1)
        finally:
            if restore:
                self.state.apply()


def _score_ratio(scores: dict[str, Tensor], old: dict[str, Tensor]) -> float | None:
    """Mean score of the inactive units over that of the active ones, each unit's scores divided by their
    mean first (the criterion-scale gap of ALGORITHMS.md gotcha 11: far below 1 = exploration cannot win)."""
    norm = sp.normalize_scores(scores, "mean")
    on = torch.cat([norm[k][old[k]] for k in old])
    off = torch.cat([norm[k][~old[k]] for k in old])
    if not on.numel() or not off.numel():
        return None
    return float(off.mean() / on.mean().clamp_min(1e-30))
