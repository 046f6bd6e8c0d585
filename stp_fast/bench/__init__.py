"""Benchmarks shipped with the package (``stp-fast bench``); ``benchmarks/`` wraps the same cases
for pytest-benchmark.  Benchmarks measure and report; they never assert timings."""
