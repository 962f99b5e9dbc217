"""Block events: what the conductor's global index is built from (`WatchEvents`, DESIGN.md 4).

Every change in where a block lives is one event: STORED (it became readable), REMOVED (gone
from every tier), TIER_CHANGED (still readable, now in a different set of tiers). Events get
consecutive sequence numbers and sit in a bounded ring. A watcher takes a snapshot of every
stored block together with the sequence number it is current to (both under the tier
manager's lock, so nothing falls between them), then reads the events after it. A watcher
that falls further behind than the ring holds is told so (`WatchLagError`) and must take a new
snapshot: a gap is never papered over.

Owner: the tier manager records (under its lock); any number of watcher threads read.
`EventLog` has its own condition variable, so readers never take the manager's lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from kvstore.errors import KVStoreError
from kvstore.types import BlockKey, NamespaceId, TierKind


class EventKind(StrEnum):
    SNAPSHOT = "snapshot"  # stored when the watch began (not in the ring; sequence = the snapshot's)
    SNAPSHOT_END = "snapshot_end"  # the snapshot is complete; no block (empty key)
    STORED = "stored"
    REMOVED = "removed"
    TIER_CHANGED = "tier_changed"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    sequence: int
    kind: EventKind
    namespace_id: NamespaceId
    key: BlockKey
    parent: BlockKey | None
    tiers: tuple[TierKind, ...]  # where the block is now, fastest first; empty when removed


class WatchLagError(KVStoreError):
    """A watcher asked for events the ring no longer holds; it must take a new snapshot."""


_TIERS = tuple(TierKind)
Change = tuple[EventKind, NamespaceId, BlockKey, BlockKey | None, tuple[TierKind, ...]]  # an event, unnumbered


_MASK_TIERS = tuple(tuple(tier for tier in _TIERS if mask >> tier & 1) for mask in range(1 << len(_TIERS)))


def tiers_of_mask(mask: int) -> tuple[TierKind, ...]:
    """Tiers whose bit is set in `mask` (bit t = TierKind t), fastest first."""
    return _MASK_TIERS[mask]


class EventLog:
    """A ring of the most recent `capacity` events, and a condition to wait for new ones."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        if capacity < 1:
            raise ValueError(f"event ring capacity must be >= 1, got {capacity}")
        self._ring: deque[BlockEvent] = deque(maxlen=capacity)
        self._last_sequence = 0
        self._changed = threading.Condition()
        self._closed = False

    @property
    def last_sequence(self) -> int:
        """The sequence number of the newest event (0 before the first)."""
        return self._last_sequence

    def record(
        self,
        kind: EventKind,
        namespace_id: NamespaceId,
        key: BlockKey,
        parent: BlockKey | None,
        tiers: tuple[TierKind, ...],
    ) -> None:
        self.record_many([(kind, namespace_id, key, parent, tiers)])

    def record_many(self, changes: Sequence[Change]) -> None:
        """`record` of several events, numbered in order, with one wake-up of the watchers."""
        with self._changed:
            sequence = self._last_sequence
            ring = self._ring
            for kind, namespace_id, key, parent, tiers in changes:
                sequence += 1
                ring.append(BlockEvent(sequence, kind, namespace_id, key, parent, tiers))
            self._last_sequence = sequence
            self._changed.notify_all()

    def after(self, sequence: int, *, timeout_s: float) -> list[BlockEvent]:
        """Events with sequence numbers above `sequence`, waiting up to `timeout_s` for the
        first one; [] on timeout or once closed. Raises WatchLagError when some are lost."""
        with self._changed:
            if self._last_sequence <= sequence and not self._closed:
                self._changed.wait(timeout_s)
            if self._last_sequence <= sequence:
                return []
            oldest = self._ring[0].sequence
            if oldest > sequence + 1:
                raise WatchLagError(
                    f"events {sequence + 1}..{oldest - 1} are no longer held (the ring holds "
                    f"{self._ring.maxlen}); take a new snapshot"
                )
            newest = len(self._ring)
            return [self._ring[i] for i in range(newest - (self._last_sequence - sequence), newest)]

    def close(self) -> None:
        """Wake every waiting watcher (the node is shutting down)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
