"""Benchmarks: each tool measures against references taken in the same run (DESIGN.md)."""
