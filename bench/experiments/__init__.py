"""Accuracy experiments: what EXPERIMENTS.md cites (run from the repository root:
python -m bench.experiments.map_variants --help)."""
