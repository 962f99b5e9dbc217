"""Checksums of blocks committed to a memory tier without one, computed off the commit path.

A writer that copies into DRAM slots (an engine through shared memory, `Store.put_blocks`)
should not pay a second pass over its bytes before its blocks become visible: the commit
marks them *unhashed* and returns, and one background thread hashes them (xxh3_64 releases
the GIL, so it runs on a spare core). Anything that needs the checksum before the thread got
there (a demotion to NVMe, a verifying reader, a removal, an allocation that must evict)
calls `settle_now`, which hashes synchronously. An unhashed block holds one lease count, so
it is never evicted or reused while the thread reads its slot.

Owner: the tier manager. `mark`, `settle_now` and `pending_in` run under the manager's lock;
the thread takes that lock only to claim and to settle a block, never while hashing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Mapping

import numpy as np

from kvstore.hashing import checksum
from kvstore.table import BlockTable
from kvstore.tiers.base import Tier
from kvstore.types import Slot, TierKind


class ChecksumBook:
    def __init__(
        self, table: BlockTable, tiers: Mapping[TierKind, Tier], lock: threading.Lock, *, background: bool
    ) -> None:
        self._table = table
        self._tiers = tiers
        self._lock = lock
        self._pending: dict[int, int] = {}  # row -> token of its hashing job
        self._next_token = 1
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="kvstore-checksums", daemon=True)
            self._thread.start()

    @property
    def background(self) -> bool:
        return self._thread is not None

    def __len__(self) -> int:
        return len(self._pending)

    def mark(self, rows: Iterable[int]) -> None:
        """Rows just committed without checksums (lock held): pin them and queue them."""
        for row in rows:
            token = self._next_token
            self._next_token += 1
            self._pending[row] = token
            self._table.leases[row] += 1
            self._queue.put((row, token))

    def settle_now(self, rows: Iterable[int]) -> None:
        """Hash any of `rows` that are still unhashed, here and now (lock held)."""
        for row in rows:
            if row in self._pending:
                tier, slot, size = self._location(row)
                self._settle(row, hash_slot(self._tiers[tier], slot, size))

    def pending_in(self, tier: TierKind) -> list[int]:
        return [row for row in self._pending if self._table.slot_of(row, tier) is not None]

    def drain(self) -> None:
        """Wait until the thread has hashed everything queued so far (for tests and shutdown)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            row, token = job
            try:
                with self._lock:
                    if self._pending.get(row) != token:
                        continue  # settled synchronously meanwhile
                    tier, slot, size = self._location(row)
                value = hash_slot(self._tiers[tier], slot, size)  # outside the lock: the row is pinned
                with self._lock:
                    if self._pending.get(row) == token:
                        self._settle(row, value)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _location(self, row: int) -> tuple[TierKind, Slot, int]:
        tier = self._table.fastest_tier(row)
        assert tier is not None and tier is not TierKind.NVME  # pinned memory-tier rows stay put
        slot = self._table.slot_of(row, tier)
        assert slot is not None
        return tier, slot, self._table.size_of(row)

    def _settle(self, row: int, value: int) -> None:
        del self._pending[row]
        self._table.checksum[row] = value
        self._table.leases[row] -= 1


def hash_slot(tier: Tier, slot: Slot, size: int) -> int:
    """The xxh3_64 of one slot's bytes (through a host copy for a device slot)."""
    view = tier.host_view(slot, size)
    if view is not None:
        return checksum(view)
    bounce = np.empty(size, dtype=np.uint8)  # a device slot: copy it to the host first
    tier.read_into([slot], size, [bounce])
    return checksum(bounce)
