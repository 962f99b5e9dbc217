"""How a client makes the metadata calls of the shared-memory path: over the node's Unix
socket (`SocketControl`, for a client on the node's host) or over gRPC (`GrpcControl`, where
the socket cannot be reached). Both mean exactly what the proto says; the client picks one at
connect time and never branches on it again.

Calls, in the order a client makes them: `lookup` any time; a write is `reserve`, copy into the
granted slots, then `commit` (or `abort`); a read is `acquire`, copy out, then `release`, which
does not wait for the node (the copy is done; a release that fails is logged and the lease
expires). `fetch` makes the node pull blocks from a peer, which a client on the node's host
asks over the socket too. `close` lets releases in flight land. Every call may raise a KVStoreError.

Owner: one `Client`. Thread-safe (the connection pool and gRPC channels are).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from kvstore import wire
from kvstore.dataplane.client import DataPlanePool
from kvstore.dataplane.local_frames import (
    ChainRequest,
    FetchRequest,
    Grant,
    pack_chain,
    pack_commit,
    pack_fetch,
    pack_id,
    pack_lookups_done,
    parse_acquire_ok,
    parse_fetch_ok,
    parse_lookup_ok,
    parse_reserve_ok,
)
from kvstore.dataplane.protocol import FrameType
from kvstore.errors import KVStoreError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, FetchResult, LookupResult, NamespaceId

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")
Call = Callable[..., Any]  # the client's gRPC call wrapper: (method, request) -> reply, errors translated

_MAX_KEYS = 1 << 20  # replies longer than this are malformed


class SlotControl(Protocol):
    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult: ...

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant: ...

    def commit(self, reservation_id: int, checksums: list[int]) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], verify: bool) -> Grant: ...

    def release(self, lease_id: int) -> None: ...

    def report_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None: ...

    def read_done(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None: ...

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None, peer: str
    ) -> FetchResult: ...

    def close(self) -> None: ...


class SocketControl:
    """Over the node's Unix socket (kvstore.dataplane.local_frames): about 20 us a call here."""

    def __init__(self, pool: DataPlanePool, address: str) -> None:
        self._pool = pool
        self._address = address

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        body = self._call(FrameType.LOOKUP, pack_chain(ChainRequest(namespace_id, list(keys))), FrameType.LOOKUP_OK)
        return parse_lookup_ok(body)

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant:
        body = pack_chain(ChainRequest(namespace_id, list(keys), parent))
        return parse_reserve_ok(self._call(FrameType.RESERVE, body, FrameType.RESERVE_OK), _MAX_KEYS)

    def commit(self, reservation_id: int, checksums: list[int]) -> None:
        self._call(FrameType.COMMIT, pack_commit(reservation_id, checksums), FrameType.OK)

    def abort(self, reservation_id: int) -> None:
        self._call(FrameType.ABORT, pack_id(reservation_id), FrameType.OK)

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], verify: bool) -> Grant:
        body = pack_chain(ChainRequest(namespace_id, list(keys), verify=verify))
        return parse_acquire_ok(self._call(FrameType.ACQUIRE, body, FrameType.ACQUIRE_OK), _MAX_KEYS)

    def release(self, lease_id: int) -> None:
        self._send_only(FrameType.RELEASE, pack_id(lease_id))  # a lease not released expires

    def report_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None:
        self._send_only(FrameType.LOOKUPS_DONE, pack_lookups_done(lookups, hit_blocks, miss_blocks))

    def read_done(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None:
        self._send_only(FrameType.READ_DONE, pack_chain(ChainRequest(namespace_id, list(keys))))

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None, peer: str
    ) -> FetchResult:
        body = pack_fetch(FetchRequest(peer, ChainRequest(namespace_id, list(keys), parent)))
        return parse_fetch_ok(self._call(FrameType.FETCH, body, FrameType.FETCH_OK))

    def _send_only(self, kind: FrameType, body: bytes) -> None:
        try:
            with self._pool.connection(self._address) as connection:
                connection.send_only(kind, body)  # the node sends no reply
        except KVStoreError as error:
            log.info("could not tell the node %s: %s", kind.name, error)

    def close(self) -> None:
        pass  # releases are sent when made; the pool is the client's

    def _call(self, kind: FrameType, body: bytes, reply: FrameType) -> bytes:
        with self._pool.connection(self._address) as connection:
            return connection.call(kind, body, reply)


class GrpcControl:
    """Over gRPC: for a client that maps the node's memory but cannot reach its socket."""

    def __init__(self, stub: pb_grpc.KVStoreStub, call: Call, *, timeout_s: float, metadata: Any) -> None:
        self._stub = stub
        self._call = call
        self._timeout_s = timeout_s
        self._metadata = metadata
        self._in_flight: set[Any] = set()  # calls sent without waiting (Release, reports)
        self._in_flight_lock = threading.Lock()

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        reply = self._call(self._stub.Lookup, pb.LookupRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys)))
        return LookupResult(reply.num_hits, wire.tiers_from_proto(reply.tiers))

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant:
        request = pb.ReserveRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys), parent=parent or b"")
        reply = self._call(self._stub.Reserve, request)
        return Grant(
            reply.reservation_id,
            reply.block_bytes,
            reply.expires_in_s,
            list(reply.offsets),
            list(reply.indexes),
            [],
            reply.node_hashes,
        )

    def commit(self, reservation_id: int, checksums: list[int]) -> None:
        self._call(self._stub.Commit, pb.CommitRequest(reservation_id=reservation_id, checksums=checksums))

    def abort(self, reservation_id: int) -> None:
        self._call(self._stub.Abort, pb.AbortRequest(reservation_id=reservation_id))

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], verify: bool) -> Grant:
        request = pb.AcquireRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys), verify=verify)
        reply = self._call(self._stub.Acquire, request)
        return Grant(
            reply.lease_id, reply.block_bytes, reply.expires_in_s, list(reply.offsets), [], list(reply.checksums)
        )

    def release(self, lease_id: int) -> None:
        self._send_only(self._stub.Release, pb.ReleaseRequest(lease_id=lease_id))

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None, peer: str
    ) -> FetchResult:
        request = pb.FetchRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys), parent=parent or b"", peer=peer)
        reply = self._call(self._stub.Fetch, request)
        return FetchResult(reply.num_fetched, reply.num_present, reply.bytes_moved)

    def _send_only(self, method: Any, request: Any) -> None:
        """A call whose answer nobody waits for (a failed one is logged; `close` lets them land)."""
        future = method.future(request, timeout=self._timeout_s, metadata=self._metadata)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._sent)

    def report_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None:
        request = pb.ReportLookupsRequest(lookups=lookups, hit_blocks=hit_blocks, miss_blocks=miss_blocks)
        self._send_only(self._stub.ReportLookups, request)

    def read_done(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None:
        self._send_only(
            self._stub.ReportReads, pb.ReportReadsRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys))
        )

    def close(self) -> None:
        with self._in_flight_lock:
            pending = list(self._in_flight)
        for future in pending:  # let them land: no lease waits for its expiry, no report is lost
            with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                future.result(timeout=self._timeout_s)

    def _sent(self, future: Any) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.warning("a call sent without waiting failed (a lease not released expires): %s", future.exception())
