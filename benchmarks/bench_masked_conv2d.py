"""masked_conv2d vs pre-sliced and masked dense F.conv2d (see stp_fast.bench.masked_conv2d).
Run: ``make bench`` or ``pytest benchmarks/bench_masked_conv2d.py -m benchmark``."""

from _harness import benchmark_test

from stp_fast.bench import masked_conv2d

test_masked_conv2d = benchmark_test(masked_conv2d)
