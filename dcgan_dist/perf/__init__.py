"""Measuring speed and correctness across devices: the benchmark harness, the GPU report, the N x B == 1 x NB check."""
