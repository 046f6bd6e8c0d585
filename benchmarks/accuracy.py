"""Pruning-quality study (SPEC section 7): STP without fine-tuning against plain ST, Torch-Pruning
magnitude pruning with fine-tuning, and the chosen architecture trained from scratch -- every method
given the same total epochs -- on Fashion-MNIST with resnet20 (in_chans=1).

    python benchmarks/accuracy.py --data ../shared/data/fashion_mnist.npz --train-images 20000 \
        --epochs 8 --ft-epochs 4 --budgets 0.15 0.05 --json benchmarks/results/cpu-accuracy-<date>.json

Rows (per budget F = kept MACs fraction):
* dense: the full net, E = epochs + ft_epochs epochs of plain training;
* stp: STP from scratch for E epochs, extracted + BN recalibrated, no fine-tuning;
* st: plain stimulative training (random subnets, no pool search, no expansion) for E epochs, then
  the same final selection -- the ablation of STP's search and expansion;
* torch-pruning: dense for ``epochs``, Torch-Pruning L1 magnitude pruning (global channel groups)
  to <= F of the MACs, then ``ft_epochs`` of fine-tuning (top-1 before and after);
* scratch: STP's chosen arch as a plain model trained from scratch for E epochs (one run per budget).
Not a CI test: it takes tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stp_fast import count_macs, models, recalibrate_bn
from stp_fast.data import load_dataset
from stp_fast.train import STPConfig, STPTrainer
from stp_fast.train.evaluate import evaluate


def train_plain(model, ds, epochs: int, *, lr: float, batch_size: int, seed: int, wd: float = 5e-4) -> None:
    """Plain SGD (nesterov, cosine per step) cross-entropy training of a plain model."""
    train = ds.source("train")
    steps = epochs * (len(train) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1))))
    model.train()
    for epoch in range(epochs):
        for x, y in train.loader(batch_size, shuffle=True, augment=True, seed=seed, epoch=epoch, drop_last=True):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  plain epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    model.eval()


def stp_run(ds, method: str, budget: float, epochs: int, args, init=None) -> dict:
    """STP/ST from scratch, or (``init``: a trained dense plain model) from its weights after the
    one-time channel importance sort, at the lower ``--init-lr``."""
    torch.manual_seed(args.seed)
    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size)
    if init is not None:
        net.load_state_dict(init.state_dict())
        net.sort_channels()
    overrides = {k: type(getattr(STPConfig, k))(v) if not isinstance(getattr(STPConfig, k), bool) else v == "1"
                 for k, v in (item.split("=", 1) for item in args.set)}  # fmt: skip
    cfg = STPConfig(method=method, epochs=epochs, batch_size=args.batch_size, flops_target=budget, seed=args.seed,
                    lr=args.lr if init is None else args.init_lr, eval_every=0, **overrides)  # fmt: skip
    res = STPTrainer(net, ds.source("train"), ds.source("test"), cfg, progress="log").fit()
    return {"top1": res.pruned["top1"], "macs_ratio": res.pruned["macs"] / res.full["macs"],
            "arch": res.pruned["arch"], "wall_s": res.wall_s, "dense_top1_of_supernet": res.full["top1"]}  # fmt: skip


def dense_run(ds, epochs: int, args):
    torch.manual_seed(args.seed)
    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size)
    model = net.extract(net.space.full())
    start = time.perf_counter()
    train_plain(model, ds, epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    return model, time.perf_counter() - start


def torch_pruning_run(dense_model, ds, budget: float, args) -> dict:
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(dense_model)
    example = torch.zeros(1, *ds.input_size)
    base, _ = tp.utils.count_ops_and_params(model, example)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.98, iterative_steps=200, ignored_layers=[model.fc])  # fmt: skip
    macs = base
    for _ in range(200):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        if macs <= budget * base:
            break
    calib = ds.loader("calib", batch_size=256)
    recalibrate_bn(model, calib, 2000)
    before = evaluate(model, ds.source("test"))
    start = time.perf_counter()
    train_plain(model, ds, args.ft_epochs, lr=args.ft_lr, batch_size=args.batch_size, seed=args.seed + 1)
    return {"top1_before_ft": before, "top1": evaluate(model, ds.source("test")), "macs_ratio": macs / base,
            "ft_wall_s": time.perf_counter() - start}  # fmt: skip


def scratch_run(ds, arch_dict: dict, epochs: int, args) -> dict:
    from stp_fast.arch import Arch

    torch.manual_seed(args.seed + 2)
    net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size)
    arch = Arch.from_dict(arch_dict)
    model = net.extract(arch)
    start = time.perf_counter()
    train_plain(model, ds, epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    macs, _ = count_macs(model, ds.input_size)
    return {"top1": evaluate(model, ds.source("test")), "macs_ratio": macs / net.space.macs(net.space.full()),
            "wall_s": time.perf_counter() - start}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/fashion_mnist.npz")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8, help="dense epochs before Torch-Pruning's fine-tuning")
    p.add_argument("--ft-epochs", type=int, default=4, help="fine-tuning epochs; every method gets epochs+ft-epochs")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.05])
    p.add_argument("--methods", nargs="+", default=["dense", "stp", "st", "stp-init", "st-init", "torch-pruning",
                                                    "scratch"],
                   help="stp/st: from scratch for epochs+ft-epochs; stp-init/st-init: from the dense model of "
                        "--epochs epochs, then --ft-epochs of STP/ST (the same split as Torch-Pruning's)")  # fmt: skip
    p.add_argument("--init-lr", type=float, default=0.02, help="peak lr of stp-init/st-init")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="STPConfig override for stp/st")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    ds = load_dataset(f"npz:{args.data}", train_limit=args.train_images, seed=args.seed)
    total = args.epochs + args.ft_epochs
    out = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "train_images": ds.train_size, "test_images": ds.test_size,
           "epochs_total": total, "rows": []}  # fmt: skip

    def record(row: dict) -> None:
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{args.json}.tmp"
            Path(tmp).write_text(json.dumps(out, indent=2))
            os.replace(tmp, args.json)

    dense_model = None
    if "dense" in args.methods:
        full_model, wall = dense_run(ds, total, args)
        record({"method": "dense", "budget": 1.0, "epochs": total, "top1": evaluate(full_model, ds.source("test")),
                "macs_ratio": 1.0, "wall_s": wall})  # fmt: skip
    if {"torch-pruning", "stp-init", "st-init"} & set(args.methods):
        dense_model, _ = dense_run(ds, args.epochs, args)
    for budget in args.budgets:
        chosen = None
        for method in ("stp", "st"):
            if method in args.methods:
                row = stp_run(ds, method, budget, total, args)
                record({"method": method, "budget": budget, "epochs": total, **row})
                chosen = chosen or row["arch"]
        for method in ("stp-init", "st-init"):
            if method in args.methods:
                row = stp_run(ds, method[:-5], budget, args.ft_epochs, args, init=dense_model)
                record({"method": method, "budget": budget, "epochs": f"{args.epochs}+{args.ft_epochs}", **row})
                chosen = chosen or row["arch"]
        if dense_model is not None and "torch-pruning" in args.methods:
            record({"method": "torch-pruning", "budget": budget, "epochs": f"{args.epochs}+{args.ft_epochs}",
                    **torch_pruning_run(dense_model, ds, budget, args)})  # fmt: skip
        if "scratch" in args.methods and chosen is not None:
            record({"method": "scratch", "budget": budget, "epochs": total, **scratch_run(ds, chosen, total, args)})
    print(render(out))
    return 0


def render(out: dict) -> str:
    dense = next((r["top1"] for r in out["rows"] if r["method"] == "dense"), None)
    lines = ["| budget (kept MACs) | method | epochs | MACs | top-1 | % of dense |", "|---|---|---|---:|---:|---:|"]
    for r in out["rows"]:
        rel = f"{100 * r['top1'] / dense:.1f}%" if dense else "-"
        extra = f" (before FT {100 * r['top1_before_ft']:.1f}%)" if "top1_before_ft" in r else ""
        lines.append(f"| {100 * r['budget']:.0f}% | {r['method']} | {r['epochs']} | {100 * r['macs_ratio']:.1f}% | "
                     f"{100 * r['top1']:.2f}%{extra} | {rel} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
