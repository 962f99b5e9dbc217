"""Feeding the global index from a node's `WatchEvents` (DESIGN.md 5).

One `NodeFeed` thread per live node: it subscribes, collects the snapshot up to its
SNAPSHOT_END, replaces the node's part of the index with it, then applies each event. Events
carry consecutive sequence numbers; a gap (events lost), a lagging-watcher abort or a broken
stream makes the feed subscribe again and rebuild the node's part from a fresh snapshot, so
the index never silently drifts from the node. Until a first snapshot has arrived the node
holds nothing in the index.

Owner: the feed's thread; it writes the cluster state only under the conductor's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from kvstore.node.auth import PLAINTEXT, Access
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, NamespaceId, TierKind

log = logging.getLogger(__name__)

RETRY_S = (0.1, 0.5, 1.0, 2.0)  # back-off between subscriptions after a failure
_STORED = (pb.EVENT_SNAPSHOT, pb.EVENT_STORED, pb.EVENT_TIER_CHANGED, pb.EVENT_REMOVED)


def tiers_of(event: pb.Event) -> tuple[TierKind, ...]:
    return tuple(TierKind(tier - 1) for tier in event.tiers if tier != pb.TIER_UNSPECIFIED)


class IndexSink(Protocol):
    """Where a feed writes (the conductor, under its lock)."""

    def replace_node(
        self, node_id: str, blocks: dict[BlockKey, tuple[TierKind, ...]], namespaces: set[NamespaceId]
    ) -> None: ...

    def apply(self, node_id: str, key: BlockKey, namespace: NamespaceId, tiers: tuple[TierKind, ...]) -> None: ...


class NodeFeed:
    def __init__(
        self,
        node_id: str,
        grpc_address: str,
        sink: IndexSink,
        *,
        access: Access = PLAINTEXT,
        on_resync: Callable[[str, str], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.grpc_address = grpc_address
        self._sink = sink
        self._access = access
        self._metadata = access.metadata
        self._on_resync = on_resync
        self._stop = threading.Event()
        self._call: Any = None  # the open WatchEvents call, cancelled by stop()
        self._lock = threading.Lock()
        self.resyncs = 0
        self.synced = threading.Event()  # set once a first snapshot is in the index
        self._thread = threading.Thread(target=self._run, name=f"feed-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            reason = self._subscribe()
            if self._stop.is_set():
                break
            self.resyncs += 1
            if self._on_resync is not None:
                self._on_resync(self.node_id, reason)
            log.info(
                "resubscribing to %s (%s): %s",
                self.node_id,
                self.grpc_address,
                reason,
                extra={"node_id": self.node_id, "reason": reason},
            )
            failures = failures + 1 if reason.startswith("stream") else 0
            self._stop.wait(RETRY_S[min(failures, len(RETRY_S) - 1)])

    def _subscribe(self) -> str:
        """Follow one subscription until it ends; returns why it ended."""
        with self._access.channel(self.grpc_address) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            try:
                with self._lock:
                    if self._stop.is_set():
                        return "stopped"
                    stream = stub.WatchEvents(pb.WatchEventsRequest(), metadata=self._metadata)
                    self._call = stream
                return self._follow(stream)
            except grpc.RpcError as error:
                return f"stream ended: {error.code().name}: {error.details()}"
            finally:
                with self._lock:
                    self._call = None

    def _follow(self, stream: object) -> str:
        blocks: dict[BlockKey, tuple[TierKind, ...]] = {}
        namespaces: set[NamespaceId] = set()
        expected: int | None = None
        for event in stream:  # type: ignore[attr-defined]
            if expected is None:
                if event.type == pb.EVENT_SNAPSHOT:
                    blocks[BlockKey(event.key)] = tiers_of(event)
                    namespaces.add(NamespaceId(event.namespace_id))
                elif event.type == pb.EVENT_SNAPSHOT_END:
                    self._sink.replace_node(self.node_id, blocks, namespaces)
                    self.synced.set()
                    blocks, expected = {}, event.sequence + 1
                else:
                    return f"a {pb.EventType.Name(event.type)} before the snapshot ended"
                continue
            if event.sequence != expected:
                return f"sequence gap: expected {expected}, got {event.sequence}"
            if event.type not in _STORED:
                return f"unexpected {pb.EventType.Name(event.type)} after the snapshot"
            self._sink.apply(self.node_id, BlockKey(event.key), NamespaceId(event.namespace_id), tiers_of(event))
            expected += 1
        return "stream ended by the node"
