"""A picture of a simulation table: mean TTFT and SLO attainment per policy, per rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conductor.simulate.report import Summary


def plot_summaries(summaries: Sequence[Summary], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - a development dependency, only when a plot is asked for

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:  # matplotlib is a development dependency
        raise SystemExit("conductor simulate --plot needs matplotlib: pip install matplotlib") from None
    policies = list(dict.fromkeys(s.placement for s in summaries))
    scales = sorted({s.rate_scale for s in summaries})
    by = {(s.placement, s.rate_scale): s for s in summaries}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(scales))
    for i, scale in enumerate(scales):
        xs = [p + i * width for p in range(len(policies))]
        left.bar(
            xs, [by[(p, scale)].ttft_mean_s if (p, scale) in by else 0 for p in policies], width, label=f"{scale:g}x"
        )
        right.bar(xs, [by[(p, scale)].attainment * 100 if (p, scale) in by else 0 for p in policies], width)
    for axes, label in ((left, "mean TTFT (s)"), (right, "requests meeting both SLOs (%)")):
        axes.set_xticks([p + width * (len(scales) - 1) / 2 for p in range(len(policies))], policies, rotation=20)
        axes.set_ylabel(label)
    left.set_yscale("log")
    left.legend(title="arrival rate")
    fig.suptitle("conductor simulate: placement policies on the trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
