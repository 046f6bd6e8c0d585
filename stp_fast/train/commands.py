"""The training subcommands of ``stp-fast``: ``prune``, ``train`` and ``eval``.

Bad input (an unknown model or data set, a target outside (0, 1), missing or corrupt data, a
checkpoint of another model or data set, an output folder that is not writable or holds an earlier
run) and a diverged run end with a one-line error on stderr and exit code 2, before any training and
before anything of an earlier run is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
SPARSE_METHODS = ("iee", "rigl", "oneshot")  # stp_fast.train.iee.IEE_METHODS (not imported: keeps --help fast)
# Every file a run writes (and pruned.pt, the TorchScript of older runs): an output folder holding any is refused.
RUN_FILES = ("checkpoint.pt", "dense.pt", "pruned.pt2", "pruned_state_dict.pt", "pruned.pt", "arch.json", "report.json",
             "report.md", "pareto.png", "metrics.jsonl")  # fmt: skip
MODEL_FILES = ("pruned.pt2", "dense.pt", "checkpoint.pt", "pruned.pt")  # what `eval` reads


class UsageError(Exception):
    """A problem with the command line or its inputs: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    from stp_fast.data import DATASET_HELP

    p = sub.add_parser("prune", help="STP-train a supernet, search the budget subnet, extract it (no fine-tuning)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"data sets (--dataset):\n{DATASET_HELP}")  # fmt: skip
    _common(p)
    p.add_argument("--flops-target", type=float, metavar="F",
                   help="kept fraction of the dense model's MACs, in (0, 1); 0.15 = 85%% reduction (required, "
                        "except for unstructured --method iee|rigl|oneshot)")  # fmt: skip
    p.add_argument("--method", choices=["stp", "st", *SPARSE_METHODS], default="stp",
                   help="stp (default), st (plain stimulative training), iee (exploitation-exploration sparse "
                        "training), rigl or oneshot (its baselines)")  # fmt: skip
    p.add_argument("--structure", choices=["unstructured", "channel"],
                   help="iee|rigl|oneshot: prune weights (ERK, default; --sparsity) or channels (--flops-target)")
    p.add_argument("--sparsity", type=float, metavar="S", help="iee|rigl|oneshot unstructured: zero fraction of "
                   "the conv/linear weights, in [0, 1) (default 0.9)")  # fmt: skip
    p.add_argument("--criterion", help="iee|oneshot importance: magnitude (default), taylor, taylor_weights")
    p.add_argument("--init", metavar="DENSE.pt", help="start from a dense checkpoint (`stp-fast train`)")
    p.add_argument("--subnets", type=int, help="subnets per step besides the full net (default 4)")
    p.add_argument("--pool-size", type=int, help="architecture pool size (default 50)")
    p.add_argument("--expansion", choices=["progressive", "assistant", "off"], help="subnet mutating expansion")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="train the dense model (a checkpoint for `prune --init`)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"data sets (--dataset):\n{DATASET_HELP}")  # fmt: skip
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 of a pruned.pt2 (torch.export) or a checkpoint on a data set's test split")
    p.add_argument("--model", required=True, metavar="FILE", help="pruned.pt2, dense.pt or checkpoint.pt (or the "
                   "TorchScript pruned.pt of older runs)")  # fmt: skip
    p.add_argument("--dataset", default="digits", help="data set (default digits)")
    p.add_argument("--data", metavar="PATH", help="path for --dataset npz|cifar10|cifar100|imagefolder")
    p.add_argument("--image-size", type=int, help="resize images to this size (imagefolder default 64)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)


def _common(p: argparse.ArgumentParser) -> None:
    from stp_fast import models

    p.add_argument("--model", required=True, help=f"a built-in model ({', '.join(models.names())}), your factory "
                   "'pkg.module:function' (returns an nn.Module), or 'hf:<model_type>' (a Hugging Face image "
                   "classifier from its config, e.g. hf:vit)")  # fmt: skip
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the factory / a field of the Hugging Face config (repeatable), e.g. "
                        "--model-arg hidden_size=192 --model-arg patch_size=4")  # fmt: skip
    p.add_argument("--dataset", default="digits", help="data set (default digits, see below)")
    p.add_argument("--data", metavar="PATH", help="path for --dataset npz|cifar10|cifar100|imagefolder")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/<command>-<model>-<dataset>[-N], new)")
    p.add_argument("--epochs", type=int, help="training epochs (default 30)")
    p.add_argument("--batch-size", type=int, help="batch size per process (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate of the cosine schedule (default 0.1)")
    p.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--train-limit", type=int, metavar="N", help="use only N training images")
    p.add_argument("--image-size", type=int, help="resize images to this size (imagefolder default 64)")
    p.add_argument("--augment", default="auto", help="auto (default), none, crop, crop+flip")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="progress bars on a terminal, log lines otherwise (auto)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any STPConfig field, e.g. --set kd_temperature=2 --set pool_update_interval=20")  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers
def _config(args: argparse.Namespace, cls=None, **fixed):
    from stp_fast.train.config import STPConfig

    cls = cls or STPConfig  # or IEEConfig (a subclass) for --method iee|rigl|oneshot
    # --augment is the data set's policy (a string); STPConfig.augment (on/off) stays as configured
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if f.name != "augment" and getattr(args, f.name, None) is not None}  # fmt: skip
    if getattr(args, "subnets", None) is not None:
        kw["subnets_per_step"] = args.subnets
    kw |= fixed
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        kw[key] = _parse_value(key, value, getattr(cls, key))
    try:
        return cls(**kw).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _parse_value(key: str, text: str, default):
    try:
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        raise UsageError(f"--set {key}={text}: expected a {type(default).__name__}") from None


def _out_dir(args: argparse.Namespace, command: str) -> Path:
    """The output folder, checked before any data is read or any epoch trained: it must be a folder
    (or creatable), writable, and hold no earlier run's files (with --resume: a checkpoint.pt)."""
    if args.out:
        out = Path(args.out).expanduser()
        _check_writable(out, f"--out {str(out)!r}")
        earlier = [f for f in RUN_FILES if (out / f).exists()]
        if args.resume:
            if not (out / "checkpoint.pt").exists():
                raise UsageError(f"--resume: {str(out)!r} holds no checkpoint.pt to continue from")
        elif earlier:
            raise UsageError(f"--out {str(out)!r} already holds an earlier run ({', '.join(earlier)}); "
                             "pass --resume to continue it, or choose another folder")  # fmt: skip
        return out
    if args.resume:
        raise UsageError("--resume needs --out (the folder of the run to continue)")
    if _world_size() > 1:
        raise UsageError("under torchrun pass --out (every rank must name the same folder)")
    tag = Path(args.data or args.dataset.partition(":")[2] or args.dataset).stem or args.dataset
    base = Path("runs") / f"{command}-{args.model}-{tag}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    _check_writable(out, f"output folder {str(out)!r} (the default; --out DIR names another)")
    return out


def _check_writable(out: Path, what: str) -> None:
    """UsageError unless ``out`` is a folder that can be written, or can be created: probed by making
    and removing a temporary entry in it (or in its nearest existing parent), so a read-only folder, a
    file in the way or an impossible path fails now, not when the first epoch's checkpoint is saved."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} is a file, not a folder")
    base = out
    while not base.exists() and base != base.parent:  # the nearest existing parent: missing folders go there
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{what} cannot be created: {str(base)!r} is a file")
    try:
        if base == out:
            fd, probe = tempfile.mkstemp(prefix=".stp-fast-probe-", dir=out)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".stp-fast-probe-", dir=base))
    except OSError as exc:
        problem = "is not writable" if base == out else f"cannot be created in {str(base)!r}"
        raise UsageError(f"{what} {problem} ({exc.strerror or type(exc).__name__})") from exc


def _load(args: argparse.Namespace, seed: int):
    """The data set and the model; the model's initial weights are drawn from ``seed`` (the run's)."""
    import torch

    from stp_fast import models
    from stp_fast.data import DatasetError, load_dataset

    if not models.is_known(args.model):
        raise UsageError(f"--model {args.model!r} is unknown; known models: {', '.join(models.names())}, or a "
                         "factory 'pkg.module:function', or 'hf:<model_type>'")  # fmt: skip
    model_args = _model_args(args)
    try:
        ds = load_dataset(args.dataset, args.data, augment=args.augment, train_limit=args.train_limit,
                          image_size=args.image_size, seed=seed)  # fmt: skip
    except (DatasetError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    torch.manual_seed(seed)  # two identical commands start from identical weights (and DDP ranks agree)
    try:
        net = models.create(args.model, ds.num_classes, ds.in_chans, input_size=ds.input_size, **model_args)
    except ValueError as exc:  # a factory that cannot be imported or called, a bad config field, a failed conversion
        raise UsageError(f"--model {args.model!r}: {exc}") from exc
    return ds, net


def _model_args(args: argparse.Namespace) -> dict:
    """``--model-arg KEY=VALUE`` as a dict; values are JSON when they parse (ints, floats, lists), else strings."""
    out = {}
    for item in getattr(args, "model_arg", []) or []:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _trainer(args, cfg, ds, net, out: Path, init=None):
    from stp_fast.train import CheckpointError, STPTrainer, report
    from stp_fast.train.iee import IEEConfig, IEETrainer

    def on_epoch(_record: dict) -> None:
        report.write_metrics(out / "metrics.jsonl", trainer.history)

    try:
        cls = IEETrainer if isinstance(cfg, IEEConfig) else STPTrainer
        trainer = cls(net, ds.source("train"), ds.source("test"), cfg, out_dir=out, resume=args.resume, init=init,
                      progress=args.progress, on_epoch=on_epoch)  # fmt: skip
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return trainer


def _fit(trainer):
    from stp_fast.train import TrainingDiverged

    try:
        return trainer.fit()
    except TrainingDiverged as exc:
        raise UsageError(f"training diverged: {exc}") from exc


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _command_line() -> str:
    return " ".join(["stp-fast", *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------- commands
def cmd_prune(args: argparse.Namespace) -> int:
    from stp_fast.train import report

    sparse = args.method in SPARSE_METHODS
    if args.flops_target is not None and not 0.0 < args.flops_target < 1.0:
        raise UsageError(f"--flops-target must lie in (0, 1) (the kept fraction of MACs), got {args.flops_target}")
    if sparse:
        cfg = _sparse_config(args)
    elif args.flops_target is None:
        raise UsageError(f"--flops-target F is required for --method {args.method}")
    elif args.sparsity is not None or args.structure is not None or args.criterion is not None:
        raise UsageError(f"--sparsity, --structure and --criterion apply to --method {'|'.join(SPARSE_METHODS)}")
    else:
        cfg = _config(args, method=args.method, flops_target=args.flops_target)
    out = _out_dir(args, "prune")
    ds, net = _load(args, cfg.seed)
    trainer = _trainer(args, cfg, ds, net, out, init=args.init)
    result = _fit(trainer)
    if not _is_rank0():  # DDP: rank 0 writes the outputs
        return 0
    extra = {"command": _command_line(), "data": ds.meta(), "config": cfg.to_dict(),
             "normalization": {"mean": list(ds.mean), "std": list(ds.std)},
             "init": args.init, "stp_fast_version": _version()}  # fmt: skip
    if sparse:
        from stp_fast.train import iee

        extra |= iee.report_extra(result, cfg)
    rep = report.build_report(result, model=args.model, dataset=ds.name, method=args.method, extra=extra)
    _write_prune_outputs(out, rep, result, ds, sparse=sparse, unstructured=sparse and cfg.structure == "unstructured")
    print(summary_table(rep))
    print(f"wrote {out}/: pruned.pt2 pruned_state_dict.pt arch.json report.json report.md "
          f"{'' if sparse else 'pareto.png '}metrics.jsonl checkpoint.pt")  # fmt: skip
    return 0


def _write_prune_outputs(out: Path, rep: dict, result, ds, *, sparse: bool, unstructured: bool) -> None:
    """Everything ``prune`` writes after training: the pruned model (a torch.export program and its state
    dict), arch.json, report.md, pareto.png, metrics.jsonl and report.json."""
    from stp_fast.train import iee, report
    from stp_fast.train.checkpoint import write_text_atomic

    # arch.json: the chosen arch, or for unstructured sparsity the per-layer densities
    arch = {"sparsity": result.pruned["sparsity"], "densities": result.densities} if unstructured else \
        result.pruned["arch"]  # fmt: skip
    report.save_state_dict(result.pruned_model, out / "pruned_state_dict.pt")
    example = next(iter(ds.source("test").loader(2)))[0]
    meta = {"dataset": ds.name, "num_classes": ds.num_classes, "input_size": list(ds.input_size),
            "normalization": rep["normalization"], "arch": arch}  # fmt: skip
    report.save_program(result.pruned_model, example, out / "pruned.pt2", metadata=meta)
    write_text_atomic(out / "arch.json", json.dumps(arch, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out / "report.md", iee.render_markdown(rep) if sparse else report.render_markdown(rep))
    if not sparse:  # IEE has no architecture pool: no pareto.png
        report.plot_pareto(out / "pareto.png", rep)
    report.write_metrics(out / "metrics.jsonl", result.history, final=_final_metrics(rep))
    write_text_atomic(out / "report.json", json.dumps(rep, indent=2) + "\n")


def _sparse_config(args: argparse.Namespace):
    """IEEConfig of ``prune --method iee|rigl|oneshot``: --structure defaults to channel when only
    --flops-target is given, else unstructured (--sparsity, default 0.9)."""
    from stp_fast.train.iee import IEEConfig

    structure = args.structure or ("channel" if args.flops_target is not None and args.sparsity is None
                                   else "unstructured")  # fmt: skip
    if structure == "channel" and args.flops_target is None:
        raise UsageError(f"--method {args.method} --structure channel needs --flops-target F (kept MACs fraction)")
    if structure == "channel" and args.sparsity is not None:
        raise UsageError("--sparsity is for --structure unstructured; channel pruning takes --flops-target F")
    if structure == "unstructured" and args.flops_target is not None:
        raise UsageError("--flops-target is for --structure channel; unstructured pruning takes --sparsity S")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise UsageError(f"--sparsity must lie in [0, 1) (the zero fraction of the weights), got {args.sparsity}")
    return _config(args, IEEConfig, method=args.method, structure=structure)


def cmd_train(args: argparse.Namespace) -> int:
    from stp_fast.train import report
    from stp_fast.train.checkpoint import save_atomic, write_text_atomic

    cfg = _config(args, method="dense", subnets_per_step=0)
    out = _out_dir(args, "train")
    ds, net = _load(args, cfg.seed)
    trainer = _trainer(args, cfg, ds, net, out)
    result = _fit(trainer)
    if not _is_rank0():
        return 0
    result.full["top1"] = _recalibrate_for_saving(trainer)
    state = trainer._state(result.wall_s) | {"kind": "dense", "optimizer": None, "scheduler": None, "pool": None}
    save_atomic(state, out / "dense.pt")
    rep = {"model": args.model, "dataset": ds.name, "method": "dense", "full": result.full, "wall_s": result.wall_s,
           "device": result.device, "input_size": list(result.input_size), "command": _command_line(),
           "config": cfg.to_dict(), "normalization": {"mean": list(ds.mean), "std": list(ds.std)}}  # fmt: skip
    report.write_metrics(out / "metrics.jsonl", result.history, final={"full": result.full})
    write_text_atomic(out / "report.json", json.dumps(rep, indent=2) + "\n")
    print(f"dense {args.model} on {ds.name}: top-1 {100 * result.full['top1']:.2f}%, "
          f"{result.full['macs'] / 1e6:.2f}M MACs, {result.wall_s:.0f} s; wrote {out}/dense.pt")  # fmt: skip
    return 0


def _recalibrate_for_saving(trainer) -> float:
    """Recalibrate the trained net's own BatchNorm statistics (the images and order of the trainer's
    recalibration of its dense model) so that ``dense.pt`` holds them, and return the top-1 of the net
    as saved: the number ``stp-fast eval dense.pt`` then reproduces to the digit (on the same device)."""
    from stp_fast.nn.bn import recalibrate_bn
    from stp_fast.train.evaluate import evaluate

    cfg = trainer.config
    calib = trainer.train.loader(min(256, cfg.calib_images), shuffle=True, seed=cfg.seed, epoch=10**6)
    recalibrate_bn(trainer.net, calib, cfg.calib_images, forward=trainer._call)
    return evaluate(trainer._wrap(trainer.net), trainer.val, trainer.device)


def cmd_eval(args: argparse.Namespace) -> int:
    from stp_fast.data import DatasetError, load_dataset
    from stp_fast.train.evaluate import evaluate

    path = Path(args.model).expanduser()
    if path.is_dir():
        found = [f for f in MODEL_FILES if (path / f).is_file()]
        hint = f"; it holds {', '.join(found)}: pass e.g. --model {path / found[0]}" if found else \
            f"; pass a model file ({', '.join(MODEL_FILES)})"  # fmt: skip
        raise UsageError(f"--model {str(path)!r} is a folder, not a model file{hint}")
    if not path.is_file():
        raise UsageError(f"--model {str(path)!r} does not exist")
    try:
        ds = load_dataset(args.dataset, args.data, image_size=args.image_size)
    except (DatasetError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    start = time.perf_counter()
    model, kind, classes, norm = _eval_model(path)
    if norm and norm.get("mean") and len(norm["mean"]) == ds.in_chans:  # the images as the model saw them in training
        ds.mean, ds.std = tuple(norm["mean"]), tuple(norm["std"])  # (another --train-limit: other statistics)
    test = ds.source("test")
    try:
        if classes is None:  # a program: the width of its output is its class count
            classes = _output_width(model, next(iter(test.loader(2)))[0])
        if classes != ds.num_classes:  # a top-1 over other classes would mean nothing
            raise UsageError(f"--model {str(path)!r} predicts {classes} classes but {ds.name} has "
                             f"{ds.num_classes}: it was trained on another data set")  # fmt: skip
        top1 = evaluate(model, test, batch_size=args.batch_size)
    except (RuntimeError, AssertionError) as exc:  # a program's shape guards raise AssertionError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {str(path)!r} does not fit {ds.name} images {ds.input_size}: {first}") from exc
    result = {"model": str(path), "kind": kind, "dataset": ds.name, "test_images": ds.test_size, "top1": top1,
              "wall_s": time.perf_counter() - start}  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else
          f"{path}: top-1 {100 * top1:.2f}% on {ds.name} test ({ds.test_size} images, {kind})")  # fmt: skip
    return 0


def _eval_model(path: Path):
    """What ``eval`` runs: ``(model, kind, classes, normalization)`` of a torch.export program, an older
    TorchScript ``pruned.pt`` (classes None: read from the output) or an stp_fast checkpoint (its full
    net); ``normalization`` is ``{"mean", "std"}`` of the training images when the file records it."""
    from stp_fast import models
    from stp_fast.train import CheckpointError, report
    from stp_fast.train import checkpoint as ckpt
    from stp_fast.train.trainer import _Logits

    kind = report.model_file_kind(path)
    if kind in ("program", "torchscript"):
        try:
            model, what, meta = report.load_model_file(path)
        except ValueError as exc:
            raise UsageError(f"--model {exc}") from exc
        return model, what, None, meta.get("normalization")
    if kind == "unknown":  # not a zip archive: every file stp_fast writes is one
        raise UsageError(f"--model {str(path)!r} is not a model file stp_fast reads ({', '.join(MODEL_FILES)}): "
                         "it is corrupt, truncated, or another kind of file")  # fmt: skip
    try:
        data = ckpt.load(path)
        net = models.create(data["model"], data["num_classes"], data["in_chans"], **data.get("model_kwargs", {}))
        ckpt.load_weights(net, data, path)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--model {str(path)!r}: not a usable stp_fast checkpoint ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc  # fmt: skip
    pick = getattr(net, "outputs", None)  # a converted model's logits selector
    model = _Logits(net, pick) if pick is not None else net
    return model, f"checkpoint ({data['model']}, full net)", int(data["num_classes"]), data.get("data")


def _output_width(model, x) -> int:
    import torch

    with torch.no_grad():
        return int(model(x).shape[-1])


def _final_metrics(rep: dict) -> dict:
    return {k: rep[k] for k in ("full", "pruned", "flops_reduction", "wall_s", "device")}


def summary_table(rep: dict) -> str:
    """The short table ``prune`` ends with: dense vs pruned top-1, MACs, params, wall time."""
    from stp_fast.train.iee import full_row_label, full_row_note

    full, pruned = rep["full"], rep["pruned"]
    label = full_row_label(rep)  # "dense", or for IEE the model its top-1 is of (maybe the untrained start net)
    width = max(10, len(label))
    rows = [("", "top-1", "MACs", "params"),
            (label, f"{100 * full['top1']:.2f}%", f"{full['macs'] / 1e6:.2f}M", f"{full['params'] / 1e3:.1f}k"),
            ("pruned", f"{100 * pruned['top1']:.2f}%", f"{pruned['macs'] / 1e6:.2f}M",
             f"{pruned['params'] / 1e3:.1f}k")]
    lines = ["  ".join(f"{c:>{width if i == 0 else 10}}" for i, c in enumerate(r)) for r in rows]
    params_cut = 100 * (1 - pruned["params"] / full["params"])
    tuned = "fine-tuned" if rep["fine_tuned"] else "no fine-tuning"
    lines.append(f"MACs -{100 * rep['flops_reduction']:.1f}%, params -{params_cut:.1f}%, "
                 f"{tuned} (BN recalibrated); wall time {rep['wall_s']:.0f} s on {rep['device']}")  # fmt: skip
    note = full_row_note(rep)
    return "\n".join([*lines, note] if note else lines)


def _version() -> str:
    from stp_fast._version import __version__

    return __version__
