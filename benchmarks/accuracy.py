"""Pruning-quality study (SPEC section 7, issue "Prove STP's edge"): STP without fine-tuning against
plain ST, Torch-Pruning with fine-tuning (four importance criteria) and the chosen architecture
trained from scratch -- every method given the same training images and the same total epochs, over
several seeds -- on Fashion-MNIST with resnet20 (in_chans=1).  ONE STP run serves every budget.

    python benchmarks/accuracy.py --data ../shared/data/fashion_mnist.npz --train-images 6667 --epochs 12 \\
        --budgets 0.15 0.05 --seeds 0 1 2 --json benchmarks/results/cpu-accuracy-study-<date>.json
    python benchmarks/accuracy.py --merge seed0.json seed1.json seed2.json --json study.json --plot study.png
    python benchmarks/accuracy.py --markdown study.json      # the README table (mean +- std per row)
    python benchmarks/accuracy.py --smoke                    # CI: digits, 1 seed, 300 images, 1 epoch

Fairness.  Per seed, ``--train-images`` images are drawn from the training set and a fixed
``--val-fraction`` of them is carved out ONCE as the validation split, with exactly the permutation
``STPTrainer`` uses for its ``holdout`` (``randperm(n, seed + 7919)``; the harness checks that the
trainer's held-out images are these).  EVERY method trains on the remaining images; the methods that
select something select it on the validation split and never on the test split: STP/ST re-score their
pool's best archs there (after BN recalibration), Torch-Pruning picks its fine-tuning lr there.
Every method trains ``--epochs`` epochs in total with the same recipe (SGD, nesterov, momentum 0.9,
weight decay 5e-4, per-step cosine, ``--lr``, ``--batch-size``, the data set's crop augmentation).
Top-1 is measured on the whole test split.

Rows (``method`` in the JSON; budget F = kept fraction of the dense MACs):
* ``dense``: the plain resnet20 (``ResNetCifar``), E epochs.
* ``stp`` (per budget) and ``stp-full``: ONE STP run with ``flops_target`` = every budget (one pool per
  budget), E epochs; each budget's arch extracted, BN recalibrated, evaluated -- no fine-tuning;
  ``stp-full`` is that run's full net (the teacher), BN recalibrated.
* ``st`` / ``st-full``: the same with ``method="st"`` (uniformly random subnets in each budget's MACs
  band, no pool search, no expansion, no focus) -- the ablation of STP's search.
* ``scratch`` (per budget): STP's chosen arch as a fresh plain model (``net.layout(arch)`` applied to a
  new ``ResNetCifar``, re-initialised), E epochs of the dense recipe.  One run per budget.
* ``tp-l1``, ``tp-l2``, ``tp-bn``, ``tp-taylor`` (per budget): Torch-Pruning (``BasePruner``, global
  pruning over coupled channel groups, the classifier's outputs ignored) of a dense model trained
  ``--tp-dense-epochs`` epochs, with importance GroupMagnitude(p=1), GroupMagnitude(p=2), BN scale,
  or GroupTaylor; then ``E - tp-dense-epochs`` fine-tuning epochs.  Pruning is iterative: the MACs
  are cut geometrically from 100% to F in ``--prune-steps`` steps spread evenly over the first
  ``--prune-span`` of the fine-tuning steps (step 1 at its start; fine-tuning continues between
  steps and after the last one; 0 = all steps back to back before fine-tuning).  Each step calls the
  pruner (0.4% of the channels at a time, importance re-estimated, Taylor on the gradient of
  ``--taylor-batches`` fresh batches) until the MACs are at or below the step's target, so the final
  MACs end a little below F (reported).  The fine-tuning lr is chosen among ``--ft-lrs`` by top-1 on
  the validation split; ``top1_pruned_no_ft`` is the dense model pruned straight to F (same steps, no
  training between them), BN recalibrated, before any fine-tuning.  ``tp-dense`` is the dense model
  of ``--tp-dense-epochs`` epochs they start from (for reference).

Every row records its wall time (one thread per process: ``--threads``); the STP row's is the one
run that serves every budget, the scratch rows' one run each.  ``--merge`` combines per-seed files,
``--markdown`` renders the mean +- std table and the goal check, ``--plot`` draws top-1 vs MACs.
Not a CI test at full size (hours on 2 CPU cores); ``tests/test_accuracy_harness.py`` runs ``--smoke``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HOLDOUT_SEED_OFFSET = 7919  # STPTrainer carves its holdout with randperm(n, seed + 7919)
IMPORTANCES = ("l1", "l2", "bn", "taylor")
METHODS = ("dense", "stp", "st", "scratch", "torch-pruning")
GOALS = {"vs_scratch": 1.0, "vs_tp": 3.0, "of_dense": {0.15: 0.97, 0.05: 0.95}, "teacher_gap": 1.0}


# ---------------------------------------------------------------------------------------------- data
def load_split(args, seed: int):
    """(dataset, train source, validation source, test source) for one seed: ``--train-images`` drawn
    with ``seed``, the validation split carved exactly as STPTrainer's holdout."""
    from stp_fast.data import load_dataset

    ds = load_dataset(args.dataset, train_limit=args.train_images, seed=seed)
    full = ds.source("train")
    n_val = round(args.val_fraction * len(full))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed + HOLDOUT_SEED_OFFSET))
    return ds, full, full.subset(order[:n_val]), full.subset(order[n_val:]), ds.source("test")


def evaluate(model: nn.Module, source) -> float:
    from stp_fast.train.evaluate import evaluate as _evaluate

    return _evaluate(model, source)


# ---------------------------------------------------------------------------------------------- plain training
def _cos(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def _sgd(model: nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def train_plain(model: nn.Module, train, epochs: int, *, lr: float, batch_size: int, seed: int, wd: float,
                on_step=None, label: str = "plain") -> None:  # fmt: skip
    """The dense recipe: SGD (nesterov, momentum 0.9), per-step cosine from ``lr``, cross-entropy, the data
    set's augmentation.  ``on_step(step) -> bool`` runs before each step; True = the model's parameters
    changed (pruned): the optimizer is rebuilt."""
    steps = epochs * (len(train) // batch_size)
    opt = _sgd(model, lr, wd)
    step = 0
    model.train()
    for epoch in range(epochs):
        loss = None
        for x, y in train.loader(batch_size, shuffle=True, augment=True, seed=seed, epoch=epoch, drop_last=True):
            if on_step is not None and on_step(step):
                opt = _sgd(model, lr, wd)
                model.train()
            for g in opt.param_groups:
                g["lr"] = lr * _cos(step, steps)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        print(f"  {label} epoch {epoch + 1}/{epochs} loss {loss.item() if loss is not None else float('nan'):.3f}",
              flush=True)  # fmt: skip
    model.eval()


def plain_resnet(ds, seed: int) -> nn.Module:
    from stp_fast.models.resnet_cifar import ResNetCifar

    torch.manual_seed(seed)
    return ResNetCifar(3, ds.num_classes, ds.in_chans)


def model_macs(model: nn.Module, ds) -> int:
    from stp_fast import count_macs

    return count_macs(model, ds.input_size)[0]


# ---------------------------------------------------------------------------------------------- methods
def run_dense(ds, train, val, test, epochs: int, args, seed: int, label: str = "dense") -> tuple[nn.Module, dict]:
    model = plain_resnet(ds, seed)
    start = time.perf_counter()
    train_plain(model, train, epochs, lr=args.lr, batch_size=args.batch_size, seed=seed, wd=args.wd, label=label)
    wall = time.perf_counter() - start
    return model, {"top1": evaluate(model, test), "val_top1": evaluate(model, val), "macs_ratio": 1.0, "wall_s": wall}


def config_overrides(items: list[str], cls=None) -> dict:
    """``--set KEY=VALUE`` items as fields of the config dataclass ``cls`` (default STPConfig; values parsed
    as JSON, else kept as strings)."""
    if cls is None:
        from stp_fast.train import STPConfig as cls
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in cls.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY an {cls.__name__} field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_stp(ds, full_train, val, test, method: str, args, seed: int) -> tuple[list[dict], list[dict]]:
    """One STP/ST run serving every budget.  Returns (the full net's row, one row per budget)."""
    from stp_fast import models
    from stp_fast.train import STPConfig, STPTrainer

    torch.manual_seed(seed)
    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size,
                        prune_residual=args.prune_residual)  # fmt: skip
    cfg = STPConfig(method=method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.wd, flops_target=list(args.budgets), seed=seed, eval_every=0,
                    holdout=args.val_fraction, device="cpu", **config_overrides(args.set))  # fmt: skip
    trainer = STPTrainer(net, full_train, test, cfg, progress="log")
    held = trainer.holdout
    if held is None or not (torch.equal(held.labels, val.labels) and torch.equal(held.images, val.images)):
        raise RuntimeError("STPTrainer's holdout is not the harness's validation split: the study would not be fair")
    start = time.perf_counter()
    res = trainer.fit()
    wall = time.perf_counter() - start
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("device",)}
    full = {"top1": res.full["top1"], "macs_ratio": 1.0, "wall_s": wall, "train_wall_s": res.wall_s,
            "config": config}  # fmt: skip
    rows = []
    for b in res.budgets:
        chosen = next(c for c in b["candidates"] if c["arch"] == b["arch"])
        rows.append({"budget": b["target"], "top1": b["top1"], "val_top1": chosen["holdout_top1"],
                     "val_kd": chosen["holdout_kd"], "macs_ratio": b["macs"] / res.full["macs"], "arch": b["arch"],
                     "wall_s": wall, "shared_run": len(res.budgets),
                     "candidates": [{k: c.get(k) for k in ("macs_ratio", "pool_score", "holdout_kd", "holdout_top1",
                                                         "top1")} for c in b["candidates"]]})  # fmt: skip
    return [full], rows


def run_scratch(ds, train, val, test, arch: dict, args, seed: int) -> dict:
    """STP's chosen ``arch`` as a fresh plain ResNetCifar (shape from ``net.layout``), re-initialised as the
    class initialises itself, trained with the dense recipe."""
    from stp_fast import apply_layout, models
    from stp_fast.arch import Arch

    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size,
                        prune_residual=args.prune_residual)  # fmt: skip
    model = apply_layout(plain_resnet(ds, seed + 2), net.layout(Arch.from_dict(arch)))
    for m in model.modules():  # a fresh init at the small shape (ResNetCifar.__init__'s rule)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    full_macs = net.space.macs(net.space.full(), ds.input_size)
    start = time.perf_counter()
    train_plain(model, train, args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed, wd=args.wd,
                label="scratch")  # fmt: skip
    wall = time.perf_counter() - start
    return {"top1": evaluate(model, test), "val_top1": evaluate(model, val),
            "macs_ratio": model_macs(model, ds) / full_macs, "wall_s": wall}  # fmt: skip


class TPSchedule:
    """Torch-Pruning's iterative global pruning of a plain model to ``budget`` x its MACs (see the module
    docstring): ``prune_to(target)`` steps the pruner until the MACs are at or below ``target``."""

    def __init__(self, model: nn.Module, ds, importance: str, train, args, seed: int) -> None:
        import torch_pruning as tp

        imp = {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
               "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
               "bn": lambda: tp.importance.BNScaleImportance(),
               "taylor": lambda: tp.importance.GroupTaylorImportance()}[importance]()  # fmt: skip
        self.model, self.ds, self.kind, self.train, self.args, self.seed = model, ds, importance, train, args, seed
        self.base = model_macs(model, ds)
        self.macs = self.base
        self.grad_calls = 0
        self.stalled = False  # the importance cannot rank the channels any more (e.g. all BN scales tied)
        self.pruner = tp.pruner.BasePruner(model, torch.zeros(1, *ds.input_size), importance=imp, global_pruning=True,
                                           pruning_ratio=0.98, iterative_steps=args.tp_fine_steps,
                                           ignored_layers=[model.fc])  # fmt: skip

    def _taylor_grads(self) -> None:
        model = self.model
        model.zero_grad(set_to_none=True)
        was = model.training
        model.train()
        loader = self.train.loader(self.args.batch_size, shuffle=True, augment=False, seed=self.seed + 31,
                                   epoch=self.grad_calls, drop_last=True)  # fmt: skip
        self.grad_calls += 1
        for i, (x, y) in enumerate(loader):
            if i >= self.args.taylor_batches:
                break
            F.cross_entropy(model(x), y).backward()
        model.train(was)

    def prune_to(self, target: float) -> int:
        if self.macs > target and self.kind == "taylor":
            self._taylor_grads()
        idle = 0
        while self.macs > target and self.pruner.current_step < self.pruner.iterative_steps and idle < 10:
            self.pruner.step()
            macs = model_macs(self.model, self.ds)
            idle = idle + 1 if macs == self.macs else 0
            self.macs = macs
        self.stalled = self.stalled or idle >= 10
        self.model.zero_grad(set_to_none=True)
        return self.macs

    def targets(self, budget: float, steps: int) -> list[float]:
        return [self.base * budget ** ((i + 1) / steps) for i in range(steps)]


def run_torch_pruning(dense_model: nn.Module, ds, train, val, test, budget: float, importance: str, args,
                      seed: int) -> dict:  # fmt: skip
    """Torch-Pruning at one budget with one importance: the one-shot number, then the fine-tuning lr grid
    (each lr: the whole iterative prune + fine-tune run), the lr chosen on the validation split."""
    from stp_fast import recalibrate_bn

    ft_epochs = args.epochs - args.tp_dense_epochs
    steps_total = ft_epochs * (len(train) // args.batch_size)
    # pruned straight to the budget (the same steps, no training between them), before fine-tuning
    model = copy.deepcopy(dense_model)
    sched = TPSchedule(model, ds, importance, train, args, seed)
    for t in sched.targets(budget, args.prune_steps):
        sched.prune_to(t)
    recalibrate_bn(model, train.loader(256, shuffle=True, seed=seed, epoch=10**6), 2000)
    oneshot = evaluate(model, test)
    grid = []
    for lr in args.ft_lrs:
        model = copy.deepcopy(dense_model)
        sched = TPSchedule(model, ds, importance, train, args, seed)
        targets = sched.targets(budget, args.prune_steps)
        at = [round(i * args.prune_span * steps_total / args.prune_steps) for i in range(args.prune_steps)]
        pending = list(zip(at, targets))

        def on_step(step: int, pending=pending, sched=sched) -> bool:
            changed = False
            while pending and pending[0][0] <= step:
                sched.prune_to(pending.pop(0)[1])
                changed = True
            return changed

        start = time.perf_counter()
        train_plain(model, train, ft_epochs, lr=lr, batch_size=args.batch_size, seed=seed + 1, wd=args.wd,
                    on_step=on_step, label=f"tp-{importance} {budget} lr {lr}")  # fmt: skip
        while pending:  # no fine-tuning steps at all (smoke runs with tiny sets)
            sched.prune_to(pending.pop(0)[1])
        wall = time.perf_counter() - start
        grid.append({"lr": lr, "val_top1": evaluate(model, val), "top1": evaluate(model, test),
                     "macs_ratio": sched.macs / sched.base, "budget_reached": sched.macs <= budget * sched.base,
                     "wall_s": wall})  # fmt: skip
    best = max(grid, key=lambda g: (g["budget_reached"], g["val_top1"], -g["lr"]))
    return {"budget": budget, "top1": best["top1"], "val_top1": best["val_top1"], "ft_lr": best["lr"],
            "macs_ratio": best["macs_ratio"], "budget_reached": best["budget_reached"],
            "top1_pruned_no_ft": oneshot, "ft_wall_s": best["wall_s"],
            "grid_wall_s": sum(g["wall_s"] for g in grid), "grid": grid}  # fmt: skip


# ---------------------------------------------------------------------------------------------- one seed
def _stp_rows(paths, seed: int) -> list[dict]:
    """The STP rows of ``seed`` in the result files ``paths`` (``--archs-from``: scratch for a recorded run)."""
    rows = [r for path in paths or () for r in json.loads(Path(path).read_text())["rows"]]
    return [r for r in rows if r.get("method") == "stp" and r.get("seed") == seed and "arch" in r]


def run_seed(args, seed: int, record) -> None:
    ds, full_train, val, train, test = load_split(args, seed)
    print(f"seed {seed}: {len(train)} training images, {len(val)} validation, {len(test)} test", flush=True)
    methods = set(args.methods)
    common = {"seed": seed, "train_images": len(train), "val_images": len(val), "test_images": len(test)}
    if "dense" in methods:
        _, row = run_dense(ds, train, val, test, args.epochs, args, seed)
        record({"method": "dense", "budget": 1.0, "epochs": args.epochs, **common, **row})
    chosen = {}
    for method in ("stp", "st"):
        if method in methods:
            fulls, rows = run_stp(ds, full_train, val, test, method, args, seed)
            for row in fulls:
                record({"method": f"{method}-full", "budget": 1.0, "epochs": args.epochs, **common, **row})
            for row in rows:
                record({"method": method, "epochs": args.epochs, **common, **row})
                if method == "stp":
                    chosen[row["budget"]] = row["arch"]
    if "scratch" in methods:
        for row in _stp_rows(args.archs_from, seed):
            chosen.setdefault(row["budget"], row["arch"])
        missing = [b for b in args.budgets if b not in chosen]
        if missing:
            raise SystemExit(f"scratch needs STP's chosen arch for budgets {missing} of seed {seed}: add stp to "
                             f"--methods or give --archs-from a result file with those STP rows")  # fmt: skip
        for budget in args.budgets:
            if budget in chosen:
                row = run_scratch(ds, train, val, test, chosen[budget], args, seed)
                record({"method": "scratch", "budget": budget, "epochs": args.epochs, **common, **row})
    if "torch-pruning" in methods:
        dense8, row = run_dense(ds, train, val, test, args.tp_dense_epochs, args, seed, label="tp-dense")
        record({"method": "tp-dense", "budget": 1.0, "epochs": args.tp_dense_epochs, **common, **row})
        for budget in args.budgets:
            for imp in args.importances:
                out = run_torch_pruning(dense8, ds, train, val, test, budget, imp, args, seed)
                out["wall_s"] = row["wall_s"] + out["ft_wall_s"]
                record({"method": f"tp-{imp}", "epochs": f"{args.tp_dense_epochs}+{args.epochs - args.tp_dense_epochs}",
                        **common, **out})  # fmt: skip


# ---------------------------------------------------------------------------------------------- summary
ORDER = ["dense", "stp-full", "st-full", "tp-dense", "stp", "st", "scratch", "tp-l1", "tp-l2", "tp-bn", "tp-taylor"]
LABELS = {
    "dense": "dense resnet20",
    "stp-full": "STP's full net (the teacher), BN recalibrated",
    "st-full": "ST's full net",
    "tp-dense": "dense, {tp} epochs (Torch-Pruning's start)",
    "stp": "**STP**, one run for every budget, extracted + BN recalibrated, no fine-tuning",
    "st": "ST (random subnets in the budget band, no search), no fine-tuning",
    "scratch": "STP's arch from scratch (one run per budget)",
    "tp-l1": "Torch-Pruning, group L1 magnitude + fine-tuning",
    "tp-l2": "Torch-Pruning, group L2 magnitude + fine-tuning",
    "tp-bn": "Torch-Pruning, BN scale + fine-tuning",
    "tp-taylor": "Torch-Pruning, group Taylor + fine-tuning",
}


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (over seeds) of every (method, budget)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["budget"])), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        s = {"method": method, "budget": budget, "seeds": sorted(r["seed"] for r in rs), "n": len(rs)}
        for key in ("top1", "macs_ratio", "wall_s", "top1_pruned_no_ft", "val_top1"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[key + "_mean"], s[key + "_std"] = _ms(vals)
        if "ft_lr" in rs[0]:
            s["ft_lrs"] = [r["ft_lr"] for r in rs]
        if any("budget_reached" in r for r in rs):
            s["budget_reached"] = all(r.get("budget_reached", True) for r in rs)
        out.append(s)
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(out, key=lambda s: (s["budget"] < 1.0, -s["budget"], rank.get(s["method"], 99), s["method"]))


def goals(summary: list[dict]) -> list[dict]:
    """The issue's goals per budget: STP >= scratch + 1, >= best Torch-Pruning + 3, >= 97% / 95% of dense;
    and the teacher within 1 point of dense.  Each: the margin (positive = met)."""
    by = {(s["method"], s["budget"]): s for s in summary}
    dense = by.get(("dense", 1.0))
    out = []
    if dense and ("stp-full", 1.0) in by:
        gap = 100 * (by[("stp-full", 1.0)]["top1_mean"] - dense["top1_mean"])
        out.append({"goal": "STP's full net within 1 point of dense", "value": gap, "margin": gap + GOALS["teacher_gap"],
                    "unit": "pts"})
    for budget in sorted({s["budget"] for s in summary if s["budget"] < 1.0}, reverse=True):
        stp = by.get(("stp", budget))
        if stp is None:
            continue
        tag = f"{100 * budget:.0f}% MACs"
        if ("scratch", budget) in by:
            d = 100 * (stp["top1_mean"] - by[("scratch", budget)]["top1_mean"])
            out.append({"goal": f"{tag}: STP >= scratch + {GOALS['vs_scratch']:.1f}", "value": d,
                        "margin": d - GOALS["vs_scratch"], "unit": "pts"})  # fmt: skip
        tps = [s for s in summary if s["budget"] == budget and s["method"].startswith("tp-") and s["method"] != "tp-dense"
               and s.get("budget_reached", True)]
        if tps:
            best = max(tps, key=lambda s: s["top1_mean"])
            d = 100 * (stp["top1_mean"] - best["top1_mean"])
            out.append({"goal": f"{tag}: STP >= best Torch-Pruning ({best['method']}) + {GOALS['vs_tp']:.0f}",
                        "value": d, "margin": d - GOALS["vs_tp"], "unit": "pts"})  # fmt: skip
        need = GOALS["of_dense"].get(round(budget, 4))
        if dense and need:
            rel = stp["top1_mean"] / dense["top1_mean"]
            out.append({"goal": f"{tag}: STP >= {100 * need:.0f}% of dense", "value": 100 * rel,
                        "margin": 100 * (rel - need), "unit": "% of dense"})  # fmt: skip
    return out


def cost(summary: list[dict]) -> dict | None:
    """One STP run serving every budget against one scratch run per budget (wall seconds, means)."""
    stp = [s for s in summary if s["method"] == "stp"]
    scratch = [s for s in summary if s["method"] == "scratch"]
    if not stp:
        return None
    return {"stp_one_run_s": stp[0]["wall_s_mean"], "budgets": len(stp),
            "scratch_per_budget_s": [s["wall_s_mean"] for s in scratch],
            "scratch_total_s": sum(s["wall_s_mean"] for s in scratch)}  # fmt: skip


def _pm(s: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    m, sd = s.get(key + "_mean"), s.get(key + "_std")
    if m is None:
        return "–"
    return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}" if s["n"] > 1 else f"{scale * m:.{digits}f}"


def render(out: dict) -> str:
    """The markdown table (mean ± std over seeds), the goal check and the cost line."""
    summary = out.get("summary") or summarize(out["rows"])
    by = {(s["method"], s["budget"]): s for s in summary}
    dense = by.get(("dense", 1.0))
    seeds = sorted({r["seed"] for r in out["rows"]})
    tp_epochs = out.get("args", {}).get("tp_dense_epochs", "?")
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds (top-1 in %, on the {out.get('test_images', '?')} "
             f"test images); wall = seconds of one run on one thread.", "",
             "| kept MACs | method | MACs kept | top-1 | of dense | wall (s) |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in summary:
        label = LABELS.get(s["method"], s["method"]).format(tp=tp_epochs)
        extra = ""
        if "top1_pruned_no_ft_mean" in s:
            extra = f" ({_pm(s, 'top1_pruned_no_ft', digits=1)} before FT; lr {'/'.join(map(str, s['ft_lrs']))})"
        if not s.get("budget_reached", True):
            extra += " (budget NOT reached: the importance stopped ranking channels)"
        rel = f"{100 * s['top1_mean'] / dense['top1_mean']:.1f}%" if dense else "–"
        budget = "100%" if s["budget"] >= 1.0 else f"{100 * s['budget']:.0f}%"
        lines.append(f"| {budget} | {label} | {_pm(s, 'macs_ratio', digits=1)}% | {_pm(s, 'top1')}{extra} | {rel} | "
                     f"{s.get('wall_s_mean', float('nan')):.0f} |")  # fmt: skip
    g = out.get("goals") or goals(summary)
    if g:
        lines += ["", "| goal | measured | met? |", "|---|---:|---|"]
        for item in g:
            value = f"{item['value']:.1f}% of dense" if item.get("unit") == "% of dense" else f"{item['value']:+.2f} pts"
            verdict = "yes" if item["margin"] >= 0 else f"no, by {-item['margin']:.2f} pts"
            lines.append(f"| {item['goal']} | {value} | {verdict} |")
    c = out.get("cost") or cost(summary)
    if c:
        per = " + ".join(f"{v:.0f}" for v in c["scratch_per_budget_s"])
        lines += ["", f"Cost: one STP run serving {c['budgets']} budgets took {c['stp_one_run_s']:.0f} s; one scratch "
                      f"run per budget took {per} = {c['scratch_total_s']:.0f} s (and needs an arch to train)."]  # fmt: skip
    return "\n".join(lines)


def render_ablation(paths: list[str]) -> str:
    """One line per result file (an STP configuration): its ``--set`` overrides, the full net's top-1, and
    STP's top-1 and MACs at every budget (means over the file's seeds), against the dense row of any file."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    dense = [r["top1"] for run in runs for r in run["rows"] if r["method"] == "dense"]
    budgets = sorted({r["budget"] for run in runs for r in run["rows"] if r["method"] == "stp"}, reverse=True)
    head = "| configuration (STPConfig overrides) | full net top-1 | " + " | ".join(
        f"STP {100 * b:.0f}% (MACs)" for b in budgets) + " | wall (s) |"
    lines = []
    if dense:
        lines.append(f"dense resnet20: {100 * statistics.fmean(dense):.2f}% ({len(dense)} run(s))")
        lines.append("")
    lines += [head, "|---|---:|" + "---:|" * len(budgets) + "---:|"]
    for path, run in zip(paths, runs):
        rows = run["rows"]
        full = [r["top1"] for r in rows if r["method"] == "stp-full"]
        if not full:
            continue
        sets = run.get("args", {}).get("set") or ["(defaults)"]
        cells = []
        for b in budgets:
            rs = [r for r in rows if r["method"] == "stp" and r["budget"] == b]
            cells.append(f"{100 * statistics.fmean(r['top1'] for r in rs):.2f}% "
                         f"({100 * statistics.fmean(r['macs_ratio'] for r in rs):.1f}%)" if rs else "–")  # fmt: skip
        wall = statistics.fmean(r["wall_s"] for r in rows if r["method"] == "stp-full")
        lines.append(f"| {Path(path).stem}: {', '.join(f'`{x}`' if x != '(defaults)' else x for x in sets)} | "
                     f"{100 * statistics.fmean(full):.2f}% | {' | '.join(cells)} | {wall:.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = out.get("summary") or summarize(out["rows"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"stp": ("o", "C3"), "st": ("s", "C1"), "scratch": ("D", "C2"), "tp-l1": ("v", "C0"),
              "tp-l2": ("^", "C9"), "tp-bn": ("<", "C4"), "tp-taylor": (">", "C5")}  # fmt: skip
    dense = next((s for s in summary if s["method"] == "dense"), None)
    for method, (marker, color) in styles.items():
        pts = sorted((s for s in summary if s["method"] == method and s["budget"] < 1.0), key=lambda s: s["budget"])
        if not pts:
            continue
        x = [100 * s["macs_ratio_mean"] for s in pts]
        y = [100 * s["top1_mean"] for s in pts]
        e = [100 * s["top1_std"] for s in pts]
        ax.errorbar(x, y, yerr=e, marker=marker, color=color, capsize=3, label=LABELS[method].replace("**", "")[:48])
    if dense:
        ax.axhline(100 * dense["top1_mean"], color="k", ls="--", lw=1,
                   label=f"dense ({100 * dense['top1_mean']:.1f}%)")  # fmt: skip
    ax.set_xlabel("MACs kept (% of resnet20)")
    ax.set_ylabel("test top-1 (%)")
    seeds = sorted({r["seed"] for r in out["rows"]})
    data = Path(str(out.get("dataset", "")).removeprefix("npz:")).stem
    ax.set_title(f"{data}: {out.get('epochs', '?')} epochs, {len(seeds)} seed(s), mean ± std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- I/O
def _git(*cmd: str) -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()  # fmt: skip
    except Exception:
        return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) per process, no GPU used"


def finish(out: dict) -> dict:
    out["summary"] = summarize(out["rows"])
    out["goals"] = goals(out["summary"])
    out["cost"] = cost(out["summary"])
    return out


def write_json(out: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)


def merge(paths: list[str]) -> dict:
    """Combine runs (e.g. one per seed) of the same study: their rows, the first run's metadata, every
    run's command."""
    runs, keep = [], []
    for path in paths:  # FILE or FILE::method,method (only those rows of that file)
        file, _, only = path.partition("::")
        runs.append(json.loads(Path(file).read_text()))
        keep.append(set(only.split(",")) if only else None)
    out = {k: v for k, v in runs[0].items() if k not in ("rows", "summary", "goals", "cost")}
    out["merged_from"] = [{"file": Path(p.partition("::")[0]).name, "methods": sorted(k) if k else "all",
                           "command": r.get("command"), "git_commit": r.get("git_commit"),
                           "seeds": sorted({x["seed"] for x in r["rows"]})} for p, r, k in zip(paths, runs, keep)]  # fmt: skip
    out["rows"] = [row for r, k in zip(runs, keep) for row in r["rows"] if k is None or row["method"] in k]
    for key in ("test_images", "val_images"):
        out[key] = next((row[key] for row in out["rows"] if key in row), out.get(key))
    return finish(out)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an npz (x_train, y_train, x_test, y_test); sets --dataset npz:PATH")
    p.add_argument("--dataset", default="npz:../shared/data/fashion_mnist.npz", help="a stp_fast.data spec")
    p.add_argument("--train-images", type=int, default=6667, help="images drawn from the training set per seed "
                   "(6667: 6000 trained on + 667 validation)")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved once per seed")
    p.add_argument("--epochs", type=int, default=12, help="total epochs of every method")
    p.add_argument("--tp-dense-epochs", type=int, default=8, help="Torch-Pruning: dense epochs before pruning; "
                   "the rest of --epochs fine-tune")  # fmt: skip
    p.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.05], help="kept MACs fractions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--importances", nargs="+", default=list(IMPORTANCES), choices=IMPORTANCES)
    p.add_argument("--ft-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1], help="Torch-Pruning fine-tuning "
                   "lr grid (chosen on the validation split)")  # fmt: skip
    p.add_argument("--prune-steps", type=int, default=8, help="Torch-Pruning: pruning steps (geometric MACs cuts)")
    p.add_argument("--prune-span", type=float, default=0.5, help="Torch-Pruning: the pruning steps are spread over "
                   "this fraction of the fine-tuning steps (0 = all before fine-tuning)")  # fmt: skip
    p.add_argument("--tp-fine-steps", type=int, default=245, help="Torch-Pruning: pruner steps to 98%% of the "
                   "channels (245: 0.4%% per step; a pruning step calls the pruner until its MACs target is met)")
    p.add_argument("--taylor-batches", type=int, default=4, help="batches whose gradient Taylor importance uses")
    p.add_argument("--prune-residual", action="store_true", help="STP/ST search space: also prune each stage's "
                   "residual width (one coupled group per stage), as Torch-Pruning does; without it the space's "
                   "smallest subnet keeps 4.5%% of resnet20's MACs at 28x28")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="STPConfig override (stp and st)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--tag", default="", help="a free-text label stored in the JSON (e.g. the ablation name)")
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    p.add_argument("--plot", help="write the top-1 vs MACs plot here (png)")
    p.add_argument("--archs-from", nargs="+", metavar="JSON",
                   help="scratch: take STP's chosen archs of each seed from these result files (a recorded run)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine these result files (then --json/--plot); "
                   "FILE::m1,m2 takes only those methods' rows of FILE")  # fmt: skip
    p.add_argument("--markdown", metavar="JSON", help="print the table of a result file and exit")
    p.add_argument("--ablation-table", nargs="+", metavar="JSON", help="print one line per STP configuration "
                   "(result files of --methods stp [dense] --set ...) and exit")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny CI run: digits, 1 seed, 300 images, 1 epoch, "
                   "Torch-Pruning 0 dense + 1 fine-tuning epoch, two lrs")  # fmt: skip
    args = p.parse_args(argv)
    if args.data:
        args.dataset = f"npz:{args.data}"
    if args.smoke:
        args.dataset, args.train_images, args.epochs, args.tp_dense_epochs = "digits", 300, 1, 0
        args.seeds, args.ft_lrs, args.prune_steps, args.taylor_batches = args.seeds[:1], [0.01, 0.1], 2, 1
        args.tp_fine_steps = 49
        args.batch_size = 64
        args.set = ["pool_size=6", "final_candidates=2", "calib_images=64", *args.set]
    if not 0 <= args.tp_dense_epochs < args.epochs and "torch-pruning" in args.methods:
        p.error("--tp-dense-epochs must lie in [0, --epochs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.ablation_table:
        print(render_ablation(args.ablation_table))
        return 0
    if args.markdown:
        print(render(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.merge:
        out = merge(args.merge)
        write_json(out, args.json)
        if args.plot:
            plot(out, args.plot)
        print(render(out))
        return 0
    torch.set_num_threads(args.threads)
    import stp_fast

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    out = {"command": " ".join(["python", *([sys.argv[0]] if argv is None else ["benchmarks/accuracy.py"]),
                                *(sys.argv[1:] if argv is None else argv)]),
           "date": time.strftime("%Y-%m-%d"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine(), "torch": torch.__version__, "git_commit": _git("rev-parse", "HEAD"),
           "git_dirty": dirty.splitlines() if dirty else [], "stp_fast_path": str(Path(stp_fast.__file__).parent),
           "tag": args.tag, "dataset": args.dataset, "epochs": args.epochs,
           "args": {k: v for k, v in vars(args).items() if k not in ("merge", "markdown", "ablation_table")}, "rows": []}  # fmt: skip
    try:
        import torch_pruning

        out["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        if "torch-pruning" in args.methods:
            raise
    start = time.perf_counter()

    def record(row: dict) -> None:
        out["rows"].append(row)
        brief = {k: v for k, v in row.items() if k not in ("candidates", "grid", "arch", "config")}
        print(json.dumps(brief), flush=True)
        out["wall_s"] = time.perf_counter() - start
        write_json(out, args.json)

    for seed in args.seeds:
        run_seed(args, seed, record)
    out["test_images"] = next((r.get("test_images") for r in out["rows"] if "test_images" in r), None)
    finish(out)
    out["wall_s"] = time.perf_counter() - start
    write_json(out, args.json)
    if args.plot:
        plot(out, args.plot)
    print(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
