"""The outputs of ``stp-fast prune``: ``report.json`` (schema of SPEC section 6), ``report.md``,
``pareto.png``, ``metrics.jsonl``, ``arch.json`` and ``pruned.pt`` (TorchScript) -- each written
atomically, so an interrupted run never leaves a half-written file."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from stp_fast.train.checkpoint import write_bytes_atomic, write_text_atomic
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


def save_torchscript(model: nn.Module, path: Path) -> None:
    """``torch.jit.script(model)`` saved atomically (loads with ``torch.jit.load``, no stp_fast)."""
    with warnings.catch_warnings():  # TorchScript notes about fx's generated module attributes
        warnings.simplefilter("ignore", UserWarning)
        scripted = torch.jit.script(model.cpu().eval())
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    write_bytes_atomic(path, buf.getvalue())


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
