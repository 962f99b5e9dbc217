"""Contract checks every eviction policy must pass, on a block table built by hand."""

from __future__ import annotations

import pytest

from kvstore.errors import ConfigError
from kvstore.policy import POLICIES, EvictionPolicy, PrefixLRFU, make_policy
from kvstore.table import BlockTable
from kvstore.types import BlockKey, Slot, TierKind

DRAM = TierKind.DRAM


def key(name: str) -> BlockKey:
    return BlockKey(name.encode().ljust(16, b"."))


def build(policy: EvictionPolicy, chains: list[list[str]]) -> tuple[BlockTable, dict[str, int]]:
    """Commit each chain (root first) into DRAM, accessing them in order."""
    table = BlockTable(16)
    table.namespace_bytes.append(4096)
    policy.attach(table)
    policy.resize(table.capacity)
    rows: dict[str, int] = {}
    for chain in chains:
        parent = None
        committed = []
        for name in chain:
            if name not in rows:
                rows[name] = table.add(key(name), parent, 0, 0)
                table.set_resident(rows[name], DRAM, Slot(4096 * rows[name]))
            committed.append(rows[name])
            parent = key(name)
        policy.on_access(committed)
        policy.on_insert(committed, DRAM)
    return table, rows


@pytest.fixture(params=sorted(POLICIES))
def policy(request) -> EvictionPolicy:
    return POLICIES[request.param]()


def names(rows: dict[str, int], victims) -> list[str]:
    by_row = {row: name for name, row in rows.items()}
    return [by_row[row] for row in victims]


def test_an_empty_table_has_no_victims(policy):
    table = BlockTable(8)
    policy.attach(table)
    policy.resize(table.capacity)
    assert list(policy.victims(DRAM, table)) == []


def test_descendants_go_before_their_ancestors(policy):
    table, rows = build(policy, [["a", "b", "c"], ["x"], ["a", "b", "d"]])
    order = names(rows, policy.victims(DRAM, table))
    assert sorted(order) == ["a", "b", "c", "d", "x"]
    for child, ancestor in [("c", "b"), ("d", "b"), ("b", "a")]:
        assert order.index(child) < order.index(ancestor)


def test_a_leased_or_pinned_block_is_never_a_victim(policy):
    table, rows = build(policy, [["a", "b"], ["x", "y"]])
    table.leases[rows["b"]] = 1
    table.pinned[rows["y"]] = True
    order = names(rows, policy.victims(DRAM, table))
    assert "b" not in order and "y" not in order
    assert "a" not in order and "x" not in order  # their resident children stay, so they stay


def test_only_blocks_resident_in_the_tier_are_victims(policy):
    table, rows = build(policy, [["a"], ["b"]])
    table.clear_resident(rows["a"], DRAM)
    assert names(rows, policy.victims(DRAM, table)) == ["b"]
    assert list(policy.victims(TierKind.NVME, table)) == []


def test_leaf_first_lru_order_is_exact():
    policy = POLICIES["leaf-first-lru"]()
    table, rows = build(policy, [["a", "b", "c"], ["x"], ["a", "b", "d"]])
    # c is the oldest leaf, then x; d was read last, and reading it refreshed a and b.
    assert names(rows, policy.victims(DRAM, table)) == ["c", "x", "d", "b", "a"]


def test_an_unknown_policy_name_is_a_config_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown eviction policy 'mru'; known: .*'prefix-lrfu'"):
        make_policy("mru")
    assert isinstance(make_policy("prefix-lrfu"), PrefixLRFU)
