"""Leaf-first LFU: a baseline for the policy benchmark.

Classic (in-cache) LFU: the block with the fewest accesses goes first, and among equals the one
accessed least recently. A block's count starts with the access that brought it in and is
forgotten when its last copy leaves the store (a block that comes back starts again from one);
moving between tiers is not an access and keeps it. No aging: that is what the baseline shows.

Leaf-first. A chain is accessed root first and stamped leaf first, as in `LeafFirstLRU`: a read
of a block reads its ancestors, so an ancestor seldom counts fewer accesses than a descendant,
and on a tie it is the more recent; LFU order itself mostly puts leaves first. Where it does not
(a chain extended by a write that did not read its prefix first), a block whose turn has come
while it still has resident children in the tier is parked: it leaves the tier's heap and goes
back in when its last resident child leaves (`on_evict` of the child, or the child's yield within
one `victims` pass), so no pass looks at it meanwhile. A leased or pinned block whose turn has
come is set aside for the pass and put back.

Cost: an access is a few vectorised writes and touches no heap. Each tier keeps a heap of
(count, stamp, row, incarnation), one entry per copy, pushed when the copy is made. An access
only raises the key, so an entry can only be too low: `victims` pops the smallest, and one whose
block was accessed since goes back with its new key (lazy update, O(log n) amortised per access).
Entries of copies that are gone, or of rows that hold another block now (the incarnation
changed), are dropped as they come up; the heap is rebuilt if they ever outnumber the live ones.
Rows the pass yields are pushed back when it ends (a caller may evict fewer) and dropped later.
A parked block whose children left without `on_evict` is found when the heap runs dry. `admit`
admits every block.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from kvstore.policy import chains
from kvstore.table import ABSENT, BlockTable
from kvstore.types import TierKind

_ABSENT = int(ABSENT)
_Scalar = TypeVar("_Scalar", bound=np.generic)

Entry = tuple[int, int, int, int]  # (count, stamp of the last access, row, the row's incarnation)


class LeafFirstLFU:
    name = "lfu"

    def __init__(self) -> None:
        self._table: BlockTable | None = None
        self._count: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self._stamp: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        # the table's incarnation when the count started; 0 = none
        self._born: npt.NDArray[np.uint32] = np.zeros(0, dtype=np.uint32)
        self._tick = 1
        self._heaps: dict[TierKind, list[Entry]] = {}
        self._parked: dict[TierKind, set[int]] = {}  # per tier: rows waiting for their resident children

    def attach(self, table: BlockTable) -> None:
        self._table = table

    def resize(self, num_rows: int) -> None:
        if num_rows > len(self._count):
            self._count = _grown(self._count, num_rows)
            self._stamp = _grown(self._stamp, num_rows)
            self._born = _grown(self._born, num_rows)

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None:
        count = len(rows)
        if not count:
            return
        index = np.asarray(rows, dtype=np.intp)
        self._adopt(index, self._require_table())
        self._count[index] += 1
        self._stamp[index] = np.arange(self._tick + count, self._tick, -1, dtype=np.uint64)  # root newest
        self._tick += count + 1

    def on_insert(self, rows: Sequence[int], tier: TierKind) -> None:
        """A copy in a new tier enters that tier's heap with the block's count."""
        if not rows:
            return
        index = np.asarray(rows, dtype=np.intp)
        self._adopt(index, self._require_table())
        heap = self._heaps.setdefault(tier, [])
        for entry in zip(
            self._count[index].tolist(),
            self._stamp[index].tolist(),
            index.tolist(),
            self._born[index].tolist(),
            strict=True,
        ):
            heapq.heappush(heap, entry)

    def on_evict(self, rows: Sequence[int], tier: TierKind) -> None:
        """Unpark parents whose last resident children leave; a block losing its last copy
        loses its count. Heap entries of gone copies are dropped as they come up."""
        if not rows:
            return
        table = self._require_table()
        parked = self._parked.get(tier)
        if parked:
            parked.difference_update(rows)
            for row in chains.freed_parents(rows, table, tier, parked):
                self._unpark(tier, row)
        index = np.asarray(rows, dtype=np.intp)
        elsewhere = table.slot[index] != ABSENT
        elsewhere[:, tier] = False
        self._born[index[~elsewhere.any(axis=1)]] = 0

    def admit(self, rows: Sequence[int], tier: TierKind) -> list[bool]:
        return [True] * len(rows)

    def victims(self, tier: TierKind, table: BlockTable) -> Iterator[int]:
        heap = self._heaps.get(tier)
        if heap is None:
            return
        if len(heap) > 2 * len(table.ids) + 1024:  # mostly entries of copies that are gone
            heap = self._rebuild(tier, table)
        parked = self._parked.setdefault(tier, set())
        count, stamp, born = self._count, self._stamp, self._born
        slot, children = table.slot[:, tier], table.children[:, tier]
        leases, pinned = table.leases, table.pinned
        remaining: dict[int, int] = {}  # parent row -> resident children left after our picks
        held: list[Entry] = []  # leased or pinned: back into the heap afterwards
        yielded: list[Entry] = []  # back too: the caller may not evict them all
        taken: set[int] = set()
        swept = False
        try:
            while True:
                if not heap:
                    if swept or not self._sweep(tier, table, remaining):
                        return
                    swept = True
                    continue
                entry = heapq.heappop(heap)
                _, _, row, incarnation = entry
                if incarnation != born.item(row) or slot.item(row) == _ABSENT:
                    continue  # the copy is gone, or the row holds another block now
                now = (count.item(row), stamp.item(row))
                if entry[:2] != now:  # accessed since it was queued
                    heapq.heappush(heap, (*now, row, incarnation))
                    continue
                if row in taken or row in parked:
                    continue  # a second entry for the same copy
                if leases.item(row) or pinned.item(row):
                    held.append(entry)
                    continue
                if remaining.get(row, children.item(row)) > 0:
                    parked.add(row)
                    continue
                yielded.append(entry)
                taken.add(row)
                yield row
                parent_row = chains.parent_row(table, row, tier)
                if parent_row is not None:
                    left = remaining.get(parent_row, children.item(parent_row)) - 1
                    remaining[parent_row] = left
                    if left == 0 and parent_row in parked:
                        self._unpark(tier, parent_row)
        finally:
            for entry in (*held, *yielded):
                heapq.heappush(heap, entry)

    # -- internals -----------------------------------------------------------------------------

    def _require_table(self) -> BlockTable:
        if self._table is None:
            raise RuntimeError("LeafFirstLFU used before attach(table)")
        return self._table

    def _adopt(self, index: npt.NDArray[np.intp], table: BlockTable) -> None:
        """Rows of `index` that hold another block than when last counted start from zero."""
        current = table.incarnation[index]
        changed = self._born[index] != current
        if changed.any():
            rows = index[changed]
            self._born[rows] = current[changed]
            self._count[rows] = 0
            self._stamp[rows] = 0

    def _unpark(self, tier: TierKind, row: int) -> None:
        self._parked[tier].discard(row)
        incarnation = self._born.item(row)
        if incarnation == self._require_table().incarnation.item(row):
            heapq.heappush(self._heaps[tier], (self._count.item(row), self._stamp.item(row), row, incarnation))

    def _sweep(self, tier: TierKind, table: BlockTable, remaining: dict[int, int]) -> bool:
        """When the heap ran dry: unpark rows whose children left unseen (dropped without
        `on_evict`), forget parked copies dropped so; True when some came back."""
        parked = self._parked[tier]
        slot, children = table.slot[:, tier], table.children[:, tier]
        back = False
        for row in list(parked):
            if slot.item(row) == _ABSENT:
                parked.discard(row)
            elif remaining.get(row, children.item(row)) <= 0:
                self._unpark(tier, row)
                back = True
        return back

    def _rebuild(self, tier: TierKind, table: BlockTable) -> list[Entry]:
        current = self._born[: table.capacity] == table.incarnation
        rows = np.flatnonzero(table.resident_mask(tier) & current)
        parked = self._parked.get(tier, set())
        heap = [
            entry
            for entry in zip(
                self._count[rows].tolist(),
                self._stamp[rows].tolist(),
                rows.tolist(),
                self._born[rows].tolist(),
                strict=True,
            )
            if entry[2] not in parked
        ]
        heapq.heapify(heap)
        self._heaps[tier] = heap
        return heap


def _grown(array: npt.NDArray[_Scalar], num_rows: int) -> npt.NDArray[_Scalar]:
    grown: npt.NDArray[_Scalar] = np.zeros(num_rows, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
