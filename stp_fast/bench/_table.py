"""Sweeps and tables shared by the benchmarks: every case x mode x provider, p50 per provider, and
the speed-up of the best stp_fast provider over each baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stp_fast.bench._timing import measure


def sweep(
    family: str,
    cases: Sequence,
    providers: Sequence[str],
    modes: Sequence[str],
    setup: Callable[..., Callable[[], None]],
    flops: Callable[[object, str], float],
    *,
    device: str,
    dtype: torch.dtype,
    quick: bool,
) -> list[dict]:
    """Time ``setup(case, provider, mode, device=, dtype=)`` for all combinations; rows in ms."""
    rows = []
    for case in cases:
        for mode in modes:
            for provider in providers:
                fn = setup(case, provider, mode, device=device, dtype=dtype)
                t = measure(fn, device, min_time=0.15 if quick else 0.4)
                rows.append({"family": family, "case": case.label, "mode": mode, "provider": provider,
                             "dtype": str(dtype).replace("torch.", ""), **t,
                             "gflops": flops(case, mode) / (t["p50"] * 1e6)})  # fmt: skip
                del fn
    return rows


def render(rows: list[dict], providers: Sequence[str], ours: Sequence[str], baselines: Sequence[str]) -> str:
    """One line per case and mode: p50 per provider, then baseline time / best-of-``ours`` time."""
    width = max(26, *(len(r["case"]) + 1 for r in rows))
    head = f"{'case':<{width}} {'mode':<8} " + " ".join(f"{p:>16}" for p in providers)
    lines = [head + "".join(f" {'vs ' + b:>14}" for b in baselines)]
    keyed = {(r["case"], r["mode"], r["provider"]): r["p50"] for r in rows}
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        t = {p: keyed[(case, mode, p)] for p in providers if (case, mode, p) in keyed}
        cells = " ".join(f"{t[p]:>13.3f} ms" if p in t else f"{'-':>16}" for p in providers)
        best = min(t.get(p, float("inf")) for p in ours)
        ratios = "".join(f" {t[b] / best:>13.2f}x" if b in t else f" {'-':>14}" for b in baselines)
        lines.append(f"{case:<{width}} {mode:<8} {cells}{ratios}")
    lines.append(f"vs X: time of baseline X / time of the faster of {', '.join(ours)} (above 1: stp_fast is faster)")
    return "\n".join(lines)
