"""SlabAllocator (kvstore/slab.py): aligned, non-overlapping slots; all or nothing; restore.

Geometry: four slabs of 64 KiB, 4 KiB alignment. Slot sizes used: 4096 (16 per slab), 8192
(from 5000-byte blocks, 8 per slab) and 12288 (5 per slab, 4 KiB of slack at the slab's end:
the size that does not divide the slab, where offsets relative to the slab matter).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from kvstore.errors import InvalidArgumentError, StorageFormatError, StoreFullError
from kvstore.slab import SlabAllocator
from kvstore.types import Slot

ALIGN = 4096
SLAB = 64 * 1024
NUM_SLABS = 4
SIZES = [1, 4096, 5000, 12288, 40000, SLAB]


def make_allocator(num_slabs: int = NUM_SLABS) -> SlabAllocator:
    return SlabAllocator(num_slabs * SLAB, SLAB, ALIGN)


def slots_of(slab: int, slot_bytes: int) -> set[int]:
    """Every slot offset a slab carved into `slot_bytes` slots has."""
    base = slab * SLAB
    return {base + i * slot_bytes for i in range(SLAB // slot_bytes)}


def availability(allocator: SlabAllocator) -> dict[int, int]:
    return {size: allocator.num_available(size) for size in SIZES}


# -- construction and sizes ---------------------------------------------------------------------


def test_capacity_is_rounded_down_to_whole_slabs() -> None:
    allocator = SlabAllocator(4 * SLAB + SLAB // 2, SLAB, ALIGN)
    assert allocator.num_slabs == 4
    assert allocator.capacity_bytes == 4 * SLAB
    assert allocator.used_bytes == 0


@pytest.mark.parametrize(
    ("capacity", "slab", "alignment", "message"),
    [
        (4 * SLAB, SLAB, 3000, "alignment_bytes must be a power of two, got 3000"),
        (4 * SLAB, SLAB, 0, "alignment_bytes must be a power of two, got 0"),
        (4 * SLAB, SLAB + 100, ALIGN, r"slab_bytes \(65636\) must be a positive multiple of alignment_bytes"),
        (SLAB - ALIGN, SLAB, ALIGN, r"capacity_bytes \(61440\) is smaller than one slab"),
    ],
)
def test_bad_geometry_is_refused(capacity: int, slab: int, alignment: int, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        SlabAllocator(capacity, slab, alignment)


@pytest.mark.parametrize(("size", "slot"), [(1, 4096), (4096, 4096), (4097, 8192), (5000, 8192), (SLAB, SLAB)])
def test_slot_bytes_round_up_to_the_alignment(size: int, slot: int) -> None:
    assert make_allocator().slot_bytes(size) == slot


def test_a_block_larger_than_a_slab_is_refused() -> None:
    allocator = make_allocator()
    with pytest.raises(InvalidArgumentError, match=f"a block of {SLAB + 1} bytes does not fit a slab of {SLAB} bytes"):
        allocator.allocate(SLAB + 1, 1)
    with pytest.raises(InvalidArgumentError, match="does not fit a slab"):
        allocator.num_available(SLAB + 1)
    assert allocator.used_bytes == 0
    assert sorted(allocator.allocate(SLAB, NUM_SLABS)) == [i * SLAB for i in range(NUM_SLABS)]


@pytest.mark.parametrize(
    ("size", "count", "message"),
    [(0, 1, "block size must be positive, got 0"), (5000, -1, "count must be >= 0, got -1")],
)
def test_bad_allocation_arguments_are_refused(size: int, count: int, message: str) -> None:
    allocator = make_allocator()
    with pytest.raises(InvalidArgumentError, match=message):
        allocator.allocate(size, count)
    assert allocator.used_bytes == 0
    assert availability(allocator) == availability(make_allocator())


# -- allocation ----------------------------------------------------------------------------------


def test_first_slots_come_from_the_lowest_addresses() -> None:
    allocator = make_allocator()
    assert sorted(allocator.allocate(5000, 3)) == [0, 8192, 16384]
    assert allocator.used_bytes == 3 * 8192
    assert allocator.allocate(5000, 0) == []
    assert allocator.used_bytes == 3 * 8192


def test_slots_of_mixed_sizes_are_aligned_in_one_slab_and_never_overlap() -> None:
    allocator = make_allocator(num_slabs=6)
    taken: list[tuple[int, int]] = []
    for size, count in [(5000, 3), (12288, 7), (1, 5), (5000, 6), (40000, 1)]:
        slot_bytes = allocator.slot_bytes(size)
        slots = allocator.allocate(size, count)
        assert len(slots) == count
        for offset in slots:
            assert offset % ALIGN == 0
            assert offset % SLAB + slot_bytes <= SLAB  # never straddles a slab
            assert offset + slot_bytes <= allocator.capacity_bytes
            taken.append((offset, offset + slot_bytes))
    taken.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(taken))
    assert allocator.used_bytes == sum(end - start for start, end in taken)
    assert allocator.used_bytes == 9 * 8192 + 7 * 12288 + 5 * 4096 + 40960


def test_free_then_reuse_hands_back_the_freed_slot() -> None:
    allocator = make_allocator()
    slots = allocator.allocate(5000, 3)
    allocator.free(5000, [slots[1]])
    assert allocator.used_bytes == 2 * 8192
    assert allocator.allocate(5000, 1) == [slots[1]]
    assert allocator.used_bytes == 3 * 8192


def test_freeing_everything_returns_the_whole_capacity() -> None:
    allocator = make_allocator()
    small = allocator.allocate(5000, 8)
    odd = allocator.allocate(12288, 10)
    allocator.free(12288, odd)
    allocator.free(5000, small)
    assert allocator.used_bytes == 0
    assert sorted(allocator.allocate(SLAB, NUM_SLABS)) == [i * SLAB for i in range(NUM_SLABS)]


def test_slots_of_a_size_that_does_not_divide_the_slab_can_be_freed_in_every_slab() -> None:
    allocator = make_allocator()
    slots = allocator.allocate(12288, 4 * 5)  # every slab, 5 slots each
    assert set(slots) == set().union(*(slots_of(slab, 12288) for slab in range(NUM_SLABS)))
    allocator.free(12288, slots)
    assert allocator.used_bytes == 0
    assert allocator.num_available(12288) == 20


def test_store_full_changes_nothing() -> None:
    def build() -> SlabAllocator:
        allocator = make_allocator()
        allocator.allocate(5000, 1)  # slab 0 is 8 KiB slots, one used
        allocator.allocate(4096, 1)  # slab 1 is 4 KiB slots, one used
        return allocator

    failed, twin = build(), build()
    used_before = failed.used_bytes
    with pytest.raises(StoreFullError, match=r"no room for 100 slots of 8192 bytes"):
        failed.allocate(5000, 100)
    assert failed.used_bytes == used_before
    assert availability(failed) == availability(twin)
    # Later allocations get exactly what they would have got had the failed call never happened.
    assert sorted(failed.allocate(5000, 2)) == sorted(twin.allocate(5000, 2))
    assert sorted(failed.allocate(12288, 3)) == sorted(twin.allocate(12288, 3))
    assert availability(failed) == availability(twin)


def test_full_allocator_refuses_and_keeps_its_slots() -> None:
    allocator = make_allocator()
    slots = allocator.allocate(5000, 4 * 8)
    assert allocator.num_available(5000) == 0
    assert allocator.num_available(1) == 0
    with pytest.raises(StoreFullError):
        allocator.allocate(5000, 1)
    with pytest.raises(StoreFullError):
        allocator.allocate(1, 1)
    assert allocator.used_bytes == allocator.capacity_bytes
    allocator.free(5000, slots[:1])
    assert allocator.allocate(5000, 1) == slots[:1]


# -- refused frees --------------------------------------------------------------------------------


def test_double_free_is_refused_and_changes_nothing() -> None:
    allocator = make_allocator()
    slots = allocator.allocate(5000, 2)
    allocator.free(5000, [slots[0]])
    before = (allocator.used_bytes, availability(allocator))
    with pytest.raises(InvalidArgumentError, match=f"offset {slots[0]}"):
        allocator.free(5000, [slots[0]])
    assert (allocator.used_bytes, availability(allocator)) == before
    # The slot comes back once, not twice.
    assert sorted(allocator.allocate(5000, 7)) == sorted(slots_of(0, 8192) - {slots[1]})


def test_the_same_slot_twice_in_one_free_is_refused_and_changes_nothing() -> None:
    allocator = make_allocator()
    slots = allocator.allocate(5000, 2)
    before = (allocator.used_bytes, availability(allocator))
    with pytest.raises(InvalidArgumentError, match=f"offset {slots[0]}"):
        allocator.free(5000, [slots[0], slots[0]])
    assert (allocator.used_bytes, availability(allocator)) == before


def test_freeing_a_slot_that_was_never_allocated_is_refused_and_changes_nothing() -> None:
    allocator = make_allocator()
    (slot,) = allocator.allocate(5000, 1)
    never_allocated = slot + 8192  # a slot of the same slab and size class, still free
    before = (allocator.used_bytes, availability(allocator))
    with pytest.raises(InvalidArgumentError, match=f"offset {never_allocated}"):
        allocator.free(5000, [never_allocated])
    assert (allocator.used_bytes, availability(allocator)) == before


@pytest.mark.parametrize(
    ("size", "offset"),
    [
        (5000, 4096),  # inside slab 0 but not on an 8 KiB slot boundary
        (5000, 100),  # not aligned at all
        (5000, SLAB * 2),  # a slab no class owns yet
        (5000, SLAB * NUM_SLABS),  # past the end
        (5000, -8192),  # before the start
        (12288, 0),  # slab 0 holds 8 KiB slots, not 12 KiB ones
        (5000, SLAB + 5 * 12288),  # the slack at the end of a 12 KiB slab
        (12288, SLAB + 5 * 12288),  # the same slack, asked as the slab's own size
    ],
)
def test_foreign_offsets_are_refused_and_change_nothing(size: int, offset: int) -> None:
    allocator = make_allocator()
    good = {5000: allocator.allocate(5000, 2)[0], 12288: allocator.allocate(12288, 5)[0]}  # slabs 0 and 1
    before = (allocator.used_bytes, availability(allocator))
    with pytest.raises(InvalidArgumentError, match=f"offset {offset} is not a slot of"):
        allocator.free(size, [good[size], Slot(offset)])  # the good slot is not freed either
    assert (allocator.used_bytes, availability(allocator)) == before


# -- size classes and availability ------------------------------------------------------------------


def test_an_empty_slab_is_reclaimed_for_another_size_class() -> None:
    allocator = make_allocator()
    small = allocator.allocate(4096, 4 * 16)  # all four slabs become 4 KiB slabs
    slab_two = [slot for slot in small if slot // SLAB == 2]
    allocator.free(4096, slab_two)
    assert allocator.num_available(4096) == 16
    assert allocator.num_available(5000) == 8
    assert set(allocator.allocate(5000, 8)) == slots_of(2, 8192)
    # Slab 2's 4 KiB slots are gone from the old class's free list.
    assert allocator.num_available(4096) == 0
    with pytest.raises(StoreFullError):
        allocator.allocate(4096, 1)
    assert allocator.used_bytes == allocator.capacity_bytes


def test_a_slab_with_one_used_slot_is_not_reclaimed() -> None:
    allocator = make_allocator(num_slabs=2)
    first = allocator.allocate(4096, 1)
    allocator.allocate(5000, 8)  # fills slab 1
    assert allocator.num_available(5000) == 0
    with pytest.raises(StoreFullError):
        allocator.allocate(5000, 1)
    allocator.free(4096, first)
    assert allocator.num_available(5000) == 8
    assert set(allocator.allocate(5000, 8)) == slots_of(0, 8192)


def build_fresh() -> SlabAllocator:
    return make_allocator()


def build_mixed() -> SlabAllocator:
    """Slab 0: 8 KiB slots, 3 used; slab 1: 12 KiB, empty again; slab 2: 4 KiB, 1 used; slab 3 free."""
    allocator = make_allocator()
    allocator.allocate(5000, 3)
    odd = allocator.allocate(12288, 2)
    allocator.allocate(1, 1)
    allocator.free(12288, odd)
    return allocator


@pytest.mark.parametrize("build", [build_fresh, build_mixed], ids=["fresh", "mixed"])
@pytest.mark.parametrize("size", SIZES)
def test_num_available_is_exactly_what_allocate_hands_out(build: Callable[[], SlabAllocator], size: int) -> None:
    allocator = build()
    count = allocator.num_available(size)
    slots = allocator.allocate(size, count)
    assert len(slots) == count
    assert allocator.num_available(size) == 0
    with pytest.raises(StoreFullError):
        allocator.allocate(size, 1)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (build_fresh, {1: 64, 4096: 64, 5000: 32, 12288: 20, 40000: 4, SLAB: 4}),
        # slab 1 (empty, 12 KiB) and slab 3 (unassigned) are free for anyone; slab 0 and 2 only for their class.
        (build_mixed, {1: 15 + 32, 4096: 15 + 32, 5000: 5 + 16, 12288: 10, 40000: 2, SLAB: 2}),
    ],
    ids=["fresh", "mixed"],
)
def test_num_available_counts_free_slots_free_slabs_and_empty_slabs(
    build: Callable[[], SlabAllocator], expected: dict[int, int]
) -> None:
    assert availability(build()) == expected


# -- restore ----------------------------------------------------------------------------------------


def test_restore_rebuilds_occupancy() -> None:
    allocator = make_allocator()
    allocator.restore([(Slot(0), 5000), (Slot(8192), 5000), (Slot(SLAB + 12288), 12288)])
    assert allocator.used_bytes == 2 * 8192 + 12288
    assert availability(allocator) == {1: 32, 4096: 32, 5000: 6 + 16, 12288: 4 + 10, 40000: 2, SLAB: 2}
    assert set(allocator.allocate(5000, 6)) == slots_of(0, 8192) - {0, 8192}
    assert set(allocator.allocate(12288, 4)) == slots_of(1, 12288) - {SLAB + 12288}
    allocator.free(5000, [Slot(0), Slot(8192)])
    allocator.free(12288, [Slot(SLAB + 12288)])
    assert allocator.used_bytes == 6 * 8192 + 4 * 12288


def test_restore_of_nothing_leaves_a_fresh_allocator() -> None:
    allocator = make_allocator()
    allocator.restore([])
    assert allocator.used_bytes == 0
    assert availability(allocator) == availability(make_allocator())


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([(0, 5000), (4096 * 4, 4096)], r"slab 0 holds blocks of two sizes \(8192 and 4096\)"),
        ([(0, 5000), (0, 5000)], r"two blocks recorded at offset 0"),
        ([(4096, 5000)], r"recorded slot at offset 4096 \(5000 bytes\) is out of place"),
        ([(SLAB * NUM_SLABS, 5000)], r"is out of place"),
        ([(-8192, 5000)], r"is out of place"),
        ([(SLAB + 5 * 12288, 12288)], r"is out of place"),  # would run past the end of its slab
    ],
    ids=["two-sizes", "duplicate", "misaligned", "past-the-end", "negative", "straddles-the-slab"],
)
def test_restore_refuses_conflicting_records(records: list[tuple[int, int]], message: str) -> None:
    allocator = make_allocator()
    with pytest.raises(StorageFormatError, match=message):
        allocator.restore([(Slot(offset), size) for offset, size in records])


def test_a_refused_restore_changes_nothing() -> None:
    allocator = make_allocator()
    with pytest.raises(StorageFormatError):
        allocator.restore([(Slot(0), 5000), (Slot(4096 * 4), 4096)])
    assert allocator.used_bytes == 0
    assert availability(allocator) == availability(make_allocator())
    allocator.restore([(Slot(0), 4096)])  # slab 0 was never given a class
    assert allocator.used_bytes == 4096


def test_restore_needs_a_fresh_allocator() -> None:
    allocator = make_allocator()
    allocator.allocate(5000, 1)
    with pytest.raises(InvalidArgumentError, match="restore\\(\\) needs a fresh allocator"):
        allocator.restore([(Slot(SLAB), 5000)])
    assert allocator.used_bytes == 8192
