"""Reference points for the cache policy: what a policy could reach if it knew more than an
online policy can (issue 4; docs/policy.md, "How far from the optimum").

    .venv/bin/python tools/bench/policy_bounds.py [--trace PATH] [--capacities 1000,10000] [--doc]

The policy benchmark (tools/bench/policy.py) compares the store's policies with the offline
optimum. This tool asks where the gap between them comes from, on the same replay model (unit
blocks, a request hits its leading resident blocks, looked up before its own are stored):

- **Reuse by age.** For every block access, the age of the block's next access (in block
  accesses of the trace), by how often the block had been used: the hazard table says how
  likely a block that has waited so long is to be used within the next 1k accesses, and how
  likely ever. A rising hazard is a signal an age-aware policy can use.
- **Turn gaps.** Whether the gap between a conversation's last two turns tells whether, and
  when, the next turn comes.
- **Three idealised caches**, each told something no online policy knows, and spared the
  store's constraints (no leaf-first rule, an unlimited history of every block):
  - `whether-oracle LRU` knows whether each block will ever be used again and stores only those;
  - `age-class density` knows the trace's whole reuse-age distribution per class (prior uses,
    and whether the block ends its request) and keeps the blocks of highest hit density: hits
    per block-access of space held, the rank of LHD (Beckmann et al., NSDI 2018); a block's
    own future stays unknown to it;
  - `frozen most-used` knows each block's use count over the trace and keeps the C most used
    once stored, bypassing all others.
- **The store's policies and the optimum** in the same run: `prefix-lrfu`, `leaf-first-lru`
  (tools/bench/policy_sim.py, the real policy objects) and Belady with bypass.

Prints the tables; with `--doc` writes them into docs/policy.md between its markers.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed

if not __package__:  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.policy import POLICIES
from kvstore.trace import TraceRequest
from tools.bench import harness
from tools.bench.policy import DEFAULT_TRACE, DOC_HEADER, DOC_PATH, load_trace_or_exit, parse_capacities
from tools.bench.policy_sim import belady, replay

DEFAULT_CAPACITIES = (1000, 10000)
BEGIN_MARKER, END_MARKER = "<!-- bench:policy-bounds:begin -->", "<!-- bench:policy-bounds:end -->"
STORE_POLICIES = ("prefix-lrfu", "leaf-first-lru")

MAX_USES_CLASS = 4  # prior uses are counted 1, 2, 3 and "4 or more"
NUM_CLASSES = 2 * MAX_USES_CLASS  # the age-class density cache's: uses so far, and whether the block ends its request
NEVER = -1  # the age of an access whose block is not used again
HAZARD_EDGES = (0, 1000, 2000, 4000, 8000, 16000, 32000, 64000)  # age buckets of the hazard table (block accesses)
DENSITY_SCALES = ((512, 256), (2048, 64), (8192, 16))  # (bucket width, buckets): each spans 131,072 accesses
DENSITY_SAMPLE = 64  # resident blocks compared per eviction, as LHD samples


@dataclass(frozen=True, slots=True)
class ReuseProfile:
    """Per block access of a trace: how often its block had been used (this one included,
    capped at MAX_USES_CLASS), whether it was the last block of its request, and the number of
    block accesses until the block's next use (NEVER when there is none)."""

    uses: npt.NDArray[np.int8]
    ends_request: npt.NDArray[np.bool_]
    age: npt.NDArray[np.int64]


def reuse_profile(requests: Sequence[TraceRequest]) -> ReuseProfile:
    """One pass over the trace's block accesses, root first, one tick each."""
    total = sum(len(request.hash_ids) for request in requests)
    uses = np.zeros(total, dtype=np.int8)
    ends = np.zeros(total, dtype=np.bool_)
    age = np.full(total, NEVER, dtype=np.int64)
    previous: dict[int, int] = {}  # hash id -> its last access
    counts: dict[int, int] = {}
    tick = 0
    for request in requests:
        ids = request.hash_ids
        for position, hash_id in enumerate(ids):
            if (before := previous.get(hash_id)) is not None:
                age[before] = tick - before
            previous[hash_id] = tick
            counts[hash_id] = count = counts.get(hash_id, 0) + 1
            uses[tick] = min(count, MAX_USES_CLASS)
            ends[tick] = position == len(ids) - 1
            tick += 1
    return ReuseProfile(uses, ends, age)


@dataclass(frozen=True, slots=True)
class HazardRow:
    """Accesses of blocks used `uses` times so far (MAX_USES_CLASS: that many or more)."""

    uses: int
    accesses: int
    reused: float  # share used again
    per_1k: list[float]  # per age bucket: reuses within it per 1k accesses, of those still waiting at its start
    ever: list[float]  # per age bucket: share used again at all, of those still waiting at its start


def hazard_table(profile: ReuseProfile, edges: Sequence[int] = HAZARD_EDGES) -> list[HazardRow]:
    """Reuse by age since the last use, per prior-use count; the last bucket is open-ended."""
    rows = []
    for uses in range(1, MAX_USES_CLASS + 1):
        ages = profile.age[profile.uses == uses]
        if not len(ages):
            continue
        reused = ages[ages != NEVER]
        per_1k, ever = [], []
        for start, end in zip(edges, [*edges[1:], None], strict=True):
            waiting = len(ages) - int(np.count_nonzero(reused < start))
            later = reused[reused >= start]
            within = int(np.count_nonzero(later < end)) if end is not None else len(later)
            width = (end - start) if end is not None else max(1, int(later.max(initial=start)) - start)
            per_1k.append(1000 * within / waiting / width if waiting else 0.0)
            ever.append(len(later) / waiting if waiting else 0.0)
        rows.append(HazardRow(uses, len(ages), len(reused) / len(ages), per_1k, ever))
    return rows


def density_classes(profile: ReuseProfile) -> npt.NDArray[np.intp]:
    """The class of each access for the age-class density cache: (prior uses - 1) * 2 + ends request."""
    classes: npt.NDArray[np.intp] = (profile.uses.astype(np.intp) - 1) * 2 + profile.ends_request
    return classes


def hit_density(profile: ReuseProfile, width: int, buckets: int) -> npt.NDArray[np.float64]:
    """[class, age bucket] -> the highest hit density a block of that class and age can reach:
    over every horizon h, the reuses expected within h over the block-accesses of space the
    waiting blocks hold until then (LHD's rank, with the distribution known). Ages past the last
    bucket count as never reused."""
    classes = density_classes(profile)
    density = np.zeros((NUM_CLASSES, buckets))
    for klass in range(NUM_CLASSES):
        ages = profile.age[classes == klass]
        if not len(ages):
            continue
        reused = ages[(ages != NEVER) & (ages < width * buckets)] // width
        hits = np.bincount(reused, minlength=buckets).astype(np.float64)
        waiting = len(ages) - np.concatenate([[0.0], np.cumsum(hits)[:-1]])  # at each bucket's start
        for start in range(buckets):
            held = np.cumsum(waiting[start:])
            density[klass, start] = float(np.max(np.cumsum(hits[start:]) / held)) if held[-1] else 0.0
    return density


@dataclass(frozen=True, slots=True)
class TurnGaps:
    """Follow-up turns of a trace: a request whose leading blocks (past the root) were used by
    an earlier request continues the last request that used the deepest of them. For each, the
    gap to the turn it continues and the gap to its own next turn (the next request using its
    last full block, the one before its last), in block accesses; NEVER when none comes."""

    previous: npt.NDArray[np.int64]
    following: npt.NDArray[np.int64]

    def log_correlation(self) -> float:
        """Of the two gaps' logarithms, over the turns that have a next one."""
        both = self.following != NEVER
        if np.count_nonzero(both) < 2:
            return float("nan")
        return float(np.corrcoef(np.log(self.previous[both]), np.log(self.following[both]))[0, 1])


def turn_gaps(requests: Sequence[TraceRequest]) -> TurnGaps:
    starts = np.cumsum([0] + [len(request.hash_ids) for request in requests])
    last_user: dict[int, int] = {}  # hash id -> the last request that used it
    continues: dict[int, int] = {}  # follow-up request -> the request it continues
    for index, request in enumerate(requests):
        ids = request.hash_ids
        seen = 0
        while seen < len(ids) and ids[seen] in last_user:
            seen += 1
        if seen >= 2 and len(ids) >= 2:
            continues[index] = last_user[ids[seen - 1]]
        for hash_id in ids:
            last_user[hash_id] = index
    next_user: dict[int, int] = {}
    following_request: dict[int, int] = {}
    for index in range(len(requests) - 1, -1, -1):
        ids = requests[index].hash_ids
        if index in continues:
            following_request[index] = next_user.get(ids[-2], NEVER)
        for hash_id in ids:
            next_user[hash_id] = index
    follow_ups = sorted(continues)
    previous = np.array([starts[index] - starts[continues[index]] for index in follow_ups], dtype=np.int64)
    following = np.array(
        [
            NEVER if (later := following_request[index]) == NEVER else starts[later] - starts[index]
            for index in follow_ups
        ],
        dtype=np.int64,
    )
    return TurnGaps(previous, following)


class _Cache(Protocol):
    def __contains__(self, hash_id: int) -> bool: ...

    def serve(self, index: int, tick: int, ids: Sequence[int]) -> None:
        """Request `index` (its first block access is `tick`) after its hits were counted."""


def replay_ideal(requests: Sequence[TraceRequest], cache: _Cache) -> int:
    """Block hits of `cache` over the trace: each request's leading resident run."""
    hits = tick = 0
    for index, request in enumerate(requests):
        ids = request.hash_ids
        run = 0
        while run < len(ids) and ids[run] in cache:
            run += 1
        hits += run
        cache.serve(index, tick, ids)
        tick += len(ids)
    return hits


class WhetherOracleLRU:
    """LRU over the blocks that will be used again; a block at its last use is dropped, or not stored."""

    def __init__(self, capacity: int, profile: ReuseProfile) -> None:
        self._capacity = capacity
        self._age = profile.age
        self._order: OrderedDict[int, None] = OrderedDict()  # least recent first

    def __contains__(self, hash_id: int) -> bool:
        return hash_id in self._order

    def serve(self, index: int, tick: int, ids: Sequence[int]) -> None:
        for position in range(len(ids) - 1, -1, -1):  # leaf first: the root ends most recent
            hash_id = ids[position]
            if self._age.item(tick + position) == NEVER:
                self._order.pop(hash_id, None)
                continue
            self._order[hash_id] = None
            self._order.move_to_end(hash_id)
            if len(self._order) > self._capacity:
                self._order.popitem(last=False)


class FrozenMostUsed:
    """The `capacity` blocks used most over the trace (ties: the earlier first seen), stored at
    their first use and never evicted; every other block bypassed."""

    def __init__(self, capacity: int, requests: Sequence[TraceRequest]) -> None:
        counts: dict[int, int] = {}
        for request in requests:
            for hash_id in request.hash_ids:
                counts[hash_id] = counts.get(hash_id, 0) + 1
        order = sorted(counts, key=lambda hash_id: -counts[hash_id])  # stable: first seen first among ties
        self._chosen = set(order[:capacity])
        self._stored: set[int] = set()

    def __contains__(self, hash_id: int) -> bool:
        return hash_id in self._stored

    def serve(self, index: int, tick: int, ids: Sequence[int]) -> None:
        self._stored.update(hash_id for hash_id in ids if hash_id in self._chosen)


class AgeClassDensity:
    """Keeps the blocks of highest hit density by class and age (`hit_density`). When full, a
    new block replaces the lowest-density of DENSITY_SAMPLE resident blocks drawn at random,
    unless its own density is lower (then it is not stored)."""

    def __init__(self, capacity: int, profile: ReuseProfile, width: int, buckets: int, seed: int = 0) -> None:
        self._capacity = capacity
        self._classes = density_classes(profile)
        self._density = hit_density(profile, width, buckets)
        self._width, self._last_bucket = width, buckets - 1
        self._rng = np.random.default_rng(seed)
        self._slots = np.zeros(capacity, dtype=np.int64)  # slot -> hash id
        self._slot_of: dict[int, int] = {}
        self._last_tick: dict[int, int] = {}  # hash id -> its last access
        self._last_class: dict[int, int] = {}
        self._tick_of_slot = np.zeros(capacity, dtype=np.int64)  # the resident block's last access
        self._class_of_slot = np.zeros(capacity, dtype=np.intp)

    def __contains__(self, hash_id: int) -> bool:
        return hash_id in self._slot_of

    def serve(self, index: int, tick: int, ids: Sequence[int]) -> None:
        for position, hash_id in enumerate(ids):
            now = tick + position
            klass = int(self._classes[now])
            slot = self._slot_of.get(hash_id)
            if slot is None:
                slot = self._place(hash_id, now, klass)
            if slot is not None:
                self._tick_of_slot[slot], self._class_of_slot[slot] = now, klass

    def _place(self, hash_id: int, now: int, klass: int) -> int | None:
        if len(self._slot_of) < self._capacity:
            slot = len(self._slot_of)
        else:
            drawn = self._rng.integers(0, self._capacity, DENSITY_SAMPLE)
            ages = np.minimum((now - self._tick_of_slot[drawn]) // self._width, self._last_bucket)
            densities = self._density[self._class_of_slot[drawn], ages]
            lowest = int(np.argmin(densities))
            if self._density[klass, 0] < densities[lowest]:
                return None
            slot = int(drawn[lowest])
            del self._slot_of[int(self._slots[slot])]
        self._slots[slot] = hash_id
        self._slot_of[hash_id] = slot
        return slot


@dataclass(frozen=True, slots=True)
class Reference:
    capacity: int
    name: str
    knows: str
    hit_blocks: int
    requested_blocks: int

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.requested_blocks if self.requested_blocks else 0.0


def references(requests: Sequence[TraceRequest], capacity: int, profile: ReuseProfile) -> list[Reference]:
    """Every reference point at one capacity, the optimum first."""
    total = sum(len(request.hash_ids) for request in requests)
    density_hits, density_width = max(
        (replay_ideal(requests, AgeClassDensity(capacity, profile, width, buckets)), width)
        for width, buckets in DENSITY_SCALES
    )
    widths = [width for width, _ in DENSITY_SCALES]
    points = [
        ("belady (offline optimum)", "every block's next use", belady(requests, capacity).hit_blocks),
        (
            "whether-oracle LRU",
            "whether each block is used again",
            replay_ideal(requests, WhetherOracleLRU(capacity, profile)),
        ),
        (
            "age-class density",
            f"the reuse-age distribution per class (best of bucket widths {widths}: {density_width})",
            density_hits,
        ),
        ("frozen most-used", "each block's use count", replay_ideal(requests, FrozenMostUsed(capacity, requests))),
    ]
    for name in STORE_POLICIES:
        points.append((name, "nothing (the store's policy)", replay(requests, POLICIES[name](), capacity).hit_blocks))
    return [Reference(capacity, name, knows, hits, total) for name, knows, hits in points]


def hazard_markdown(rows: Sequence[HazardRow], edges: Sequence[int] = HAZARD_EDGES) -> str:
    labels = [f"{start // 1000}k-{end // 1000}k" for start, end in itertools.pairwise(edges)]
    labels.append(f"{edges[-1] // 1000}k+")
    head = "| uses so far | accesses | used again | " + " | ".join(labels) + " |"
    lines = [head, "|---:|---:|---:|" + "---:|" * len(labels)]
    for row in rows:
        uses = f"{row.uses}+" if row.uses == MAX_USES_CLASS else str(row.uses)
        cells = [f"{rate:.3f} ({ever:.2f})" for rate, ever in zip(row.per_1k, row.ever, strict=True)]
        lines.append(f"| {uses} | {row.accesses} | {row.reused:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def turn_gaps_markdown(gaps: TurnGaps, edges: Sequence[int] = HAZARD_EDGES) -> str:
    lines = [
        f"{len(gaps.previous)} follow-up turns; the logs of the gap before and the gap after correlate "
        f"at {gaps.log_correlation():.2f}.",
        "",
        "| gap to the turn before (block accesses) | turns | with a next turn | next gap, median |",
        "|---|---:|---:|---:|",
    ]
    for start, end in zip(edges, [*edges[1:], None], strict=True):
        chosen = (gaps.previous >= start) & (gaps.previous < end if end is not None else True)
        if not chosen.any():
            continue
        after = gaps.following[chosen]
        later = after[after != NEVER]
        median = f"{np.median(later):.0f}" if len(later) else "-"
        label = f"{start // 1000}k-{end // 1000}k" if end is not None else f"{start // 1000}k+"
        lines.append(f"| {label} | {len(after)} | {len(later) / len(after):.2f} | {median} |")
    return "\n".join(lines)


def references_markdown(found: Sequence[Reference]) -> str:
    optimum = {ref.capacity: ref.hit_ratio for ref in found if ref.name.startswith("belady")}
    lines = ["| capacity (blocks) | reference | knows | block hits % | x optimum |", "|---:|---|---|---:|---:|"]
    for ref in found:
        best = optimum[ref.capacity]
        share = f"{ref.hit_ratio / best:.2f}" if best else "-"
        lines.append(f"| {ref.capacity} | {ref.name} | {ref.knows} | {100 * ref.hit_ratio:.2f} | {share} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What a cache policy could reach if it knew more.")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="Mooncake-format trace (JSON lines)")
    parser.add_argument(
        "--capacities", default=",".join(map(str, DEFAULT_CAPACITIES)), help="tier sizes in blocks, comma-separated"
    )
    parser.add_argument("--doc", action="store_true", help=f"write the tables into {DOC_PATH.name}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    capacities = parse_capacities(args.capacities)
    trace_path = args.trace.resolve()
    requests = load_trace_or_exit(trace_path)
    profile = reuse_profile(requests)
    found: list[Reference] = []
    for capacity in tqdm(capacities, desc="capacities", unit="capacity"):
        found += references(requests, capacity, profile)
    hazard = hazard_markdown(hazard_table(profile))
    gaps = turn_gaps_markdown(turn_gaps(requests))
    table = references_markdown(found)
    print(hazard, gaps, table, sep="\n\n")
    if args.doc:
        command = "tools/bench/policy_bounds.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = "\n\n".join(
            [
                f"Written by `.venv/bin/python {command.strip()}` on {time.strftime('%Y-%m-%d')}, "
                f"{trace_path.name}: {len(requests)} requests, {len(profile.age)} block accesses.",
                "Reuse by age since the last use: per age bucket (in block accesses), the reuses within it "
                "per 1k accesses of the blocks still waiting at its start, and (in brackets) the share of "
                "those used again at all.",
                hazard,
                "Follow-up turns by the gap to the turn they continue: how many have a next turn, and after what gap.",
                gaps,
                table,
            ]
        )
        harness.write_doc_section(DOC_PATH, section, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        print(f"written: {DOC_PATH}")


if __name__ == "__main__":
    main()
