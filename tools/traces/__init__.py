"""Synthetic request traces in Mooncake's format, for the benchmarks (see generate.py)."""
