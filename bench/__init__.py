"""Benchmarks in two rooms, run from the repository root:

- ``bench.speed``: speed, memory, parity and throughput (BENCHMARKS.md),
  e.g. ``python -m bench.speed.throughput --help``;
- ``bench.experiments``: accuracy experiments (EXPERIMENTS.md),
  e.g. ``python -m bench.experiments.map_variants --help``;
- ``bench.common``: the helpers more than one script uses.
"""
