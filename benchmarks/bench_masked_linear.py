"""masked_linear vs pre-sliced and masked dense F.linear (see stp_fast.bench.masked_linear).
Run: ``make bench`` or ``pytest benchmarks/bench_masked_linear.py -m benchmark``."""

from _harness import benchmark_test

from stp_fast.bench import masked_linear

test_masked_linear = benchmark_test(masked_linear)
