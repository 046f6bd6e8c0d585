"""pytest-benchmark wrapper around ``stp_fast.bench.masked_linear`` (same cases, same providers).

Run: ``make bench`` or ``pytest benchmarks/bench_masked_linear.py -m benchmark``; on a GPU machine
the CUDA cases are used.  Results are measurements only: nothing here asserts a timing.
For the plain table (also what ``make demo`` prints): ``stp-fast bench masked_linear``.
"""

import pytest
import torch

from stp_fast.bench import masked_linear as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench.cases(device=DEVICE)


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_masked_linear(benchmark, case, provider, mode):
    fn = bench.setup(case, provider, mode, device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.group = f"{case.label}-{mode}"
    benchmark.extra_info.update(density=case.density, device=DEVICE)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=10, warmup_rounds=2)
