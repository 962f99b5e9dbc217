"""NVMe tier on real slab files and a real LMDB index in pytest's tmp_path (small geometry)."""

from __future__ import annotations

import mmap
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import xxhash

from kvstore.config import KiB, MiB, NvmeConfig
from kvstore.errors import ConfigError, InvalidArgumentError, PayloadSizeError, StorageFormatError, StoreClosedError
from kvstore.tiers.nvme import LOCK_NAME, NvmeTier, slab_file_name
from kvstore.tiers.nvme_index import INDEX_NAME, NvmeRecord
from kvstore.types import BlockKey, NamespaceId, Slot

NAMESPACE = NamespaceId(b"N" * 16)


def make_config(directory: Path, **overrides: Any) -> NvmeConfig:
    fields: dict[str, Any] = {
        "directory": directory,
        "capacity_bytes": 4 * MiB,
        "file_bytes": 1 * MiB,
        "slab_bytes": 256 * KiB,
        "stage_bytes": 1 * MiB,
        "index_map_bytes": 1 * MiB,
    }
    fields.update(overrides)
    return NvmeConfig(**fields)


def payload(seed: int, size_bytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size_bytes, dtype=np.uint8)


def key(number: int) -> BlockKey:
    return BlockKey(number.to_bytes(16, "big"))


def records_for(keys: list[BlockKey], slots: list[Slot], size_bytes: int, checksums: list[int]) -> list[NvmeRecord]:
    parents: list[BlockKey | None] = [None, *keys[:-1]]
    return [
        NvmeRecord(key=k, namespace_id=NAMESPACE, parent=p, slot=s, size_bytes=size_bytes, checksum=c)
        for k, p, s, c in zip(keys, parents, slots, checksums, strict=True)
    ]


def filesystem_type(path: Path) -> str:
    best, kind = "", "unknown"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        inside = str(path) == mountpoint or str(path).startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) > len(best):
            best, kind = mountpoint, fstype
    return kind


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls to os.<name> (the tier looks it up at call time)."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(os, name)

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(os, name, spy)
    return calls


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "nvme"


@pytest.fixture
def tier(directory: Path) -> Iterator[NvmeTier]:
    tier = NvmeTier(make_config(directory))
    yield tier
    tier.close()


@pytest.mark.parametrize("use_direct_io", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size_bytes", [5000, 70000, 8192])
def test_round_trip_returns_the_bytes_and_their_xxh3(directory: Path, use_direct_io: bool, size_bytes: int) -> None:
    tier = NvmeTier(make_config(directory, use_direct_io=use_direct_io))
    try:
        if not use_direct_io:
            assert tier.direct_io is False
        slots = tier.allocate(size_bytes, 4)
        payloads = [payload(seed, size_bytes) for seed in range(4)]
        checksums = tier.write(
            slots, size_bytes, [payloads[0], payloads[1].tobytes(), bytearray(payloads[2]), payloads[3]]
        )
        assert checksums == [xxhash.xxh3_64_intdigest(p.tobytes()) for p in payloads]
        dests: list[Any] = [bytearray(size_bytes), np.zeros(size_bytes, np.uint8), memoryview(bytearray(size_bytes))]
        dests.append(np.zeros(size_bytes // 4 + 1, np.uint32).view(np.uint8)[:size_bytes])
        assert tier.read_into(slots, size_bytes, dests, checksums) == [True] * 4
        assert [bytes(d) for d in dests] == [p.tobytes() for p in payloads]
        assert tier.num_checksum_failures == 0
    finally:
        tier.close()


def test_direct_io_is_detected(directory: Path, tier: NvmeTier) -> None:
    kind = filesystem_type(directory.resolve())
    if kind not in ("ext4", "xfs"):
        pytest.skip(f"tmp_path is on {kind}, which may refuse O_DIRECT")
    assert tier.direct_io is True
    assert not (directory / ".direct-io-probe").exists()


def test_aligned_destinations_are_read_without_the_stage(tier: NvmeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 8192
    slots = tier.allocate(size, 3)
    payloads = [payload(seed, size) for seed in range(3)]
    checksums = tier.write(slots, size, payloads)
    aligned = mmap.mmap(-1, 3 * size)  # page-aligned
    dests = [np.frombuffer(aligned, np.uint8, size, i * size) for i in range(3)]
    staged_reads: list[int] = []
    monkeypatch.setattr(tier, "_read_staged", lambda *args: staged_reads.append(1))
    preadv_calls = count_calls(monkeypatch, "preadv")
    assert tier.read_into(slots, size, dests, checksums) == [True, True, True]
    assert [d.tobytes() for d in dests] == [p.tobytes() for p in payloads]
    assert staged_reads == []
    assert len(preadv_calls) == 1  # three adjacent slots, one syscall
    del dests
    aligned.close()


def test_reads_are_always_verified(tier: NvmeTier) -> None:
    slots = tier.allocate(5000, 1)
    tier.write(slots, 5000, [payload(1, 5000)])
    with pytest.raises(InvalidArgumentError, match="always verified"):
        tier.read_into(slots, 5000, [bytearray(5000)])
    with pytest.raises(InvalidArgumentError, match="read-only"):
        tier.read_into(slots, 5000, [bytes(5000)], [0])


def test_restart_serves_committed_blocks_and_frees_the_rest(directory: Path) -> None:
    size = 70000
    tier = NvmeTier(make_config(directory))
    committed_slots = tier.allocate(size, 3)
    committed_payloads = [payload(seed, size) for seed in range(3)]
    checksums = tier.write(committed_slots, size, committed_payloads)
    records = records_for([key(1), key(2), key(3)], committed_slots, size, checksums)
    tier.commit_records(records)
    tier.put_namespace(NAMESPACE, b"namespace encoding")
    uncommitted_slots = tier.allocate(size, 2)
    tier.write(uncommitted_slots, size, [payload(10, size), payload(11, size)])
    assert tier.allocator.used_bytes == 5 * 73728
    tier.close()

    reopened = NvmeTier(make_config(directory))
    try:
        assert sorted(reopened.records(), key=lambda r: r.key) == records
        assert reopened.namespaces() == {NAMESPACE: b"namespace encoding"}
        assert reopened.allocator.used_bytes == 3 * 73728
        dests = [bytearray(size) for _ in range(3)]
        assert reopened.read_into([r.slot for r in records], size, dests, [r.checksum for r in records]) == [True] * 3
        assert [bytes(d) for d in dests] == [p.tobytes() for p in committed_payloads]
        # The uncommitted blocks' space is free again: the next slots of that size are theirs.
        assert sorted(reopened.allocate(size, 2)) == sorted(uncommitted_slots)
    finally:
        reopened.close()


def test_a_flipped_byte_is_caught_and_never_returned(directory: Path, tier: NvmeTier) -> None:
    size = 70000
    slots = tier.allocate(size, 3)
    payloads = [payload(seed, size) for seed in range(3)]
    checksums = tier.write(slots, size, payloads)
    tier.commit_records(records_for([key(1), key(2), key(3)], slots, size, checksums))
    file_index, file_offset = divmod(slots[1] + 12345, 1 * MiB)
    with open(directory / slab_file_name(file_index), "r+b") as slab_file:
        slab_file.seek(file_offset)
        original = slab_file.read(1)[0]
        slab_file.seek(file_offset)
        slab_file.write(bytes([original ^ 0x01]))
        slab_file.flush()
        os.fsync(slab_file.fileno())
    dests = [np.full(size, 0xFF, np.uint8) for _ in range(3)]
    assert tier.read_into(slots, size, dests, checksums) == [True, False, True]
    assert not dests[1].any()
    assert dests[0].tobytes() == payloads[0].tobytes()
    assert dests[2].tobytes() == payloads[2].tobytes()
    assert tier.num_checksum_failures == 1


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([5000, 65000, 130000, 16000], id="power-of-two-slots"),
        pytest.param([5000, 70000, 200000, 40000], id="odd-slots"),
    ],
)
def test_churn_of_ten_times_the_capacity_keeps_the_files_and_the_allocator_sound(
    directory: Path, tier: NvmeTier, sizes: list[int]
) -> None:
    expected_sizes = [1 * MiB] * 4
    live: deque[tuple[int, list[Slot], list[NvmeRecord]]] = deque()
    written_bytes, round_number = 0, 0
    while written_bytes < 10 * tier.allocator.capacity_bytes:
        size = sizes[round_number % len(sizes)]
        count = 6
        while tier.allocator.num_available(size) < count:
            old_size, old_slots, old_records = live.popleft()
            tier.remove_records([r.key for r in old_records])
            tier.free(old_size, old_slots)
        slots = tier.allocate(size, count)
        keys = [key(round_number * count + i) for i in range(count)]
        checksums = tier.write(slots, size, [np.full(size, round_number % 251, np.uint8)] * count)
        records = records_for(keys, slots, size, checksums)
        tier.commit_records(records)
        live.append((size, slots, records))
        written_bytes += size * count
        round_number += 1
        assert [os.path.getsize(directory / slab_file_name(i)) for i in range(4)] == expected_sizes
    assert sorted(tier.records(), key=lambda r: r.key) == sorted(
        (r for _, _, rs in live for r in rs), key=lambda r: r.key
    )
    assert tier.allocator.used_bytes == sum(tier.allocator.slot_bytes(size) * len(slots) for size, slots, _ in live)
    size, slots, records = live[-1]
    dests = [bytearray(size) for _ in slots]
    assert tier.read_into(slots, size, dests, [r.checksum for r in records]) == [True] * len(slots)
    assert sorted(os.listdir(directory)) == sorted([INDEX_NAME, LOCK_NAME, *(slab_file_name(i) for i in range(4))])


@pytest.mark.parametrize(
    ("field", "value"),
    [("slab_bytes", 512 * KiB), ("file_bytes", 2 * MiB), ("capacity_bytes", 8 * MiB)],
)
def test_reopening_with_another_geometry_is_refused(directory: Path, field: str, value: int) -> None:
    tier = NvmeTier(make_config(directory))
    slots = tier.allocate(5000, 1)
    checksums = tier.write(slots, 5000, [payload(1, 5000)])
    records = records_for([key(1)], slots, 5000, checksums)
    tier.commit_records(records)
    tier.close()
    with pytest.raises(StorageFormatError, match=field):
        NvmeTier(make_config(directory, **{field: value}))
    reopened = NvmeTier(make_config(directory))  # the refused open changed nothing
    try:
        assert reopened.records() == records
        assert [os.path.getsize(directory / slab_file_name(i)) for i in range(4)] == [1 * MiB] * 4
    finally:
        reopened.close()


def test_batches_larger_than_the_stage_are_chunked(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = NvmeTier(make_config(directory, stage_bytes=256 * KiB))
    try:
        size = 70000  # 73728-byte slots: three per 256 KiB slab, and three fit the stage
        slots = tier.allocate(size, 12)  # slabs 0-3, full
        payloads = [payload(seed, size) for seed in range(12)]
        pwritev_calls = count_calls(monkeypatch, "pwritev")
        fdatasync_calls = count_calls(monkeypatch, "fdatasync")
        checksums = tier.write(slots, size, payloads)
        assert len(pwritev_calls) == 4  # four chunks of 3 blocks, each one slab's run of adjacent slots
        assert len(fdatasync_calls) == 1  # all four slabs lie in the first file
        dests = [bytearray(size) for _ in range(12)]
        assert tier.read_into(slots, size, dests, checksums) == [True] * 12
        assert [bytes(d) for d in dests] == [p.tobytes() for p in payloads]
    finally:
        tier.close()


def test_a_batch_spanning_files_syncs_each_file(tier: NvmeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 200000  # 200704-byte slots: one per slab, four slabs per file
    slots = tier.allocate(size, 6)
    payloads = [payload(seed, size) for seed in range(6)]
    fdatasync_calls = count_calls(monkeypatch, "fdatasync")
    checksums = tier.write(slots, size, payloads)
    assert len(fdatasync_calls) == 2
    dests = [np.zeros(size, np.uint8) for _ in range(6)]
    assert tier.read_into(slots, size, dests, checksums) == [True] * 6
    assert [d.tobytes() for d in dests] == [p.tobytes() for p in payloads]


def test_a_wrong_payload_size_changes_nothing(tier: NvmeTier, monkeypatch: pytest.MonkeyPatch) -> None:
    slots = tier.allocate(5000, 2)
    checksums = tier.write(slots[:1], 5000, [payload(1, 5000)])
    records = records_for([key(1)], slots[:1], 5000, checksums)
    tier.commit_records(records)
    used_before = tier.allocator.used_bytes
    pwritev_calls = count_calls(monkeypatch, "pwritev")
    with pytest.raises(PayloadSizeError, match="payload 1 has 4999 bytes"):
        tier.write(slots, 5000, [payload(2, 5000), payload(3, 4999)])
    assert pwritev_calls == []
    assert tier.allocator.used_bytes == used_before
    assert tier.records() == records
    dest = bytearray(5000)
    assert tier.read_into(slots[:1], 5000, [dest], checksums) == [True]
    assert bytes(dest) == payload(1, 5000).tobytes()


def test_files_are_private_and_sized_to_the_capacity(tmp_path: Path) -> None:
    directory = tmp_path / "parent" / "nvme"
    tier = NvmeTier(make_config(directory, capacity_bytes=3 * MiB + 600 * KiB))  # rounds down to 3.5 MiB
    try:
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(directory / INDEX_NAME).st_mode) == 0o700
        slab_files = [directory / slab_file_name(i) for i in range(4)]
        assert [os.path.getsize(path) for path in slab_files] == [1 * MiB, 1 * MiB, 1 * MiB, 512 * KiB]
        index_files = sorted((directory / INDEX_NAME).iterdir())
        assert [path.name for path in index_files] == ["data.mdb", "lock.mdb"]
        assert {stat.S_IMODE(os.stat(path).st_mode) for path in [*slab_files, directory / LOCK_NAME, *index_files]} == {
            0o600
        }
        assert tier.usage().capacity_bytes == 3 * MiB + 512 * KiB
    finally:
        tier.close()


def test_a_corrupt_record_is_refused_naming_its_key(directory: Path) -> None:
    NvmeTier(make_config(directory)).close()
    env = lmdb.open(str(directory / INDEX_NAME), max_dbs=3)
    with env.begin(write=True) as txn:
        txn.put(key(7), b"\x01garbage", db=env.open_db(b"blocks", txn=txn))
    env.close()
    with pytest.raises(StorageFormatError, match=key(7).hex()):
        NvmeTier(make_config(directory))


def test_close_is_idempotent_and_final(tier: NvmeTier) -> None:
    slots = tier.allocate(5000, 1)
    tier.close()
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.write(slots, 5000, [payload(1, 5000)])
    with pytest.raises(StoreClosedError):
        tier.read_into(slots, 5000, [bytearray(5000)], [0])
    with pytest.raises(StoreClosedError):
        tier.records()
    with pytest.raises(StoreClosedError):
        tier.commit_records([])


def test_a_directory_is_required() -> None:
    with pytest.raises(ConfigError, match=r"nvme\.directory"):
        NvmeTier(NvmeConfig())


def test_a_directory_serves_one_tier_at_a_time(directory: Path, tier: NvmeTier) -> None:
    with pytest.raises(ConfigError, match="in use"):
        NvmeTier(make_config(directory))
    tier.close()
    NvmeTier(make_config(directory)).close()
