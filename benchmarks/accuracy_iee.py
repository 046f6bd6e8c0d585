"""IEE quality study (issue 6): IEE against the RigL-style baseline and one-shot magnitude pruning +
fine-tuning, at 90% unstructured (ERK) sparsity and at 85% MACs reduction by channels, every method
given the same total epochs, on Fashion-MNIST with resnet20 (in_chans=1).

    python benchmarks/accuracy_iee.py --data ../shared/data/fashion_mnist.npz --train-images 20000 \
        --epochs 12 --json benchmarks/results/cpu-accuracy-iee-<date>.json

Rows, each one :class:`stp_fast.train.iee.IEETrainer` run from the same random init, E epochs, one
cosine schedule, final BN recalibration:
* dense: the same trainer at sparsity 0 (the reference);
* iee: pruned at step 0 by magnitude, a prune-and-grow decision every cycle (one epoch) after
  ``t_exp`` reactivation steps, fixed mask for the last ``final_fraction`` of the steps;
* rigl: the same cycles without reactivation, magnitude prune and gradient grow (unstructured: grown
  weights start at zero, as RigL; channels: at their stored values);
* oneshot: dense for (1 - final_fraction) E, one magnitude prune, fine-tuning for the rest
  (its "dense" column is the dense net at the prune point).
Unstructured MACs count only multiply-accumulates with a nonzero weight. Not a CI test: on 2 CPU
cores a full run takes hours (7 runs of E epochs); ``--test-limit`` and ``--train-images`` shrink it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from stp_fast import models
from stp_fast.data import load_dataset
from stp_fast.train.iee import IEEConfig, IEETrainer


def run(ds, val, structure: str, method: str, args, sparsity: float | None = None) -> dict:
    torch.manual_seed(args.seed)
    net = models.create(args.model, ds.num_classes, ds.in_chans, input_size=ds.input_size)
    cfg = IEEConfig(method=method, structure=structure, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, sparsity=args.sparsity if sparsity is None else sparsity,
                    flops_target=args.flops_target, criterion=args.criterion, cycle_steps=args.cycle_steps,
                    explore_steps=args.explore_steps, final_fraction=args.final_fraction, eval_every=0,
                    calib_images=args.calib_images, device=args.device)  # fmt: skip
    trainer = IEETrainer(net, ds.source("train"), val, cfg, progress=args.progress)
    res = trainer.fit()
    decisions = [c for c in res.cycles if c["event"] == "decide"]
    return {"structure": structure, "method": method, "epochs": args.epochs, "top1": res.pruned["top1"],
            "macs_ratio": res.pruned["macs"] / res.full["macs"], "params": res.pruned["params"],
            "sparsity": res.pruned.get("sparsity"), "arch": res.pruned["arch"] if structure == "channel" else None,
            "decisions": len(decisions), "grown": sum(c["grown"] for c in decisions),
            "dense_top1": res.full["top1"], "dense_top1_of": res.full_top1_of, "cycle_steps": trainer.cycle,
            "explore_steps": trainer.t_exp, "wall_s": res.wall_s, "device": res.device}  # fmt: skip


def render(out: dict) -> str:
    dense = next((r["top1"] for r in out["rows"] if r["method"] == "dense"), None)
    lines = ["| structure | target | method | epochs | MACs | top-1 | % of dense | decisions (grown) | wall |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in out["rows"]:
        if r["method"] == "dense":
            target = "-"
        elif r["structure"] == "unstructured":
            target = f"{100 * out['sparsity']:.0f}% sparse (got {100 * r['sparsity']:.2f}%)"
        else:
            target = f"{100 * out['flops_target']:.0f}% MACs"
        rel = f"{100 * r['top1'] / dense:.1f}%" if dense else "-"
        extra = f" (dense at prune {100 * r['dense_top1']:.2f}%)" if r["method"] == "oneshot" else ""
        lines.append(f"| {r['structure'] if r['method'] != 'dense' else '-'} | {target} | {r['method']} | "
                     f"{r['epochs']} | {100 * r['macs_ratio']:.1f}% | {100 * r['top1']:.2f}%{extra} | {rel} | "
                     f"{r['decisions']} ({r['grown']}) | {r['wall_s']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/fashion_mnist.npz")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only (smoke runs)")
    p.add_argument("--epochs", type=int, default=12, help="total epochs of every method (default 12 = STP's 8 + 4)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--flops-target", type=float, default=0.15)
    p.add_argument("--structures", nargs="+", default=["unstructured", "channel"])
    p.add_argument("--methods", nargs="+", default=["dense", "iee", "rigl", "oneshot"])
    p.add_argument("--criterion", default="magnitude")
    p.add_argument("--cycle-steps", type=int, default=0, help="0 = one epoch")
    p.add_argument("--explore-steps", type=int, default=0, help="t_exp (0 = a tenth of the cycle)")
    p.add_argument("--final-fraction", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--calib-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="log", choices=["auto", "bar", "log", "off"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    ds = load_dataset(f"npz:{args.data}", train_limit=args.train_images, seed=args.seed)
    val = ds.source("test")
    if args.test_limit:
        val = val.subset(torch.arange(min(args.test_limit, len(val))))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None
    out = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "device": gpu or f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "model": args.model, "train_images": ds.train_size, "test_images": len(val),
           "epochs": args.epochs, "sparsity": args.sparsity, "flops_target": args.flops_target,
           "criterion": args.criterion, "final_fraction": args.final_fraction, "rows": []}  # fmt: skip

    def record(row: dict) -> None:
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "arch"}), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{args.json}.tmp"
            Path(tmp).write_text(json.dumps(out, indent=2))
            os.replace(tmp, args.json)

    if "dense" in args.methods:
        record(run(ds, val, "unstructured", "iee", args, sparsity=0.0) | {"method": "dense", "structure": "-"})
    for structure in args.structures:
        for method in ("iee", "rigl", "oneshot"):
            if method in args.methods:
                record(run(ds, val, structure, method, args))
    print(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
