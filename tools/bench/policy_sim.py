"""Replaying a request trace through a cache policy over a simulated tier of C blocks.

This is the mechanism of the policy benchmark (tools/bench/policy.py), and it runs the store's
own code: the policy object the tier manager would hold (any `EvictionPolicy`) over a
`SimulatedTier` (kvstore/policy/simulated.py: the real `BlockTable`, driven in the order the
tier manager drives it; its docstring gives the per-request steps). A request's hit is the run
of its leading hash ids resident in the tier, looked up before its own blocks are inserted.

`belady` computes the offline optimum for the same model; see its docstring.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidArgumentError
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.simulated import TIER, SimulatedTier, block_key
from kvstore.trace import TRACE_BLOCK_TOKENS, TraceRequest

__all__ = ["BELADY", "TIER", "ReplayResult", "SimulatedTier", "belady", "block_key", "replay"]

BELADY = "belady (offline optimum)"


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one replay of a trace at one capacity reused, and what the policy's calls cost."""

    policy: str
    capacity_blocks: int
    num_requests: int
    requested_blocks: int
    hit_blocks: int
    input_tokens: int
    hit_tokens: int  # per request min(hit blocks * 512, input_length)
    policy_s: float  # time spent inside the policy's methods; 0 for the offline optimum

    @property
    def block_hit_ratio(self) -> float:
        return self.hit_blocks / self.requested_blocks if self.requested_blocks else 0.0

    @property
    def token_hit_ratio(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def policy_us_per_request(self) -> float:
        return self.policy_s * 1e6 / self.num_requests if self.num_requests else 0.0

    @property
    def policy_us_per_access(self) -> float:
        """Per block of a request (looked up, then hit or stored)."""
        return self.policy_s * 1e6 / self.requested_blocks if self.requested_blocks else 0.0


class _Totals:
    """Running sums of a replay."""

    def __init__(self) -> None:
        self.num_requests = self.requested_blocks = self.hit_blocks = self.input_tokens = self.hit_tokens = 0

    def add(self, request: TraceRequest, hits: int) -> None:
        self.num_requests += 1
        self.requested_blocks += len(request.hash_ids)
        self.hit_blocks += hits
        self.input_tokens += request.input_length
        self.hit_tokens += min(hits * TRACE_BLOCK_TOKENS, request.input_length)

    def result(self, policy: str, capacity_blocks: int, policy_s: float) -> ReplayResult:
        return ReplayResult(
            policy,
            capacity_blocks,
            self.num_requests,
            self.requested_blocks,
            self.hit_blocks,
            self.input_tokens,
            self.hit_tokens,
            policy_s,
        )


def replay(trace: Iterable[TraceRequest], policy: EvictionPolicy, capacity_blocks: int) -> ReplayResult:
    """Serve every request of `trace` from an empty tier of `capacity_blocks` under `policy`."""
    tier = SimulatedTier(policy, capacity_blocks)
    totals = _Totals()
    for request in trace:
        totals.add(request, tier.serve(request.hash_ids))
    return totals.result(policy.name, capacity_blocks, tier.policy_ns / 1e9)


def belady(trace: Sequence[TraceRequest], capacity_blocks: int) -> ReplayResult:
    """The offline optimum of the replay model: most hit blocks any policy could get.

    Definition. Each block of a request, root first, gets the key (next use, depth): the index
    of the next request whose chain contains it (never = len(trace)) and its position in the
    chain. Hits are counted as in `replay` (the leading resident run, before any insertion).
    Then each block of the request in order: a resident one takes its new key; a missing one is
    inserted when there is room, else it replaces the resident block of largest key when its
    own key is smaller, else it is bypassed (not stored).

    Why this is optimal. Ids are chained (an id stands for its whole prefix), so any request that
    uses a block uses its parent: next use(parent) <= next use(child), and depth breaks the tie,
    so a parent's key is always below its child's. Farthest-key eviction therefore never evicts
    a parent before its child, and bypass never stores a child without its parent: the resident
    set stays closed under ancestors, so every resident block of a chain is in its leading run
    and prefix-consistent hits equal plain hits. Plain hits are bounded by Belady's MIN with
    bypass (optimal for unit-size blocks), and a prefix-consistent policy cannot beat the plain
    optimum; this schedule reaches it, so it is the optimum of both. On a trace whose ids are
    not chained the hits are still those of a valid schedule, but may fall short of optimal.
    """
    if capacity_blocks < 1:
        raise InvalidArgumentError(f"a simulated tier needs at least one block, got {capacity_blocks}")
    next_uses = _next_uses(trace)
    resident: dict[int, tuple[int, int]] = {}  # hash id -> its key (next use, depth)
    farthest: list[tuple[int, int, int]] = []  # max-heap of (-next use, -depth, id); stale entries skipped
    totals = _Totals()
    for request, upcoming in zip(trace, next_uses, strict=True):
        hits = 0
        while hits < len(request.hash_ids) and request.hash_ids[hits] in resident:
            hits += 1
        totals.add(request, hits)
        for depth, (hash_id, next_use) in enumerate(zip(request.hash_ids, upcoming, strict=True)):
            key = (next_use, depth)
            if hash_id not in resident and len(resident) >= capacity_blocks:
                while resident.get(farthest[0][2]) != (-farthest[0][0], -farthest[0][1]):
                    heapq.heappop(farthest)  # stale: evicted, or re-keyed since
                if key >= (-farthest[0][0], -farthest[0][1]):
                    continue  # bypass: every resident block is needed sooner
                del resident[heapq.heappop(farthest)[2]]
            resident[hash_id] = key
            heapq.heappush(farthest, (-next_use, -depth, hash_id))
    return totals.result(BELADY, capacity_blocks, 0.0)


def _next_uses(trace: Sequence[TraceRequest]) -> list[list[int]]:
    """For each request and each of its blocks, the index of the next request using that block
    (len(trace) when none does)."""
    never = len(trace)
    seen_next: dict[int, int] = {}
    result: list[list[int]] = [[] for _ in trace]
    for index in range(len(trace) - 1, -1, -1):
        ids = trace[index].hash_ids
        result[index] = [seen_next.get(hash_id, never) for hash_id in ids]
        for hash_id in ids:
            seen_next[hash_id] = index
    return result
