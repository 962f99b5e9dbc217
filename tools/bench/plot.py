"""A picture of a benchmark's data-path figures: each one's ratio to its reference, with the
issue's target where there is one. Written next to docs/benchmarks.md by the tools that own
the figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to a file
import matplotlib.pyplot as plt

from tools.bench.harness import Figure


def plot_ratios(figures: list[Figure], group: str, title: str, path: Path) -> None:
    """Horizontal bars of the ratio of every figure of `group` to its first reference."""
    rows: dict[str, Figure] = {}
    for figure in figures:
        if figure.group == group:
            rows.setdefault(figure.name, figure)  # the first row of a measurement: its main reference
    names = list(rows)[::-1]
    ratios = [rows[name].ratio for name in names]
    colours = [_colour(rows[name].status) for name in names]
    height = 0.32 * len(names) + 1.2
    fig, axes = plt.subplots(figsize=(8, height))
    axes.barh(names, ratios, color=colours)
    for position, name in enumerate(names):
        target = _target_limit(rows[name].target)
        if target is not None:
            axes.plot([target, target], [position - 0.4, position + 0.4], color="black", linewidth=2)
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("ratio to the reference measured in the same run (black tick: target)")
    axes.set_title(title)
    axes.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _colour(status: str) -> str:
    return {"PASS": "#3a7d44", "FAIL": "#c0392b"}.get(status, "#7f8c8d")


def _target_limit(target: str) -> float | None:
    """The number in a target such as '>= 0.8x'."""
    digits = "".join(ch for ch in target if ch.isdigit() or ch == ".")
    return float(digits) if digits and target.endswith("x") else None
