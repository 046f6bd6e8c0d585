"""The ``stp-fast`` command (also ``python -m stp_fast``).

Subcommands: ``prune`` (STP training, search, extraction), ``train`` (dense model), ``eval``
(top-1 of a saved model), ``bench`` (benchmarks; prints a table, writes JSON), ``info`` (versions
and backends).  Bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from stp_fast.train import commands


def _cmd_info(args: argparse.Namespace) -> int:
    from stp_fast import info

    data = info.collect()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(info.render(data))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    import torch

    from stp_fast import info

    bench = importlib.import_module(f"stp_fast.bench.{args.what}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("stp-fast bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    env = info.collect()
    where = env["gpu"] or f"CPU, {env['cpu_threads']} threads"
    print(f"{args.what} benchmark -- measured now on {where}, torch {env['torch']}, {args.dtype}; "
          f"p50 of repeated runs")  # fmt: skip
    start = time.perf_counter()
    rows = bench.run(quick=args.quick, device=device, dtype=dtype)
    print(bench.render(rows))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json:
        record = {
            "benchmark": args.what,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["stp-fast", *sys.argv[1:]]),
            "device": where,
            "torch": env["torch"],
            "triton": env["triton"],
            "rows": rows,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


BENCHMARKS = ["masked_linear", "masked_conv2d", "multi_subnet", "forward_many", "step"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stp-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parsers(sub)

    p = sub.add_parser("info", help="versions, compiled kernels and the backend each op uses")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="run a benchmark, print its table (and optionally write JSON)")
    p.add_argument("what", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when visible, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the rows, device and command as JSON")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except commands.UsageError as exc:
        print(f"stp-fast {args.command}: error: {exc}", file=sys.stderr)
        return commands.EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
