"""The policy replay (tools/bench/policy_sim.py): exact hits on hand-worked traces, the offline
optimum against an exhaustive search, and the store's invariants on random traces."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.policy import LeafFirstLRU
from kvstore.table import NO_TIER
from kvstore.trace import TraceRequest
from tools.bench.policy_sim import TIER, SimulatedTier, belady, block_key, replay


def trace_of(*chains: list[int], input_length: int | None = None) -> list[TraceRequest]:
    return [
        TraceRequest(index, input_length if input_length is not None else 512 * len(chain), 1, tuple(chain))
        for index, chain in enumerate(chains)
    ]


# Worked by hand at capacity 2 (LRU: leaf-first, the hit run is leased while the misses go in):
#   [1,2]  miss, miss          -> {1,2}
#   [1,3]  hit 1; 3 needs room: 1 is leased, so 2 goes   -> {1,3}
#   [1,2]  hit 1; 3 goes       -> {1,2}
#   [4]    miss; the only leaf is 2 (1 still has its child) -> {1,4}
#   [1,2]  hit 1; 4 goes       -> {1,2}
# Belady keeps {1,2} throughout (3 and 4 are never used again, so they are bypassed).
HAND = trace_of([1, 2], [1, 3], [1, 2], [4], [1, 2])


def test_lru_hits_on_a_hand_worked_trace():
    result = replay(HAND, LeafFirstLRU(), 2)
    assert (result.hit_blocks, result.requested_blocks) == (3, 9)
    assert result.block_hit_ratio == 3 / 9
    assert result.num_requests == 5
    assert result.policy == "leaf-first-lru"


def test_belady_hits_on_a_hand_worked_trace():
    result = belady(HAND, 2)
    assert (result.hit_blocks, result.requested_blocks) == (5, 9)
    assert result.policy_s == 0.0


def test_lru_keeps_the_hand_worked_resident_set():
    tier = SimulatedTier(LeafFirstLRU(), 2)
    for request in HAND[:4]:
        tier.serve(request.hash_ids)
    assert resident_ids(tier) == {1, 4}


def test_a_hit_counts_only_up_to_the_first_miss():
    # at capacity 3, [1,2,3] is stored whole; [1,9,3]: 9 is missing, so resident 3 is no hit
    result = replay(trace_of([1, 2, 3], [1, 9, 3]), LeafFirstLRU(), 3)
    assert result.hit_blocks == 1
    # 3 was resident, so it is not stored again: only 9 goes in
    tier = SimulatedTier(LeafFirstLRU(), 4)
    tier.serve((1, 2, 3))
    tier.serve((1, 9, 3))
    assert resident_ids(tier) == {1, 2, 3, 9}
    assert tier.table.parents[tier.table.ids[block_key(3)]] == block_key(2)


def test_a_chain_longer_than_the_tier_stores_its_leading_blocks():
    tier = SimulatedTier(LeafFirstLRU(), 2)
    assert tier.serve((1, 2, 3)) == 0
    assert resident_ids(tier) == {1, 2}
    assert tier.serve((1, 2, 3)) == 2
    assert belady(trace_of([1, 2, 3], [1, 2, 3]), 2).hit_blocks == 2


def test_token_hits_are_capped_at_the_input_length():
    result = belady(trace_of([1, 2], [1, 2], input_length=700), 2)
    assert result.hit_blocks == 2
    assert result.hit_tokens == 700
    assert result.input_tokens == 1400
    assert result.token_hit_ratio == 0.5


def test_belady_bypasses_a_block_needed_later_than_every_resident():
    # capacity 1: 1 is needed again at request 2, 5 never: 5 must not displace 1
    assert belady(trace_of([1], [5], [1]), 1).hit_blocks == 1
    assert replay(trace_of([1], [5], [1]), LeafFirstLRU(), 1).hit_blocks == 0


def test_belady_evicts_the_block_needed_farthest_ahead():
    # capacity 2 holding 1 and 2; 3 arrives; 2 is needed before 1, so 1 goes
    trace = trace_of([1], [2], [3], [2], [3], [1])
    assert belady(trace, 2).hit_blocks == 2  # 2 and 3 hit; 1 was the right one to lose
    assert belady(trace, 3).hit_blocks == 3


def resident_ids(tier: SimulatedTier) -> set[int]:
    table = tier.table
    return {
        int.from_bytes(key, "big")
        for key, row in table.ids.items()
        if table.fastest[row] != NO_TIER and table.slot_of(row, TIER) is not None
    }


# -- random traces ------------------------------------------------------------------------------

# A request is a path in a small token tree; ids are numbered per distinct prefix, so they are
# chained exactly as Mooncake's are.
paths = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=4), min_size=1, max_size=7)


def chained(token_paths: list[list[int]]) -> list[TraceRequest]:
    ids: dict[tuple[int, ...], int] = {}
    chains = []
    for path in token_paths:
        chains.append([ids.setdefault(tuple(path[: depth + 1]), len(ids)) for depth in range(len(path))])
    return trace_of(*chains)


def exhaustive_optimum(trace: list[TraceRequest], capacity: int) -> int:
    """Most prefix-consistent hits over every schedule: after each request the tier may hold any
    set of at most `capacity` blocks drawn from what it held and what the request brought."""
    best: dict[frozenset[int], int] = {frozenset(): 0}
    for request in trace:
        following: dict[frozenset[int], int] = {}
        for held, score in best.items():
            hits = len(list(itertools.takewhile(held.__contains__, request.hash_ids)))
            pool = sorted(held | set(request.hash_ids))
            for size in range(min(capacity, len(pool)) + 1):
                for kept in itertools.combinations(pool, size):
                    state = frozenset(kept)
                    following[state] = max(following.get(state, -1), score + hits)
        best = following
    return max(best.values())


@settings(max_examples=60, deadline=None)
@given(paths, st.integers(1, 3))
def test_belady_equals_the_exhaustive_optimum(token_paths, capacity):
    trace = chained(token_paths)
    assert belady(trace, capacity).hit_blocks == exhaustive_optimum(trace, capacity)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=30), st.integers(1, 8))
def test_belady_is_never_beaten_by_lru_and_the_tier_stays_consistent(token_paths, capacity):
    trace = chained(token_paths)
    tier = SimulatedTier(LeafFirstLRU(), capacity)
    lru_hits = serve_checked(tier, trace, capacity)
    assert belady(trace, capacity).hit_blocks >= lru_hits
    assert replay(trace, LeafFirstLRU(), capacity).hit_blocks == lru_hits


def serve_checked(tier: SimulatedTier, trace: list[TraceRequest], capacity: int) -> int:
    """Serve `trace`, checking after each request that the tier holds at most `capacity`
    blocks, every resident block's parent is resident, and no lease is left; the hits."""
    hits = 0
    for request in trace:
        hits += tier.serve(request.hash_ids)
        held = resident_ids(tier)
        assert len(held) <= capacity
        table = tier.table
        for key, row in table.ids.items():  # every resident block's parent is resident too
            parent = table.parents[row]
            if int.from_bytes(key, "big") in held and parent is not None:
                assert int.from_bytes(parent, "big") in held
        assert int(table.leases.sum()) == 0
    return hits


def test_block_keys_are_sixteen_bytes_and_distinct():
    assert len(block_key(0)) == 16
    assert block_key(1) != block_key(256)
