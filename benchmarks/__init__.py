"""Benchmark scripts of pem_kernels and the harness they share (``benchmarks.harness``)."""
