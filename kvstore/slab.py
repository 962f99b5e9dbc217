"""Slab allocator: fixed-size slots carved from an address space, no allocation per request.

Mechanism only, shared by every tier (DRAM segment, HBM slab, NVMe slab files). The address
space `[0, capacity_bytes)` is split into slabs of `slab_bytes`. A slab is handed to one size
class when that class runs out of slots and carved into slots of that size; a slab whose slots
are all free again is reclaimed for any class when another class needs one. Slot sizes are
rounded up to `alignment_bytes`, so every slot is aligned (O_DIRECT needs 4 KiB).

Owner: one tier. Not thread-safe: the tier manager serialises calls under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvstore.errors import InvalidArgumentError, StorageFormatError, StoreFullError
from kvstore.types import Slot


class SlabAllocator:
    def __init__(self, capacity_bytes: int, slab_bytes: int, alignment_bytes: int) -> None:
        if alignment_bytes <= 0 or alignment_bytes & (alignment_bytes - 1):
            raise InvalidArgumentError(f"alignment_bytes must be a power of two, got {alignment_bytes}")
        if slab_bytes <= 0 or slab_bytes % alignment_bytes:
            raise InvalidArgumentError(
                f"slab_bytes ({slab_bytes}) must be a positive multiple of alignment_bytes ({alignment_bytes})"
            )
        if capacity_bytes < slab_bytes:
            raise InvalidArgumentError(f"capacity_bytes ({capacity_bytes}) is smaller than one slab ({slab_bytes})")
        self.slab_bytes = slab_bytes
        self.alignment_bytes = alignment_bytes
        self.num_slabs = capacity_bytes // slab_bytes
        self.capacity_bytes = self.num_slabs * slab_bytes
        self._slab_class = [0] * self.num_slabs  # slot bytes of the slab's class; 0 = unassigned
        self._slab_used = [0] * self.num_slabs
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))  # a stack: low addresses first
        self._free_slots: dict[int, list[int]] = {}  # slot bytes -> stack of free offsets
        # One byte per alignment unit (0.02% of the capacity at 4 KiB) marks slot starts that
        # are handed out, so a double free or a foreign offset is refused, not absorbed.
        self._in_use = bytearray(self.capacity_bytes // alignment_bytes)
        self._used_bytes = 0

    # -- queries -----------------------------------------------------------------------------

    def slot_bytes(self, size_bytes: int) -> int:
        """The slot size a payload of `size_bytes` occupies."""
        if size_bytes <= 0:
            raise InvalidArgumentError(f"block size must be positive, got {size_bytes}")
        if size_bytes > self.slab_bytes:
            raise InvalidArgumentError(f"a block of {size_bytes} bytes does not fit a slab of {self.slab_bytes} bytes")
        mask = self.alignment_bytes - 1
        return (size_bytes + mask) & ~mask

    @property
    def used_bytes(self) -> int:
        """Bytes in allocated slots (slot sizes, not payload sizes)."""
        return self._used_bytes

    def num_available(self, size_bytes: int) -> int:
        """How many slots of this size `allocate` could hand out right now without eviction."""
        slot = self.slot_bytes(size_bytes)
        reclaimable = sum(1 for slab in range(self.num_slabs) if self._slab_class[slab] and not self._slab_used[slab])
        free_here = len(self._free_slots.get(slot, ()))
        reclaimed_here = sum(
            1 for slab in range(self.num_slabs) if self._slab_class[slab] == slot and not self._slab_used[slab]
        )
        per_slab = self.slab_bytes // slot
        return free_here + (len(self._free_slabs) + reclaimable - reclaimed_here) * per_slab

    def slab_of(self, slot: Slot) -> int:
        return slot // self.slab_bytes

    def slab_used(self, slab: int) -> int:
        return self._slab_used[slab]

    def slots_per_slab(self, size_bytes: int) -> int:
        return self.slab_bytes // self.slot_bytes(size_bytes)

    # -- changes -----------------------------------------------------------------------------

    def allocate(self, size_bytes: int, count: int) -> list[Slot]:
        """`count` slots for payloads of `size_bytes`, all or none (StoreFullError, nothing changed)."""
        slot = self.slot_bytes(size_bytes)
        if count < 0:
            raise InvalidArgumentError(f"count must be >= 0, got {count}")
        free = self._free_slots.setdefault(slot, [])
        if len(free) < count and self.num_available(size_bytes) < count:
            raise StoreFullError(
                f"no room for {count} slots of {slot} bytes: {self.num_available(size_bytes)} available, "
                f"{self._used_bytes} of {self.capacity_bytes} bytes in use"
            )
        while len(free) < count:
            slab = self._take_slab(exclude_class=slot)
            if slab is None:
                raise StoreFullError(
                    f"no room for {count} slots of {slot} bytes: {len(free)} free slots of that size, "
                    f"{self._used_bytes} of {self.capacity_bytes} bytes in use"
                )
            self._carve(slab, slot, free)
        taken = free[len(free) - count :]
        del free[len(free) - count :]
        taken.sort()  # ascending: a batch of adjacent slots is one run for copies and NVMe I/O
        unit = self.alignment_bytes
        for offset in taken:
            self._slab_used[offset // self.slab_bytes] += 1
            self._in_use[offset // unit] = 1
        self._used_bytes += slot * count
        return [Slot(offset) for offset in taken]

    def free(self, size_bytes: int, slots: Sequence[Slot]) -> None:
        """Return slots; double frees and foreign offsets are refused before anything changes."""
        slot = self.slot_bytes(size_bytes)
        unit = self.alignment_bytes
        for offset in slots:
            slab = offset // self.slab_bytes
            if not 0 <= slab < self.num_slabs or self._slab_class[slab] != slot or not self._fits(offset, slot):
                raise InvalidArgumentError(f"offset {offset} is not a slot of {slot} bytes in this allocator")
            if not self._in_use[offset // unit]:
                raise InvalidArgumentError(f"slot at offset {offset} is not allocated (double free?)")
        if len(set(slots)) != len(slots):
            twice = next(offset for offset in slots if slots.count(offset) > 1)
            raise InvalidArgumentError(f"slot at offset {twice} appears twice in one free()")
        free = self._free_slots.setdefault(slot, [])
        for offset in slots:
            self._slab_used[offset // self.slab_bytes] -= 1
            self._in_use[offset // unit] = 0
            free.append(offset)
        self._used_bytes -= slot * len(slots)

    def restore(self, used: Iterable[tuple[Slot, int]]) -> None:
        """Mark (offset, size_bytes) slots as allocated; only on a fresh allocator (restart recovery).
        Every record is checked before anything changes."""
        if self._used_bytes or self._free_slots:
            raise InvalidArgumentError("restore() needs a fresh allocator")
        slab_class: dict[int, int] = {}
        by_slab: dict[int, set[int]] = {}
        for offset, size_bytes in used:
            slot = self.slot_bytes(size_bytes)
            slab = offset // self.slab_bytes
            if not 0 <= slab < self.num_slabs or not self._fits(offset, slot):
                raise StorageFormatError(f"recorded slot at offset {offset} ({size_bytes} bytes) is out of place")
            if slab_class.setdefault(slab, slot) != slot:
                raise StorageFormatError(f"slab {slab} holds blocks of two sizes ({slab_class[slab]} and {slot})")
            if offset in by_slab.setdefault(slab, set()):
                raise StorageFormatError(f"two blocks recorded at offset {offset}")
            by_slab[slab].add(offset)
        self._free_slabs = [slab for slab in range(self.num_slabs - 1, -1, -1) if slab not in by_slab]
        for slab, offsets in by_slab.items():
            slot = slab_class[slab]
            self._slab_class[slab] = slot
            base = slab * self.slab_bytes
            top = base + (self.slab_bytes // slot - 1) * slot
            self._free_slots.setdefault(slot, []).extend(o for o in range(top, base - 1, -slot) if o not in offsets)
            for used_offset in offsets:
                self._in_use[used_offset // self.alignment_bytes] = 1
            self._slab_used[slab] = len(offsets)
            self._used_bytes += slot * len(offsets)

    # -- internals ---------------------------------------------------------------------------

    def _fits(self, offset: int, slot: int) -> bool:
        """Is `offset` the start of a whole slot of this size inside its slab?"""
        within = offset % self.slab_bytes
        return within % slot == 0 and within + slot <= self.slab_bytes

    def _take_slab(self, exclude_class: int) -> int | None:
        if self._free_slabs:
            return self._free_slabs.pop()
        for slab in range(self.num_slabs):  # reclaim an empty slab from another class
            slab_class = self._slab_class[slab]
            if slab_class and slab_class != exclude_class and not self._slab_used[slab]:
                old = self._free_slots[self._slab_class[slab]]
                lo, hi = slab * self.slab_bytes, (slab + 1) * self.slab_bytes
                old[:] = [offset for offset in old if not lo <= offset < hi]
                self._slab_class[slab] = 0
                return slab
        return None

    def _carve(self, slab: int, slot: int, free: list[int]) -> None:
        self._slab_class[slab] = slot
        base = slab * self.slab_bytes
        count = self.slab_bytes // slot
        # Pushed high to low: a batch takes the lowest offsets, handed out in ascending order.
        free.extend(range(base + (count - 1) * slot, base - 1, -slot))
