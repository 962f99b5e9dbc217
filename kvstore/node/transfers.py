"""Blocks on their way between a node's pool and a socket: the node side of the data plane.

`open_read` leases a run of blocks and exposes them as memoryviews of their slots, ready for
`sendall` (blocks in adjacent DRAM slots become one view; blocks only on NVMe or in device
memory are read, and verified, into a bounce buffer first). `open_write` reserves DRAM slots
and exposes each as a writable view for `recv_into`; `IncomingBlocks.commit` hashes what
arrived and commits only when every block matches the checksum its sender claimed; otherwise
it aborts, and nothing becomes visible.

A transfer's slots must never be reused while a socket can still write into or read from
them, so the lease or reservation behind one lives longer than the transfer may: each object
carries a `deadline` (time.monotonic) by which its bytes must have moved, derived from its
size (`transfer_budget_s`), and its lease or reservation expires `EXPIRY_GRACE_S` after that.
The socket side enforces the deadline with timeouts and gives up when it passes.

Used by the data-plane server (GET and PUT) and by `Fetch` (a node pulling from a peer).
Owner: the thread serving one connection; each object is used by that thread only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np

from kvstore.errors import ChecksumError, InvalidArgumentError, UnknownLeaseError, UnknownReservationError
from kvstore.hashing import checksum
from kvstore.manager import Lease, Reservation
from kvstore.store import Store, adjacent_runs
from kvstore.types import BlockKey, NamespaceId, TierKind

BASE_TRANSFER_S = 30.0  # any transfer may take this long ...
MIN_TRANSFER_BYTES_PER_S = 10e6  # ... plus its bytes at this (slow) rate
EXPIRY_GRACE_S = 10.0  # between a transfer's deadline and its slots' expiry


def transfer_budget_s(num_bytes: int) -> float:
    """How long moving `num_bytes` over one connection may take before the peer is given up."""
    return BASE_TRANSFER_S + num_bytes / MIN_TRANSFER_BYTES_PER_S


class OutgoingBlocks:
    """A leased run of blocks to send: `checksums` per block and `views` covering their bytes
    in order. `close` releases the lease; the views must not be used after it."""

    def __init__(self, store: Store, lease: Lease | None, block_bytes: int, deadline: float) -> None:
        self._store = store
        self._lease = lease
        self.block_bytes = block_bytes
        self.deadline = deadline
        self.checksums: list[int] = []
        self.views: list[memoryview] = []

    @property
    def num_bytes(self) -> int:
        return self.block_bytes * len(self.checksums)

    def close(self) -> None:
        self.views = []
        if self._lease is not None:
            lease, self._lease = self._lease, None
            # Expired means its deadline passed, so the sender stopped before the slots could be reused.
            with contextlib.suppress(UnknownLeaseError):
                self._store.manager.release(lease.lease_id)


def open_read(store: Store, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> OutgoingBlocks:
    """Lease the longest stored leading run of `keys` and prepare its bytes for sending."""
    budget = transfer_budget_s(len(keys) * store.manager.namespace(namespace_id).block_bytes)
    # The receiver checks every block against the checksum sent with it, so the checksums must
    # be final: blocks still queued for background hashing are hashed now (verify=True settles
    # them; whether the bytes are checked before sending is `verify` here, in _prepare).
    lease = store.manager.acquire(namespace_id, keys, verify=True, ttl_s=budget + EXPIRY_GRACE_S)
    outgoing = OutgoingBlocks(store, lease, lease.size_bytes, time.monotonic() + budget)
    try:
        count = _prepare(store, lease, outgoing, verify)
        outgoing.checksums = list(lease.checksums[:count])
        return outgoing
    except BaseException:
        outgoing.close()
        raise


def _prepare(store: Store, lease: Lease, outgoing: OutgoingBlocks, verify: bool) -> int:
    """Fill `outgoing.views`; returns how many leading blocks are good to send."""
    size = lease.size_bytes
    for start, stop in adjacent_runs(lease, size):
        tier_kind = lease.tiers[start]
        tier = store.tiers[tier_kind]
        view = tier.host_view(lease.slots[start], (stop - start) * size) if tier_kind is not TierKind.NVME else None
        if view is not None and (
            not verify
            or all(checksum(view[i * size : (i + 1) * size]) == lease.checksums[start + i] for i in range(stop - start))
        ):
            outgoing.views.append(view)
            continue
        # NVMe (always verified), device memory, or a memory copy that failed `verify`: read
        # through a bounce buffer, which checks every block against its checksum.
        bounce = np.empty((stop - start) * size, dtype=np.uint8)
        targets = [bounce[i * size : (i + 1) * size] for i in range(stop - start)]
        matches = tier.read_flat(list(lease.slots[start:stop]), size, targets, list(lease.checksums[start:stop]))
        good = matches.index(False) if False in matches else len(matches)
        if good:
            outgoing.views.append(memoryview(bounce[: good * size].data))
        if good < len(matches):
            store.manager.report_corrupt(lease, lease.keys[start + good :])
            return start + good
    return len(lease)


class IncomingBlocks:
    """A reservation being filled from a socket.

    `views[i]` receives the i-th block of the request: a pool slot when this node lacks the
    block, a scratch buffer when it already has it (the sender sends it anyway on a Fetch).
    `written` lists the request positions that go into slots, ascending.
    """

    def __init__(self, store: Store, reservation: Reservation, keys: Sequence[BlockKey], deadline: float) -> None:
        self._store = store
        self._reservation: Reservation | None = reservation
        self.deadline = deadline
        size = reservation.size_bytes
        dram = store.tiers[TierKind.DRAM]
        slot_of = dict(zip(reservation.keys, reservation.slots, strict=True))
        self.written = [i for i, key in enumerate(keys) if key in slot_of]
        self.num_present = reservation.num_present
        self.block_bytes = size
        self.views: list[memoryview] = []
        scratch: memoryview | None = None
        for key in keys:
            slot = slot_of.get(key)
            if slot is not None:
                view = dram.host_view(slot, size)
                assert view is not None  # the DRAM tier is host memory
                self.views.append(view)
            else:
                scratch = scratch or memoryview(bytearray(size))
                self.views.append(scratch)

    def commit(self, expected: Sequence[int], received: Sequence[int] | None = None) -> int:
        """Check every written block against `expected` (one checksum per request position):
        `received` holds the checksums of what arrived (hashed while receiving, one per written
        block); without it the blocks are hashed now. Commit when all match, else abort and
        raise ChecksumError. Returns blocks written."""
        reservation = self._take()
        if len(expected) != len(self.views) or (received is not None and len(received) != len(self.written)):
            self._store.manager.abort(reservation.reservation_id)
            raise InvalidArgumentError(f"{len(expected)} checksums for {len(self.views)} blocks")
        checksums = [expected[i] for i in self.written]
        got = received if received is not None else [checksum(self.views[i]) for i in self.written]
        bad = [i for i, want, have in zip(self.written, checksums, got, strict=True) if have != want]
        self.views = []
        if bad:
            self._store.manager.abort(reservation.reservation_id)
            raise ChecksumError(f"{len(bad)} received block(s) fail their checksum (first at position {bad[0]})")
        self._store.manager.commit(reservation.reservation_id, checksums)
        return len(checksums)

    def abort(self) -> None:
        """Free the slots (idempotent; a no-op after commit)."""
        if self._reservation is not None:
            self.views = []
            # Expired means its deadline passed, so the receiver stopped before the slots could be reused.
            with contextlib.suppress(UnknownReservationError):
                self._store.manager.abort(self._take().reservation_id)

    def _take(self) -> Reservation:
        reservation = self._reservation
        if reservation is None:
            raise InvalidArgumentError("this transfer was already committed or aborted")
        self._reservation = None
        return reservation


def open_write(
    store: Store, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None
) -> IncomingBlocks:
    """Reserve DRAM slots for the blocks of `keys` this node lacks."""
    budget = transfer_budget_s(len(keys) * store.manager.namespace(namespace_id).block_bytes)
    reservation = store.manager.reserve(
        namespace_id, keys, parent=parent, tier=TierKind.DRAM, ttl_s=budget + EXPIRY_GRACE_S
    )
    return IncomingBlocks(store, reservation, keys, time.monotonic() + budget)
