"""Speed, memory, parity and throughput benchmarks: what BENCHMARKS.md cites (run from the repository root:
python -m bench.speed.throughput --help)."""
