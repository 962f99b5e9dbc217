"""PrefixLRFU's own behaviour: frequency against recency, history across evictions, the learned
time scale, admission, and victims that never name a block twice."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.policy import PrefixLRFU
from kvstore.table import BlockTable
from kvstore.types import BlockKey, Slot, TierKind
from tests.unit.test_policy import key

DRAM, NVME = TierKind.DRAM, TierKind.NVME


class Rig:
    """A table and a PrefixLRFU driven as the tier manager drives them."""

    def __init__(self) -> None:
        self.table = BlockTable(16)
        self.table.namespace_bytes.append(4096)
        self.policy = PrefixLRFU()
        self.policy.attach(self.table)
        self.policy.resize(self.table.capacity)
        self.next_slot = 0

    def store(self, name: str, parent: str | None = None, tier: TierKind = DRAM) -> int:
        row = self.table.add(key(name), key(parent) if parent else None, 0, 0)
        self.table.set_resident(row, tier, Slot(4096 * self.next_slot))
        self.next_slot += 1
        self.policy.resize(self.table.capacity)
        self.policy.on_access([row])
        self.policy.on_insert([row], tier)
        return row

    def access(self, *names: str) -> None:
        self.policy.on_access([self.table.ids[key(name)] for name in names])

    def evict(self, name: str, tier: TierKind = DRAM) -> None:
        row = self.table.ids[key(name)]
        self.policy.on_evict([row], tier)
        self.table.clear_resident(row, tier)

    def victims(self, tier: TierKind = DRAM) -> list[str]:
        by_row = {row: bytes(k).rstrip(b".").decode() for k, row in self.table.ids.items()}
        return [by_row[row] for row in self.policy.victims(tier, self.table)]


def test_a_block_used_often_outlives_one_used_once_more_recently():
    rig = Rig()
    rig.store("often")
    for _ in range(5):
        rig.access("often")
    rig.store("once")  # the most recent access of all
    assert rig.victims()[0] == "once"


def test_with_equal_use_the_older_block_goes_first():
    rig = Rig()
    rig.store("old")
    rig.store("new")
    assert rig.victims() == ["old", "new"]


def test_a_block_that_returns_resumes_its_history():
    rig = Rig()
    rig.store("back")
    for _ in range(5):
        rig.access("back")
    rig.evict("back")
    assert key("back") not in rig.table.ids  # the row is gone
    rig.store("fresh")
    rig.store("back")  # returns after "fresh": without history it would be the newer, once-used block
    rig.store("later")
    assert rig.victims()[:2] == ["fresh", "later"]


def test_a_reused_row_does_not_inherit_the_previous_blocks_priority():
    rig = Rig()
    rig.store("popular")
    for _ in range(5):
        rig.access("popular")
    row = rig.table.ids[key("popular")]
    rig.table.clear_resident(row, DRAM)  # removed without an eviction (an explicit Remove)
    assert rig.store("stranger") == row  # the table reuses the row
    rig.store("newer")
    assert rig.victims() == ["stranger", "newer"]


def test_the_time_scale_follows_the_median_reuse_interval():
    rig = Rig()
    names = [f"b{i}" for i in range(64)]
    for name in names:
        rig.store(name)
    for _ in range(40):  # each block is accessed again 64 block accesses (+ call gaps) later
        for name in names:
            rig.access(name)
    # one access per call: 2 clock ticks per access, so intervals of 128 ticks -> H = 4 * 2**7.5
    assert 512 <= rig.policy.time_scale <= 1024


def test_the_scale_factor_must_be_positive():
    with pytest.raises(ValueError, match="scale_factor must be > 0"):
        PrefixLRFU(scale_factor=0)


def test_admission_refuses_a_copy_that_would_be_the_next_victim():
    rig = Rig()
    for name in ("a", "b"):
        rig.store(name, tier=DRAM)
        for _ in range(3):
            rig.access(name)
    cold = rig.store("cold", tier=NVME)
    hot = rig.store("hot", tier=NVME)
    for _ in range(10):
        rig.access("hot")
    assert rig.policy.admit([cold, hot], DRAM) == [False, True]
    assert rig.policy.admit([cold], TierKind.HBM) == [True]  # an empty tier takes anything


def test_victims_name_each_block_once_even_when_it_was_inserted_twice():
    rig = Rig()
    rows = [rig.store(name) for name in ("a", "b", "c")]
    rig.policy.on_insert(rows, DRAM)  # inserted again, as a second commit of the same copies would
    rig.policy.on_insert(rows, DRAM)
    assert sorted(rig.victims()) == ["a", "b", "c"]


def test_an_ancestor_waits_for_its_children_then_follows_in_order():
    rig = Rig()
    rig.store("root")
    for _ in range(5):
        rig.access("root")
    rig.store("child", "root")
    rig.store("other")
    order = rig.victims()
    assert order.index("child") < order.index("root")
    assert set(order) == {"root", "child", "other"}
    assert rig.victims() == order  # an unfinished iteration leaves the queue as it was


def test_a_leased_block_is_held_back_and_offered_again_later():
    rig = Rig()
    row = rig.store("leased")
    rig.store("free")
    rig.table.leases[row] = 1
    assert rig.victims() == ["free"]
    rig.table.leases[row] = 0
    assert rig.victims() == ["leased", "free"]


def test_keys_that_differ_only_in_their_high_bytes_have_separate_history():
    policy = PrefixLRFU()
    policy.attach(BlockTable(16))
    policy.resize(16)
    keys = [BlockKey(i.to_bytes(16, "big")) for i in range(1000)]
    positions, tags = policy._history_positions(keys, np.arange(len(keys)))
    assert len(set(tags.tolist())) == 1000
    assert len(set(positions.tolist())) > 990


def test_weights_are_rebased_before_they_overflow_and_keep_their_order():
    rig = Rig()
    names = ["a", "b", "c"]
    for name in names:
        rig.store(name)
    rig.access("a")  # a: two accesses; b, c: one each, c the most recent
    before = rig.victims()
    scale = rig.policy.time_scale
    for _ in range(int(110 * scale / 2)):  # past 100 H of block accesses (2 ticks per call)
        rig.policy.on_access([])  # no rows: nothing changes
        rig.policy._clock += 2.0
    rig.access("b")  # this access must rebase first
    weights = rig.policy._weight[: rig.table.capacity]
    assert np.isfinite(weights).all() and weights.max() <= 2.0
    assert rig.victims()[-1] == "b"  # the fresh access outweighs everything decayed
    assert [name for name in rig.victims() if name != "b"] == [name for name in before if name != "b"]


def test_a_new_time_scale_keeps_the_order_of_single_accesses():
    rig = Rig()
    for name in ("x", "y", "z"):
        rig.store(name)
    order = rig.victims()
    rig.policy._set_scale(rig.policy.time_scale * 8)
    assert rig.victims() == order
    rig.policy._set_scale(rig.policy.time_scale / 64)
    assert rig.victims() == order
    assert np.isfinite(rig.policy._weight).all()


def test_victims_the_caller_kept_are_offered_again_and_evicted_ones_are_not():
    rig = Rig()
    for name in ("a", "b", "c", "d"):
        rig.store(name)
    rig.access("c")  # c: two accesses, the others one each, oldest first
    first = rig.victims()  # handed out, none evicted yet
    assert first == ["a", "b", "d", "c"]
    assert rig.victims() == first
    rig.evict("a")
    rig.evict("d")
    assert rig.victims() == ["b", "c"]
    rig.store("e")  # one access, the latest: after b, before c's two
    assert rig.victims() == ["b", "e", "c"]


def test_admission_works_out_the_lightest_victim_again_after_enough_accesses():
    rig = Rig()
    rig.store("heavy", tier=DRAM)
    for _ in range(3):
        rig.access("heavy")
    cold = rig.store("cold", tier=NVME)
    rig.access("cold")  # two accesses: lighter than heavy's four, heavier than one
    assert rig.policy.admit([cold], DRAM) == [False]
    rig.evict("heavy")
    rig.store("light", tier=DRAM)  # one access: DRAM's lightest victim is now lighter than cold
    assert rig.policy.admit([cold], DRAM) == [False]  # the kept lightest weight is heavy's still
    rig.policy._clock += 1024.0  # as many block accesses as the refresh waits for (at least 1024)
    assert rig.policy.admit([cold], DRAM) == [True]
