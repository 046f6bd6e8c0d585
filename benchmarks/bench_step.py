"""The STP training step (full + 4 subnets, KD losses, backward): stp_fast's forward_many against the
masked and sliced plain-PyTorch baselines (see stp_fast.bench.step).
Run: ``pytest benchmarks/bench_step.py -m benchmark``."""

from _harness import benchmark_test

from stp_fast.bench import step

test_step = benchmark_test(step)
