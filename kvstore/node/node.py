"""`Node`: what the daemon does, in domain types. The gRPC servicer and the data-plane server
translate to and from it; neither decides anything itself.

A node is a `Store` plus what being a network service adds: the local path hands out DRAM
slots in the shared-memory segment (`reserve`/`acquire` pin them to the DRAM tier, the only
one a client process can map), `fetch` pulls blocks from a peer's data plane into reserved
slots, `watch` streams block events from a snapshot, and draining refuses new work while
leases and writes in flight finish.

Owner: the node server. Thread-safe: every call may come from any gRPC or data-plane thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from kvstore.dataplane.client import DataPlanePool
from kvstore.dataplane.local_frames import Grant
from kvstore.dataplane.protocol import check_peer_address
from kvstore.errors import (
    InvalidArgumentError,
    KVStoreError,
    NamespaceMismatchError,
    NodeDrainingError,
    PeerUnavailableError,
)
from kvstore.events import BlockEvent, EventKind
from kvstore.hostid import host_id
from kvstore.node.engine_loads import EngineLoads
from kvstore.node.metrics import LookupCounts, NodeMetrics
from kvstore.node.transfers import IncomingBlocks, OutgoingBlocks, open_read, open_write
from kvstore.stats import StoreStats
from kvstore.store import Store
from kvstore.tiers.dram import DramTier
from kvstore.types import (
    BlockInfo,
    BlockKey,
    EngineLoad,
    FetchResult,
    LeaseId,
    LookupResult,
    Namespace,
    NamespaceId,
    RemoveResult,
    ReservationId,
    TierKind,
)

log = logging.getLogger(__name__)

VERSION = "0.1.0"
WATCH_POLL_S = 0.5  # how often a watch stream checks that its client is still there


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    host_id: str
    version: str
    data_address: str
    local_address: str
    index_segment: str  # the shared index (kvstore.shared_index); "" when not published
    segment_name: str
    segment_bytes: int
    namespaces: tuple[Namespace, ...]
    is_draining: bool
    uptime_s: float


class Node:
    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        data_address: str,
        local_address: str = "",
        metrics: NodeMetrics,
        peers: DataPlanePool,
        engine_load_max_age_s: float = 10.0,
    ) -> None:
        dram = store.tiers.get(TierKind.DRAM)
        if not isinstance(dram, DramTier):
            raise TypeError("a node's store needs its shared-memory DRAM tier")
        self.store = store
        self.node_id = node_id
        self.data_address = data_address
        self.local_address = local_address
        self.index_segment = ""  # set by the node server once it publishes the shared index
        self.metrics = metrics
        self._dram = dram
        self._peers = peers
        self._draining = threading.Event()
        self._drain_lock = threading.Lock()
        self._drain_listeners: list[Callable[[], None]] = []
        self._started = time.monotonic()
        self._lookup_lock = threading.Lock()
        self._lookups = LookupCounts(0, 0, 0)
        self.engine_loads = EngineLoads(engine_load_max_age_s)  # what its engines last reported

    # -- identity ------------------------------------------------------------------------------

    def info(self) -> NodeInfo:
        manager = self.store.manager
        return NodeInfo(
            self.node_id,
            host_id(),
            VERSION,
            self.data_address,
            self.local_address,
            self.index_segment,
            self._dram.segment.name,
            self._dram.segment.size_bytes,
            tuple(manager.namespaces()),
            self.is_draining,
            time.monotonic() - self._started,
        )

    @property
    def segment_name(self) -> str:
        return self._dram.segment.name

    def expires_in_s(self, deadline_s: float) -> float:
        """A lease's or reservation's deadline as seconds from now (clients have other clocks)."""
        return max(0.0, deadline_s - self.store.clock.now())

    def register_namespace(self, namespace: Namespace) -> NamespaceId:
        return self.store.register_namespace(namespace)

    def namespace(self, namespace_id: NamespaceId) -> Namespace:
        return self.store.manager.namespace(namespace_id)

    # -- index -------------------------------------------------------------------------------

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        result = self.store.lookup(namespace_id, keys)
        self.count_lookups(1, result.num_hits, len(keys) - result.num_hits)
        return result

    def count_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None:
        """Add to the Lookup statistics (also what clients answered from the shared index)."""
        if not 0 <= min(lookups, hit_blocks, miss_blocks) <= max(lookups, hit_blocks, miss_blocks) < 1 << 48:
            raise InvalidArgumentError(f"Lookup counts {lookups}, {hit_blocks}, {miss_blocks} are implausible")
        with self._lookup_lock:
            counts = self._lookups
            self._lookups = LookupCounts(
                counts.lookups + lookups, counts.hit_blocks + hit_blocks, counts.miss_blocks + miss_blocks
            )

    def lookup_counts(self) -> LookupCounts:
        return self._lookups

    # -- load ----------------------------------------------------------------------------------

    def report_load(self, engine_id: str, load: EngineLoad) -> None:
        """An engine's latest load; the node's heartbeats carry the sum (engine_loads.py)."""
        self.engine_loads.report(engine_id, load)

    # -- local path: shared-memory slots -------------------------------------------------------

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant:
        """DRAM slots for the keys of the chain not stored yet: `indexes` says which."""
        self._check_accepting()
        reservation = self.store.manager.reserve(namespace_id, keys, parent=parent, tier=TierKind.DRAM)
        self.metrics.local_reserved_bytes.inc(reservation.size_bytes * len(reservation.keys))
        position = {key: index for index, key in enumerate(keys)}
        return Grant(
            reservation.reservation_id,
            reservation.size_bytes,
            self.expires_in_s(reservation.expires_at_s),
            list(reservation.slots),
            [position[key] for key in reservation.keys],
            [],
            self.hashes_later(reservation.size_bytes),
        )

    def hashes_later(self, block_bytes: int) -> bool:
        """Whether a commit of blocks this big without checksums is hashed off the commit path
        (so a writer should copy without hashing and leave it to the node)."""
        return self.store.manager.hashes_later(block_bytes)

    def commit(self, reservation_id: int, checksums: Sequence[int] | None) -> None:
        self.store.manager.commit(ReservationId(reservation_id), checksums)

    def abort(self, reservation_id: int) -> None:
        self.store.manager.abort(ReservationId(reservation_id))

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> Grant:
        """A lease on the leading run of `keys` held in DRAM, as slot offsets and checksums."""
        self._check_accepting()
        lease = self.store.manager.acquire(namespace_id, keys, verify=verify, tier=TierKind.DRAM)
        self.metrics.local_leased_bytes.inc(lease.size_bytes * len(lease))
        return Grant(
            lease.lease_id,
            lease.size_bytes,
            self.expires_in_s(lease.expires_at_s),
            list(lease.slots),
            [],
            list(lease.checksums),
        )

    def release(self, lease_id: int) -> None:
        self.store.manager.release(LeaseId(lease_id))

    def touch(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None:
        """A same-host client read these blocks without a lease (through the shared index)."""
        count = self.store.manager.touch(namespace_id, keys)
        if count:
            self.metrics.local_copied_bytes.inc(count * self.store.manager.namespace(namespace_id).block_bytes)

    # -- data plane (this node serving) --------------------------------------------------------

    def open_read(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> OutgoingBlocks:
        self._check_accepting()
        return open_read(self.store, namespace_id, keys, verify=verify)

    def open_write(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None
    ) -> IncomingBlocks:
        self._check_accepting()
        return open_write(self.store, namespace_id, keys, parent)

    # -- data plane (this node pulling) ---------------------------------------------------------

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None, peer: str
    ) -> FetchResult:
        """Pull the blocks of `keys` this node lacks from `peer`'s data plane: the peer sends
        its longest stored run of them, which lands in reserved slots, is verified, then
        committed. Returns what was copied and what was already here."""
        check_peer_address(peer)
        self._check_accepting()
        namespace = self.namespace(namespace_id)
        start = self.store.lookup(namespace_id, keys).num_hits  # also validates the keys
        if start == len(keys):
            return FetchResult(0, start, 0)
        wanted = keys[start:]
        with self._peers.connection(peer) as connection:
            try:
                reply = connection.request_get(namespace_id, wanted)
            except PeerUnavailableError:
                raise
            except KVStoreError as error:  # the peer's refusal, or a malformed reply: not the caller's fault
                connection.close()
                raise PeerUnavailableError(f"peer {peer} did not send the blocks: {error}") from None
            count = len(reply.checksums)
            if count and reply.block_bytes != namespace.block_bytes:
                connection.close()
                raise NamespaceMismatchError(
                    f"peer {peer} sends {reply.block_bytes}-byte blocks for namespace {namespace_id.hex()}, "
                    f"which has {namespace.block_bytes}-byte blocks here"
                )
            if not count:
                return FetchResult(0, start, 0)
            incoming = open_write(self.store, namespace_id, wanted[:count], keys[start - 1] if start else parent)
            try:
                arrived = connection.receive_into(incoming.views, incoming.deadline)
            except BaseException:
                incoming.abort()
                raise
            written = incoming.commit(reply.checksums, [arrived[i] for i in incoming.written])
        moved = count * namespace.block_bytes
        self.metrics.fetch_bytes.inc(moved)
        return FetchResult(written, start + count - written, moved)

    # -- administration ------------------------------------------------------------------------

    def remove(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> RemoveResult:
        return self.store.remove(namespace_id, keys)

    def pin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], pinned: bool) -> int:
        return self.store.pin(namespace_id, keys) if pinned else self.store.unpin(namespace_id, keys)

    def stats(self) -> StoreStats:
        return self.store.stats()

    def list_blocks(
        self, namespace_id: NamespaceId | None, *, start_row: int, limit: int
    ) -> tuple[list[BlockInfo], int | None]:
        return self.store.manager.list_blocks(namespace_id, start_row=start_row, limit=limit)

    def inspect(self, keys: Sequence[BlockKey]) -> list[BlockInfo | None]:
        return self.store.manager.inspect(keys)

    def watch(self, is_active: Callable[[], bool]) -> Iterator[BlockEvent]:
        """A snapshot of every stored block, a SNAPSHOT_END, then events as they happen, until
        the client leaves or the node closes. Raises WatchLagError if the client fell behind."""
        manager = self.store.manager
        sequence, snapshot = manager.watch_snapshot()
        self.metrics.watchers.inc()
        try:
            yield from snapshot
            yield BlockEvent(sequence, EventKind.SNAPSHOT_END, NamespaceId(b""), BlockKey(b""), None, ())
            while is_active() and not manager.events.closed:
                for event in manager.events.after(sequence, timeout_s=WATCH_POLL_S):
                    yield event
                    sequence = event.sequence
        finally:
            self.metrics.watchers.dec()

    # -- draining and shutdown -----------------------------------------------------------------

    @property
    def is_draining(self) -> bool:
        return self._draining.is_set()

    def drain(self, *, flush: bool) -> int:
        """Refuse new reads and writes from now on, and call the drain listeners (the first time
        only; the conductor link leaves the cluster); with `flush`, copy memory-only blocks to
        NVMe. Returns how many were flushed."""
        with self._drain_lock:
            first = not self._draining.is_set()
            self._draining.set()
        if first:
            for listener in self._drain_listeners:
                try:
                    listener()
                except Exception:  # the drain goes on whatever a listener does
                    log.exception("a drain listener failed")
        return self.store.manager.flush() if flush else 0

    def add_drain_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` when the node starts draining (from the thread that drains it)."""
        self._drain_listeners.append(listener)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no lease or reservation is held (True), or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.store.manager.expire()
            stats = self.store.stats()
            if not stats.num_leases and not stats.num_reservations:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def close(self) -> None:
        self._draining.set()
        self.store.manager.events.close()
        self._peers.close()
        self.store.close()

    def _check_accepting(self) -> None:
        if self._draining.is_set():
            raise NodeDrainingError(f"node {self.node_id} is draining and takes no new reads or writes")
