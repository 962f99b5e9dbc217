"""The baseline policies' own behaviour (LFU, S3-FIFO, ARC): each algorithm's characteristic
decisions, and what the store's constraints add to them (leaf first, several tiers, rows reused,
passes cut short). The contract every policy meets is in test_policy.py."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.policy import POLICIES
from kvstore.policy.arc import ARC
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lfu import LeafFirstLFU
from kvstore.policy.s3fifo import S3FIFO
from kvstore.table import BlockTable
from kvstore.types import Slot, TierKind
from tests.unit.test_policy import key
from tests.unit.test_policy_sim import chained, serve_checked
from tools.bench.policy_sim import TIER, SimulatedTier, belady

DRAM, NVME = TierKind.DRAM, TierKind.NVME
BASELINES = [LeafFirstLFU, S3FIFO, ARC]


class Rig:
    """A table and a policy driven as the tier manager drives them."""

    def __init__(self, policy: EvictionPolicy) -> None:
        self.table = BlockTable(16)
        self.table.namespace_bytes.append(4096)
        self.policy = policy
        policy.attach(self.table)
        policy.resize(self.table.capacity)
        self.slots = itertools.count()

    def row(self, name: str) -> int:
        return self.table.ids[key(name)]

    def store(self, *chain: str, parent: str | None = None, tier: TierKind = DRAM) -> list[int]:
        """Commit new blocks as one chain (root first) below `parent`."""
        rows = []
        for name in chain:
            row = self.table.add(key(name), key(parent) if parent else None, 0, 0)
            self.table.set_resident(row, tier, Slot(4096 * next(self.slots)))
            rows.append(row)
            parent = name
        self.policy.resize(self.table.capacity)
        self.policy.on_access(rows)
        self.policy.on_insert(rows, tier)
        return rows

    def access(self, *chain: str) -> None:
        self.policy.on_access([self.row(name) for name in chain])

    def copy(self, *names: str, tier: TierKind) -> None:
        rows = [self.row(name) for name in names]
        for row in rows:
            self.table.set_resident(row, tier, Slot(4096 * next(self.slots)))
        self.policy.on_insert(rows, tier)

    def evict(self, *names: str, tier: TierKind = DRAM) -> None:
        rows = [self.row(name) for name in names]
        self.policy.on_evict(rows, tier)
        for row in rows:
            self.table.clear_resident(row, tier)

    def victims(self, tier: TierKind = DRAM, take: int | None = None) -> list[str]:
        by_row = {row: bytes(k).rstrip(b".").decode() for k, row in self.table.ids.items()}
        return [by_row[row] for row in itertools.islice(self.policy.victims(tier, self.table), take)]

    def evict_victims(self, count: int, tier: TierKind = DRAM) -> list[str]:
        """Evict the policy's first `count` victims, as the manager does."""
        names = self.victims(tier, take=count)
        self.evict(*names, tier=tier)
        return names


@pytest.fixture(params=BASELINES, ids=lambda cls: cls.name)
def rig(request: pytest.FixtureRequest) -> Rig:
    return Rig(request.param())


# -- LFU -------------------------------------------------------------------------------------------


def test_lfu_evicts_the_least_frequently_used_block_first():
    rig = Rig(LeafFirstLFU())
    for name in "abc":
        rig.store(name)
    for _ in range(3):
        rig.access("a")
    rig.access("c")
    assert rig.victims() == ["b", "c", "a"]  # 1, 2 and 4 accesses


def test_lfu_breaks_a_tie_by_the_least_recent_access():
    rig = Rig(LeafFirstLFU())
    for name in "abc":
        rig.store(name)
    rig.access("b")
    rig.access("a")  # a and b both twice, a last
    assert rig.victims() == ["c", "b", "a"]


def test_lfu_keeps_a_count_across_tiers_and_forgets_it_with_the_last_copy():
    rig = Rig(LeafFirstLFU())
    rig.store("a")
    rig.store("b")
    for _ in range(3):
        rig.access("a")
    rig.access("b")
    rig.copy("a", "b", tier=NVME)  # a demotion is no access
    assert rig.victims(NVME) == ["b", "a"]
    row = rig.row("a")
    rig.evict("a", tier=DRAM)
    rig.evict("a", tier=NVME)
    rig.store("a")  # back, in the same row: its 4 accesses are forgotten
    assert rig.row("a") == row
    assert rig.victims() == ["a", "b"]


def test_lfu_forgets_the_count_of_a_tombstone_that_comes_back():
    rig = Rig(LeafFirstLFU())
    rig.store("p")
    for _ in range(3):
        rig.access("p")
    rig.store("c", parent="p", tier=NVME)
    rig.store("q")
    rig.access("q")
    rig.evict("p")  # its last copy: the row stays, a tombstone kept for c
    row = rig.row("p")
    rig.table.set_resident(row, DRAM, Slot(4096 * next(rig.slots)))  # committed again, same row
    rig.policy.on_access([row])
    rig.policy.on_insert([row], DRAM)
    assert rig.victims() == ["p", "q"]  # 1 access against 2


# -- S3-FIFO ---------------------------------------------------------------------------------------


def test_s3fifo_evicts_a_block_seen_once_from_the_small_queue_before_an_older_block_seen_twice():
    rig = Rig(S3FIFO())
    rig.store("old")
    rig.access("old")
    rig.store("new")
    # old moves to the main queue (its counter cleared); new, never read again, goes first
    assert rig.victims() == ["new", "old"]


def test_s3fifo_inserts_a_ghost_hit_into_the_main_queue():
    rig = Rig(S3FIFO())
    names = [f"b{i}" for i in range(20)]
    for name in names:
        rig.store(name)
    assert rig.evict_victims(1) == ["b0"]  # evicted from the small queue: its key is a ghost
    rig.store("b0")  # back while a ghost: into the main queue
    fresh = ["f1", "f2", "f3"]
    for name in fresh:
        rig.store(name)  # into the small queue
    # The small queue is drained while it holds 10% of the tier (23 blocks) or more, oldest
    # first: b1..b19 and f1; then main's b0, which a small-queue entry would have been before f1.
    assert rig.victims() == [*names[1:], "f1", "b0", "f2", "f3"]


def test_s3fifo_main_queue_gives_a_block_read_again_a_second_chance():
    rig = Rig(S3FIFO())
    rig.store("m1")
    rig.store("m2")
    rig.access("m1")
    rig.access("m2")
    rig.store("f")
    # m1 and m2 were read while in the small queue: they move to main; f goes
    assert rig.victims() == ["f", "m1", "m2"]
    rig.access("m1")  # read while in main: reinserted once (counter decremented), m2 goes first
    assert rig.victims() == ["f", "m2", "m1"]


def test_s3fifo_a_block_evicted_from_main_leaves_no_ghost():
    rig = Rig(S3FIFO())
    rig.store("m")
    rig.access("m")
    for name in ("f1", "f2"):
        rig.store(name)
    assert rig.evict_victims(3) == ["f1", "f2", "m"]  # m via main
    rig.store("m")
    rig.store("f3")
    assert rig.victims() == ["m", "f3"]  # m came back into the small queue, first in


# -- ARC -------------------------------------------------------------------------------------------


def test_arc_keeps_a_block_seen_twice_over_newer_blocks_seen_once():
    rig = Rig(ARC())
    rig.store("a")
    rig.access("a")  # T1 -> T2
    for name in ("s1", "s2", "s3"):
        rig.store(name)
    assert rig.victims() == ["s1", "s2", "s3", "a"]  # |T1| > p = 0: T1 goes first


def test_arc_grows_p_after_a_b1_ghost_hit_and_shrinks_it_after_a_b2_ghost_hit():
    rig = Rig(ARC())
    for name in "abc":
        rig.store(name)
    assert rig.policy.target(DRAM) == 0.0
    assert rig.evict_victims(1) == ["a"]  # from T1: into B1
    rig.store("a")  # a B1 hit: T1 was too small
    grown = rig.policy.target(DRAM)
    assert grown >= 1.0
    rig.access("b")
    rig.access("c")  # T1 is empty now: REPLACE takes T2's least recent, a
    assert rig.evict_victims(1) == ["a"]  # from T2: into B2
    rig.store("a")  # a B2 hit: T2 was too small
    assert rig.policy.target(DRAM) < grown


def test_arc_a_hit_moves_a_block_to_the_most_recent_end_of_t2():
    rig = Rig(ARC())
    for name in "abc":
        rig.store(name)
        rig.access(name)  # all in T2, a least recent
    rig.access("a")
    assert rig.victims() == ["b", "c", "a"]


# -- all three -------------------------------------------------------------------------------------


def test_a_parent_goes_right_after_its_last_resident_child(rig):
    rig.store("p")
    rig.store("c", parent="p")  # the parent's turn comes first; it waits for its child
    rig.store("o")
    assert rig.victims() == ["c", "p", "o"]
    assert rig.evict_victims(1) == ["c"]
    assert rig.victims() == ["p", "o"]  # p kept its place ahead of newer blocks


def test_a_parent_waiting_for_a_leased_child_comes_back_when_the_child_is_dropped(rig):
    rig.store("p")
    rig.store("c", parent="p")
    rig.store("o")
    rig.table.leases[rig.row("c")] = 1
    assert rig.victims() == ["o"]  # p waits for c, which is leased
    rig.table.leases[rig.row("c")] = 0
    rig.evict("c")  # dropped by the manager (say, a bad checksum), not as a victim
    assert rig.victims() == ["p", "o"]


def test_a_parent_whose_child_was_dropped_unseen_still_goes(rig):
    rig.store("p")
    rig.store("c", parent="p")
    assert rig.victims(take=1) == ["c"]  # p's turn came first: it waits for c
    rig.table.clear_resident(rig.row("c"), DRAM)  # no on_evict
    assert rig.victims() == ["p"]


def test_a_pass_cut_short_loses_nothing(rig):
    for name in "abcd":
        rig.store(name)
    order = rig.victims()
    assert rig.victims(take=2) == order[:2]  # taken, but not evicted
    assert rig.victims() == order


def test_a_pass_over_blocks_that_cannot_go_ends(rig):
    rows = rig.store("a", "b") + rig.store("x", "y")
    rig.table.pinned[rows] = True
    assert rig.victims() == []
    rig.table.pinned[rows] = False
    rig.table.leases[rows] = 1
    assert rig.victims() == []
    rig.table.leases[rows] = 0
    assert sorted(rig.victims()) == ["a", "b", "x", "y"]


def test_each_tier_queues_its_own_copies(rig):
    rig.store("a")
    rig.store("b")
    rig.copy("b", tier=NVME)
    assert rig.victims(NVME) == ["b"]
    rig.evict("b", tier=DRAM)
    assert rig.victims(DRAM) == ["a"]
    assert rig.victims(NVME) == ["b"]
    rig.evict("b", tier=NVME)
    assert rig.victims(NVME) == []


def test_a_reused_row_starts_afresh_even_when_the_policy_missed_the_drop(rig):
    rig.store("a")
    for _ in range(3):
        rig.access("a")
    rig.store("b")
    rig.access("b")
    row = rig.row("a")
    rig.table.clear_resident(row, DRAM)  # no on_evict: the row is freed and reused
    rig.store("x")
    assert rig.row("x") == row
    rig.store("y")
    assert rig.victims()[0] == "x"  # a new block read once, not a's history


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=30), st.integers(1, 8))
def test_random_traces_keep_the_tier_consistent_and_every_block_reachable(name, token_paths, capacity):
    """Every store policy, the default and prefix-lrfu included."""
    trace = chained(token_paths)
    tier = SimulatedTier(POLICIES[name](), capacity)
    hits = serve_checked(tier, trace, capacity)
    assert belady(trace, capacity).hit_blocks >= hits
    # one full pass names every resident block once, each after its resident children
    table = tier.table
    order = list(tier.policy.victims(TIER, table))
    assert sorted(order) == sorted(row for row in table.ids.values() if table.slot_of(row, TIER) is not None)
    position = {row: index for index, row in enumerate(order)}
    for row in order:
        parent = table.parents[row]
        if parent is not None and table.ids.get(parent) in position:
            assert position[row] < position[table.ids[parent]]
