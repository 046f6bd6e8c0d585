"""IEE quality study (issue "IEE that explores"): IEE against RigL and one-shot magnitude pruning +
fine-tuning, by weights (ERK sparsity) and by channels (kept MACs), with the dense net and STP's
channel rows for reference -- on the fair protocol of ``benchmarks/accuracy.py`` (the STP study):
Fashion-MNIST, resnet20 (in_chans=1), the same images for every method, equal epochs, 3 seeds.

    python benchmarks/accuracy_iee.py --data ../shared/data/fashion_mnist.npz --seeds 0 \\
        --json benchmarks/results/cpu-accuracy-iee-seed0-<date>.json       # one seed per process
    python benchmarks/accuracy_iee.py --merge seed0.json seed1.json seed2.json --stp-json STUDY.json [DENSE.json] \\
        --json benchmarks/results/cpu-accuracy-iee-study-<date>.json --plot ....png
    python benchmarks/accuracy_iee.py --markdown study.json   # the README table (mean +- std), the goal check
    python benchmarks/accuracy_iee.py --methods iee --structures channel --flops-targets 0.15 \\
        --set criterion=taylor --tag taylor ...                # an ablation row (IEEConfig overrides)
    python benchmarks/accuracy_iee.py --smoke                  # CI: digits, 1 seed, tiny

Fairness (the STP study's conventions, imported from ``accuracy.py``): per seed ``--train-images``
images are drawn and ``--val-fraction`` of them carved out ONCE as the validation split
(``accuracy.load_split``, STPTrainer's holdout permutation); every method trains on the rest, with
the same recipe (SGD, nesterov, momentum 0.9, weight decay ``--wd``, per-step cosine from ``--lr``,
``--batch-size``, the data set's crop augmentation) for ``--epochs`` epochs in total.  Knobs are chosen
on the validation split only (``val_top1`` of every row); top-1 is on the whole test split.

Rows (``method``; ``budget`` = the target: sparsity for ``unstructured``, kept MACs for ``channel``):
* ``dense``: the plain resnet20 trained with the dense recipe (``accuracy.run_dense``; the STP
  study's dense row is the same run, and is taken from ``--stp-json`` when given).
* ``iee``, ``rigl``: one :class:`~stp_fast.train.iee.IEETrainer` run each per target, from the same
  init, pruned at step 0 (iee by the criterion, rigl by magnitude), a prune-and-grow decision every
  cycle (one epoch), fixed mask for the last ``--final-fraction`` of the steps, BN recalibrated.  Every
  decision's record (candidates, wanted, cap, grown, reason, score_ratio) is kept in the row.
* ``oneshot``: dense training for (1 - final_fraction) of the steps, one magnitude prune, fine-tuning
  for the rest, in one cosine schedule.  The dense phase is the same for every target, so it runs ONCE
  per seed and each target continues from its snapshot (bit-identical to separate runs); the row's
  wall time is the shared dense phase plus its own fine-tuning.
* ``stp`` (channels): from ``--stp-json`` (the STP study's rows of the same seeds, after checking that
  it used this protocol: data set, images, validation split, epochs, lr, batch size, weight decay), or
  run here with ``accuracy.run_stp`` when ``stp`` is in ``--methods``.
Unstructured MACs count only the multiply-accumulates with a nonzero weight.  Not a CI test at full
size (hours on 2 CPU cores); ``tests/test_accuracy_iee_harness.py`` runs ``--smoke``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

GOAL_VS_RIGL = 0.5  # points: IEE mean >= RigL mean + 0.5 at every budget
PROTOCOL = ("dataset", "train_images", "val_fraction", "epochs", "lr", "batch_size", "wd")
ORDER = ["dense", "stp", "iee", "rigl", "oneshot"]
LABELS = {"dense": "dense resnet20", "stp": "STP (one run for both budgets), no fine-tuning",
          "iee": "**IEE**", "rigl": "RigL", "oneshot": "one-shot magnitude + fine-tuning"}  # fmt: skip


def _study():
    """benchmarks/accuracy.py (the STP study), imported by path: its split, dense recipe and I/O helpers."""
    name = "stp_accuracy_study"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "accuracy.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------- runs
def overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` items as IEEConfig fields (values parsed as JSON, else kept as strings)."""
    from stp_fast.train.iee import IEEConfig

    return _study().config_overrides(items, IEEConfig)


def iee_config(args, seed: int, structure: str, method: str, budget: float):
    from stp_fast.train.iee import IEEConfig

    kw = dict(method=method, structure=structure, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              momentum=0.9, nesterov=True, weight_decay=args.wd, seed=seed, eval_every=0, device="cpu",
              calib_images=args.calib_images, final_fraction=args.final_fraction)  # fmt: skip
    kw["sparsity" if structure == "unstructured" else "flops_target"] = budget
    kw |= overrides(args.all_set)
    if method == "iee":
        kw |= overrides(args.set)
    return IEEConfig(**kw)


def _trainer(ds, train, test, cfg):
    """The run's IEETrainer on a fresh resnet20 (the seed's init).  Channels: the inner widths of the
    blocks are the units; a target below what they can reach (one channel each: 5.5% of the MACs at
    28x28) also prunes the residual widths (``prune_residual``; the same init, more units)."""
    from stp_fast import models
    from stp_fast.train.iee import IEETrainer

    for residual in (False, True):
        torch.manual_seed(cfg.seed)  # the same init for every method of a seed
        net = models.create("resnet20", ds.num_classes, ds.in_chans, input_size=ds.input_size,
                            prune_residual=residual)  # fmt: skip
        try:
            trainer = IEETrainer(net, train, test, cfg, progress="log")
        except ValueError as exc:
            if residual or cfg.structure != "channel" or "smallest channel allocation" not in str(exc):
                raise
            continue
        trainer.channel_space = "inner + residual widths" if residual else "inner widths"
        return trainer
    raise AssertionError("unreachable")


def _row(trainer, res, val, cfg, wall: float) -> dict:
    study = _study()
    decisions = [c for c in res.cycles if c["event"] == "decide"]
    keep = ("step", "grown", "wanted", "cap", "candidates", "score_ratio", "reason")
    row = {"structure": cfg.structure, "top1": res.pruned["top1"], "val_top1": study.evaluate(res.pruned_model, val),
           "macs_ratio": res.pruned["macs"] / res.full["macs"], "params": res.pruned["params"],
           "decisions": len(decisions), "grown": sum(c["grown"] for c in decisions),
           "decision_log": [{k: c.get(k) for k in keep} for c in decisions], "cycle_steps": trainer.cycle,
           "explore_steps": trainer.t_exp, "criterion": trainer.criterion_name, "wall_s": wall,
           "train_wall_s": res.wall_s,
           "config": {k: v for k, v in cfg.to_dict().items() if k in IEE_KNOBS}}  # fmt: skip
    if cfg.structure == "unstructured":
        row["sparsity"] = res.pruned["sparsity"]
    else:
        row |= {"arch": res.pruned["arch"], "channel_space": trainer.channel_space}
    return row


IEE_KNOBS = ("method", "structure", "sparsity", "flops_target", "criterion", "cycle_steps", "explore_steps",
             "explore_fraction", "explore_norm", "swap_fraction", "swap_anneal", "final_fraction",
             "regrow_init", "erk_first_layer", "erk_classifier", "erk_power", "channel_score_norm", "lr",
             "weight_decay", "batch_size", "epochs", "seed")  # fmt: skip


def run_sparse(ds, train, val, test, structure: str, method: str, budget: float, args, seed: int) -> dict:
    """One IEE or RigL run (or a stand-alone one-shot run) at one target."""
    cfg = iee_config(args, seed, structure, method, budget)
    start = time.perf_counter()
    trainer = _trainer(ds, train, test, cfg)
    res = trainer.fit()
    return _row(trainer, res, val, cfg, time.perf_counter() - start)


class _Pause(Exception):
    pass


def run_oneshot_shared(ds, train, val, test, targets: list[tuple[str, float]], args, seed: int) -> list[dict]:
    """One-shot rows for every ``(structure, budget)``: the dense phase once, then each target from its
    snapshot (the state a stand-alone run has at that epoch: weights, optimizer, schedule, RNG)."""
    first = iee_config(args, seed, *targets[0][:1], "oneshot", targets[0][1])
    probe = _trainer(ds, train, test, first)
    pause = probe.explore_end // probe.steps_per_epoch  # whole dense epochs before the prune step
    if pause < 1 or len(targets) == 1:
        return [run_sparse(ds, train, val, test, s, "oneshot", b, args, seed) | {"shared_dense_epochs": 0}
                for s, b in targets]  # fmt: skip

    def stop(record):
        if record["epoch"] == pause:
            raise _Pause

    probe.on_epoch = stop
    start = time.perf_counter()
    try:
        probe.fit()
        raise RuntimeError("one-shot dense phase: the run did not pause")
    except _Pause:
        pass
    dense_wall = time.perf_counter() - start
    snap = {"net": copy.deepcopy(probe.net.state_dict()), "opt": copy.deepcopy(probe.optimizer.state_dict()),
            "sched": probe.scheduler.state_dict(), "rng": torch.get_rng_state(), "history": list(probe.history)}
    assert not probe.pruned
    rows = []
    for structure, budget in targets:
        cfg = iee_config(args, seed, structure, "oneshot", budget)
        start = time.perf_counter()
        trainer = _trainer(ds, train, test, cfg)
        trainer.net.load_state_dict(snap["net"])
        trainer.optimizer.load_state_dict(copy.deepcopy(snap["opt"]))
        trainer.scheduler.load_state_dict(snap["sched"])
        trainer.epoch, trainer.history, trainer.wall_before = pause, list(snap["history"]), 0.0
        torch.set_rng_state(snap["rng"])
        res = trainer.fit()
        own = time.perf_counter() - start
        row = _row(trainer, res, val, cfg, dense_wall + own)
        rows.append(row | {"shared_dense_epochs": pause, "shared_dense_wall_s": dense_wall, "own_wall_s": own,
                           "dense_top1_at_prune": res.full["top1"]})  # fmt: skip
    return rows


def stp_rows(path: str, args, seeds: list[int]) -> list[dict]:
    """The STP study's ``stp`` and ``dense`` rows of ``seeds``, after checking its protocol is this one."""
    data = json.loads(Path(path).read_text())
    theirs = data.get("args", {})
    ours = vars(args)
    diff = [k for k in PROTOCOL if theirs.get(k) != ours.get(k)]
    if diff:
        raise SystemExit(f"--stp-json {path}: another protocol ({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}; "
                         f"here {', '.join(f'{k}={ours.get(k)!r}' for k in diff)})")  # fmt: skip
    out = []
    for r in data["rows"]:
        if r["seed"] in seeds and r["method"] in ("stp", "dense"):
            extra = {"structure": "channel" if r["method"] == "stp" else "-", "source": Path(path).name}
            out.append({k: v for k, v in r.items() if k not in ("candidates", "config")} | extra)
    return out


# ---------------------------------------------------------------------------------------------- one seed
def run_seed(args, seed: int, record, have: set) -> None:
    study = _study()
    ds, full_train, val, train, test = study.load_split(args, seed)
    print(f"seed {seed}: {len(train)} training images, {len(val)} validation, {len(test)} test", flush=True)
    common = {"seed": seed, "epochs": args.epochs, "train_images": len(train), "val_images": len(val),
              "test_images": len(test), "variant": args.tag}  # fmt: skip
    methods = set(args.methods)
    if "dense" in methods and ("dense", seed) not in have:
        _, row = study.run_dense(ds, train, val, test, args.epochs, args, seed)
        record({"method": "dense", "structure": "-", "budget": 1.0, **common, **row})
    if "stp" in methods and ("stp", seed) not in have and "channel" in args.structures:
        stp_args = argparse.Namespace(**{**vars(args), "set": [], "budgets": list(args.flops_targets)})
        _, rows = study.run_stp(ds, full_train, val, test, "stp", stp_args, seed)
        for row in rows:
            record({"method": "stp", "structure": "channel", **common, **row})
    targets = [(s, b) for s in args.structures
               for b in (args.sparsities if s == "unstructured" else args.flops_targets)]  # fmt: skip
    for structure, budget in targets:
        for method in ("iee", "rigl"):
            if method in methods:
                row = run_sparse(ds, train, val, test, structure, method, budget, args, seed)
                record({"method": method, "budget": budget, **common, **row})
    if "oneshot" in methods and targets:
        for (_, budget), row in zip(targets, run_oneshot_shared(ds, train, val, test, targets, args, seed)):
            record({"method": "oneshot", "budget": budget, **common, **row})


# ---------------------------------------------------------------------------------------------- summary
def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of every (structure, budget, method, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r.get("structure", "-"), float(r["budget"]), r["method"], r.get("variant", ""))
        groups.setdefault(key, []).append(r)
    out = []
    for (structure, budget, method, variant), rs in groups.items():
        s = {"structure": structure, "budget": budget, "method": method, "variant": variant,
             "seeds": sorted(r["seed"] for r in rs), "n": len(rs)}  # fmt: skip
        for key in ("top1", "val_top1", "macs_ratio", "wall_s", "grown", "decisions"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[key + "_mean"], s[key + "_std"] = _ms(vals)
        sources = sorted({r["source"] for r in rs if r.get("source")})
        if sources:
            s["source"] = sources
        out.append(s)
    rank = {m: i for i, m in enumerate(ORDER)}
    skey = {"-": 0, "unstructured": 1, "channel": 2}
    return sorted(out, key=lambda s: (skey.get(s["structure"], 3), s["budget"] if s["structure"] == "unstructured"
                                      else -s["budget"], rank.get(s["method"], 99), s["variant"]))  # fmt: skip


def goals(summary: list[dict]) -> list[dict]:
    """IEE (the default variant) mean >= RigL mean + 0.5 point at every budget; the margin (>= 0 = met)."""
    by = {(s["structure"], s["budget"], s["method"], s["variant"]): s for s in summary}
    out = []
    for (structure, budget, method, variant), s in by.items():
        rigl = by.get((structure, budget, "rigl", ""))
        if method != "iee" or variant or rigl is None:
            continue
        d = 100 * (s["top1_mean"] - rigl["top1_mean"])
        out.append({"goal": f"{_target(structure, budget)}: IEE >= RigL + {GOAL_VS_RIGL}", "value": d,
                    "margin": d - GOAL_VS_RIGL, "seeds": min(s["n"], rigl["n"])})  # fmt: skip
    return out


def _target(structure: str, budget: float) -> str:
    if structure == "unstructured":
        return f"{100 * budget:.0f}% sparse (ERK)"
    return "–" if budget >= 1.0 else f"{100 * budget:.0f}% MACs kept"


def _pm(s: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    return _study()._pm(s, key, scale, digits)


def render(out: dict) -> str:
    summary = out.get("summary") or summarize(out["rows"])
    dense = next((s for s in summary if s["method"] == "dense"), None)
    seeds = sorted({r["seed"] for r in out["rows"]})
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds (top-1 in % on the "
             f"{out.get('test_images', '?')} test images; val = the {out.get('val_images', '?')}-image "
             f"validation split); wall = seconds of one run on one thread.", "",
             "| structure | target | method | MACs kept | top-1 | val top-1 | of dense | grown (decisions) "
             "| wall (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in summary:
        label = LABELS.get(s["method"], s["method"]) + (f" `{s['variant']}`" if s["variant"] else "")
        if s.get("source"):
            label += " (from the STP study)"
        rel = f"{100 * s['top1_mean'] / dense['top1_mean']:.1f}%" if dense else "–"
        grown = f"{s['grown_mean']:.0f} ({s['decisions_mean']:.0f})" if s.get("decisions_mean") else "–"
        wall = f"{s['wall_s_mean']:.0f}" if "wall_s_mean" in s else "–"
        lines.append(f"| {s['structure']} | {_target(s['structure'], s['budget'])} | {label} | "
                     f"{_pm(s, 'macs_ratio', digits=1)}% | {_pm(s, 'top1')} | {_pm(s, 'val_top1')} | {rel} | {grown} | "
                     f"{wall} |")  # fmt: skip
    g = out.get("goals") or goals(summary)
    if g:
        lines += ["", "| goal | IEE − RigL (mean) | met? |", "|---|---:|---|"]
        for item in g:
            verdict = "yes" if item["margin"] >= 0 else f"no, by {-item['margin']:.2f} pts"
            lines.append(f"| {item['goal']} | {item['value']:+.2f} pts | {verdict} |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = out.get("summary") or summarize(out["rows"])
    dense = next((s for s in summary if s["method"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"iee": ("o", "C3"), "rigl": ("s", "C0"), "oneshot": ("v", "C2"), "stp": ("D", "C1")}
    for ax, structure in zip(axes, ("unstructured", "channel")):
        for method, (marker, color) in styles.items():
            pts = sorted((s for s in summary if s["structure"] == structure and s["method"] == method
                          and not s["variant"]), key=lambda s: s["macs_ratio_mean"])  # fmt: skip
            if pts:
                x, y = [100 * s["macs_ratio_mean"] for s in pts], [100 * s["top1_mean"] for s in pts]
                ax.errorbar(x, y, yerr=[100 * s["top1_std"] for s in pts], marker=marker, color=color, capsize=3,
                            label=LABELS[method].replace("**", ""))  # fmt: skip
        if dense:
            ax.axhline(100 * dense["top1_mean"], color="k", ls="--", lw=1,
                       label=f"dense ({100 * dense['top1_mean']:.1f}%)")  # fmt: skip
        ax.set_xlabel("MACs kept (% of resnet20" + (", nonzero weights)" if structure == "unstructured" else ")"))
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{structure}: {out.get('epochs', '?')} epochs, {len(sorted({r['seed'] for r in out['rows']}))} "
                     f"seed(s), mean ± std")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- I/O
def finish(out: dict) -> dict:
    out["summary"] = summarize(out["rows"])
    out["goals"] = goals(out["summary"])
    for key in ("test_images", "val_images", "train_images"):
        out[key] = out.get(key) or next((r[key] for r in out["rows"] if r.get(key)), None)
    return out


def borrow(rows: list[dict], files: list[str] | None, args, seeds: list[int]) -> list[dict]:
    """The STP study's rows (from ``files``, in order) of ``seeds`` that ``rows`` does not hold yet: per
    (method, budget, seed), the first file that has one."""
    have = {(r["method"], float(r["budget"]), r["seed"]) for r in rows}
    out = []
    for path in files or []:
        for r in stp_rows(path, args, seeds):
            key = (r["method"], float(r["budget"]), r["seed"])
            if key not in have:
                have.add(key)
                out.append(r)
    return out


def merge(paths: list[str], stp_json: list[str] | None = None) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("rows", "summary", "goals")}
    out["merged_from"] = [{"file": Path(p).name, "command": r.get("command"), "git_commit": r.get("git_commit"),
                           "git_dirty": r.get("git_dirty"), "seeds": sorted({x["seed"] for x in r["rows"]}),
                           "wall_s": r.get("wall_s")} for p, r in zip(paths, runs)]  # fmt: skip
    out["rows"] = [row for r in runs for row in r["rows"]]
    if stp_json:
        seeds = sorted({r["seed"] for r in out["rows"]})
        out["rows"] += borrow(out["rows"], stp_json, argparse.Namespace(**runs[0]["args"]), seeds)
        out["stp_json"] = [Path(p).name for p in stp_json]
    return finish(out)


def _snapshot(name: str) -> str | None:
    """Run from a copy of the tree (``HEAD`` and ``STATUS`` files written next to ``benchmarks/`` when it was
    taken, so concurrent edits cannot reach a running study): what the copy was taken from."""
    path = Path(__file__).resolve().parent.parent / name
    return path.read_text().strip() if path.is_file() else None


def _commit(study) -> str | None:
    commit = study._git("rev-parse", "HEAD")
    return commit or (f"{_snapshot('HEAD')} (snapshot of the working tree)" if _snapshot("HEAD") else None)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", default=None, help="an npz (x_train, y_train, x_test, y_test); sets --dataset npz:PATH")
    p.add_argument("--dataset", default="npz:../shared/data/fashion_mnist.npz", help="a stp_fast.data spec")
    p.add_argument("--train-images", type=int, default=6667, help="images drawn per seed (6000 + 667 validation)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved once per seed")
    p.add_argument("--epochs", type=int, default=12, help="total epochs of every method")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95], help="unstructured targets (ERK)")
    p.add_argument("--flops-targets", type=float, nargs="+", default=[0.15, 0.05], help="channel targets (kept MACs)")
    p.add_argument("--structures", nargs="+", default=["unstructured", "channel"], choices=["unstructured", "channel"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["dense", "iee", "rigl", "oneshot"],
                   choices=["dense", "iee", "rigl", "oneshot", "stp"])  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="IEEConfig override, iee rows")
    p.add_argument("--all-set", action="append", default=[], metavar="KEY=VALUE",
                   help="IEEConfig override for the iee, rigl and oneshot rows")  # fmt: skip
    p.add_argument("--final-fraction", type=float, default=0.25, help="fixed-mask share (oneshot: fine-tuning)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--calib-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--tag", default="", help="the rows' variant label (ablations; '' = the defaults)")
    p.add_argument("--stp-json", nargs="+", help="the STP study's JSON file(s): their stp and dense rows of the same "
                   "seeds and protocol (per row, the first file that has it)")  # fmt: skip
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    p.add_argument("--plot", help="write the top-1 vs MACs plot here (png)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine these result files (then --json/--plot)")
    p.add_argument("--markdown", metavar="JSON", help="print the table of a result file and exit")
    p.add_argument("--smoke", action="store_true", help="tiny CI run: digits, 1 seed, 300 images, 2 epochs")
    args = p.parse_args(argv)
    if args.data:
        args.dataset = f"npz:{args.data}"
    if args.smoke:
        args.dataset, args.train_images, args.epochs, args.batch_size = "digits", 300, 2, 32
        args.seeds, args.sparsities, args.flops_targets, args.calib_images = args.seeds[:1], [0.9], [0.3], 64
        args.all_set = ["cycle_steps=4", "explore_steps=1", *args.all_set]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.markdown:
        print(render(json.loads(Path(args.markdown).read_text())))
        return 0
    study = _study()
    if args.merge:
        out = merge(args.merge, args.stp_json)
        study.write_json(out, args.json)
        if args.plot:
            plot(out, args.plot)
        print(render(out))
        return 0
    torch.set_num_threads(args.threads)
    import stp_fast

    dirty = study._git("status", "--porcelain", "--untracked-files=no") or _snapshot("STATUS")
    out = {"command": " ".join(["python", "benchmarks/accuracy_iee.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": time.strftime("%Y-%m-%d"), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": study.machine(), "torch": torch.__version__, "git_commit": _commit(study),
           "git_dirty": dirty.splitlines() if dirty else [], "stp_fast_path": str(Path(stp_fast.__file__).parent),
           "tag": args.tag, "dataset": args.dataset, "epochs": args.epochs,
           "args": {k: v for k, v in vars(args).items() if k not in ("merge", "markdown")}, "rows": []}  # fmt: skip
    start = time.perf_counter()

    def record(row: dict) -> None:
        out["rows"].append(row)
        brief = {k: v for k, v in row.items() if k not in ("decision_log", "arch", "config", "candidates")}
        print(json.dumps(brief), flush=True)
        out["wall_s"] = time.perf_counter() - start
        study.write_json(out, args.json)

    borrowed = borrow([], args.stp_json, args, args.seeds)
    have = {(r["method"], r["seed"]) for r in borrowed}
    for seed in args.seeds:
        run_seed(args, seed, record, have)
    out["rows"] += borrowed
    finish(out)
    out["wall_s"] = time.perf_counter() - start
    study.write_json(out, args.json)
    if args.plot:
        plot(out, args.plot)
    print(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
