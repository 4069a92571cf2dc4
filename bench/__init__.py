"""Benchmarks and tuning scripts (bench/README.md); a package so that python -m bench.tune.<name> runs from the root."""
