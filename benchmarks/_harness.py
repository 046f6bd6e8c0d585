"""pytest-benchmark glue: turns a ``stp_fast.bench.<family>`` module (cases, PROVIDERS, MODES, setup)
into one parametrised benchmark test.  Timing only; nothing here asserts a timing."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def benchmark_test(bench: ModuleType):
    cases = bench.cases(device=DEVICE)

    @pytest.mark.benchmark
    @pytest.mark.parametrize("mode", bench.MODES)
    @pytest.mark.parametrize("provider", bench.PROVIDERS)
    @pytest.mark.parametrize("case", cases, ids=[c.label for c in cases])
    def test(benchmark, case, provider, mode):
        fn = bench.setup(case, provider, mode, device=DEVICE)
        sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
        benchmark.group = f"{case.label}-{mode}"
        benchmark.extra_info.update(device=DEVICE, flops=bench.flops(case, mode))
        benchmark.pedantic(lambda: (fn(), sync()), rounds=10, warmup_rounds=2)

    return test
