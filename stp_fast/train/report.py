"""The outputs of ``stp-fast prune``: ``report.json`` (schema of SPEC section 6), ``report.md``,
``pareto.png``, ``metrics.jsonl``, ``arch.json``, ``pruned.pt2`` (a ``torch.export`` program) and
``pruned_state_dict.pt`` -- each written atomically, so an interrupted run never leaves a half-written
file.  ``load_model_file`` reads the programs back, and the TorchScript ``pruned.pt`` of older runs."""

from __future__ import annotations

import io
import json
import time
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from stp_fast.train.checkpoint import save_atomic, write_bytes_atomic, write_text_atomic
from stp_fast.train.trainer import STPResult

REPORT_KEYS = ("model", "dataset", "method", "full", "pruned", "flops_reduction", "fine_tuned", "bn_recalibrated",
               "wall_s", "device")  # fmt: skip


def build_report(result: STPResult, *, model: str, dataset: str, method: str, extra: dict | None = None) -> dict:
    """The ``report.json`` dict: the SPEC keys first, then context (budget, candidates, config...)."""
    pruned = result.pruned
    report = {
        "model": model, "dataset": dataset, "method": method, "full": dict(result.full), "pruned": dict(pruned),
        "flops_reduction": 1.0 - pruned["macs"] / result.full["macs"], "fine_tuned": False, "bn_recalibrated": True,
        "wall_s": result.wall_s, "device": result.device,
    }  # fmt: skip
    report |= {
        "flops_target": result.budget_macs / result.full["macs"],
        "input_size": list(result.input_size),
        "macs_convention": "multiply-accumulates per image, Torch-Pruning counting rules",
        "candidates": result.candidates,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    return report


def write_metrics(path: Path, history: list[dict], final: dict | None = None) -> None:
    """``metrics.jsonl``: one JSON object per epoch, then the final summary (``"event": "final"``)."""
    lines = [json.dumps({"event": "epoch", **h}) for h in history]
    if final is not None:
        lines.append(json.dumps({"event": "final", **final}))
    write_text_atomic(path, "\n".join(lines) + "\n")


def render_markdown(report: dict) -> str:
    """``report.md``: the summary table, the protocol, and the re-scored candidates."""
    full, pruned = report["full"], report["pruned"]
    lines = [
        f"# stp_fast prune: {report['model']} on {report['dataset']} ({report['method']})",
        "",
        "| model | top-1 | MACs | params |",
        "|---|---:|---:|---:|",
        f"| dense | {100 * full['top1']:.2f}% | {_si(full['macs'])} | {_si(full['params'])} |",
        f"| pruned | {100 * pruned['top1']:.2f}% | {_si(pruned['macs'])} ({100 * pruned['macs'] / full['macs']:.1f}%) "
        f"| {_si(pruned['params'])} ({100 * pruned['params'] / full['params']:.1f}%) |",
        "",
        f"MACs reduction {100 * report['flops_reduction']:.1f}% (target {100 * (1 - report['flops_target']):.1f}%); "
        f"no fine-tuning, BN recalibrated; {report['wall_s']:.0f} s on {report['device']}.",
        "",
        f"Chosen arch: `{json.dumps(pruned['arch'], sort_keys=True)}`",
        "",
        "## Re-scored candidates (best pool archs, after BN recalibration)",
        "",
        "| MACs | pool score | held-out KD | held-out top-1 | test top-1 |",
        "|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for c in report.get("candidates", []):
        score = "-" if c["pool_score"] is None else f"{c['pool_score']:.4f}"
        mark = " (chosen)" if c["arch"] == pruned["arch"] else ""
        lines.append(f"| {100 * c['macs_ratio']:.1f}%{mark} | {score} | {c['holdout_kd']:.4f} | "
                     f"{100 * c['holdout_top1']:.2f}% | {100 * c['top1']:.2f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_pareto(path: Path, report: dict) -> None:
    """``pareto.png``: test top-1 against MACs (fraction of the dense model) for the re-scored pool
    candidates, the chosen arch, and the dense model."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    ax = fig.add_subplot()
    cands = report.get("candidates", [])
    ax.scatter([100 * c["macs_ratio"] for c in cands], [100 * c["top1"] for c in cands], s=28, c="tab:blue",
               alpha=0.75, label="pool candidates (BN recalibrated)")  # fmt: skip
    pruned, full = report["pruned"], report["full"]
    ax.scatter([100 * pruned["macs"] / full["macs"]], [100 * pruned["top1"]], s=160, marker="*", c="tab:red",
               zorder=3, label="chosen")  # fmt: skip
    ax.scatter([100.0], [100 * full["top1"]], s=70, marker="D", c="black", zorder=3, label="dense")
    ax.axvline(100 * report["flops_target"], color="gray", ls="--", lw=1, label="budget")
    ax.set_xlabel("MACs (% of dense)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{report['model']} on {report['dataset']}: {report['method']}, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


PROGRAM_META = "stp_fast.json"  # the extra file of a saved program that holds ``metadata``


def save_program(model: nn.Module, example_input: Tensor, path: str | Path, *, metadata: dict | None = None) -> Path:
    """``model`` as a ``torch.export`` program (exported in eval mode on the CPU; the model itself is
    left on its device and in its mode), saved atomically.

    The batch dimension is dynamic, so the program takes any batch size; the file loads with
    ``torch.export.load(path).module()`` and needs no stp_fast (TorchScript, the format of older runs,
    is deprecated since torch 2.13).  ``example_input``: one batch (B, ...) of the model's inputs;
    only its shape beyond the batch and its dtype matter.  A model whose graph does not allow a
    dynamic batch is exported for batch size 2 only, with a warning.  ``metadata`` (JSON-ready, e.g.
    the input normalisation) goes into the archive as the extra file ``stp_fast.json``."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    was_training = model.training
    x = example_input.detach().cpu()
    x = x[:1].expand(2, *x.shape[1:]).contiguous() if x.shape[0] != 2 else x  # batch 2: not 0/1-specialised
    try:
        model.cpu().eval()
        try:
            program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as exc:  # a graph with batch-size-dependent code (reshape to a fixed batch, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"{path}: exported for batch size 2 only; a dynamic batch failed: {first}", stacklevel=2)
            program = torch.export.export(model, (x,))
        buf = io.BytesIO()  # serialised before the model moves back: the program holds its parameters
        extra = {PROGRAM_META: json.dumps(metadata, sort_keys=True)} if metadata is not None else None
        torch.export.save(program, buf, extra_files=extra)
    finally:  # the caller's model stays where and as it was
        model.train(was_training)
        if len(devices) == 1:
            model.to(devices.pop())
    return write_bytes_atomic(path, buf.getvalue())


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """``model.state_dict()`` (CPU tensors; loads with ``torch.load(..., weights_only=True)``), atomically."""
    return save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


class _Program(nn.Module):
    """An exported program's module, callable by code that switches modes (``evaluate``): the program
    was exported in eval mode and refuses ``.train()``/``.eval()``, so this wrapper only records the flag."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.program = module

    def train(self, mode: bool = True) -> _Program:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


def model_file_kind(path: str | Path) -> str:
    """``"program"`` (torch.export), ``"torchscript"``, ``"torch.save"`` (a checkpoint or state dict) or
    ``"unknown"`` -- from the archive's member names, without loading it."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return "unknown"
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "program"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch.save"
    return "unknown"


def load_model_file(path: str | Path) -> tuple[nn.Module, str, dict]:
    """A ``pruned.pt2`` program or an older TorchScript ``pruned.pt`` as a runnable module, its kind and
    the metadata saved with it (``{}`` if none).  ValueError (one line) for other or unreadable files."""
    kind = model_file_kind(path)
    try:
        if kind == "program":
            extra = {PROGRAM_META: ""}
            program = torch.export.load(str(path), extra_files=extra)
            meta = json.loads(extra[PROGRAM_META]) if extra[PROGRAM_META] else {}
            return _Program(program.module()), "torch.export program", meta
        if kind == "torchscript":
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice: reading old runs stays supported
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu"), "torchscript", {}
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{str(path)!r} looks like a {kind} file but cannot be loaded: {first}") from exc
    raise ValueError(f"{str(path)!r} is neither a torch.export program nor a TorchScript model")


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
