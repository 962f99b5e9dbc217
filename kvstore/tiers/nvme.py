"""NVMe tier: block payloads in preallocated slab files written with O_DIRECT, indexed in LMDB.

Step of the data path: the bottom tier. The tier manager calls `write` when it demotes a block
from memory (write-back) or writes it through, `read_into` when it serves or promotes an NVMe
hit, and `commit_records` / `remove_records` so that what it stored survives a restart.

Durability order, so that a crash never exposes a torn block:

    1. payload pwrite (O_DIRECT from the aligned staging buffer, adjacent blocks in one syscall)
    2. os.fdatasync on every slab file the batch touched              -> `write` returns
    3. LMDB commit of the blocks' records (`commit_records`)          -> visible after a restart

Removal runs the other way: `remove_records` before `free`, so a record never points at a slot
that a new block may be written into. A crash between 2 and 3 leaves written but unrecorded
space, which the restart treats as free; every read is verified against the recorded checksum.

Layout: the tier's address space [0, capacity_bytes) is the slab files `slab-0000.bin`, ... laid
end to end: address a is byte a % file_bytes of file a // file_bytes. Slabs never straddle files.

Owner: the tier manager. allocate/free run under the manager's lock. write/read_into on disjoint
slots may come from any thread: transfers through the staging buffer hold its lock, reads
straight into aligned destinations do not.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvstore.config import ALIGNMENT_BYTES, NvmeConfig
from kvstore.errors import ConfigError, InvalidArgumentError, StorageFormatError, StoreClosedError
from kvstore.slab import SlabAllocator
from kvstore.tiers.base import Buffer, SlabTier, as_bytes_arrays, check_batch, copy_with_checksum, zero_and_verify
from kvstore.tiers.nvme_index import NvmeIndex, NvmeRecord
from kvstore.types import BlockKey, NamespaceId, Slot, TierKind

PROBE_NAME = ".direct-io-probe"
LOCK_NAME = "tier.lock"
MAX_IOVECS = 1024
"""Linux's UIO_MAXIOV: the most buffers one preadv/pwritev takes."""

Transfer = Callable[[int, list[memoryview], int], int]
"""os.preadv or os.pwritev: (fd, buffers, offset) -> bytes moved."""


def slab_file_name(file_index: int) -> str:
    return f"slab-{file_index:04d}.bin"


@dataclass(slots=True)
class _Run:
    """Blocks that lie end to end in one file, moved with one syscall."""

    file_index: int
    file_offset: int
    first_position: int  # position of the run's first block in its chunk (its place in the stage)
    indices: list[int]  # batch indices, in address order


class NvmeTier(SlabTier):
    """Slots in slab files plus the LMDB index of committed blocks; holds its directory's lock while open."""

    kind = TierKind.NVME

    def __init__(self, config: NvmeConfig) -> None:
        if config.directory is None:
            raise ConfigError("nvme.directory must be set to use the NVMe tier")
        super().__init__(SlabAllocator(config.capacity_bytes, config.slab_bytes, ALIGNMENT_BYTES))
        self.directory = Path(config.directory)
        self.file_bytes = config.file_bytes
        self.direct_io = False
        self.num_checksum_failures = 0
        self._fds: list[int] = []
        self._stage_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        # Anonymous mappings are page-aligned, as O_DIRECT needs; writing once faults every page in.
        self._stage = mmap.mmap(-1, config.stage_bytes)
        # Huge pages where the kernel allows them (THP "madvise" mode): an O_DIRECT request from
        # a stage of scattered 4 KiB pages is cut into ~1 MiB pieces once memory is fragmented.
        with contextlib.suppress(AttributeError, OSError):
            self._stage.madvise(mmap.MADV_HUGEPAGE)
        self._stage_array: npt.NDArray[np.uint8] = np.frombuffer(self._stage, dtype=np.uint8)
        self._stage_array.fill(0)
        _make_private_directory(self.directory)
        self._lock_fd = _lock_directory(self.directory)
        try:
            self.index = NvmeIndex(self.directory, config.index_map_bytes)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self.index.check_geometry(
                {
                    "capacity_bytes": self.allocator.capacity_bytes,
                    "file_bytes": self.file_bytes,
                    "slab_bytes": self.allocator.slab_bytes,
                    "alignment": ALIGNMENT_BYTES,
                }
            )
            self.direct_io = config.use_direct_io and probe_direct_io(self.directory)
            self._open_files()
            self.allocator.restore((record.slot, record.size_bytes) for record in self.index.records())
        except BaseException:
            self.close()
            raise

    # -- data ----------------------------------------------------------------------------------

    def write(
        self, slots: Sequence[Slot], size_bytes: int, payloads: Sequence[Buffer], *, with_checksums: bool = True
    ) -> list[int]:
        """Write the payloads into their slots and return their checksums (always: the copy into
        the stage computes them for free); durable on return."""
        check_batch(slots, payloads, size_bytes, "payloads")
        sources = as_bytes_arrays(payloads, size_bytes, "payload")
        span = self._check_slots(slots, size_bytes)
        checksums = [0] * len(slots)
        touched: set[int] = set()
        with self._stage_lock:
            stage = self._stage_memory()
            for chunk in self._chunks(_address_order(slots), span):
                for position, index in enumerate(chunk):
                    start = position * span
                    checksums[index] = copy_with_checksum(stage[start : start + size_bytes], sources[index])
                    stage[start + size_bytes : start + span] = 0  # no stale bytes in the padding
                for run in self._runs(chunk, slots, span):
                    start = run.first_position * span
                    buffer = stage[start : start + len(run.indices) * span].data
                    self._transfer(os.pwritev, run.file_index, [buffer], run.file_offset)
                    touched.add(run.file_index)
        for file_index in sorted(touched):
            os.fdatasync(self._fds[file_index])
        return checksums

    def read_flat(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        targets: Sequence[npt.NDArray[np.uint8]],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]:
        """Read the blocks into `targets` and verify each; a mismatch is zeroed and reported False.
        NVMe reads are always verified, so `checksums` is required (read_into lands here too)."""
        if checksums is None:
            raise InvalidArgumentError("NVMe reads are always verified: pass the recorded checksums")
        check_batch(slots, targets, size_bytes, "destinations", checksums)
        span = self._check_slots(slots, size_bytes)
        order = _address_order(slots)
        straight = [index for index in order if self._reads_straight_into(targets[index], size_bytes)]
        staged = [index for index in order if not self._reads_straight_into(targets[index], size_bytes)]
        for run in self._runs(straight, slots, span):  # here span == size_bytes
            self._transfer(os.preadv, run.file_index, [targets[i].data for i in run.indices], run.file_offset)
        if staged:
            self._read_staged(staged, slots, size_bytes, span, targets)
        matches = zero_and_verify(targets, checksums)
        if not all(matches):
            with self._stats_lock:
                self.num_checksum_failures += matches.count(False)
        return matches

    # -- index (see the module docstring for the order these calls must keep) -------------------

    def records(self) -> list[NvmeRecord]:
        """Every committed block, as recorded in the index."""
        self._check_open()
        return self.index.records()

    def commit_records(self, records: Sequence[NvmeRecord]) -> None:
        """Record blocks whose `write` has returned (their payload is durable), in one transaction."""
        self._check_open()
        self.index.commit(records)

    def remove_records(self, keys: Sequence[BlockKey]) -> None:
        """Forget blocks; call before freeing their slots. Unknown keys are ignored."""
        self._check_open()
        self.index.remove(keys)

    def put_namespace(self, namespace_id: NamespaceId, encoded: bytes) -> None:
        self._check_open()
        self.index.put_namespace(namespace_id, encoded)

    def namespaces(self) -> dict[NamespaceId, bytes]:
        self._check_open()
        return self.index.namespaces()

    def close(self) -> None:
        """Close the files, the index and the staging buffer; idempotent. Later calls raise StoreClosedError."""
        if self._closed:
            return
        self._closed = True
        with self._stage_lock:  # let a staged transfer in flight finish first
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            self.index.close()
            os.close(self._lock_fd)  # releases the directory for the next store
            self._stage_array = np.empty(0, dtype=np.uint8)
            with contextlib.suppress(BufferError):  # a view is still held; the OS unmaps it at exit
                self._stage.close()

    # -- internals ------------------------------------------------------------------------------

    def _open_files(self) -> None:
        """Open (creating and preallocating where needed) the slab files; the last one may be shorter."""
        capacity = self.allocator.capacity_bytes
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if self.direct_io else 0)
        for file_index, start in enumerate(range(0, capacity, self.file_bytes)):
            size = min(self.file_bytes, capacity - start)
            path = self.directory / slab_file_name(file_index)
            fd = os.open(path, flags, 0o600)
            self._fds.append(fd)
            os.fchmod(fd, 0o600)  # the umask must not widen or narrow it
            existing = os.fstat(fd).st_size
            if existing > size:
                raise StorageFormatError(f"{path} has {existing} bytes, the configured geometry gives it {size}")
            os.posix_fallocate(fd, 0, size)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the NVMe tier at {self.directory} is closed")

    def _stage_memory(self) -> npt.NDArray[np.uint8]:
        """The staging buffer; call with the stage lock held."""
        self._check_open()
        return self._stage_array

    def _check_slots(self, slots: Sequence[Slot], size_bytes: int) -> int:
        """Refuse slots outside the address space before any I/O; return the slot size."""
        self._check_open()
        span = self.allocator.slot_bytes(size_bytes)
        slab_bytes, capacity = self.allocator.slab_bytes, self.allocator.capacity_bytes
        for slot in slots:
            if slot < 0 or slot % ALIGNMENT_BYTES or slot % slab_bytes + span > slab_bytes or slot + span > capacity:
                raise InvalidArgumentError(f"offset {slot} is not a slot of {span} bytes in this NVMe tier")
        return span

    def _reads_straight_into(self, target: npt.NDArray[np.uint8], size_bytes: int) -> bool:
        """Whether a block can be read into `target` without the stage (O_DIRECT needs alignment)."""
        if size_bytes % ALIGNMENT_BYTES:
            return False
        return not self.direct_io or target.ctypes.data % ALIGNMENT_BYTES == 0

    def _read_staged(
        self,
        indices: list[int],
        slots: Sequence[Slot],
        size_bytes: int,
        span: int,
        targets: Sequence[npt.NDArray[np.uint8]],
    ) -> None:
        with self._stage_lock:
            stage = self._stage_memory()
            for chunk in self._chunks(indices, span):
                for run in self._runs(chunk, slots, span):
                    start = run.first_position * span
                    buffer = stage[start : start + len(run.indices) * span].data
                    self._transfer(os.preadv, run.file_index, [buffer], run.file_offset)
                for position, index in enumerate(chunk):
                    start = position * span
                    np.copyto(targets[index], stage[start : start + size_bytes])

    def _chunks(self, indices: list[int], span: int) -> Iterator[list[int]]:
        """Split a batch into pieces whose slots fit the staging buffer (one slot always fits)."""
        per_chunk = len(self._stage_array) // span
        for start in range(0, len(indices), per_chunk):
            yield indices[start : start + per_chunk]

    def _runs(self, indices: list[int], slots: Sequence[Slot], span: int) -> list[_Run]:
        """Group blocks (in address order) into runs that are adjacent in one file."""
        runs: list[_Run] = []
        for position, index in enumerate(indices):
            file_index, file_offset = divmod(slots[index], self.file_bytes)
            if runs:
                last = runs[-1]
                adjacent = last.file_index == file_index and last.file_offset + len(last.indices) * span == file_offset
                if adjacent and len(last.indices) < MAX_IOVECS:
                    last.indices.append(index)
                    continue
            runs.append(_Run(file_index, file_offset, position, [index]))
        return runs

    def _transfer(self, call: Transfer, file_index: int, buffers: list[memoryview], file_offset: int) -> None:
        """Move all of `buffers` at `file_offset`, resuming after a short transfer."""
        fd = self._fds[file_index]
        while buffers:
            done = call(fd, buffers, file_offset)
            if done <= 0:
                raise StorageFormatError(f"{slab_file_name(file_index)} ends before byte {file_offset}")
            file_offset += done
            buffers = _skip_bytes(buffers, done)


def probe_direct_io(directory: Path) -> bool:
    """Whether the filesystem under `directory` takes O_DIRECT: an aligned 4 KiB write and read
    of a scratch file (never of a slab file, which may hold blocks). False means buffered I/O."""
    path = directory / PROBE_NAME
    written = mmap.mmap(-1, ALIGNMENT_BYTES)  # anonymous mappings are page-aligned
    read_back = mmap.mmap(-1, ALIGNMENT_BYTES)
    written.write(b"kvstore O_DIRECT probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o600)
        try:
            return (
                os.pwrite(fd, written, 0) == ALIGNMENT_BYTES
                and os.preadv(fd, [read_back], 0) == ALIGNMENT_BYTES
                and read_back[:] == written[:]
            )
        finally:
            os.close(fd)
    except OSError:  # EINVAL where the filesystem refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE)
        return False
    finally:
        path.unlink(missing_ok=True)
        written.close()
        read_back.close()


def _make_private_directory(directory: Path) -> None:
    """Create the directory mode 0700 (its parents with the default mode); an existing one is kept as is."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        return
    os.chmod(directory, 0o700)  # the umask must not widen or narrow it


def _lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on the directory for the tier's lifetime: two stores (or two tiers in
    one process, which LMDB forbids) writing the same slab files would overwrite each other's blocks."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"nvme.directory {directory} is in use by another store") from None
    return fd


def _address_order(slots: Sequence[Slot]) -> list[int]:
    """Batch indices sorted by address, so that neighbours on disk become one syscall."""
    return sorted(range(len(slots)), key=slots.__getitem__)


def _skip_bytes(buffers: list[memoryview], count: int) -> list[memoryview]:
    """What is left of `buffers` after the first `count` bytes were moved."""
    for i, buffer in enumerate(buffers):
        if count < len(buffer):
            return [buffer[count:], *buffers[i + 1 :]]
        count -= len(buffer)
    return []
