"""The block table tells its residency listener of changes in batches, with the masks before
and after: what the shared index and the event log are kept equal to the table by."""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.table import BlockTable
from kvstore.types import BlockKey, Slot, TierKind

DRAM, NVME = TierKind.DRAM, TierKind.NVME


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int], list[int], list[int]]] = []

    def residency_changed(
        self, rows: Sequence[int], namespaces: Sequence[int], before: Sequence[int], after: Sequence[int]
    ) -> None:
        self.calls.append((list(rows), list(namespaces), list(before), list(after)))


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def test_a_batch_is_one_call_with_each_blocks_masks_and_counts_children():
    table = BlockTable()
    recorder = Recorder()
    table.listener = recorder
    rows = [table.add(key(i), key(i - 1) if i else None, 3, 0) for i in range(3)]
    table.set_resident_many(rows[:1], NVME, [Slot(0)])

    table.set_resident_many(rows, DRAM, [Slot(4096 * i) for i in range(3)])

    assert len(recorder.calls) == 2
    assert recorder.calls[1] == (rows, [3, 3, 3], [1 << NVME, 0, 0], [1 << NVME | 1 << DRAM, 1 << DRAM, 1 << DRAM])
    assert [table.slot_of(row, DRAM) for row in rows] == [Slot(0), Slot(4096), Slot(8192)]
    assert [table.fastest_tier(row) for row in rows] == [DRAM, DRAM, DRAM]
    assert table.children[rows[0], DRAM] == 1 and table.children[rows[1], DRAM] == 1
    assert table.children[rows[2], DRAM] == 0
    # The child goes first, then its parent can go: the counts the batch made are exact.
    assert table.clear_resident(rows[2], DRAM) == [rows[2]]
    assert table.children[rows[1], DRAM] == 0
    assert recorder.calls[-1] == ([rows[2]], [3], [1 << DRAM], [0])


def test_an_empty_batch_tells_nobody():
    table = BlockTable()
    recorder = Recorder()
    table.listener = recorder
    table.set_resident_many([], DRAM, [])
    assert recorder.calls == []
