"""`kvctl top`: a live view of one node, redrawn every interval: each tier's usage bar, and hits,
lookups and evictions per second computed from the counters' change between two refreshes.

Called by `kvctl.main`. The clock and the sleep are passed in, so a test runs it without
waiting; `iterations` stops it after that many refreshes, Ctrl-C at any time. On a terminal each
frame replaces the last (ANSI clear screen); otherwise frames follow each other, and `--json`
writes one JSON object per line and refresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from kvstore.client import Client, NodeStatus
from kvstore.kvctl import render
from kvstore.kvctl.render import JsonObject
from kvstore.types import TierKind

CLEAR_SCREEN = "\x1b[H\x1b[2J"


@dataclass(frozen=True, slots=True)
class Sample:
    """One refresh: the node's status and when (the passed-in clock, in seconds) it was taken."""

    at_s: float
    status: NodeStatus


@dataclass(frozen=True, slots=True)
class Rates:
    """Counter changes per second between two samples (0 where a counter went back: a restart)."""

    interval_s: float
    lookups_per_s: float
    hits_per_s: float
    evictions_per_s: float
    tier_hits_per_s: Mapping[TierKind, float]
    tier_evictions_per_s: Mapping[TierKind, float]
    hit_ratio: float | None  # of the blocks looked up in the interval; None when none were


def rates(previous: Sample, current: Sample) -> Rates:
    elapsed_s = max(current.at_s - previous.at_s, 1e-9)

    def per_s(before: int, after: int) -> float:
        return max(after - before, 0) / elapsed_s

    before_tiers = {tier.kind: tier for tier in previous.status.tiers}
    tier_hits, tier_evictions = {}, {}
    for tier in current.status.tiers:
        before = before_tiers.get(tier.kind)
        tier_hits[tier.kind] = per_s(before.hits if before else 0, tier.hits)
        tier_evictions[tier.kind] = per_s(before.evictions if before else 0, tier.evictions)
    old, new = previous.status, current.status
    hit_blocks = max(new.lookup_hit_blocks - old.lookup_hit_blocks, 0)
    miss_blocks = max(new.lookup_miss_blocks - old.lookup_miss_blocks, 0)
    return Rates(
        interval_s=current.at_s - previous.at_s,
        lookups_per_s=per_s(old.lookups, new.lookups),
        hits_per_s=sum(tier_hits.values()),
        evictions_per_s=sum(tier_evictions.values()),
        tier_hits_per_s=tier_hits,
        tier_evictions_per_s=tier_evictions,
        hit_ratio=hit_blocks / (hit_blocks + miss_blocks) if hit_blocks + miss_blocks else None,
    )


def frame_text(status: NodeStatus, change: Rates | None, address: str) -> str:
    """One screen: a header, a row per tier, and the node-wide rates ("-" on the first frame)."""
    header = f"kvctl top - node {status.node_id} at {address}, up {render.format_duration(status.uptime_s)}"
    if status.is_draining:
        header += ", DRAINING"
    lines = [
        header,
        f"blocks {status.num_blocks}  leases {status.num_leases}  reservations {status.num_reservations}",
        "",
    ]
    rows = []
    for tier in status.tiers:
        fraction = tier.used_bytes / tier.capacity_bytes if tier.capacity_bytes else 0.0
        rows.append(
            [
                render.tier_name(tier.kind),
                render.usage_bar(fraction),
                f"{100 * fraction:.1f}%",
                f"{render.format_bytes(tier.used_bytes)} / {render.format_bytes(tier.capacity_bytes)}",
                str(tier.num_blocks),
                _rate(change.tier_hits_per_s.get(tier.kind) if change else None),
                _rate(change.tier_evictions_per_s.get(tier.kind) if change else None),
            ]
        )
    headers = ["TIER", "USAGE", "FULL", "USED / CAPACITY", "BLOCKS", "HITS/S", "EVICTIONS/S"]
    lines.append(render.table(headers, rows, right=[False, False, True, True, True, True, True]))
    lines.append("")
    if change is None:
        lines.append("lookups/s -  hits/s -  evictions/s -  (rates from the next refresh on)")
    else:
        ratio = "-" if change.hit_ratio is None else f"{100 * change.hit_ratio:.1f}%"
        lines.append(
            f"lookups/s {_rate(change.lookups_per_s)}  hits/s {_rate(change.hits_per_s)}  "
            f"evictions/s {_rate(change.evictions_per_s)}  lookup hit ratio {ratio}"
        )
    return "\n".join(lines)


def frame_json(sample: Sample, change: Rates | None, address: str) -> JsonObject:
    rates_document: JsonObject | None = None
    if change is not None:
        rates_document = {
            "interval_s": change.interval_s,
            "lookups_per_s": change.lookups_per_s,
            "hits_per_s": change.hits_per_s,
            "evictions_per_s": change.evictions_per_s,
            "lookup_hit_ratio": change.hit_ratio,
            "tiers": {
                kind.label: {"hits_per_s": hits, "evictions_per_s": change.tier_evictions_per_s.get(kind, 0.0)}
                for kind, hits in change.tier_hits_per_s.items()
            },
        }
    status = render.node_status_json(sample.status, address)
    return {"at_s": sample.at_s, "status": status, "rates": rates_document}


def run(
    client: Client,
    out: TextIO,
    *,
    interval_s: float,
    iterations: int | None,
    as_json: bool,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> int:
    """Refresh until `iterations` frames were drawn (None: until Ctrl-C); returns the exit code."""
    is_terminal = out.isatty() and not as_json
    previous: Sample | None = None
    count = 0
    try:
        while iterations is None or count < iterations:
            if previous is not None:
                sleep(max(0.0, previous.at_s + interval_s - clock()))
            sample = Sample(clock(), client.status())
            change = rates(previous, sample) if previous is not None else None
            if as_json:
                out.write(json.dumps(frame_json(sample, change, client.address)) + "\n")
            else:
                separator = CLEAR_SCREEN if is_terminal else ("\n" if count else "")
                out.write(separator + frame_text(sample.status, change, client.address) + "\n")
            out.flush()
            previous, count = sample, count + 1
    except KeyboardInterrupt:
        out.write("\n")
    return 0


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
