"""DRAM tier: one shared-memory segment per store, carved into slots.

The segment is a file under /dev/shm (POSIX shared memory), mode 0600, sized and pre-faulted
once at start (MAP_POPULATE): fresh pages cost 2-3 us per 4 KiB here, so no request ever
touches a page for the first time. Engines on the same host `SharedSegment.attach` it by name
and read or write slots directly; the node tells them which slots (from issue 3 on, over gRPC).

Owner: the store that created it unlinks it on close. Any thread may copy into or out of
slots it holds a reservation or lease for.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvstore.config import ALIGNMENT_BYTES, DramConfig
from kvstore.errors import InvalidArgumentError, StoreClosedError
from kvstore.slab import SlabAllocator
from kvstore.tiers.base import Buffer, SlabTier, as_bytes_arrays, check_batch, copy_with_checksum, zero_and_verify
from kvstore.types import Slot, TierKind

NativeCopy = Callable[[object, object, int, object], None]
native_copy_blocks: NativeCopy | None
try:  # many blocks out of the segment in one C call, the GIL released (kvstore/_index_probe.c); the
    # tier's batch reads and same-host clients' reads (kvstore/client) use it
    from kvstore._index_probe import copy_blocks as native_copy_blocks
except ImportError:  # where nothing was compiled: a loop of np.copyto does the same
    native_copy_blocks = None

SHM_DIR = Path("/dev/shm")


class SharedSegment:
    """A named shared-memory mapping. `create` owns (and unlinks) it; `attach` only maps it."""

    def __init__(self, name: str, mapping: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self.size_bytes = len(mapping)
        self._mmap = mapping
        self.array: npt.NDArray[np.uint8] = np.frombuffer(mapping, dtype=np.uint8)
        self._finalizer = weakref.finalize(self, _release, mapping, SHM_DIR / name if owner else None)

    @classmethod
    def create(cls, name: str, size_bytes: int) -> SharedSegment:
        _check_name(name)
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask must not widen or narrow it
            os.ftruncate(fd, size_bytes)
            mapping = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, mapping, owner=True)

    @classmethod
    def attach(cls, name: str, *, writable: bool = True) -> SharedSegment:
        """Map an existing segment (another process's store), read-write or read-only (then
        `array` is a read-only array)."""
        _check_name(name)
        fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if writable:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            else:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(name, mapping, owner=False)

    def view(self, offset: int, size_bytes: int) -> memoryview:
        return memoryview(self._mmap)[offset : offset + size_bytes]

    def close(self) -> None:
        """Unmap (and, for the owner, unlink). Views still held keep the memory mapped."""
        self.array = np.empty(0, dtype=np.uint8)
        self._finalizer()


def _release(mapping: mmap.mmap, path: Path | None) -> None:
    # Exported views (numpy arrays, memoryviews) may still use the mapping: the OS unmaps it at exit.
    with contextlib.suppress(BufferError):
        mapping.close()
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgumentError(f"invalid shared-memory segment name {name!r}")


def remove_stale_segments() -> list[str]:
    """Unlink the default-named segments (`kvstore-<pid>-<hex>`) of this user's stores whose
    process is gone: a store killed with SIGKILL cannot unlink its own, and tmpfs pages stay
    allocated until someone does. Returns the names removed."""
    removed = []
    for path in SHM_DIR.glob(f"{_DEFAULT_PREFIX}*"):
        match = _DEFAULT_NAME.fullmatch(path.name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if path.stat().st_uid == os.geteuid():
                path.unlink()
                removed.append(path.name)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


_DEFAULT_PREFIX = "kvstore-"
_DEFAULT_NAME = re.compile(r"kvstore-(\d+)-[0-9a-f]{8}(\.index)?")  # a DRAM segment, or its shared index


class DramTier(SlabTier):
    kind = TierKind.DRAM
    host_addressable = True

    def __init__(self, config: DramConfig) -> None:
        remove_stale_segments()
        name = config.segment_name or f"{_DEFAULT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        allocator = SlabAllocator(config.capacity_bytes, config.slab_bytes, ALIGNMENT_BYTES)
        super().__init__(allocator)
        self.segment = SharedSegment.create(name, allocator.capacity_bytes)

    def write(
        self, slots: Sequence[Slot], size_bytes: int, payloads: Sequence[Buffer], *, with_checksums: bool = True
    ) -> list[int]:
        check_batch(slots, payloads, size_bytes, "payloads")
        sources = as_bytes_arrays(payloads, size_bytes, "payload")
        memory = self._memory()
        if not with_checksums:
            for slot, source in zip(slots, sources, strict=True):
                np.copyto(memory[slot : slot + size_bytes], source)
            return []
        return [
            copy_with_checksum(memory[slot : slot + size_bytes], source)
            for slot, source in zip(slots, sources, strict=True)
        ]

    def read_flat(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        targets: Sequence[npt.NDArray[np.uint8]],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]:
        memory = self._memory()
        if len(slots) != len(targets):
            raise InvalidArgumentError(f"{len(slots)} slots but {len(targets)} targets")
        if native_copy_blocks is not None and len(slots) > 1:  # ~1 us of Python less per block
            native_copy_blocks(memory, np.array(slots, dtype=np.int64), size_bytes, targets)
        else:
            for slot, target in zip(slots, targets, strict=True):
                np.copyto(target, memory[slot : slot + size_bytes])
        return zero_and_verify(targets, checksums)

    def host_view(self, slot: Slot, size_bytes: int) -> memoryview:
        self._memory()
        return self.segment.view(slot, size_bytes)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.segment.close()

    def _memory(self) -> npt.NDArray[np.uint8]:
        if self._closed:
            raise StoreClosedError("the DRAM tier is closed")
        return self.segment.array
