"""DRAM tier's shared-memory segment (kvstore/tiers/dram.py): a real /dev/shm file, a real second process."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.config import DramConfig, KiB, MiB
from kvstore.errors import InvalidArgumentError
from kvstore.tiers.dram import SHM_DIR, DramTier, SharedSegment, remove_stale_segments

SIZE = 5000


def make_tier(segment_name: str = "") -> DramTier:
    return DramTier(DramConfig(capacity_bytes=1 * MiB, slab_bytes=256 * KiB, segment_name=segment_name))


def unique_name() -> str:
    return f"kvstore-test-{os.getpid()}-{secrets.token_hex(4)}"


def payload(seed: int, size_bytes: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size_bytes, dtype=np.uint8)


@pytest.fixture
def tier() -> Iterator[DramTier]:
    tier = make_tier()
    yield tier
    tier.close()


def run_python(script: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["permissive", "restrictive"])
def test_segment_file_is_mode_0600_whatever_the_umask(umask: int) -> None:
    previous = os.umask(umask)
    try:
        tier = make_tier()
    finally:
        os.umask(previous)
    try:
        info = os.stat(SHM_DIR / tier.segment.name)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_ISREG(info.st_mode)
        assert info.st_uid == os.getuid()
        assert info.st_size == 1 * MiB
    finally:
        tier.close()


def test_a_second_process_reads_and_writes_slots(tier: DramTier) -> None:
    written_slot, other_slot = tier.allocate(SIZE, 2)
    (expected,) = tier.write([written_slot], SIZE, [payload(1)])
    script = (
        "import xxhash\n"
        "from kvstore.tiers.dram import SharedSegment\n"
        f"segment = SharedSegment.attach({tier.segment.name!r})\n"
        f"print(segment.size_bytes, xxhash.xxh3_64_intdigest(segment.view({written_slot}, {SIZE})))\n"
        f"segment.view({other_slot}, {SIZE})[:] = bytes(i % 251 for i in range({SIZE}))\n"
        "segment.close()\n"
    )
    size_seen, checksum_seen = run_python(script)
    assert int(size_seen) == 1 * MiB
    assert int(checksum_seen) == expected
    from_child = bytes(i % 251 for i in range(SIZE))
    dest = np.zeros(SIZE, np.uint8)
    assert tier.read_into([other_slot], SIZE, [dest], [xxhash.xxh3_64_intdigest(from_child)]) == [True]
    assert dest.tobytes() == from_child
    assert bytes(tier.host_view(other_slot, SIZE)) == from_child


def test_an_attached_segment_in_this_process_shares_the_bytes(tier: DramTier) -> None:
    (slot,) = tier.allocate(SIZE, 1)
    attached = SharedSegment.attach(tier.segment.name)
    try:
        tier.write([slot], SIZE, [payload(2)])
        assert bytes(attached.view(slot, SIZE)) == payload(2).tobytes()
        attached.view(slot, 3)[:] = b"abc"
        assert bytes(tier.host_view(slot, 3)) == b"abc"
    finally:
        attached.close()
    assert (SHM_DIR / tier.segment.name).exists()  # closing an attachment never unlinks


def test_the_owners_close_unlinks_the_segment() -> None:
    tier = make_tier(segment_name=unique_name())
    path = SHM_DIR / tier.segment.name
    assert path.exists()
    tier.close()
    assert not path.exists()
    tier.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        SharedSegment.attach(path.name)


def test_attaching_a_missing_segment_raises_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        SharedSegment.attach(unique_name())


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_attaching_a_bad_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid shared-memory segment name"):
        SharedSegment.attach(name)


def test_a_segment_name_in_use_is_refused_and_left_alone() -> None:
    name = unique_name()
    first = make_tier(segment_name=name)
    try:
        (slot,) = first.allocate(SIZE, 1)
        first.write([slot], SIZE, [payload(3)])
        with pytest.raises(FileExistsError):
            make_tier(segment_name=name)
        assert Path(SHM_DIR / name).exists()
        assert bytes(first.host_view(slot, SIZE)) == payload(3).tobytes()
    finally:
        first.close()


def test_segments_of_dead_stores_are_removed_at_start():
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    stale = SHM_DIR / f"kvstore-{dead_pid}-0badc0de"
    alive = SHM_DIR / f"kvstore-{os.getpid()}-0badc0de"
    other = SHM_DIR / f"kvstore-{dead_pid}-custom-name"
    for path in (stale, alive, other):
        path.write_bytes(b"x")
    try:
        tier = make_tier()
        tier.close()
        assert not stale.exists()  # its process is gone
        assert alive.exists()  # ours: alive
        assert other.exists()  # not a name a store picks by default: never touched
    finally:
        for path in (stale, alive, other):
            path.unlink(missing_ok=True)


def test_segments_and_indexes_of_dead_stores_are_removed():
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    names = [f"kvstore-{dead}-0123abcd", f"kvstore-{dead}-0123abcd.index", f"kvstore-{os.getpid()}-0123abcd.index"]
    for name in names:
        (SHM_DIR / name).write_bytes(b"x")
    try:
        removed = remove_stale_segments()
        assert sorted(set(removed) & set(names)) == sorted(names[:2])
        assert (SHM_DIR / names[2]).exists()  # a live process's index stays
    finally:
        for name in names:
            (SHM_DIR / name).unlink(missing_ok=True)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_read_copies_every_block_compiled_or_not(tier: DramTier, compiled: bool, monkeypatch) -> None:
    from kvstore.tiers import dram  # noqa: PLC0415 - the module whose copy is switched

    if compiled and dram.native_copy_blocks is None:
        pytest.skip("kvstore/_index_probe.c was not compiled here")
    if not compiled:
        monkeypatch.setattr(dram, "native_copy_blocks", None)
    slots = tier.allocate(SIZE, 3)
    blocks = [payload(seed) for seed in range(3)]
    checksums = tier.write(slots, SIZE, blocks)
    dests = [np.zeros(SIZE, np.uint8) for _ in range(3)]
    assert tier.read_flat(list(reversed(slots)), SIZE, dests, list(reversed(checksums))) == [True] * 3
    assert [d.tobytes() for d in dests] == [b.tobytes() for b in reversed(blocks)]
    with pytest.raises(InvalidArgumentError, match="3 slots but 2 targets"):
        tier.read_flat(slots, SIZE, dests[:2])
