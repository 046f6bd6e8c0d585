"""Full + 4 subnets in one multi-subnet op vs 5 sequential / masked calls (see stp_fast.bench.multi_subnet).
Run: ``make bench`` or ``pytest benchmarks/bench_multi_subnet.py -m benchmark``."""

from _harness import benchmark_test

from stp_fast.bench import multi_subnet

test_multi_subnet = benchmark_test(multi_subnet)
