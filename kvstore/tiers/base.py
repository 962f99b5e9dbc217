"""The tier interface and what every tier shares: slots from a slab allocator, batched copies.

A tier is mechanism: it stores bytes in slots and reads them back. It keeps no index of keys
(the tier manager does) and takes no decisions (the policy does). Calls, in order:

    allocate(size, n) -> slots      all or nothing; StoreFullError leaves the tier unchanged
    write(slots, size, payloads)    copies payloads in, returns their checksums (xxh3_64); with
                                    with_checksums=False a memory tier only copies (returns [])
    read_into(slots, size, dests)   copies out; with `checksums`, verifies each block and
                                    reports which ones matched (a mismatch is never returned
                                    as data: that destination is zeroed)
    free(size, slots)               slots are reusable
    close()

Memory tiers also give `host_view(slot, size)`: a writable view of the slot for zero-copy
readers and writers in this process (None where the bytes are not host-addressable).

Thread safety: allocate/free are serialised by the tier manager's lock. write/read_into on
disjoint slots may run concurrently from several threads (the manager calls them outside its
lock for slots it reserved or leased).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import xxhash

from kvstore.errors import InvalidArgumentError, PayloadSizeError, StoreClosedError
from kvstore.slab import SlabAllocator
from kvstore.types import Slot, TierKind

Buffer = bytes | bytearray | memoryview | npt.NDArray[np.generic]
"""Anything exposing a C-contiguous buffer; read as raw bytes."""

HASH_CHUNK_BYTES = 256 * 1024
"""Copy-and-hash granularity: each chunk is hashed while it is still in cache after the copy."""


@dataclass(frozen=True, slots=True)
class TierUsage:
    kind: TierKind
    capacity_bytes: int
    used_bytes: int


class Tier(Protocol):
    kind: TierKind
    allocator: SlabAllocator
    host_addressable: bool

    def allocate(self, size_bytes: int, count: int) -> list[Slot]: ...

    def free(self, size_bytes: int, slots: Sequence[Slot]) -> None: ...

    def write(
        self, slots: Sequence[Slot], size_bytes: int, payloads: Sequence[Buffer], *, with_checksums: bool = True
    ) -> list[int]: ...

    def read_into(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        dests: Sequence[Buffer],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]: ...

    def read_flat(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        targets: Sequence[npt.NDArray[np.uint8]],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]: ...

    def host_view(self, slot: Slot, size_bytes: int) -> memoryview | None: ...

    def usage(self) -> TierUsage: ...

    def close(self) -> None: ...


class SlabTier:
    """Base of the concrete tiers: slot bookkeeping and argument checks, done once."""

    kind: TierKind
    host_addressable = False  # does host_view() return the slot's memory?

    def __init__(self, allocator: SlabAllocator) -> None:
        self.allocator = allocator
        self._closed = False

    def allocate(self, size_bytes: int, count: int) -> list[Slot]:
        self._check_open()
        return self.allocator.allocate(size_bytes, count)

    def free(self, size_bytes: int, slots: Sequence[Slot]) -> None:
        self._check_open()
        self.allocator.free(size_bytes, slots)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the {self.kind.label} tier is closed")

    def usage(self) -> TierUsage:
        return TierUsage(self.kind, self.allocator.capacity_bytes, self.allocator.used_bytes)

    def read_into(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        dests: Sequence[Buffer],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]:
        check_batch(slots, dests, size_bytes, "destinations", checksums)
        targets = as_bytes_arrays(dests, size_bytes, "destination", writable=True)
        return self.read_flat(slots, size_bytes, targets, checksums)

    def read_flat(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        targets: Sequence[npt.NDArray[np.uint8]],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]:
        """`read_into` for destinations already checked by `as_bytes_arrays(writable=True)`
        (the store's batched read path checks them once, not once per layer)."""
        raise NotImplementedError

    def host_view(self, slot: Slot, size_bytes: int) -> memoryview | None:
        return None


def as_bytes_array(
    buffer: Buffer, size_bytes: int, what: str, index: int | None = None, *, writable: bool = False
) -> npt.NDArray[np.uint8]:
    """A flat uint8 view of `buffer`, refused unless it is exactly `size_bytes` long (and
    writable, for a destination). Errors name `what` (and `index`, for one of a batch)."""
    if type(buffer) is np.ndarray and buffer.dtype is _UINT8 and buffer.strides == (1,):
        # The common case (a flat byte array), checked in a fraction of a microsecond.
        flat: npt.NDArray[np.uint8] = buffer  # type: ignore[assignment]  # checked just above
    elif isinstance(buffer, np.ndarray | bytes | bytearray | memoryview):
        try:
            flat = np.frombuffer(buffer, dtype=np.uint8)  # a view of the same memory, ~0.4 us
        except ValueError:
            raise InvalidArgumentError(f"{_name(what, index)} must be C-contiguous") from None
    else:
        raise InvalidArgumentError(
            f"{_name(what, index)} must be bytes, bytearray, memoryview, a numpy array or a CPU torch tensor, "
            f"got {type(buffer).__name__}"
        )
    if flat.nbytes != size_bytes:
        raise PayloadSizeError(f"{_name(what, index)} has {flat.nbytes} bytes, expected {size_bytes}")
    if writable and not flat.flags.writeable:
        raise InvalidArgumentError(f"{_name(what, index)} is read-only")
    return flat


def as_bytes_arrays(
    buffers: Sequence[Buffer], size_bytes: int, what: str, *, writable: bool = False
) -> list[npt.NDArray[np.uint8]]:
    """`as_bytes_array` over a batch; errors name the offending index."""
    return [as_bytes_array(buffer, size_bytes, what, index, writable=writable) for index, buffer in enumerate(buffers)]


def _name(what: str, index: int | None) -> str:
    return what if index is None else f"{what} {index}"


_UINT8 = np.dtype(np.uint8)


def check_batch(
    slots: Sequence[Slot], buffers: Sequence[Buffer], size_bytes: int, what: str, checksums: Sequence[int] | None = None
) -> None:
    if len(slots) != len(buffers):
        raise InvalidArgumentError(f"{len(slots)} slots but {len(buffers)} {what}")
    if checksums is not None and len(checksums) != len(slots):
        raise InvalidArgumentError(f"{len(slots)} slots but {len(checksums)} checksums")
    if size_bytes <= 0:
        raise InvalidArgumentError(f"block size must be positive, got {size_bytes}")


def copy_with_checksum(dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8]) -> int:
    """Copy `src` into `dst` and return the xxh3_64 of the bytes, hashing each chunk in cache.

    Fusing the two passes chunk by chunk costs ~5% over a bare copy here; hashing afterwards
    in a second pass over memory costs ~30%.
    """
    size = src.nbytes
    if size <= HASH_CHUNK_BYTES:
        np.copyto(dst, src)
        return xxhash.xxh3_64_intdigest(dst.data)
    hasher = xxhash.xxh3_64()
    for start in range(0, size, HASH_CHUNK_BYTES):
        chunk = dst[start : start + HASH_CHUNK_BYTES]
        np.copyto(chunk, src[start : start + HASH_CHUNK_BYTES])
        hasher.update(chunk.data)
    return hasher.intdigest()


def zero_and_verify(dests: Sequence[npt.NDArray[np.uint8]], checksums: Sequence[int] | None) -> list[bool]:
    """Verify each destination against its checksum; zero the ones that do not match."""
    if checksums is None:
        return [True] * len(dests)
    matches: list[bool] = []
    for dest, expected in zip(dests, checksums, strict=True):
        ok = xxhash.xxh3_64_intdigest(dest.data) == expected
        if not ok:
            dest.fill(0)
        matches.append(ok)
    return matches
