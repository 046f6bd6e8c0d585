"""A supernet's forward_many (full + 4 subnets) vs a Python loop of per-arch passes
(see stp_fast.bench.forward_many). Run: ``pytest benchmarks/bench_forward_many.py -m benchmark``."""

from _harness import benchmark_test

from stp_fast.bench import forward_many

test_forward_many = benchmark_test(forward_many)
