"""The block table: key -> block id, and each block's metadata in compact columns.

This is the prefix index of DESIGN.md 3. A Python object per block would cost ~470 bytes;
here a block costs one dict entry plus a row in a few numpy arrays (under 200 bytes in all,
measured by tools/bench/store.py), so a node can index tens of millions of blocks. Nothing
that can be derived is stored: a block's size comes from its namespace.

A row exists while its block is resident in at least one tier, or while resident children
still count it as their parent (a "tombstone": not visible to readers, kept so that the
children's bookkeeping stays exact). Only committed blocks have rows; reservations live in the
tier manager until commit.

Owner: the tier manager, which calls it only under its lock. Policies read it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from kvstore.config import ALIGNMENT_BYTES
from kvstore.errors import InvalidArgumentError
from kvstore.types import KEY_BYTES, BlockKey, Slot, TierKind

NUM_TIERS = len(TierKind)
ABSENT = np.uint32(2**32 - 1)
"""`slot[row, tier]` of a block that has no copy in that tier. Slots are stored in units of
ALIGNMENT_BYTES, so a uint32 addresses 16 TiB per tier."""
NO_TIER = np.uint8(255)
"""`fastest[row]` of a tombstone."""
NO_NAMESPACE = np.uint16(2**16 - 1)
"""`namespace[row]` of a tombstone, so one comparison tells a usable row (no namespace has this
index: the manager registers at most 65535)."""
_TIERS = tuple(TierKind)
_ABSENT_INT = int(ABSENT)
_TIER_BITS = np.array([1 << tier for tier in range(NUM_TIERS)], dtype=np.int64)


class ResidencyListener(Protocol):
    """Told of every change in a block's set of tiers, in batches: block `rows[i]`, of namespace
    index `namespaces[i]`, went from tier mask `before[i]` to `after[i]` (bit t = a copy in
    TierKind t; 0 = not readable). Called under the tier manager's lock, so it must be quick;
    one call per batch (a commit, a demotion) because a call per block cost ~30 us of a commit's
    Python per block."""

    def residency_changed(
        self, rows: Sequence[int], namespaces: Sequence[int], before: Sequence[int], after: Sequence[int]
    ) -> None: ...


class ResidencyListeners:
    """Several listeners as one, told in order."""

    def __init__(self, *listeners: ResidencyListener) -> None:
        self._listeners = listeners

    def residency_changed(
        self, rows: Sequence[int], namespaces: Sequence[int], before: Sequence[int], after: Sequence[int]
    ) -> None:
        for listener in self._listeners:
            listener.residency_changed(rows, namespaces, before, after)


class BlockTable:
    """Columns indexed by block id (a row number). Row ids are reused after removal."""

    def __init__(self, initial_rows: int = 1024) -> None:
        self.ids: dict[BlockKey, int] = {}
        self.keys: list[BlockKey | None] = []
        self.parents: list[BlockKey | None] = []
        self.namespace_bytes: list[int] = []  # block size per namespace index (the manager appends)
        self._free_rows: list[int] = []
        self.capacity = 0
        self.slot: npt.NDArray[Any] = np.empty((0, NUM_TIERS), dtype=np.uint32)
        self.fastest: npt.NDArray[Any] = np.empty(0, dtype=np.uint8)  # fastest resident tier, or NO_TIER
        self.children: npt.NDArray[Any] = np.empty((0, NUM_TIERS), dtype=np.uint32)  # resident children per tier
        self.counted: npt.NDArray[Any] = np.empty(0, dtype=np.uint8)  # bit t: counted in parent's children[t]
        self.namespace: npt.NDArray[Any] = np.empty(0, dtype=np.uint16)
        self.checksum: npt.NDArray[Any] = np.empty(0, dtype=np.uint64)
        self.leases: npt.NDArray[Any] = np.empty(0, dtype=np.uint32)
        self.pinned: npt.NDArray[Any] = np.empty(0, dtype=np.bool_)
        # bumped each time a row starts holding a block: per-row state kept elsewhere (a policy's)
        # tells a reused row from the block it held before by comparing it
        self.incarnation: npt.NDArray[Any] = np.empty(0, dtype=np.uint32)
        self.listener: ResidencyListener | None = None
        self._grow(initial_rows)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, key: BlockKey, parent: BlockKey | None, namespace: int, checksum: int) -> int:
        """A new row with no residency yet; the caller then calls `set_resident`."""
        return self.add_many([key], [parent], namespace, [checksum])[0]

    def add_many(
        self,
        keys: Sequence[BlockKey],
        parents: Sequence[BlockKey | None],
        namespaces: int | Sequence[int],
        checksums: Sequence[int],
    ) -> list[int]:
        """`add` of distinct keys that have no rows (`namespaces`: one index for all, or one per
        key), with one write per column for all of them: a commit's rows cost ~1.5 us a block
        less than one `add` each."""
        count = len(keys)
        if len(parents) != count or len(checksums) != count:
            raise ValueError(f"{count} keys, {len(parents)} parents and {len(checksums)} checksums")
        if not count:
            return []
        ids = self.ids
        if len(set(keys)) != count or any(key in ids for key in keys):
            raise ValueError("add_many takes distinct keys that have no rows")
        short = count - len(self._free_rows)
        if short > 0:
            self._grow(max(1024, self.capacity // 2, short))
        free = self._free_rows
        rows = free[-count:][::-1]  # the rows `count` pops would take, in the same order
        del free[-count:]
        key_list, parent_list = self.keys, self.parents
        for row, key, parent in zip(rows, keys, parents, strict=True):
            ids[key] = row
            key_list[row] = key
            parent_list[row] = parent
        index = np.array(rows, dtype=np.intp)
        self.slot[index] = ABSENT
        self.fastest[index] = NO_TIER
        self.children[index] = 0
        self.counted[index] = 0
        self.namespace[index] = namespaces
        self.checksum[index] = np.array(checksums, dtype=np.uint64)
        self.leases[index] = 0
        self.pinned[index] = False
        self.incarnation[index] += 1  # uint32 wraps after 4 billion reuses of one row: still a change
        return rows

    def insert_many(
        self,
        keys: Sequence[BlockKey],
        parents: Sequence[BlockKey | None],
        namespace: int,
        checksums: Sequence[int],
    ) -> list[int]:
        """Rows for newly committed distinct blocks, in order: a tombstone kept for its children
        comes back (its namespace and checksum set), any other key gets a new row (`add_many`).
        The caller then calls `set_resident_many`."""
        ids = self.ids
        rows = [ids.get(key, -1) for key in keys]
        new = [i for i, row in enumerate(rows) if row < 0]
        for i, row in enumerate(rows):
            if row >= 0:
                self.namespace[row] = namespace
                self.checksum[row] = checksums[i]
        if new:
            added = self.add_many(
                [keys[i] for i in new], [parents[i] for i in new], namespace, [checksums[i] for i in new]
            )
            for i, row in zip(new, added, strict=True):
                rows[i] = row
        return rows

    # -- reading ------------------------------------------------------------------------------

    def size_of(self, row: int) -> int:
        return self.namespace_bytes[int(self.namespace[row])]

    def is_resident(self, row: int) -> bool:
        return bool(self.fastest[row] != NO_TIER)

    def fastest_tier(self, row: int) -> TierKind | None:
        tier = int(self.fastest[row])
        return None if tier == NO_TIER else _TIERS[tier]

    def slot_of(self, row: int, tier: TierKind) -> Slot | None:
        units = self.slot[row, tier]
        return None if units == ABSENT else Slot(int(units) * ALIGNMENT_BYTES)

    def slots_of(self, rows: npt.NDArray[np.intp], tiers: npt.NDArray[Any]) -> list[Slot]:
        """Slots of many rows at once (each in the tier given for it; all must be resident)."""
        return np.multiply(self.slot[rows, tiers], ALIGNMENT_BYTES, dtype=np.int64).tolist()  # type: ignore[no-any-return]

    def leading_run(
        self, keys: Sequence[BlockKey], namespace: int
    ) -> tuple[list[int], npt.NDArray[np.intp], npt.NDArray[Any]]:
        """Rows of the longest run of leading keys stored in `namespace` (as a list and as an
        index array), and each one's fastest tier. A tombstone or a block of another namespace
        ends the run (on doubt, miss).

        Keys are validated here rather than up front: a key found in the table equals a stored,
        valid key, so only the keys from the first miss on need checking (none, on a full hit).
        """
        found: list[int | None]
        try:
            found = list(map(self.ids.get, keys))  # at C speed, past a miss too
        except TypeError:  # an unhashable key (a bytearray, a list): the run ends before it
            found = list(itertools.takewhile(lambda row: row is not None, map(self._get_hashable, keys)))
        rows: list[int] = found[: found.index(None)] if None in found else found  # type: ignore[assignment]
        check_keys(keys[len(rows) :])
        index = np.array(rows, dtype=np.intp)
        foreign = self.namespace[index] != namespace  # tombstones carry NO_NAMESPACE
        if foreign.any():
            cut = int(foreign.argmax())
            rows, index = rows[:cut], index[:cut]
        return rows, index, self.fastest[index]

    def _get_hashable(self, key: BlockKey) -> int | None:
        try:
            return self.ids.get(key)
        except TypeError:
            return None

    def tier_mask(self, row: int) -> int:
        """Bit t set when the block has a copy in TierKind t."""
        return sum(1 << tier for tier, units in enumerate(self.slot[row].tolist()) if units != _ABSENT_INT)

    def tier_masks(self, rows: npt.NDArray[np.intp]) -> list[int]:
        """`tier_mask` of many rows at once."""
        return ((self.slot[rows] != ABSENT) @ _TIER_BITS).tolist()  # type: ignore[no-any-return]

    def resident_mask(self, tier: TierKind) -> npt.NDArray[np.bool_]:
        mask: npt.NDArray[np.bool_] = self.slot[:, tier] != ABSENT
        return mask

    # -- residency ----------------------------------------------------------------------------

    def set_resident(self, row: int, tier: TierKind, slot: Slot) -> None:
        """Record a copy in `tier`; counts it in the parent's children when the parent has a row."""
        self.set_resident_many([row], tier, [slot])

    def set_resident_many(self, rows: Sequence[int], tier: TierKind, slots: Sequence[Slot]) -> None:
        """`set_resident` of distinct rows, each at its slot, told to the listener as one batch.
        A parent must have its row before its child is counted: add a chain's rows first."""
        if not rows:
            return
        index = np.array(rows, dtype=np.intp)
        before = self.tier_masks(index) if self.listener is not None else []
        self.slot[index, tier] = np.array(slots, dtype=np.int64) // ALIGNMENT_BYTES
        self.fastest[index] = np.minimum(self.fastest[index], np.uint8(tier))
        bit = 1 << int(tier)
        ids, parents, children, counted = self.ids, self.parents, self.children, self.counted
        for row in rows:
            parent = parents[row]
            parent_row = ids.get(parent) if parent is not None else None
            if parent_row is not None:
                children[parent_row, tier] += 1
                counted[row] |= bit
        if self.listener is not None:
            after = [mask | bit for mask in before]
            self.listener.residency_changed(rows, self.namespace[index].tolist(), before, after)

    def clear_resident(self, row: int, tier: TierKind) -> list[int]:
        """Drop the copy in `tier`. Returns the rows removed as a result (this one, and its
        parent when that was a tombstone kept only for this child)."""
        if self.listener is not None:
            before = self.tier_mask(row)
            self.listener.residency_changed([row], [int(self.namespace[row])], [before], [before & ~(1 << int(tier))])
        self.slot[row, tier] = ABSENT
        present = np.flatnonzero(self.slot[row] != ABSENT)
        if len(present):
            self.fastest[row] = present[0]
        else:
            self.fastest[row] = NO_TIER
            self.namespace[row] = NO_NAMESPACE
        if not self.counted[row] & (1 << tier):
            return self._remove_if_unused(row)
        self.counted[row] &= ~np.uint8(1 << tier)
        parent = self.parents[row]
        assert parent is not None  # counted implies a parent row existed, and it cannot leave before us
        parent_row = self.ids[parent]
        self.children[parent_row, tier] -= 1
        return self._remove_if_unused(row) + self._remove_if_unused(parent_row)

    def _remove_if_unused(self, row: int) -> list[int]:
        key = self.keys[row]
        if key is None or self.fastest[row] != NO_TIER or self.children[row].any():
            return []
        del self.ids[key]
        self.keys[row] = None
        self.parents[row] = None
        self._free_rows.append(row)
        return [row]

    def _grow(self, extra: int) -> None:
        old, new = self.capacity, self.capacity + extra
        self.slot = _resized(self.slot, new, ABSENT)
        self.fastest = _resized(self.fastest, new, NO_TIER)
        self.children = _resized(self.children, new, 0)
        self.counted = _resized(self.counted, new, 0)
        self.namespace = _resized(self.namespace, new, 0)
        self.checksum = _resized(self.checksum, new, 0)
        self.leases = _resized(self.leases, new, 0)
        self.pinned = _resized(self.pinned, new, False)
        self.incarnation = _resized(self.incarnation, new, 0)
        self.keys.extend([None] * extra)
        self.parents.extend([None] * extra)
        self._free_rows.extend(range(new - 1, old - 1, -1))
        self.capacity = new


def check_keys(keys: Sequence[BlockKey]) -> None:
    """Every key is 16 bytes of type bytes, or InvalidArgumentError naming the first that is not."""
    # Two passes at C speed; the slow search for the culprit runs only when one is there.
    if set(map(type, keys)) <= {bytes} and set(map(len, keys)) <= {KEY_BYTES}:
        return
    bad = next(key for key in keys if type(key) is not bytes or len(key) != KEY_BYTES)
    raise InvalidArgumentError(f"a block key must be {KEY_BYTES} bytes, got {bad!r}")


def _resized(array: npt.NDArray[Any], rows: int, fill: object) -> npt.NDArray[Any]:
    grown = np.full((rows, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
