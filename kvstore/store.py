"""`Store`: the tiers, the tier manager and the policy assembled from a `StoreConfig`, with the
batched in-process data calls (`put_blocks`, `get_into`, `get_blocks`).

This is what the node daemon (issue 3) serves and what `kvstore tour` drives. Payloads are
checked against their namespace's layout before anything is reserved; copies into reserved
slots and out of leased slots run outside the manager's lock, so readers and writers of
different blocks proceed in parallel.

Owner: the process that opens it; close it (or use it as a context manager) to unlink the
shared-memory segment and close the NVMe files. Thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from kvstore.clock import Clock, MonotonicClock
from kvstore.config import StoreConfig
from kvstore.errors import InvalidArgumentError
from kvstore.events import EventLog
from kvstore.layout import payload_bytes, payloads_bytes
from kvstore.manager import Lease, TierManager
from kvstore.policy import EvictionPolicy, make_policy
from kvstore.stats import StoreStats
from kvstore.tiers.base import Tier
from kvstore.tiers.dram import DramTier
from kvstore.tiers.nvme import NvmeTier
from kvstore.types import BlockKey, LookupResult, Namespace, NamespaceId, PutResult, RemoveResult, TierKind

_MAX_INITIAL_ROWS = 1 << 20


class Store:
    def __init__(
        self,
        config: StoreConfig,
        *,
        clock: Clock | None = None,
        policy: EvictionPolicy | None = None,
        events: EventLog | None = None,
    ):
        tiers: dict[TierKind, Tier] = {}
        try:
            if config.hbm.capacity_bytes:
                from kvstore.tiers.hbm import HbmTier  # noqa: PLC0415 - imports torch (seconds), only when wanted

                tiers[TierKind.HBM] = HbmTier(config.hbm)
            tiers[TierKind.DRAM] = DramTier(config.dram)
            if config.nvme.directory is not None:
                tiers[TierKind.NVME] = NvmeTier(config.nvme)
            total = sum(tier.allocator.capacity_bytes for tier in tiers.values())
            rows = min(_MAX_INITIAL_ROWS, max(1024, total // 65536))
            self.clock = clock or MonotonicClock()
            policy = policy or make_policy(config.eviction_policy)
            self.manager = TierManager(config, tiers, policy, self.clock, rows, events=events)
        except BaseException:
            for tier in tiers.values():
                tier.close()
            raise
        self.config = config
        self.tiers = tiers
        self._closed = False

    # -- context -------------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.manager.close()  # the checksum thread reads slots: stop it before the tiers go
            for tier in self.tiers.values():
                tier.close()

    # -- namespaces and index ------------------------------------------------------------------

    def register_namespace(self, namespace: Namespace) -> NamespaceId:
        return self.manager.register_namespace(namespace)

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        return self.manager.lookup(namespace_id, keys)

    def remove(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> RemoveResult:
        return self.manager.remove(namespace_id, keys)

    def pin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        return self.manager.set_pinned(namespace_id, keys, True)

    def unpin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        return self.manager.set_pinned(namespace_id, keys, False)

    def stats(self) -> StoreStats:
        return self.manager.stats()

    # -- data ----------------------------------------------------------------------------------

    def put_blocks(
        self,
        namespace_id: NamespaceId,
        keys: Sequence[BlockKey],
        payloads: Sequence[Any],
        *,
        parent: BlockKey | None = None,
        tier: TierKind = TierKind.DRAM,
    ) -> PutResult:
        """Store a chain of blocks (`parent` precedes `keys[0]`): reserve, copy, commit.

        Payloads are numpy arrays or CPU tensors of the namespace's dtype and block shape, or
        raw bytes of its block size; anything else is refused before the store changes.
        """
        namespace = self.manager.namespace(namespace_id)
        if len(keys) != len(payloads):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(payloads)} payloads")
        flats = payloads_bytes(payloads, namespace, "payload")
        reservation = self.manager.reserve(namespace_id, keys, parent=parent, tier=tier)
        if reservation.num_present:
            position = {key: i for i, key in enumerate(keys)}
            flats = [flats[position[key]] for key in reservation.keys]
        hash_later = tier is not TierKind.NVME and self.manager.hashes_later(reservation.size_bytes)
        try:
            checksums = self.tiers[tier].write(
                reservation.slots, reservation.size_bytes, flats, with_checksums=not hash_later
            )
        except BaseException:
            self.manager.abort(reservation.reservation_id)
            raise
        self.manager.commit(reservation.reservation_id, None if hash_later else checksums)
        return PutResult(len(reservation.keys), reservation.num_present)

    def get_into(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], dests: Sequence[Any], *, verify: bool = False
    ) -> int:
        """Copy the longest stored leading run of `keys` into `dests`; returns its length.

        NVMe reads are always verified against the block's checksum; `verify` also checks
        memory-tier copies. A block that fails ends the run (and is dropped from the store);
        destinations past the run are left unspecified.
        """
        namespace = self.manager.namespace(namespace_id)
        if len(keys) != len(dests):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(dests)} destinations")
        targets = payloads_bytes(dests, namespace, "destination", writable=True)
        lease = self.manager.acquire(namespace_id, keys, verify=verify)
        try:
            return self._read_lease(lease, targets, verify)
        finally:
            self.manager.release(lease.lease_id)

    def get_into_buffer(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], buffer: Any, *, verify: bool = False
    ) -> int:
        """`get_into` for one destination holding the blocks back to back (an engine's staging
        buffer: flat bytes, or typed with shape `(len(keys), *block_shape)`). The buffer is
        checked once, and blocks in adjacent memory-tier slots are copied in one call."""
        namespace = self.manager.namespace(namespace_id)
        flat = payload_bytes(buffer, namespace, "buffer", writable=True, num_blocks=len(keys))
        lease = self.manager.acquire(namespace_id, keys, verify=verify)
        try:
            size = lease.size_bytes
            if verify or not all(self.tiers[tier].host_addressable for tier in set(lease.tiers)):
                targets = [flat[i * size : (i + 1) * size] for i in range(len(lease))]
                return self._read_lease(lease, targets, verify)  # per block: checksums, or device slots
            for start, stop in adjacent_runs(lease, size):
                source = self.tiers[lease.tiers[start]].host_view(lease.slots[start], (stop - start) * size)
                assert source is not None  # checked above: every tier of the lease is host-addressable
                np.copyto(flat[start * size : stop * size], np.frombuffer(source, dtype=np.uint8))
            return len(lease)
        finally:
            self.manager.release(lease.lease_id)

    def get_blocks(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> list[npt.NDArray[np.uint8]]:
        """The longest stored leading run of `keys`, as new flat uint8 arrays."""
        lease = self.manager.acquire(namespace_id, keys)
        try:
            targets = [np.empty(lease.size_bytes, dtype=np.uint8) for _ in range(len(lease))]
            return targets[: self._read_lease(lease, targets, verify=False)]
        finally:
            self.manager.release(lease.lease_id)

    def _read_lease(self, lease: Lease, targets: list[npt.NDArray[np.uint8]], verify: bool) -> int:
        """Copy a lease's blocks into `targets`, one batch per tier; the length of the good run."""
        count = len(lease)
        if not count:
            return 0
        by_tier = [range(count)] if len(set(lease.tiers)) == 1 else _indexes_by_tier(lease.tiers)
        failed: list[int] = []
        for indexes in by_tier:
            kind = lease.tiers[indexes[0]]
            checks = [lease.checksums[i] for i in indexes] if verify or kind is TierKind.NVME else None
            slots = [lease.slots[i] for i in indexes]
            matches = self.tiers[kind].read_flat(slots, lease.size_bytes, [targets[i] for i in indexes], checks)
            if checks is not None:
                failed.extend(i for i, ok in zip(indexes, matches, strict=True) if not ok)
        if not failed:
            return count
        self.manager.report_corrupt(lease, [lease.keys[i] for i in failed])
        return min(failed)


def adjacent_runs(lease: Lease, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of a lease's blocks that lie end to end in one tier."""
    tiers, slots, count = lease.tiers, lease.slots, len(lease)
    runs: list[tuple[int, int]] = []
    start = 0
    for index in range(1, count + 1):
        if index == count or tiers[index] is not tiers[start] or slots[index] != slots[index - 1] + size:
            runs.append((start, index))
            start = index
    return runs


def _indexes_by_tier(tiers: Sequence[TierKind]) -> list[list[int]]:
    groups: dict[TierKind, list[int]] = {}
    for index, tier in enumerate(tiers):
        groups.setdefault(tier, []).append(index)
    return list(groups.values())
