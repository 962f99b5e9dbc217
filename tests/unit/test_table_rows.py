"""Rows of the block table: `add_many` takes rows for a batch of new keys with one write per
column, `insert_many` brings a tombstone back in its old row, and both refuse what would
corrupt the index."""

from __future__ import annotations

import pytest

from kvstore.table import ABSENT, NO_TIER, BlockTable
from kvstore.types import BlockKey, Slot, TierKind

DRAM = TierKind.DRAM


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def chain(count: int, start: int = 0) -> tuple[list[BlockKey], list[BlockKey | None]]:
    keys = [key(start + i) for i in range(count)]
    return keys, [None, *keys[:-1]]


def test_add_many_takes_the_rows_single_adds_would_and_resets_reused_ones() -> None:
    single, batched = BlockTable(initial_rows=8), BlockTable(initial_rows=8)
    keys, parents = chain(5)
    expected = [single.add(k, p, 2, 10 + i) for i, (k, p) in enumerate(zip(keys, parents, strict=True))]
    rows = batched.add_many(keys, parents, 2, [10 + i for i in range(5)])
    assert rows == expected
    assert [batched.ids[k] for k in keys] == rows
    assert batched.parents[rows[3]] == keys[2]
    assert batched.checksum[rows].tolist() == [10, 11, 12, 13, 14]
    assert batched.namespace[rows].tolist() == [2] * 5

    # a freed row comes back clean: no stale slot, lease, pin or checksum, a new incarnation
    batched.set_resident_many(rows, DRAM, [Slot(4096 * i) for i in range(5)])
    batched.leases[rows[4]] = 3
    batched.pinned[rows[4]] = True
    old = int(batched.incarnation[rows[4]])
    assert batched.clear_resident(rows[4], DRAM) == [rows[4]]
    (again,) = batched.add_many([key(99)], [None], 7, [5])
    assert again == rows[4]
    assert (batched.slot[again] == ABSENT).all() and batched.fastest[again] == NO_TIER
    assert (batched.leases[again], bool(batched.pinned[again]), int(batched.checksum[again])) == (0, False, 5)
    assert int(batched.incarnation[again]) == old + 1


def test_add_many_grows_the_table_and_takes_one_namespace_per_key() -> None:
    table = BlockTable(initial_rows=4)
    keys, parents = chain(10)
    rows = table.add_many(keys, parents, [i % 3 for i in range(10)], [0] * 10)
    assert len(set(rows)) == 10 and table.capacity >= 10
    assert table.namespace[rows].tolist() == [i % 3 for i in range(10)]


@pytest.mark.parametrize(
    ("keys", "parents", "checksums", "match"),
    [
        ([key(1), key(1)], [None, None], [0, 0], "distinct"),
        ([key(0)], [None], [0], "no rows"),  # key(0) is already in the table
        ([key(5), key(6)], [None], [0, 0], "parents"),
    ],
)
def test_add_many_refuses_what_would_corrupt_the_index(
    keys: list[BlockKey], parents: list[BlockKey | None], checksums: list[int], match: str
) -> None:
    table = BlockTable(initial_rows=4)
    (row,) = table.add_many([key(0)], [None], 0, [1])
    free_before = table.capacity - len(table)
    with pytest.raises(ValueError, match=match):
        table.add_many(keys, parents, 0, checksums)
    assert list(table.ids) == [key(0)] and table.ids[key(0)] == row
    assert table.capacity - len(table) == free_before


def test_insert_many_brings_a_tombstone_back_in_its_row() -> None:
    table = BlockTable()
    keys, parents = chain(2)
    parent_row, child_row = table.add_many(keys, parents, 0, [1, 2])
    table.set_resident_many([parent_row, child_row], DRAM, [Slot(0), Slot(4096)])
    table.clear_resident(parent_row, DRAM)  # kept as a tombstone: its child still counts it
    assert table.ids[keys[0]] == parent_row and not table.is_resident(parent_row)
    assert int(table.children[parent_row, DRAM]) == 1

    rows = table.insert_many([keys[0], key(7)], [None, keys[1]], 4, [11, 12])
    assert rows[0] == parent_row and rows[1] not in (parent_row, child_row)
    assert table.namespace[rows].tolist() == [4, 4] and table.checksum[rows].tolist() == [11, 12]
    table.set_resident_many(rows, DRAM, [Slot(8192), Slot(12288)])
    assert table.is_resident(parent_row) and table.is_resident(rows[1])
    assert int(table.children[parent_row, DRAM]) == 1  # its child, counted once, still there
