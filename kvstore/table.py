"""The block table: key -> block id, and each block's metadata in compact columns.

This is the prefix index of DESIGN.md 3. A Python object per block would cost ~400 bytes;
here a block costs one dict entry plus a row in a few numpy arrays (about 180 bytes in all,
measured by tools/bench/store.py), so a node can index tens of millions of blocks.

A row exists while its block is resident in at least one tier, or while resident children
still count it as their parent (a "tombstone": not visible to readers, kept so that the
children's bookkeeping stays exact). Only committed blocks have rows; reservations live in the
tier manager until commit.

Owner: the tier manager, which calls it only under its lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kvstore.types import BlockKey, Slot, TierKind

NUM_TIERS = len(TierKind)
ABSENT = np.uint64(2**64 - 1)
"""`slot[row, tier]` of a block that has no copy in that tier."""


class BlockTable:
    """Columns indexed by block id (a row number). Row ids are reused after removal."""

    def __init__(self, initial_rows: int = 1024) -> None:
        self.ids: dict[BlockKey, int] = {}
        self.keys: list[BlockKey | None] = []
        self.parents: list[BlockKey | None] = []
        self._free_rows: list[int] = []
        self.capacity = 0
        self.slot: npt.NDArray[Any] = np.empty((0, NUM_TIERS), dtype=np.uint64)
        self.children: npt.NDArray[Any] = np.empty((0, NUM_TIERS), dtype=np.uint32)  # resident children per tier
        self.counted: npt.NDArray[Any] = np.empty(
            0, dtype=np.uint8
        )  # bit t: this block is counted in parent's children[t]
        self.namespace: npt.NDArray[Any] = np.empty(0, dtype=np.uint16)
        self.size_bytes: npt.NDArray[Any] = np.empty(0, dtype=np.uint32)
        self.checksum: npt.NDArray[Any] = np.empty(0, dtype=np.uint64)
        self.leases: npt.NDArray[Any] = np.empty(0, dtype=np.uint16)
        self.pinned: npt.NDArray[Any] = np.empty(0, dtype=np.bool_)
        self._grow(initial_rows)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: BlockKey, parent: BlockKey | None, namespace: int, size_bytes: int, checksum: int) -> int:
        """A new row with no residency yet; the caller then calls `set_resident`."""
        if not self._free_rows:
            self._grow(max(1024, self.capacity // 2))
        row = self._free_rows.pop()
        self.ids[key] = row
        self.keys[row] = key
        self.parents[row] = parent
        self.slot[row] = ABSENT
        self.children[row] = 0
        self.counted[row] = 0
        self.namespace[row] = namespace
        self.size_bytes[row] = size_bytes
        self.checksum[row] = checksum
        self.leases[row] = 0
        self.pinned[row] = False
        return row

    def is_resident(self, row: int) -> bool:
        return bool((self.slot[row] != ABSENT).any())

    def tier_slot(self, row: int, tier: TierKind) -> Slot | None:
        value = self.slot[row, tier]
        return None if value == ABSENT else Slot(int(value))

    def fastest_tier(self, row: int) -> TierKind | None:
        for tier in TierKind:
            if self.slot[row, tier] != ABSENT:
                return tier
        return None

    def set_resident(self, row: int, tier: TierKind, slot: Slot) -> None:
        """Record a copy in `tier`; counts it in the parent's children when the parent has a row."""
        self.slot[row, tier] = slot
        parent = self.parents[row]
        parent_row = self.ids.get(parent) if parent is not None else None
        if parent_row is not None:
            self.children[parent_row, tier] += 1
            self.counted[row] |= 1 << tier

    def clear_resident(self, row: int, tier: TierKind) -> list[int]:
        """Drop the copy in `tier`. Returns the rows removed as a result (this one and tombstoned
        ancestors that no longer have a reason to exist)."""
        self.slot[row, tier] = ABSENT
        if self.counted[row] & (1 << tier):
            self.counted[row] &= ~np.uint8(1 << tier)
            parent = self.parents[row]
            assert parent is not None  # counted implies a parent row existed and still exists
            parent_row = self.ids[parent]
            self.children[parent_row, tier] -= 1
            removed = self._remove_if_unused(row)
            return removed + self._remove_if_unused(parent_row)
        return self._remove_if_unused(row)

    def rows_of(self, keys: Sequence[BlockKey]) -> list[int]:
        """Rows of the longest run of leading keys that have a resident row."""
        rows: list[int] = []
        get = self.ids.get
        for key in keys:
            row = get(key)
            if row is None:
                break
            rows.append(row)
        if rows:
            resident = (self.slot[rows] != ABSENT).any(axis=1)
            if not resident.all():
                rows = rows[: int(resident.argmin())]
        return rows

    def resident_mask(self, tier: TierKind) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = self.slot[:, tier] != ABSENT
        return mask

    def _remove_if_unused(self, row: int) -> list[int]:
        if (self.slot[row] != ABSENT).any() or self.children[row].any():
            return []
        key = self.keys[row]
        if key is None:
            return []
        del self.ids[key]
        self.keys[row] = None
        self.parents[row] = None
        self._free_rows.append(row)
        return [row]

    def _grow(self, extra: int) -> None:
        old, new = self.capacity, self.capacity + extra
        self.slot = _resized(self.slot, new, ABSENT)
        self.children = _resized(self.children, new, 0)
        self.counted = _resized(self.counted, new, 0)
        self.namespace = _resized(self.namespace, new, 0)
        self.size_bytes = _resized(self.size_bytes, new, 0)
        self.checksum = _resized(self.checksum, new, 0)
        self.leases = _resized(self.leases, new, 0)
        self.pinned = _resized(self.pinned, new, False)
        self.keys.extend([None] * extra)
        self.parents.extend([None] * extra)
        self._free_rows.extend(range(new - 1, old - 1, -1))
        self.capacity = new


def _resized(array: npt.NDArray[Any], rows: int, fill: object) -> npt.NDArray[Any]:
    grown = np.full((rows, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
