"""One contract suite over every tier (kvstore/tiers/base.py): DRAM, HBM on the CPU, NVMe.

Each tier is real: a /dev/shm segment, a torch slab, slab files and an LMDB index in tmp_path.
Geometry everywhere: 4 MiB in 256 KiB slabs, 4 KiB alignment, so a 5000-byte block takes an
8192-byte slot (32 per slab, 512 in all) and a 70000-byte block a 73728-byte slot (3 per slab,
48 in all).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from kvstore.config import DramConfig, HbmConfig, KiB, MiB, NvmeConfig
from kvstore.errors import InvalidArgumentError, PayloadSizeError, StoreClosedError, StoreFullError
from kvstore.tiers.base import SlabTier, TierUsage
from kvstore.tiers.dram import DramTier
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.nvme import NvmeTier
from kvstore.types import TierKind

CAPACITY = 4 * MiB
SLAB = 256 * KiB
ODD_SIZES = [5000, 70000]
SLOT_BYTES = {5000: 8192, 70000: 73728, 4096: 4096}
NUM_SLOTS = {5000: 512, 70000: 48}


@dataclass(frozen=True)
class TierCase:
    kind: TierKind
    build: Callable[[Path], SlabTier]
    # NVMe reads are always verified: read_into(..., checksums=None) raises InvalidArgumentError
    # there, while the memory tiers skip verification. The suite passes checksums to every tier
    # and checks the None case per tier with this flag.
    reads_need_checksums: bool


CASES = [
    TierCase(TierKind.DRAM, lambda _: DramTier(DramConfig(capacity_bytes=CAPACITY, slab_bytes=SLAB)), False),
    TierCase(
        TierKind.HBM,
        lambda _: HbmTier(HbmConfig(capacity_bytes=CAPACITY, slab_bytes=SLAB, device="cpu")),
        False,
    ),
    TierCase(
        TierKind.NVME,
        lambda tmp_path: NvmeTier(
            NvmeConfig(
                directory=tmp_path / "nvme",
                capacity_bytes=CAPACITY,
                file_bytes=2 * MiB,
                slab_bytes=SLAB,
                stage_bytes=1 * MiB,
                index_map_bytes=1 * MiB,
            )
        ),
        True,
    ),
]


@pytest.fixture(params=CASES, ids=[case.kind.label for case in CASES])
def case(request: pytest.FixtureRequest) -> TierCase:
    tier_case: TierCase = request.param
    return tier_case


@pytest.fixture
def tier(case: TierCase, tmp_path: Path) -> Iterator[SlabTier]:
    tier = case.build(tmp_path)
    yield tier
    tier.close()


def payload(seed: int, size_bytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size_bytes, dtype=np.uint8)


def xxh3(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(bytes(data))


def read_back(tier: SlabTier, slots: list[Any], size_bytes: int, checksums: list[int]) -> list[bytes]:
    """The slots' bytes, verified against `checksums` (which every tier accepts)."""
    dests = [np.zeros(size_bytes, np.uint8) for _ in slots]
    assert tier.read_into(slots, size_bytes, dests, checksums) == [True] * len(slots)
    return [dest.tobytes() for dest in dests]


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [*ODD_SIZES, 4096])
def test_round_trip_of_every_buffer_kind_returns_the_bytes_and_their_xxh3(tier: SlabTier, size: int) -> None:
    slots = tier.allocate(size, 5)
    data = [payload(seed, size) for seed in range(5)]
    halves = np.frombuffer(data[4].tobytes(), dtype=np.uint16) if size % 2 == 0 else data[4]
    sources: list[Any] = [
        data[0],
        data[1].tobytes(),
        bytearray(data[2].tobytes()),
        memoryview(data[3].tobytes()),
        halves,
    ]
    checksums = tier.write(slots, size, sources)
    assert checksums == [xxh3(d) for d in data]
    dests: list[Any] = [
        np.full(size, 0xFF, np.uint8),
        bytearray(size),
        memoryview(bytearray(size)),
        np.zeros(size // 4 + 1, np.uint32).view(np.uint8)[:size],  # a view that does not start a page
        np.zeros(size, np.uint8),
    ]
    assert tier.read_into(slots, size, dests, checksums) == [True] * 5
    assert [bytes(dest) for dest in dests] == [d.tobytes() for d in data]


def test_blocks_of_two_sizes_live_side_by_side(tier: SlabTier) -> None:
    small_slots = tier.allocate(5000, 3)
    large_slots = tier.allocate(70000, 2)
    small = [payload(seed, 5000) for seed in range(3)]
    large = [payload(seed + 10, 70000) for seed in range(2)]
    small_sums = tier.write(small_slots, 5000, small)
    large_sums = tier.write(large_slots, 70000, large)
    assert read_back(tier, small_slots, 5000, small_sums) == [p.tobytes() for p in small]
    assert read_back(tier, large_slots, 70000, large_sums) == [p.tobytes() for p in large]


def test_reads_without_checksums_per_tier(case: TierCase, tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    data = [payload(1, 5000), payload(2, 5000)]
    tier.write(slots, 5000, data)
    dests = [np.zeros(5000, np.uint8), np.zeros(5000, np.uint8)]
    if case.reads_need_checksums:
        with pytest.raises(InvalidArgumentError, match="always verified"):
            tier.read_into(slots, 5000, dests)
        assert not any(dest.any() for dest in dests)
    else:
        assert tier.read_into(slots, 5000, dests) == [True, True]
        assert [dest.tobytes() for dest in dests] == [d.tobytes() for d in data]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_a_wrong_checksum_is_reported_and_its_destination_zeroed(tier: SlabTier, size: int) -> None:
    slots = tier.allocate(size, 3)
    data = [payload(seed, size) for seed in range(3)]
    checksums = tier.write(slots, size, data)
    dests = [np.full(size, 0xFF, np.uint8) for _ in range(3)]
    wrong = [checksums[0], checksums[1] ^ 1, checksums[2]]
    assert tier.read_into(slots, size, dests, wrong) == [True, False, True]
    assert not dests[1].any()
    assert dests[0].tobytes() == data[0].tobytes()
    assert dests[2].tobytes() == data[2].tobytes()
    # The stored bytes are untouched: the right checksum still reads them.
    assert read_back(tier, slots[1:2], size, checksums[1:2]) == [data[1].tobytes()]


# -- refused input changes nothing -----------------------------------------------------------------


@pytest.mark.parametrize("bad_size", [4999, 5001, 0])
def test_a_payload_of_the_wrong_size_is_refused_before_anything_is_written(tier: SlabTier, bad_size: int) -> None:
    slots = tier.allocate(5000, 2)
    original = [payload(1, 5000), payload(2, 5000)]
    checksums = tier.write(slots, 5000, original)
    with pytest.raises(PayloadSizeError, match=f"payload 1 has {bad_size} bytes, expected 5000"):
        tier.write(slots, 5000, [payload(3, 5000), payload(4, bad_size)])
    assert read_back(tier, slots, 5000, checksums) == [p.tobytes() for p in original]


def test_a_destination_of_the_wrong_size_is_refused_before_anything_is_read(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    checksums = tier.write(slots, 5000, [payload(1, 5000), payload(2, 5000)])
    dests = [np.full(5000, 0xFF, np.uint8), np.full(4096, 0xFF, np.uint8)]
    with pytest.raises(PayloadSizeError, match="destination 1 has 4096 bytes, expected 5000"):
        tier.read_into(slots, 5000, dests, checksums)
    assert (dests[0] == 0xFF).all()
    assert (dests[1] == 0xFF).all()


def test_a_non_contiguous_payload_is_refused_before_anything_is_written(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    original = [payload(1, 5000), payload(2, 5000)]
    checksums = tier.write(slots, 5000, original)
    strided = payload(3, 10000)[::2]
    with pytest.raises(InvalidArgumentError, match="payload 1 must be C-contiguous"):
        tier.write(slots, 5000, [payload(4, 5000), strided])
    assert read_back(tier, slots, 5000, checksums) == [p.tobytes() for p in original]


def test_a_read_only_destination_is_refused_and_left_unchanged(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    checksums = tier.write(slots, 5000, [payload(1, 5000), payload(2, 5000)])
    writable = np.full(5000, 0xFF, np.uint8)
    read_only = bytes(5000)
    with pytest.raises(InvalidArgumentError, match="destination 1"):
        tier.read_into(slots, 5000, [writable, read_only], checksums)
    assert read_only == bytes(5000)  # an immutable bytes object must never be written into
    assert (writable == 0xFF).all()


def test_mismatched_batch_lengths_are_refused_and_change_nothing(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    original = [payload(1, 5000), payload(2, 5000)]
    checksums = tier.write(slots, 5000, original)
    with pytest.raises(InvalidArgumentError, match="2 slots but 1 payloads"):
        tier.write(slots, 5000, [payload(3, 5000)])
    with pytest.raises(InvalidArgumentError, match="1 slots but 2 payloads"):
        tier.write(slots[:1], 5000, [payload(3, 5000), payload(4, 5000)])
    dests = [np.full(5000, 0xFF, np.uint8)]
    with pytest.raises(InvalidArgumentError, match="2 slots but 1 destinations"):
        tier.read_into(slots, 5000, dests, checksums)
    assert (dests[0] == 0xFF).all()
    assert read_back(tier, slots, 5000, checksums) == [p.tobytes() for p in original]
    assert tier.usage().used_bytes == 2 * 8192


def test_checksums_of_the_wrong_length_are_refused_before_anything_is_read(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 2)
    checksums = tier.write(slots, 5000, [payload(1, 5000), payload(2, 5000)])
    dests = [np.full(5000, 0xFF, np.uint8), np.full(5000, 0xFF, np.uint8)]
    with pytest.raises(InvalidArgumentError, match="2 slots but 1 checksums"):
        tier.read_into(slots, 5000, dests, checksums[:1])
    with pytest.raises(InvalidArgumentError, match="2 slots but 3 checksums"):
        tier.read_into(slots, 5000, dests, [*checksums, 0])
    assert all((dest == 0xFF).all() for dest in dests)


# -- capacity and usage ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ODD_SIZES)
def test_allocating_beyond_capacity_raises_store_full_and_changes_nothing(tier: SlabTier, size: int) -> None:
    empty = tier.usage()
    with pytest.raises(StoreFullError):
        tier.allocate(size, NUM_SLOTS[size] + 1)
    assert tier.usage() == empty
    slots = tier.allocate(size, NUM_SLOTS[size])
    full = tier.usage()
    assert full.used_bytes == NUM_SLOTS[size] * SLOT_BYTES[size]
    with pytest.raises(StoreFullError):
        tier.allocate(size, 1)
    assert tier.usage() == full
    assert len(set(slots)) == NUM_SLOTS[size]


def test_free_makes_the_space_reusable(tier: SlabTier) -> None:
    slots = tier.allocate(70000, NUM_SLOTS[70000])
    freed = [slots[3], slots[17], slots[40]]
    tier.free(70000, freed)
    assert tier.usage().used_bytes == (NUM_SLOTS[70000] - 3) * 73728
    again = tier.allocate(70000, 3)
    assert sorted(again) == sorted(freed)
    with pytest.raises(StoreFullError):
        tier.allocate(70000, 1)
    data = [payload(seed, 70000) for seed in range(3)]
    checksums = tier.write(again, 70000, data)
    assert read_back(tier, again, 70000, checksums) == [p.tobytes() for p in data]


def test_freed_space_is_reusable_by_another_block_size(tier: SlabTier) -> None:
    large = tier.allocate(70000, NUM_SLOTS[70000])
    tier.free(70000, large)
    small = tier.allocate(5000, NUM_SLOTS[5000])
    assert tier.usage().used_bytes == CAPACITY
    data = payload(7, 5000)
    checksums = tier.write(small[-1:], 5000, [data])
    assert read_back(tier, small[-1:], 5000, checksums) == [data.tobytes()]


def test_usage_reports_slot_bytes(case: TierCase, tier: SlabTier) -> None:
    assert tier.usage() == TierUsage(case.kind, CAPACITY, 0)
    small = tier.allocate(5000, 3)
    assert tier.usage() == TierUsage(case.kind, CAPACITY, 3 * 8192)
    large = tier.allocate(70000, 2)
    assert tier.usage() == TierUsage(case.kind, CAPACITY, 3 * 8192 + 2 * 73728)
    assert tier.usage().used_bytes % 4096 == 0
    tier.free(5000, small[:1])
    assert tier.usage().used_bytes == 2 * 8192 + 2 * 73728
    tier.free(70000, large)
    tier.free(5000, small[1:])
    assert tier.usage() == TierUsage(case.kind, CAPACITY, 0)
    assert tier.kind is case.kind


def test_slots_are_aligned_and_disjoint(tier: SlabTier) -> None:
    spans = []
    for size, count in [(5000, 40), (70000, 5), (4096, 3)]:
        for slot in tier.allocate(size, count):
            assert slot % 4096 == 0
            spans.append((slot, slot + SLOT_BYTES[size]))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= CAPACITY


# -- close ---------------------------------------------------------------------------------------------


def test_a_closed_tier_refuses_reads_and_writes(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 1)
    checksums = tier.write(slots, 5000, [payload(1, 5000)])
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.write(slots, 5000, [payload(2, 5000)])
    dest = np.full(5000, 0xFF, np.uint8)
    with pytest.raises(StoreClosedError):
        tier.read_into(slots, 5000, [dest], checksums)
    assert (dest == 0xFF).all()
    tier.close()  # idempotent


def test_a_closed_tier_refuses_allocate_and_free(tier: SlabTier) -> None:
    slots = tier.allocate(5000, 1)
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.allocate(5000, 1)
    with pytest.raises(StoreClosedError):
        tier.free(5000, slots)
