"""Cluster placement (issue 5)."""
