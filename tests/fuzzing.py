"""Shared parts of the fuzz tests of a node's planes (tests/integration/test_fuzz_*.py).

Every fuzz case checks the same three promises: the reply is a clean rejection (never
INTERNAL), a rejected call changed nothing (the store's fingerprint is the same before and
after), and the node keeps serving a well-behaved client. No exception may escape into any
thread. Here: the node under fuzz (`Target`, built by the `target` fixture in
tests/integration/conftest.py), its fingerprint, helpers for raw data-plane connections, and a
fake peer for `Fetch`.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kvstore import errors, status
from kvstore.client import Client
from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType, GetRequest, PutRequest
from kvstore.hashing import checksum
from kvstore.node.server import NodeServer
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import KEY_BYTES, BlockKey, Namespace, NamespaceId
from tests import factories
from tests.nodes import TOKEN

MAX_KEYS = 64  # the fuzzed node's server.max_keys_per_call
CHAIN_BLOCKS = 4  # the known chain a well-behaved client stores at setup
CALL_TIMEOUT_S = 15.0  # above the node's 10 s peer timeout, so a Fetch that hangs shows as a hang
SOCKET_TIMEOUT_S = 5.0  # a data-plane connection the node neither answers nor closes by then hangs
SETTLE_S = 2.0  # a dropped connection's reservation must be gone by then
SHORT_TTL_S = 0.5  # reservations and leases on the node the stalled-transfer tests use
GRPC = grpc.StatusCode
REJECTIONS = frozenset({GRPC.INVALID_ARGUMENT, GRPC.NOT_FOUND, GRPC.FAILED_PRECONDITION, GRPC.RESOURCE_EXHAUSTED})
# A Fetch also reports the peer: unreachable, or what its error frame said.
FETCH_REJECTIONS = REJECTIONS | {GRPC.UNAVAILABLE, GRPC.DATA_LOSS, GRPC.UNAUTHENTICATED}
INVALID_ARGUMENT = GRPC.INVALID_ARGUMENT.value[0]
NOT_FOUND = GRPC.NOT_FOUND.value[0]
FAILED_PRECONDITION = GRPC.FAILED_PRECONDITION.value[0]
DATA_LOSS = GRPC.DATA_LOSS.value[0]
UNAUTHENTICATED = GRPC.UNAUTHENTICATED.value[0]
# Errors a well-behaved peer sends, as (status code number, error class name).
PEER_ERRORS = [
    (status.code_number(cls("peer says no")), cls.__name__)
    for cls in (
        errors.InvalidArgumentError,
        errors.UnknownNamespaceError,
        errors.NamespaceMismatchError,
        errors.StoreFullError,
        errors.ChecksumError,
        errors.NodeDrainingError,
        errors.AuthenticationError,
    )
]

GRPC_METHODS = ("Lookup", "Reserve", "Commit", "Abort", "Acquire", "Release", "Remove", "Pin", "Unpin", "ListBlocks",
                "RegisterNamespace", "Fetch", "ReportLookups", "ReportReads", "ReportLoad")  # fmt: skip
# Raw bytes go to these; never Remove or Fetch, which a mutated request could aim at the known chain.
RAW_METHODS: dict[str, type[Message]] = {
    "Lookup": pb.LookupRequest,
    "Reserve": pb.ReserveRequest,
    "Commit": pb.CommitRequest,
    "Abort": pb.AbortRequest,
    "Acquire": pb.AcquireRequest,
    "Release": pb.ReleaseRequest,
    "ListBlocks": pb.ListBlocksRequest,
    "RegisterNamespace": pb.RegisterNamespaceRequest,
    "Pin": pb.PinRequest,
    "ReportLookups": pb.ReportLookupsRequest,
    "ReportReads": pb.ReportReadsRequest,
    "ReportLoad": pb.ReportLoadRequest,
}
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SLOW = settings(FUZZ, max_examples=40)  # cases that open connections and run a client check


# -- the node under fuzz ---------------------------------------------------------------------


class ThreadErrors:
    """Exceptions that escaped any thread of this process (a node's connection, gRPC or
    housekeeping thread dying). Installed as `threading.excepthook` for the module."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[str] = []

    def hook(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        with self._lock:
            self._errors.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")

    def take(self) -> list[str]:
        with self._lock:
            taken, self._errors = self._errors, []
        return taken


@dataclass(eq=False)  # hashed by identity: test modules cache strategies per target
class Target:
    """The node under fuzz and what a well-behaved client stored on it at setup."""

    server: NodeServer
    channel: grpc.Channel
    stub: pb_grpc.KVStoreStub
    client: Client  # well-behaved, over the TCP data plane
    namespace: Namespace
    namespace_id: NamespaceId
    other_namespace_id: NamespaceId  # registered, with nothing stored under it
    chain: list[BlockKey]
    payloads: list[np.ndarray]
    thread_errors: ThreadErrors
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    @property
    def known_bytes(self) -> bytes:
        return b"".join(payload.tobytes() for payload in self.payloads)


def fingerprint(target: Target) -> tuple[object, ...]:
    """What a rejected call must leave as it was. Tier placement is left out: a legitimate
    read may promote a block, and that is a cache decision, not a state change."""
    store = target.server.store
    stats = store.stats()
    blocks, _ = store.manager.list_blocks(None, start_row=0, limit=10**6)
    stored = sorted((b.key, b.namespace_id, b.parent, b.checksum, b.is_pinned) for b in blocks)
    namespaces = tuple(namespace.namespace_id for namespace in store.manager.namespaces())
    known_hits = store.lookup(target.namespace_id, target.chain).num_hits
    return stats.num_blocks, stats.num_leases, stats.num_reservations, tuple(stored), namespaces, known_hits


def servicer_failures(server: NodeServer) -> float:
    """Calls the servicer answered INTERNAL or UNKNOWN (its metrics label every call's code)."""
    return sum(
        sample.value
        for metric in server.registry.collect()
        if metric.name == "kvstore_rpc_seconds"
        for sample in metric.samples
        if sample.name.endswith("_count") and sample.labels.get("code") in {"INTERNAL", "UNKNOWN"}
    )


def wait_until(condition: Callable[[], bool], timeout_s: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def connection_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "dataplane-conn"}


def join_connection_threads(known: set[threading.Thread]) -> None:
    """Wait until the node's threads for connections opened since `known` have ended (and so
    have reported any exception that escaped them)."""
    for thread in connection_threads() - known:
        thread.join(SETTLE_S)
        assert not thread.is_alive(), "the node still serves a connection its client dropped"


def assert_unchanged(target: Target, before: tuple[object, ...]) -> None:
    wait_until(lambda: fingerprint(target) == before)
    assert fingerprint(target) == before


def assert_serves_everyone(target: Target) -> None:
    """A well-behaved client still puts and gets fresh blocks correctly, over the data plane."""
    seed = next(target.seeds)
    keys = factories.chain(target.namespace_id, 2, seed=seed)
    payloads = factories.payloads(target.namespace, 2, seed=seed)
    put = target.client.put_blocks(target.namespace_id, keys, payloads)
    assert (put.num_written, put.num_present) == (2, 0)
    got = target.client.get_blocks(target.namespace_id, keys)
    assert [block.tobytes() for block in got] == [payload.tobytes() for payload in payloads]
    assert remove_after_reads(target, keys) == (2, 0)


def remove_after_reads(target: Target, keys: list[BlockKey]) -> tuple[int, int]:
    """Remove blocks just read: the node releases a GET's lease after sending its last byte,
    which may be after the client got it, so wait for the lease first."""
    assert wait_until(lambda: target.server.store.stats().num_leases == 0)
    removed = target.client.remove(target.namespace_id, keys)
    return removed.num_removed, removed.num_busy


def call(target: Target, method: str, request: Message) -> tuple[grpc.StatusCode, Any]:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        return GRPC.OK, getattr(target.stub, method)(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details()


# -- data plane: helpers -----------------------------------------------------------------------


def header(kind: int, length: int, *, magic: bytes = protocol.MAGIC, version: int = protocol.VERSION) -> bytes:
    return protocol.HEADER.pack(magic, version, kind, length)


def frame(kind: int, body: bytes) -> bytes:
    return header(kind, len(body)) + body


def connect(target: Target) -> socket.socket:
    host, port = protocol.split_address(target.server.data_address)
    return socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S)


def say_hello(sock: socket.socket) -> None:
    protocol.send_frame(sock, FrameType.HELLO, TOKEN.encode())
    assert protocol.recv_frame(sock) == (FrameType.HELLO_OK, b"")


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the node may stop reading halfway (it hangs up on a bad header)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def half_close_quietly(sock: socket.socket) -> None:
    """Signal EOF; the node may have hung up already."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def frames_until_closed(sock: socket.socket) -> list[tuple[FrameType, bytes]]:
    """What the node sends until it closes the connection; a node that keeps a broken
    connection open past the socket timeout fails the test with TimeoutError."""
    frames = []
    while True:
        try:
            frames.append(protocol.recv_frame(sock))
        except ConnectionError:  # EOF, or a reset after it stopped reading
            return frames


def error_codes(frames: list[tuple[FrameType, bytes]]) -> list[int]:
    assert all(kind is FrameType.ERROR for kind, _ in frames), frames
    return [protocol.parse_error(body).code for _, body in frames]


def expect_known_run(target: Target, sock: socket.socket, keys: Sequence[bytes]) -> None:
    """GET `keys` on an open connection: the node sends exactly the known chain's leading run."""
    protocol.send_frame(
        sock, FrameType.GET, protocol.pack_get(GetRequest(target.namespace_id, [BlockKey(key) for key in keys], False))
    )
    kind, body = protocol.recv_frame(sock)
    reply = protocol.parse_get_ok(protocol.expect(kind, FrameType.GET_OK, body), MAX_KEYS)
    count = 0
    while count < len(keys) and count < CHAIN_BLOCKS and keys[count] == target.chain[count]:
        count += 1
    assert len(reply.checksums) == count
    payload = bytearray(count * target.namespace.block_bytes)
    protocol.recv_exactly_into(sock, memoryview(payload))
    assert bytes(payload) == target.known_bytes[: len(payload)]


@dataclass
class Fuzzed:
    """Runs one malicious connection, then checks that it changed nothing and hurt no one."""

    target: Target
    before: tuple[object, ...] = ()
    threads: set[threading.Thread] = field(default_factory=set)

    def __enter__(self) -> Fuzzed:
        self.before, self.threads = fingerprint(self.target), connection_threads()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            return
        join_connection_threads(self.threads)
        assert_unchanged(self.target, self.before)
        assert self.target.thread_errors.take() == []
        assert_serves_everyone(self.target)


PUT_ENTRY_BYTES = KEY_BYTES + 8  # a key and its checksum


def put_prefix(namespace_id: bytes, count: int) -> bytes:
    """A PUT body's fixed part (namespace, flags, parent, count), claiming `count` blocks."""
    return namespace_id + b"\x00" + bytes(KEY_BYTES) + struct.pack("<I", count)


def put_body(namespace_id: bytes, keys: Sequence[bytes], checksums: list[int], parent: bytes | None = None) -> bytes:
    request = PutRequest(
        NamespaceId(namespace_id),
        [BlockKey(key) for key in keys],
        None if parent is None else BlockKey(parent),
        checksums,
    )
    return protocol.pack_put(request)


@dataclass(frozen=True)
class PeerReply:
    how: str  # "garbage", "hello_error", "get_error" or "get_ok"
    raw: bytes = b""  # garbage, or an ERROR frame's body
    count: int = 0
    block_bytes: int | None = None  # None: the namespace's
    lie_at: int | None = None  # the block whose checksum is wrong
    cut: int | None = None  # payload bytes sent before hanging up


@st.composite
def peer_replies(draw: st.DrawFn, num_wanted: int, block_bytes: int) -> PeerReply:
    how = draw(st.sampled_from(["garbage", "hello_error", "get_error", "get_ok", "get_ok", "get_ok"]))
    if how == "garbage":
        return PeerReply(how, draw(st.binary(max_size=40)))
    if how != "get_ok":
        code, name = draw(st.sampled_from(PEER_ERRORS))
        return PeerReply(how, protocol.pack_error(code, name, draw(TEXT)))
    count = draw(st.integers(0, num_wanted + 1))
    size = draw(st.one_of(st.none(), st.none(), UINT64.filter(lambda value: value != block_bytes)))
    lie_at = draw(st.one_of(st.none(), st.none(), st.integers(0, count - 1))) if count else None
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, count * block_bytes - 1))) if count else None
    return PeerReply(how, count=count, block_bytes=size, lie_at=lie_at, cut=cut)


class FakePeer:
    """A data-plane peer on loopback that answers one connection as `reply` says."""

    def __init__(self, reply: PeerReply, payloads: list[np.ndarray], block_bytes: int) -> None:
        self._reply, self._payloads, self._block_bytes = reply, payloads, block_bytes
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-peer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._thread.join(SOCKET_TIMEOUT_S)
        assert not self._thread.is_alive() and self.failure is None, self.failure

    def _serve(self) -> None:
        try:
            self._listener.settimeout(SOCKET_TIMEOUT_S)
            connection, _ = self._listener.accept()
            with connection:
                connection.settimeout(SOCKET_TIMEOUT_S)
                self._answer(connection)
        except OSError:
            pass  # the node hung up first, as it should on many of these replies
        except BaseException as error:  # reported by close(), never into the thread hook
            self.failure = error
        finally:
            self._listener.close()

    def _answer(self, connection: socket.socket) -> None:
        reply = self._reply
        assert protocol.recv_frame(connection) == (FrameType.HELLO, TOKEN.encode())
        if reply.how == "garbage":
            connection.sendall(reply.raw)
            return
        if reply.how == "hello_error":
            protocol.send_frame(connection, FrameType.ERROR, reply.raw)
            return
        protocol.send_frame(connection, FrameType.HELLO_OK)
        assert protocol.recv_frame(connection)[0] is FrameType.GET
        if reply.how == "get_error":
            protocol.send_frame(connection, FrameType.ERROR, reply.raw)
            return
        payloads = self._payloads[: reply.count]
        checksums = [checksum(payload) for payload in payloads]
        if reply.lie_at is not None:
            checksums[reply.lie_at] ^= 1
        size = self._block_bytes if reply.block_bytes is None else reply.block_bytes
        payload = b"".join(p.tobytes() for p in payloads)
        connection.sendall(frame(FrameType.GET_OK, protocol.pack_get_ok(size, checksums)) + payload[: reply.cut])


# -- strategies shared by the planes ------------------------------------------------------------

TEXT = st.text(alphabet="abcxyz09_-./ é€\x00", max_size=12)  # no ':' : a peer never needs DNS
UINT32 = st.one_of(st.just(0), st.integers(1, 8), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))
RANDOM_KEY = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)


def numbered_keys(count: int) -> bytes:
    return b"".join((index + 1).to_bytes(KEY_BYTES, "little") for index in range(count))
