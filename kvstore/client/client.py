"""`Client`: the SDK engines and tools use to talk to a node (DESIGN.md 4).

Batched first: every data call takes a chain of keys. Where the bytes go depends on where the
node is. On the same host (same host id, and its shared-memory segment maps) the client copies
payloads straight into and out of the node's DRAM slots: `put_blocks` is Reserve -> copy (and
hash while copying, unless the node hashes big blocks itself) -> Commit, `get_into` is
Acquire -> copy -> Release, and only metadata crosses, over the node's Unix socket
(`control`). Lookups, and reads of blocks in DRAM, need not even that: the node publishes
what it holds in a read-only shared index (`kvstore.shared_index`), which answers Lookups and
locates blocks to copy without a lease, checked after the copy. Otherwise the bytes go over
the node's TCP data plane, straight into the caller's buffers, and are checked against their
checksums before they count.

Every call has a deadline (`timeout_s`). Idempotent calls (Info, Lookup, Stats, ListBlocks,
RegisterNamespace, Remove, Pin, Unpin) are retried by gRPC on UNAVAILABLE with backoff; calls
that create state (Reserve, Acquire, Fetch) never are. Errors are the store's own classes
(`kvstore.errors`), whichever side raised them.

Owner: the caller. Thread-safe: gRPC channels are, and the data-plane pool is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from kvstore import wire
from kvstore.client.control import GrpcControl, SlotControl, SocketControl
from kvstore.client.reports import NodeReports
from kvstore.dataplane.client import DataPlanePool
from kvstore.dataplane.protocol import SOCKET_BUFFER_BYTES
from kvstore.errors import InvalidArgumentError, KVStoreError, PeerUnavailableError, UnknownNamespaceError
from kvstore.events import BlockEvent
from kvstore.hashing import checksum
from kvstore.hostid import host_id
from kvstore.layout import payloads_bytes
from kvstore.node.auth import Access, call_metadata
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.shared_index import IndexReader
from kvstore.stats import TierStats
from kvstore.status import ERROR_METADATA_KEY, error_from_status
from kvstore.tiers.base import copy_with_checksum
from kvstore.tiers.dram import SharedSegment, native_copy_blocks
from kvstore.types import (
    BlockInfo,
    BlockKey,
    EngineLoad,
    FetchResult,
    LookupResult,
    Namespace,
    NamespaceId,
    PutResult,
    RemoveResult,
)

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")

EXPIRY_MARGIN_S = 1.0  # stop copying this long before a lease or reservation lapses
_IDEMPOTENT = ("Info", "Lookup", "Stats", "ListBlocks", "RegisterNamespace", "Remove", "Pin", "Unpin")
_SERVICE = "kvstore.v1.KVStore"


class Transport(StrEnum):
    AUTO = "auto"  # shared memory when the node is on this host and its segment maps, else TCP
    SHARED_MEMORY = "shm"  # fail at connect if shared memory cannot be used
    TCP = "tcp"  # the data plane, even on the same host


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """`Info` and `Stats` of a node, as `kvctl status` shows them."""

    node_id: str
    version: str
    data_address: str
    segment_name: str
    namespaces: tuple[Namespace, ...]
    is_draining: bool
    uptime_s: float
    tiers: tuple[TierStats, ...]
    num_blocks: int
    num_leases: int
    num_reservations: int
    num_unhashed: int
    lookups: int
    lookup_hit_blocks: int
    lookup_miss_blocks: int
    reporting_engines: int  # engines whose load report is fresh
    load: EngineLoad | None  # their sum, which the node's heartbeats carry; None when none reports


@dataclass(frozen=True, slots=True)
class LeasedBlocks:
    """A run of blocks leased in place in the node's shared memory (`Client.lease_in_place`):
    block `i`'s bytes are `block_bytes` at `addresses[i]` in this process, and stay that
    block's until the lease lapses at `deadline` (time.monotonic()) or is released."""

    addresses: tuple[int, ...]
    block_bytes: int
    deadline: float

    def __len__(self) -> int:
        return len(self.addresses)

    def expired(self) -> bool:
        """Past the lease's end the slots may hold other blocks: what was read is a miss."""
        return time.monotonic() > self.deadline


class Client:
    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls_root_certificates: bytes | None = None,
        timeout_s: float = 10.0,
        transport: Transport = Transport.AUTO,
        max_attempts: int = 3,
        shared_index: bool = True,
        data_socket_buffer_bytes: int = SOCKET_BUFFER_BYTES,
    ) -> None:
        """`shared_index`: on the node's host, answer Lookups from the index the node publishes
        in shared memory when it can (False: always ask the node). `data_socket_buffer_bytes`:
        the send and receive buffer of each data-plane connection (0: the kernel's autotuning)."""
        if data_socket_buffer_bytes < 0:
            raise InvalidArgumentError(
                f"data_socket_buffer_bytes is {data_socket_buffer_bytes}; 0 leaves the buffers to the kernel"
            )
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = call_metadata(token)
        options = [("grpc.service_config", _retry_config(max_attempts)), ("grpc.enable_retries", 1)]
        self._channel = Access(token, tls_root_certificates).channel(address, options)
        self._stub = pb_grpc.KVStoreStub(self._channel)
        self._namespaces: dict[NamespaceId, Namespace] = {}
        self._pool = DataPlanePool(token=token, timeout_s=timeout_s, buffer_bytes=data_socket_buffer_bytes)
        self._segment: SharedSegment | None = None
        self._index: IndexReader | None = None
        self._reports: NodeReports | None = None  # what the shared index's users tell the node
        # The shared-memory path's metadata calls: the node's Unix socket once Info names it.
        self._slots: SlotControl = GrpcControl(self._stub, self._call, timeout_s=timeout_s, metadata=self._metadata)
        try:
            info = self._call(self._stub.Info, pb.InfoRequest())
            self.node_id = info.node_id
            self.data_address = info.data_address
            self._remember(info.namespaces)
            if transport is not Transport.TCP:
                self._segment = _attach_segment(info)
                if self._segment is not None and info.local_address:
                    self._slots = _socket_control(self._pool, info.local_address, self._slots)
                if self._segment is not None and info.index_segment_name and shared_index:
                    self._index = _attach_index(info.index_segment_name)
                if self._index is not None:
                    self._reports = NodeReports(self._slots)
                if self._segment is None and transport is Transport.SHARED_MEMORY:
                    raise InvalidArgumentError(
                        f"node {info.node_id} at {address} is not reachable through shared memory from here"
                    )
        except BaseException:
            self.close()
            raise

    @property
    def uses_shared_memory(self) -> bool:
        return self._segment is not None

    @property
    def uses_shared_index(self) -> bool:
        return self._index is not None

    @property
    def shared_memory(self) -> npt.NDArray[np.uint8] | None:
        """The node's shared-memory segment as mapped here (None off the node's host): what
        an engine registers with its GPU so kernels read leased slots in place."""
        return None if self._segment is None else self._segment.array

    def close(self) -> None:
        if self._reports is not None:
            self._reports.close()
            self._reports = None
        self._slots.close()
        self._pool.close()
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        if self._index is not None:
            self._index.close()
            self._index = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- namespaces and index ------------------------------------------------------------------

    def register_namespace(self, namespace: Namespace) -> NamespaceId:
        request = pb.RegisterNamespaceRequest(namespace=wire.namespace_to_proto(namespace))
        reply = self._call(self._stub.RegisterNamespace, request)
        namespace_id = NamespaceId(reply.namespace_id)
        self._namespaces[namespace_id] = namespace
        return namespace_id

    def namespaces(self) -> tuple[Namespace, ...]:
        """The namespaces registered on the node (one Info call)."""
        infos = self._call(self._stub.Info, pb.InfoRequest()).namespaces
        self._remember(infos)
        return tuple(wire.namespace_from_proto(item.namespace) for item in infos)

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        """How many leading keys the node holds, and each one's fastest tier. On the node's
        host this is answered here, from the index the node publishes in shared memory, unless
        the index cannot be sure (then, as elsewhere, by the node)."""
        index = self._index
        if index is not None and self._known_namespace(namespace_id) is not None:
            result = index.lookup(namespace_id, keys)
            if result is not None:
                assert self._reports is not None  # made with the index
                self._reports.lookup(result.num_hits, len(keys) - result.num_hits)
                return result
        return self._slots.lookup(namespace_id, keys)

    # -- data ----------------------------------------------------------------------------------

    def put_blocks(
        self,
        namespace_id: NamespaceId,
        keys: Sequence[BlockKey],
        payloads: Sequence[Any],
        *,
        parent: BlockKey | None = None,
    ) -> PutResult:
        """Store a chain (`parent` precedes keys[0]). Payloads are numpy arrays or CPU tensors
        of the namespace's dtype and block shape, or raw bytes of its block size; they are
        checked before anything is sent."""
        namespace = self._namespace(namespace_id)
        if len(keys) != len(payloads):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(payloads)} payloads")
        flats = payloads_bytes(payloads, namespace, "payload")
        if self._segment is None:
            return self._put_remote(namespace_id, keys, flats, parent)
        asked = time.monotonic()
        grant = self._slots.reserve(namespace_id, keys, parent)
        deadline = _copy_deadline(asked, grant.expires_in_s)
        try:
            array, size = self._segment.array, grant.block_bytes
            checksums = []
            for index, offset in zip(grant.indexes, grant.offsets, strict=True):
                _check_deadline(deadline, "reservation")  # past it, the slots may belong to another block
                if grant.node_hashes:  # big blocks: the node's background hasher does it, off our path
                    np.copyto(array[offset : offset + size], flats[index])
                else:
                    checksums.append(copy_with_checksum(array[offset : offset + size], flats[index]))
        except BaseException:
            self._abort_quietly(grant.grant_id)
            raise
        self._slots.commit(grant.grant_id, checksums)
        return PutResult(len(grant.indexes), len(keys) - len(grant.indexes))

    def get_into(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], dests: Sequence[Any], *, verify: bool = False
    ) -> int:
        """Copy the longest stored leading run of `keys` into `dests`; returns its length
        (destinations past it may have been written). Bytes from another host are always
        checked against their checksums; `verify` also checks shared-memory copies. A block
        that fails ends the run.

        On the node's host, blocks the shared index places in DRAM are copied without a lease
        and kept only if the index still vouches for them afterwards; the rest (blocks in NVMe
        or in doubt, and every read with `verify`) take the Acquire -> copy -> Release path."""
        namespace = self._namespace(namespace_id)
        if len(keys) != len(dests):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(dests)} destinations")
        targets = payloads_bytes(dests, namespace, "destination", writable=True)
        if self._segment is None:
            return self._get_remote(namespace_id, keys, targets)
        copied = 0
        if self._index is not None and not verify and keys:
            copied, finished = self._get_unleased(namespace_id, keys, targets, namespace.block_bytes)
            if finished:
                return copied
        return copied + self._get_leased(namespace_id, keys[copied:], targets[copied:], verify)

    def _get_unleased(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], targets: list[npt.NDArray[np.uint8]], size: int
    ) -> tuple[int, bool]:
        """Copy the leading run the shared index places in DRAM, then keep what it still vouches
        for. Returns (blocks copied and kept, whether that answers the whole request)."""
        assert self._index is not None and self._segment is not None
        plan = self._index.locate(namespace_id, keys)
        array = self._segment.array
        if plan is None or (plan.count and int(plan.offsets.max()) + size > array.size):
            return 0, False
        if native_copy_blocks is not None:  # one C call, GIL released: no ~1 us of Python per block
            native_copy_blocks(array, plan.offsets, size, targets)
        else:
            for target, offset in zip(targets, plan.offsets.tolist(), strict=False):
                np.copyto(target, array[offset : offset + size])
        kept = self._index.unchanged(plan)
        if kept and self._reports is not None:
            self._reports.read(namespace_id, keys[:kept])
        return kept, kept == plan.count and plan.ends_at_miss

    def _get_leased(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], targets: list[npt.NDArray[np.uint8]], verify: bool
    ) -> int:
        if not keys:
            return 0
        asked = time.monotonic()
        grant = self._slots.acquire(namespace_id, keys, verify)
        deadline = _copy_deadline(asked, grant.expires_in_s)
        assert self._segment is not None  # only called for a node whose segment is mapped
        array, size = self._segment.array, grant.block_bytes
        try:
            for index, offset in enumerate(grant.offsets):
                if time.monotonic() > deadline:
                    return index  # the lease is about to lapse: the rest may be reused slots
                np.copyto(targets[index], array[offset : offset + size])
                if verify and checksum(targets[index]) != grant.checksums[index]:
                    return index
            return len(grant.offsets)
        finally:
            self._slots.release(grant.grant_id)

    @contextlib.contextmanager
    def lease_in_place(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool = False
    ) -> Iterator[LeasedBlocks]:
        """Lease the longest stored leading run of `keys` in the node's shared memory and yield
        where its slots are, for a kernel or a DMA engine to read them in place (no copy
        through this process); the lease ends with the `with` block. On the node's host only.
        With `verify`, each slot is checked against its checksum first, and the run ends at
        the first that fails. Whatever reads the slots must be done by `deadline`: check
        `expired()` after, and treat the blocks as missing if it is true."""
        namespace = self._namespace(namespace_id)
        if self._segment is None:
            raise InvalidArgumentError(f"node {self.node_id} is not reachable through shared memory from here")
        if not keys:
            yield LeasedBlocks((), namespace.block_bytes, time.monotonic() + self.timeout_s)
            return
        asked = time.monotonic()
        grant = self._slots.acquire(namespace_id, keys, verify)
        try:
            array, size = self._segment.array, grant.block_bytes
            count = len(grant.offsets)
            if verify:
                for index, offset in enumerate(grant.offsets):
                    if checksum(array[offset : offset + size]) != grant.checksums[index]:
                        count = index
                        break
            base = array.ctypes.data
            addresses = tuple(base + offset for offset in grant.offsets[:count])
            yield LeasedBlocks(addresses, size, _copy_deadline(asked, grant.expires_in_s))
        finally:
            self._slots.release(grant.grant_id)

    def get_blocks(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> list[npt.NDArray[np.uint8]]:
        """The longest stored leading run of `keys`, as new flat uint8 arrays."""
        size = self._namespace(namespace_id).block_bytes
        found = self.lookup(namespace_id, keys).num_hits
        dests = [np.empty(size, dtype=np.uint8) for _ in range(found)]
        count = self.get_into(namespace_id, keys[:found], dests) if found else 0
        return dests[:count]

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], peer: str, *, parent: BlockKey | None = None
    ) -> FetchResult:
        """Make the node pull the blocks of `keys` it lacks from `peer` (its data address); a
        client on the node's host asks over the node's Unix socket, others over gRPC."""
        return self._slots.fetch(namespace_id, keys, parent, peer)

    # -- load ----------------------------------------------------------------------------------

    def report_load(self, engine_id: str, load: EngineLoad) -> None:
        """Tell the node this engine's load, under an id the engine keeps (a new report replaces
        its last). The node's heartbeats to its conductor carry the sum of its engines' latest
        reports; a report older than the node's membership ttl no longer counts, so an engine
        reports every second or two. InvalidArgumentError names a bad field; nothing changes."""
        load.check()  # here too: a negative count cannot even be put in the message
        self._call(self._stub.ReportLoad, pb.ReportLoadRequest(engine_id=engine_id, load=wire.load_to_proto(load)))

    # -- administration ------------------------------------------------------------------------

    def remove(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> RemoveResult:
        reply = self._call(self._stub.Remove, pb.RemoveRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys)))
        return RemoveResult(reply.num_removed, reply.num_busy)

    def pin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        request = pb.PinRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys))
        return self._call(self._stub.Pin, request).num_changed

    def unpin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        request = pb.PinRequest(namespace_id=namespace_id, keys=wire.pack_keys(keys))
        return self._call(self._stub.Unpin, request).num_changed

    def status(self) -> NodeStatus:
        info = self._call(self._stub.Info, pb.InfoRequest())
        stats = self._call(self._stub.Stats, pb.StatsRequest())
        self._remember(info.namespaces)
        return NodeStatus(
            info.node_id,
            info.version,
            info.data_address,
            info.segment_name,
            tuple(wire.namespace_from_proto(item.namespace) for item in info.namespaces),
            info.draining or stats.draining,
            info.uptime_s,
            tuple(wire.tier_stats_from_proto(tier) for tier in stats.tiers),
            stats.num_blocks,
            stats.num_leases,
            stats.num_reservations,
            stats.num_unhashed,
            stats.lookups,
            stats.lookup_hit_blocks,
            stats.lookup_miss_blocks,
            stats.reporting_engines,
            wire.load_from_proto(stats.load) if stats.HasField("load") else None,
        )

    def list_blocks(self, namespace_id: NamespaceId | None = None, *, page_size: int = 1000) -> Iterator[BlockInfo]:
        """Every stored block (of one namespace, or all), fetched a page at a time."""
        token = b""
        while True:
            request = pb.ListBlocksRequest(namespace_id=namespace_id or b"", page_size=page_size, page_token=token)
            reply = self._call(self._stub.ListBlocks, request)
            yield from (wire.block_info_from_proto(block) for block in reply.blocks)
            token = reply.next_page_token
            if not token:
                return

    def inspect(self, keys: Sequence[BlockKey]) -> list[BlockInfo]:
        """The stored blocks among `keys` (absent ones are left out)."""
        reply = self._call(self._stub.ListBlocks, pb.ListBlocksRequest(keys=wire.pack_keys(keys)))
        return [wire.block_info_from_proto(block) for block in reply.blocks]

    def watch_events(self) -> EventWatch:
        """A snapshot of every stored block (SNAPSHOT events, then one SNAPSHOT_END), then
        events as they happen, until `cancel()` or the node goes away. A client that falls too
        far behind gets WatchLagError and should watch again."""
        return EventWatch(self._stub.WatchEvents(pb.WatchEventsRequest(), metadata=self._metadata))

    def drain(self, *, flush: bool = True) -> int:
        """Make the node refuse new reads and writes; with `flush`, copy memory-only blocks to
        NVMe. Returns how many were flushed."""
        return self._call(
            self._stub.Drain, pb.DrainRequest(flush=flush), timeout_s=max(self.timeout_s, 600.0)
        ).num_flushed

    # -- internals -----------------------------------------------------------------------------

    def _call(self, method: Callable[..., Reply], request: Any, *, timeout_s: float | None = None) -> Reply:
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _translate(error) from None

    def _namespace(self, namespace_id: NamespaceId) -> Namespace:
        namespace = self._known_namespace(namespace_id)
        if namespace is None:
            shown = namespace_id.hex() if isinstance(namespace_id, bytes) else repr(namespace_id)
            raise UnknownNamespaceError(f"namespace {shown} is not registered on node {self.node_id}")
        return namespace

    def _known_namespace(self, namespace_id: NamespaceId) -> Namespace | None:
        """The namespace, if the node has it (asking it once about one this client has not seen)."""
        namespace = self._namespaces.get(namespace_id)
        if namespace is None:
            self._remember(self._call(self._stub.Info, pb.InfoRequest()).namespaces)
            namespace = self._namespaces.get(namespace_id)
        return namespace

    def _remember(self, infos: Sequence[pb.NamespaceInfo]) -> None:
        for item in infos:
            self._namespaces[NamespaceId(item.namespace_id)] = wire.namespace_from_proto(item.namespace)

    def _abort_quietly(self, reservation_id: int) -> None:
        try:
            self._slots.abort(reservation_id)
        except KVStoreError as error:  # expiry frees it anyway; the original error matters more
            log.warning("abort of reservation %d failed: %s", reservation_id, error)

    def _put_remote(
        self,
        namespace_id: NamespaceId,
        keys: Sequence[BlockKey],
        flats: list[npt.NDArray[np.uint8]],
        parent: BlockKey | None,
    ) -> PutResult:
        checksums = [checksum(flat) for flat in flats]
        views = [memoryview(flat.data) for flat in flats]
        with self._pool.connection(self.data_address) as connection:
            written, present = connection.put(namespace_id, keys, parent, checksums, views)
        return PutResult(written, present)

    def _get_remote(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], targets: list[npt.NDArray[np.uint8]]
    ) -> int:
        with self._pool.connection(self.data_address) as connection:
            reply = connection.request_get(namespace_id, keys)
            count = len(reply.checksums)
            if count and reply.block_bytes != targets[0].nbytes:
                connection.close()
                raise InvalidArgumentError(
                    f"node sends {reply.block_bytes}-byte blocks, destinations hold {targets[0].nbytes}"
                )
            arrived = connection.receive_into([memoryview(target.data) for target in targets[:count]])
        for index, (have, want) in enumerate(zip(arrived, reply.checksums, strict=True)):
            if have != want:
                return index  # the receiver is the trust boundary: on doubt, miss
        return count


def _copy_deadline(asked: float, expires_in_s: float) -> float:
    """When a copy into or out of slots granted at `asked` must stop: a margin before the grant
    lapses (a quarter of it for short grants), so the slots cannot have been reused."""
    return asked + expires_in_s - min(EXPIRY_MARGIN_S, expires_in_s / 4)


def _check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise PeerUnavailableError(f"the node's {what} lapsed before the copy finished; nothing was stored")


class EventWatch:
    """An open WatchEvents stream: iterate it for events; `cancel` ends it from any thread."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[BlockEvent]:
        try:
            for message in self._stream:
                yield wire.event_from_proto(message)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.CANCELLED:
                raise _translate(error) from None

    def cancel(self) -> None:
        self._stream.cancel()


def _translate(error: grpc.RpcError) -> KVStoreError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    name = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for item in trailing or ():
        if item.key == ERROR_METADATA_KEY:
            name = item.value if isinstance(item.value, str) else item.value.decode()
    return error_from_status(code, details or "", name)


def _socket_control(pool: DataPlanePool, address: str, fallback: SlotControl) -> SlotControl:
    """The node's Unix socket when a connection to it works (it may not from another network
    namespace, a container sharing only /dev/shm); otherwise `fallback`, the same calls over gRPC."""
    try:
        with pool.connection(address):
            pass  # connected and authenticated: kept in the pool for the first call
    except KVStoreError as error:
        log.info("node socket %s is not reachable (%s); metadata goes over gRPC", address, error)
        return fallback
    return SocketControl(pool, address)


def _attach_index(name: str) -> IndexReader | None:
    try:
        return IndexReader(name)
    except (OSError, ValueError) as error:
        log.info("the node's shared index %s is not readable (%s); Lookups go to the node", name, error)
        return None


def _attach_segment(info: pb.InfoResponse) -> SharedSegment | None:
    """The node's segment, mapped, when the node runs on this host and the mapping works."""
    if info.host_id != host_id() or not info.segment_name:
        return None
    try:
        segment = SharedSegment.attach(info.segment_name)
    except OSError as error:  # another /dev/shm (a container), or another user's 0600 segment
        log.info("shared memory of node %s is not mappable (%s); using the data plane", info.node_id, error)
        return None
    if segment.size_bytes != info.segment_bytes:
        segment.close()
        return None
    return segment


def _retry_config(max_attempts: int) -> str:
    policy = {
        "maxAttempts": max(2, min(max_attempts, 5)),
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = [{"service": _SERVICE, "method": method} for method in _IDEMPOTENT]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})
