"""Benchmarks (scripts, not tests): run `python -m pymoe.bench --help`."""
