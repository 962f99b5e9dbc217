"""What a simulation run says: latency percentiles, SLO attainment, reuse, bytes moved, and
goodput (the fastest arrival rate at which enough requests still meet both SLOs).

Rejected requests count against attainment (they did not meet their SLO) and are left out of
the latency figures (they have none)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from conductor.costs import DEFAULT_COSTS, CostModel
from conductor.simulate.sim import SimConfig, SimResult, simulate
from kvstore.trace import TraceRequest

GOODPUT_ATTAINMENT = 0.9  # the share of requests that must meet both SLOs


@dataclass(frozen=True, slots=True)
class Summary:
    placement: str
    rate_scale: float
    requests: int
    rejected: int
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tbt_mean_s: float
    tbt_p99_s: float
    attainment: float  # share of all requests meeting both SLOs
    reuse: float  # prompt tokens not computed, over prompt tokens (served requests)
    fetched_reuse: float  # of those, the share fetched from another node
    fetched_gb: float
    handoff_gb: float
    decision_p50_us: float
    decision_p99_us: float
    wall_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(result: SimResult) -> Summary:
    outcomes = result.outcomes
    served = [o for o in outcomes if not o.rejected]
    ttft = [o.ttft_s for o in served]
    tbt = [o.tbt_s for o in served if o.output_tokens]
    prompt = sum(o.prompt_tokens for o in served)
    reused = sum(o.reused_tokens for o in served)
    decisions = [o.decision_us for o in outcomes]
    slo = result.config.slo
    return Summary(
        placement=result.config.label,
        rate_scale=result.config.rate_scale,
        requests=len(outcomes),
        rejected=len(outcomes) - len(served),
        ttft_mean_s=statistics.fmean(ttft) if ttft else math.nan,
        ttft_p50_s=percentile(ttft, 0.5),
        ttft_p90_s=percentile(ttft, 0.9),
        ttft_p99_s=percentile(ttft, 0.99),
        tbt_mean_s=statistics.fmean(tbt) if tbt else math.nan,
        tbt_p99_s=percentile(tbt, 0.99),
        attainment=sum(o.meets(slo) for o in outcomes) / len(outcomes) if outcomes else math.nan,
        reuse=reused / prompt if prompt else 0.0,
        fetched_reuse=sum(o.fetched_tokens for o in served) / reused if reused else 0.0,
        fetched_gb=result.fetched_bytes / 1e9,
        handoff_gb=result.handoff_bytes / 1e9,
        decision_p50_us=percentile(decisions, 0.5),
        decision_p99_us=percentile(decisions, 0.99),
        wall_s=result.wall_s,
    )


@dataclass(frozen=True, slots=True)
class Goodput:
    placement: str
    rate_scale: float  # the largest scale found that meets the attainment (0 when none tried did)
    requests_per_s: float
    tried: tuple[tuple[float, float], ...]  # (scale, attainment) of every run, in order


def goodput(
    config: SimConfig,
    trace: Sequence[TraceRequest],
    costs: CostModel = DEFAULT_COSTS,
    *,
    start: float = 1.0,
    precision: float = 0.05,
    on_run: Callable[[float, Summary], None] | None = None,
) -> Goodput:
    """The largest rate scale at which >= 90% of requests meet both SLOs, to within
    `precision` (relative): doubling (or halving) from `start` to bracket it, then bisecting."""
    tried: list[tuple[float, float]] = []

    def meets(scale: float) -> bool:
        summary = summarize(simulate(replace(config, rate_scale=scale), trace, costs))
        tried.append((scale, summary.attainment))
        if on_run is not None:
            on_run(scale, summary)
        return summary.attainment >= GOODPUT_ATTAINMENT

    low, high = 0.0, start
    if meets(start):
        low, high = start, start * 2
        while meets(high):
            low, high = high, high * 2
    else:
        while high > start / 64:
            high /= 2
            if meets(high):
                low, high = high, high * 2
                break
    while low and (high - low) / low > precision:
        middle = (low + high) / 2
        if meets(middle):
            low = middle
        else:
            high = middle
    duration_s = (trace[-1].timestamp_ms - trace[0].timestamp_ms) / 1000 if len(trace) > 1 else 0.0
    rate = len(trace) * low / duration_s if duration_s else math.nan
    return Goodput(config.label, low, rate, tuple(tried))


def markdown_table(summaries: Sequence[Summary], goodputs: dict[str, Goodput] | None = None) -> str:
    """One row per summary; the goodput column when given (by placement)."""
    header = (
        "| placement | rate | TTFT mean s | p50 | p90 | p99 | TBT mean ms | p99 | SLO met | rejected "
        "| reuse | of it fetched | fetched TB | decision p50/p99 us |"
    )
    rule = "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    if goodputs:
        header += " goodput req/s (scale) |"
        rule += "--:|"
    lines = [header, rule]
    for s in summaries:
        row = (
            f"| {s.placement} | {s.rate_scale:g}x | {s.ttft_mean_s:.2f} | {s.ttft_p50_s:.2f} | {s.ttft_p90_s:.2f} "
            f"| {s.ttft_p99_s:.2f} | {s.tbt_mean_s * 1e3:.1f} | {s.tbt_p99_s * 1e3:.1f} | {s.attainment:.1%} "
            f"| {s.rejected} | {s.reuse:.1%} | {s.fetched_reuse:.1%} | {s.fetched_gb / 1e3:.2f} "
            f"| {s.decision_p50_us:.0f}/{s.decision_p99_us:.0f} |"
        )
        if goodputs:
            g = goodputs.get(s.placement)
            row += f" {g.requests_per_s:.2f} ({g.rate_scale:.2f}x) |" if g else " |"
        lines.append(row)
    return "\n".join(lines)
