"""The global prefix index: per-node leading runs by tier, drops, reuse of node slots."""

from __future__ import annotations

from conductor.index import GlobalIndex
from kvstore.types import BlockKey, TierKind

DRAM, NVME, HBM = (TierKind.DRAM,), (TierKind.NVME,), (TierKind.HBM,)


def keys(*ids: int) -> list[BlockKey]:
    return [BlockKey(i.to_bytes(16, "big")) for i in ids]


def test_leading_runs_per_node_stop_at_the_first_missing_block() -> None:
    index = GlobalIndex()
    chain = keys(1, 2, 3, 4)
    index.set_many("a", chain[:3], DRAM)
    index.set_many("b", chain[:1], DRAM)
    index.set_many("b", chain[2:], DRAM)  # b lacks block 2: its run ends after block 1
    index.set_many("c", chain[1:], DRAM)  # c lacks the root: no run at all
    found = index.match(chain)
    assert {node: holding.blocks for node, holding in found.items()} == {"a": 3, "b": 1}


def test_runs_are_counted_by_their_fastest_tier() -> None:
    index = GlobalIndex()
    chain = keys(1, 2, 3)
    index.set_tiers("a", chain[0], (TierKind.HBM, TierKind.DRAM))
    index.set_tiers("a", chain[1], NVME)
    index.set_tiers("a", chain[2], (TierKind.DRAM, TierKind.NVME))
    assert index.match(chain)["a"].by_tier == (1, 1, 1)
    assert index.holders(chain[0]) == {"a": (TierKind.HBM, TierKind.DRAM)}


def test_removal_and_node_drop_forget_blocks() -> None:
    index = GlobalIndex()
    chain = keys(1, 2)
    index.set_many("a", chain, DRAM)
    index.set_many("b", chain, DRAM)
    index.set_tiers("a", chain[1], ())  # removed from a
    assert index.match(chain)["a"].blocks == 1
    assert index.blocks_of("a") == 1
    assert index.drop_node("b") == 2
    assert "b" not in index.match(chain)
    assert index.drop_node("b") == 0  # already gone
    assert len(index) == 2  # b's bits are still there, ignored, until swept
    index.sweep_all()
    assert len(index) == 1  # only a's root remains
    assert index.stale_mask == 0


def test_a_dropped_nodes_slot_is_reused_only_once_swept_and_without_leaking_old_bits() -> None:
    index = GlobalIndex()
    chain = keys(1, 2)
    index.set_many("a", chain, DRAM)
    index.set_many("b", chain, DRAM)
    index.drop_node("a")
    index.set_many("d", chain[1:], NVME)  # a's slot is not swept yet: d gets a new one
    assert index.match(chain[1:])["d"].by_tier == (0, 0, 1)
    index.drop_node("d")
    index.sweep_all()
    index.set_many("c", chain[:1], HBM)  # takes a's old slot
    found = index.match(chain)
    assert found["c"].blocks == 1 and found["c"].by_tier == (1, 0, 0)
    assert found["b"].blocks == 2
    assert index.nodes == ["b", "c"]


def test_a_sweep_in_chunks_clears_a_dropped_node_while_writes_go_on() -> None:
    index = GlobalIndex()
    chain = keys(*range(10))
    index.set_many("a", chain, DRAM)
    index.set_many("b", chain[:5], DRAM)
    index.drop_node("a")
    mask = index.stale_mask
    snapshot = index.snapshot_keys()
    index.sweep(snapshot[:3], mask)
    index.set_tiers("b", chain[7], HBM)  # written mid-sweep: a's bits go with the write
    index.sweep(snapshot[3:], mask)
    index.release(mask)
    assert index.stale_mask == 0
    assert len(index) == 6  # b's five, and the one b now holds
    assert index.match(chain)["b"].blocks == 5
    assert index.holders(chain[7]) == {"b": (TierKind.HBM,)}


def test_setting_the_same_tiers_twice_counts_once() -> None:
    index = GlobalIndex()
    key = keys(9)[0]
    index.set_tiers("a", key, DRAM)
    index.set_tiers("a", key, (TierKind.DRAM, TierKind.NVME))
    assert index.blocks_of("a") == 1
    index.set_tiers("a", key, ())
    index.set_tiers("a", key, ())
    assert index.blocks_of("a") == 0 and len(index) == 0


def test_empty_chain_and_empty_index_match_nothing() -> None:
    index = GlobalIndex()
    assert index.match([]) == {}
    assert index.match(keys(1, 2)) == {}
    index.set_many("a", keys(1), DRAM)
    assert index.match([]) == {}


def test_many_nodes_each_with_its_own_run() -> None:
    index = GlobalIndex()
    chain = keys(*range(100))
    for node in range(64):
        index.set_many(f"n{node}", chain[: node + 1], DRAM)
    found = index.match(chain)
    assert {holding.blocks for holding in found.values()} == set(range(1, 65))
    assert found["n63"].blocks == 64
