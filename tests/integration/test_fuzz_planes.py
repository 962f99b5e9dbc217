"""Fuzzing both planes of a real node on loopback with random and malformed input.

The gRPC plane gets requests with random fields (keys of any length, counts above the node's
`max_keys_per_call`, namespace ids of any length, ids never issued, broken namespaces, page
tokens) and raw bytes that may not even parse. The TCP data plane gets garbage, broken headers,
frames before or instead of HELLO, wrong tokens, malformed GET and PUT bodies, PUTs cut off or
corrupted mid-payload, and a fake peer that answers a `Fetch` with malformed replies.

Every case checks the same three promises: the reply is a clean rejection (never INTERNAL),
a rejected call changed nothing (the store's fingerprint is the same before and after), and the
node keeps serving a well-behaved client. No exception may escape into any thread.

The tests at the end pin the bugs this fuzzing found (and that are fixed): undecodable bytes
answered INTERNAL, a peer's unmapped error relayed as INTERNAL, and transfers whose lease or
reservation expired under a stalled socket (slots reused while still being written).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvstore import errors, status
from kvstore.client import Client, Transport
from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType, GetRequest, PutRequest
from kvstore.hashing import checksum
from kvstore.node.server import NodeServer
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import KEY_BYTES, BlockKey, DType, KVPacking, Namespace, NamespaceId
from tests import factories
from tests.nodes import TOKEN, running_node

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
                "RegisterNamespace", "Fetch")  # fmt: skip
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


@dataclass
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

    # Strategies over this node's known values, built once: hypothesis validates a new strategy
    # object on its first draw, which costs more than the call it generates.

    @functools.cached_property
    def requests(self) -> st.SearchStrategy[tuple[str, Message]]:
        return grpc_requests(self, GRPC_METHODS)

    @functools.cached_property
    def raw_requests(self) -> st.SearchStrategy[tuple[str, Message]]:
        return grpc_requests(self, RAW_METHODS)

    @functools.cached_property
    def scripts(self) -> st.SearchStrategy[Script]:
        return scripts(self)

    @functools.cached_property
    def broken_puts(self) -> st.SearchStrategy[BrokenPut]:
        return broken_puts(self)


@pytest.fixture(scope="module")
def thread_errors() -> Iterator[ThreadErrors]:
    captured = ThreadErrors()
    previous, threading.excepthook = threading.excepthook, captured.hook
    try:
        yield captured
    finally:
        threading.excepthook = previous
    assert captured.take() == []


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, thread_errors: ThreadErrors) -> Iterator[Target]:
    with running_node(tmp_path_factory.mktemp("fuzz"), token=TOKEN, server__max_keys_per_call=MAX_KEYS) as server:
        channel = grpc.insecure_channel(server.grpc_address)
        client = Client(server.grpc_address, transport=Transport.TCP, token=TOKEN)
        try:
            namespace = factories.namespace()
            namespace_id = client.register_namespace(namespace)
            other_namespace_id = client.register_namespace(factories.namespace("other"))
            chain = factories.chain(namespace_id, CHAIN_BLOCKS)
            payloads = factories.payloads(namespace, CHAIN_BLOCKS)
            assert client.put_blocks(namespace_id, chain, payloads).num_written == CHAIN_BLOCKS
            yield Target(
                server,
                channel,
                pb_grpc.KVStoreStub(channel),
                client,
                namespace,
                namespace_id,
                other_namespace_id,
                chain,
                payloads,
                thread_errors,
            )
        finally:
            client.close()
            channel.close()


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


# -- strategies: gRPC fields -----------------------------------------------------------------

TEXT = st.text(alphabet="abcxyz09_-./ é€\x00", max_size=12)  # no ':' : a peer never needs DNS
UINT32 = st.one_of(st.just(0), st.integers(1, 8), st.integers(0, 2**32 - 1))
UINT64 = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))
RANDOM_KEY = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)


def numbered_keys(count: int) -> bytes:
    return b"".join((index + 1).to_bytes(KEY_BYTES, "little") for index in range(count))


def packed_keys(target: Target, *, destructive: bool) -> st.SearchStrategy[bytes]:
    """`keys` fields: any byte length, random keys, counts above the limit, and the known chain
    with junk appended or repeated past the limit. With `destructive` (Remove, Pin), never a
    well-formed run of stored keys, so an accepted call cannot touch the known chain."""
    known = b"".join(target.chain)
    malformed = [
        st.binary(max_size=100),
        st.lists(RANDOM_KEY, max_size=8).map(b"".join),
        st.integers(MAX_KEYS + 1, 20 * MAX_KEYS).map(numbered_keys),
        st.tuples(RANDOM_KEY, st.integers(MAX_KEYS + 1, 10 * MAX_KEYS)).map(lambda pair: pair[0] * pair[1]),
        st.binary(min_size=1, max_size=KEY_BYTES - 1).map(lambda junk: known + junk),
        st.integers(MAX_KEYS // CHAIN_BLOCKS + 1, 40).map(lambda times: known * times),
    ]
    if destructive:
        return st.one_of(malformed)
    known_runs = [
        st.integers(1, CHAIN_BLOCKS).map(lambda count: b"".join(target.chain[:count])),
        st.integers(2, MAX_KEYS // CHAIN_BLOCKS).map(lambda times: known * times),  # repeats, within the limit
        st.lists(RANDOM_KEY, min_size=1, max_size=4).map(lambda keys: known + b"".join(keys)),
    ]
    return st.one_of(*malformed, *known_runs)


def namespace_ids(target: Target) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(target.namespace_id), st.just(target.other_namespace_id), st.binary(max_size=40), RANDOM_KEY
    )


def parents(target: Target) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(b""), st.binary(max_size=24), st.sampled_from(target.chain))


@st.composite
def namespace_messages(draw: st.DrawFn) -> pb.RegisterNamespaceRequest:
    """A valid namespace with up to four fields broken: bad dtypes, zero or huge sizes, packing
    garbage, ranks out of range, no layout; or no namespace at all."""
    if not draw(st.integers(0, 9)):
        return pb.RegisterNamespaceRequest()
    namespace = pb.Namespace(
        model_id="tiny", dtype="float16", layout=pb.KVLayout(num_layers=2, num_kv_heads=4, head_size=64), block_tokens=4
    )
    fields = {
        "model_id": st.one_of(st.just(""), TEXT),
        "model_revision": TEXT,
        "dtype": st.one_of(st.sampled_from([d.value for d in DType] + ["", "fp16", "float16 "]), TEXT),
        "layout.num_layers": UINT32,
        "layout.num_kv_heads": UINT32,
        "layout.head_size": UINT32,
        "layout.packing": st.one_of(st.sampled_from([p.value for p in KVPacking] + ["SEPARATE"]), TEXT),
        "block_tokens": UINT32,
        "tp_rank": UINT32,
        "tp_size": UINT32,
        "tenant_salt": TEXT,
        "layout": st.none(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        value = draw(fields[name])
        if name == "layout":
            namespace.ClearField("layout")
        elif name.startswith("layout."):
            setattr(namespace.layout, name.removeprefix("layout."), value)
        else:
            setattr(namespace, name, value)
    return pb.RegisterNamespaceRequest(namespace=namespace)


def peers(target: Target) -> st.SearchStrategy[str]:
    fixed = ["", ":", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:1", "127.0.0.1:99999", "[::1]:x", "localhost:-1"]
    return st.one_of(st.sampled_from(fixed), TEXT, st.just(target.server.data_address))


def grpc_requests(target: Target, methods: Iterable[str]) -> st.SearchStrategy[tuple[str, Message]]:
    """(method, request) pairs for `methods`, with random and malformed fields."""
    ns, ids = namespace_ids(target), UINT64
    keys, safe_keys = packed_keys(target, destructive=False), packed_keys(target, destructive=True)
    page_tokens = st.one_of(st.just(b""), st.binary(max_size=12), UINT64.map(lambda row: row.to_bytes(8, "little")))
    requests: dict[str, st.SearchStrategy[Message]] = {
        "Lookup": st.builds(pb.LookupRequest, namespace_id=ns, keys=keys),
        "Reserve": st.builds(pb.ReserveRequest, namespace_id=ns, keys=keys, parent=parents(target)),
        "Commit": st.builds(pb.CommitRequest, reservation_id=ids, checksums=st.lists(UINT64, max_size=4)),
        "Abort": st.builds(pb.AbortRequest, reservation_id=ids),
        "Acquire": st.builds(pb.AcquireRequest, namespace_id=ns, keys=keys, verify=st.booleans()),
        "Release": st.builds(pb.ReleaseRequest, lease_id=ids),
        "Remove": st.builds(pb.RemoveRequest, namespace_id=ns, keys=safe_keys),
        "Pin": st.builds(pb.PinRequest, namespace_id=ns, keys=safe_keys),
        "Unpin": st.builds(pb.PinRequest, namespace_id=ns, keys=safe_keys),
        "ListBlocks": st.builds(
            pb.ListBlocksRequest,
            namespace_id=st.one_of(st.just(b""), ns),
            keys=st.one_of(st.just(b""), keys),
            page_size=st.one_of(st.just(0), st.integers(1, 12000), UINT32),
            page_token=page_tokens,
        ),
        "RegisterNamespace": namespace_messages(),
        "Fetch": st.builds(pb.FetchRequest, namespace_id=ns, keys=keys, parent=parents(target), peer=peers(target)),
    }
    return st.one_of([requests[name].map(functools.partial(named, name)) for name in methods])


def named(method: str, request: Message) -> tuple[str, Message]:
    return method, request


def check_accepted(target: Target, method: str, request: Message, reply: Any) -> None:
    """An accepted call's reply is consistent, and what it opened is closed again."""
    count = len(getattr(request, "keys", b"")) // KEY_BYTES
    if method == "Lookup":
        assert len(reply.tiers) == reply.num_hits <= count
    elif method == "Reserve":
        assert list(reply.indexes) == sorted(set(reply.indexes)) and all(i < count for i in reply.indexes)
        assert len(reply.offsets) == len(reply.indexes)
        assert call(target, "Abort", pb.AbortRequest(reservation_id=reply.reservation_id))[0] is GRPC.OK
    elif method == "Acquire":
        assert len(reply.offsets) == len(reply.checksums) <= count
        assert call(target, "Release", pb.ReleaseRequest(lease_id=reply.lease_id))[0] is GRPC.OK
    elif method == "Remove":
        assert (reply.num_removed, reply.num_busy) == (0, 0)  # only keys never stored get this far
    elif method in ("Pin", "Unpin"):
        assert reply.num_changed == 0
    elif method == "Fetch":
        assert reply.num_fetched == 0  # the only reachable peer is the node itself
    elif method == "ListBlocks":
        stored, _ = target.server.store.manager.list_blocks(None, start_row=0, limit=10**6)
        assert {block.key for block in reply.blocks} <= {info.key for info in stored}
    elif method == "RegisterNamespace":
        assert len(reply.namespace_id) == KEY_BYTES and reply.block_bytes > 0


# -- gRPC plane ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_grpc_requests_with_random_fields_are_rejected_cleanly(target: Target, data: st.DataObject) -> None:
    method, request = data.draw(target.requests, label="request")
    before, failures = fingerprint(target), servicer_failures(target.server)

    code, reply = call(target, method, request)

    event(f"{method}: {code.name}")
    assert code in (FETCH_REJECTIONS if method == "Fetch" else REJECTIONS) | {GRPC.OK}, (code, reply)
    if code is GRPC.OK:
        check_accepted(target, method, request, reply)
    else:
        assert fingerprint(target) == before
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert target.client.lookup(target.namespace_id, target.chain).num_hits == CHAIN_BLOCKS


RESPONSES: dict[str, type[Message]] = {"Reserve": pb.ReserveResponse, "Acquire": pb.AcquireResponse}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` truncated, with a byte flipped, with junk inserted, or replaced by junk."""
    position = draw(st.integers(0, len(valid)))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "garbage"]))
    if how == "truncate":
        return valid[:position]
    if how == "flip" and position < len(valid):
        return valid[:position] + bytes([valid[position] ^ draw(st.integers(1, 255))]) + valid[position + 1 :]
    if how == "insert":
        return valid[:position] + draw(st.binary(min_size=1, max_size=20)) + valid[position:]
    return draw(st.binary(max_size=200))


def parses(request_class: type[Message], raw: bytes) -> bool:
    try:
        request_class.FromString(raw)
    except DecodeError:
        return False
    return True


@FUZZ
@given(data=st.data())
def test_grpc_raw_bytes_are_rejected_cleanly(target: Target, data: st.DataObject) -> None:
    valid_method, valid = data.draw(target.raw_requests, label="request")
    method = data.draw(st.sampled_from([valid_method, *RAW_METHODS]), label="method")
    raw = data.draw(mutated(valid.SerializeToString()), label="raw")
    send: grpc.UnaryUnaryMultiCallable[bytes, bytes] = target.channel.unary_unary(f"/kvstore.v1.KVStore/{method}")
    before, failures = fingerprint(target), servicer_failures(target.server)

    code, reply, details = GRPC.OK, b"", None
    try:
        reply = send(raw, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()

    event(f"{method}: {code.name}")
    assert code in REJECTIONS | {GRPC.OK}, (code, details)
    if not parses(RAW_METHODS[method], raw):
        assert code is GRPC.INVALID_ARGUMENT, (code, details)
    if code is GRPC.OK and method in RESPONSES:
        check_accepted(target, method, RAW_METHODS[method].FromString(raw), RESPONSES[method].FromString(reply))
    if code is not GRPC.OK:
        assert fingerprint(target) == before
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert target.client.lookup(target.namespace_id, target.chain).num_hits == CHAIN_BLOCKS


def test_grpc_fuzzing_left_the_node_serving(target: Target) -> None:
    assert_serves_everyone(target)
    assert servicer_failures(target.server) == 0


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


# -- data plane: before HELLO -------------------------------------------------------------------


@dataclass(frozen=True)
class Preamble:
    raw: bytes
    codes: frozenset[int]  # the error codes the node may answer with (at most one ERROR frame)
    must_answer: bool


def wrong_tokens() -> st.SearchStrategy[bytes]:
    token = TOKEN.encode()
    return st.one_of(
        st.binary(max_size=64),
        st.just(token[:-1]),
        st.just(token + b"x"),
        st.integers(0, len(token) - 1).map(lambda i: token[:i] + bytes([token[i] ^ 1]) + token[i + 1 :]),
    ).filter(lambda candidate: candidate != token)


@st.composite
def preambles(draw: st.DrawFn) -> Preamble:
    hello = frame(FrameType.HELLO, TOKEN.encode())
    case = draw(st.sampled_from(["garbage", "truncated", "magic", "version", "type", "oversized", "early", "token"]))
    if case == "garbage":
        return Preamble(draw(st.binary(max_size=64)), frozenset({INVALID_ARGUMENT, UNAUTHENTICATED}), False)
    if case == "truncated":  # a header or token cut short, then EOF
        return Preamble(hello[: draw(st.integers(0, len(hello) - 1))], frozenset(), False)
    length = len(TOKEN)
    if case == "magic":
        magic = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != protocol.MAGIC))
        raw = header(FrameType.HELLO, length, magic=magic)
    elif case == "version":
        raw = header(FrameType.HELLO, length, version=draw(st.integers(0, 255).filter(lambda v: v != 1)))
    elif case == "type":
        raw = header(draw(st.one_of(st.just(0), st.integers(len(FrameType) + 1, 255))), length)
    elif case == "oversized":
        raw = header(FrameType.HELLO, draw(st.integers(protocol.MAX_TOKEN_BYTES + 1, 2**32 - 1)))
    elif case == "early":  # a well-formed frame, but not HELLO
        kind = draw(st.sampled_from([kind for kind in FrameType if kind is not FrameType.HELLO]))
        raw = frame(kind, draw(st.binary(max_size=64)))
    else:
        return Preamble(frame(FrameType.HELLO, draw(wrong_tokens())), frozenset({UNAUTHENTICATED}), True)
    return Preamble(raw, frozenset({INVALID_ARGUMENT}), True)


@FUZZ_SLOW
@given(preamble=preambles(), half_close=st.booleans())
def test_data_plane_refuses_connections_that_do_not_say_hello(
    target: Target, preamble: Preamble, half_close: bool
) -> None:
    with Fuzzed(target), connect(target) as sock:
        send_quietly(sock, preamble.raw)
        if not half_close and preamble.must_answer:
            replies = [protocol.recv_frame(sock)]  # the node answers without waiting for EOF
            replies += frames_until_closed(sock)
        else:
            half_close_quietly(sock)
            replies = frames_until_closed(sock)
        codes = error_codes(replies)
        assert len(codes) == 1 if preamble.must_answer else len(codes) <= 1
        assert set(codes) <= preamble.codes


# -- data plane: after HELLO --------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One frame after HELLO and what the node must do with it: `framing` errors get one ERROR
    and a closed connection; a `truncated` frame gets nothing; any other request gets exactly
    `expected` (frame type and error code, GET count, PUT_READY indexes or PUT_OK counts), and
    the connection stays usable."""

    raw: bytes
    outcome: str  # "framing", "truncated" or "answered"
    expected: tuple[tuple[FrameType, object], ...] = ()


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


@st.composite
def framing_errors(draw: st.DrawFn, target: Target) -> bytes:
    namespace_id = target.namespace_id
    case = draw(st.sampled_from(["short_get", "ragged_get", "long_get", "short_put", "ragged_put", "long_put"] * 2 + [
        "unexpected", "magic", "version", "type", "oversized"
    ]))  # fmt: skip
    if case == "short_get":
        return frame(FrameType.GET, draw(st.binary(max_size=KEY_BYTES)))
    if case == "ragged_get":
        keys = draw(st.binary(max_size=200).filter(lambda k: len(k) % KEY_BYTES))
        return frame(FrameType.GET, namespace_id + b"\x00" + keys)
    if case == "long_get":
        return frame(FrameType.GET, namespace_id + b"\x00" + numbered_keys(draw(st.integers(MAX_KEYS + 1, 300))))
    if case == "short_put":
        return frame(FrameType.PUT, draw(st.binary(max_size=2 * KEY_BYTES + 4)))
    if case == "ragged_put":  # the count field and the body length disagree
        count = draw(st.integers(0, MAX_KEYS))
        tail = draw(st.integers(0, (MAX_KEYS + 2) * PUT_ENTRY_BYTES).filter(lambda n: n != count * PUT_ENTRY_BYTES))
        return frame(FrameType.PUT, put_prefix(namespace_id, count) + bytes(tail))
    if case == "long_put":
        count = draw(st.integers(MAX_KEYS + 1, 2**32 - 1))
        return frame(FrameType.PUT, put_prefix(namespace_id, count) + draw(st.binary(max_size=48)))
    if case == "unexpected":  # HELLO again, or a frame only a server sends
        kind = draw(st.sampled_from([k for k in FrameType if k not in (FrameType.GET, FrameType.PUT)]))
        return frame(kind, draw(st.binary(max_size=32)))
    if case == "magic":
        return header(
            FrameType.GET, 0, magic=draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != protocol.MAGIC))
        )
    if case == "version":
        return header(FrameType.GET, 0, version=draw(st.integers(0, 255).filter(lambda v: v != 1)))
    if case == "type":
        return header(draw(st.one_of(st.just(0), st.integers(len(FrameType) + 1, 255))), 0)
    return header(
        draw(st.sampled_from([FrameType.GET, FrameType.PUT])), draw(st.integers(protocol.MAX_BODY_BYTES + 1, 2**32 - 1))
    )


@st.composite
def truncated_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([FrameType.GET, FrameType.PUT]))
    length = draw(st.one_of(st.integers(1, 64), st.integers(1, protocol.MAX_BODY_BYTES)))
    whole = header(kind, length) + draw(st.binary(min_size=min(length, 64), max_size=min(length, 64)))
    return whole[: draw(st.integers(0, min(len(whole), protocol.HEADER.size + length) - 1))]


@st.composite
def answered_requests(draw: st.DrawFn, target: Target) -> Script:
    chain, known = target.chain, target.namespace_id
    random_keys = draw(st.lists(RANDOM_KEY, max_size=MAX_KEYS, unique=True).filter(lambda ks: not set(ks) & set(chain)))
    flags = bytes([draw(st.integers(0, 255))])
    expected: tuple[tuple[FrameType, object], ...]
    case = draw(st.sampled_from(["get_unknown", "get_random", "get_known", "get_other", "put_unknown", "put_known",
                                 "put_other", "put_repeat", "put_empty"]))  # fmt: skip
    if case == "get_unknown":
        namespace_id = draw(RANDOM_KEY.filter(lambda n: n not in (known, target.other_namespace_id)))
        raw, expected = namespace_id + flags + b"".join(random_keys), ((FrameType.ERROR, NOT_FOUND),)
    elif case in ("get_random", "get_known", "get_other"):
        count = draw(st.integers(0, CHAIN_BLOCKS))
        keys = chain[:count] + random_keys[: MAX_KEYS - count] if case != "get_random" else random_keys
        hits = count if case == "get_known" else 0
        namespace_id = target.other_namespace_id if case == "get_other" else known
        raw, expected = namespace_id + flags + b"".join(keys), ((FrameType.GET_OK, hits),)
    else:
        checksums = draw(st.lists(UINT64, min_size=CHAIN_BLOCKS, max_size=CHAIN_BLOCKS))
        if case == "put_unknown":
            body = put_body(draw(RANDOM_KEY.filter(lambda n: n != known)), chain, checksums)
            expected = ((FrameType.ERROR, NOT_FOUND),)
        elif case == "put_known":  # all stored: nothing to send, whatever the checksums claim
            body = put_body(known, chain, checksums)
            expected = ((FrameType.PUT_READY, ()), (FrameType.PUT_OK, (0, CHAIN_BLOCKS)))
        elif case == "put_other":
            body = put_body(target.other_namespace_id, chain, checksums)
            expected = ((FrameType.ERROR, FAILED_PRECONDITION),)
        elif case == "put_repeat":
            times = draw(st.integers(2, MAX_KEYS // CHAIN_BLOCKS))
            body = put_body(known, chain * times, checksums * times)
            expected = ((FrameType.ERROR, INVALID_ARGUMENT),)
        else:
            body, expected = put_body(known, [], []), ((FrameType.PUT_READY, ()), (FrameType.PUT_OK, (0, 0)))
        return Script(frame(FrameType.PUT, body), "answered", expected)
    return Script(frame(FrameType.GET, raw), "answered", expected)


def scripts(target: Target) -> st.SearchStrategy[Script]:
    return st.one_of(
        framing_errors(target).map(lambda raw: Script(raw, "framing")),
        truncated_frames().map(lambda raw: Script(raw, "truncated")),
        answered_requests(target),
    )


def expect_answer(target: Target, sock: socket.socket, expected: tuple[tuple[FrameType, object], ...]) -> None:
    for wanted, detail in expected:
        kind, body = protocol.recv_frame(sock)
        assert kind is wanted, (kind, body)
        if kind is FrameType.ERROR:
            assert protocol.parse_error(body).code == detail
        elif kind is FrameType.GET_OK:
            reply = protocol.parse_get_ok(body, MAX_KEYS)
            assert len(reply.checksums) == detail
            payload = bytearray(reply.block_bytes * len(reply.checksums))
            protocol.recv_exactly_into(sock, memoryview(payload))
            assert bytes(payload) == target.known_bytes[: len(payload)]
        elif kind is FrameType.PUT_READY:
            assert tuple(protocol.parse_indexes(body, MAX_KEYS)) == detail
        else:
            assert protocol.parse_put_ok(body) == detail


@FUZZ
@given(data=st.data())
def test_data_plane_survives_malformed_frames_after_hello(target: Target, data: st.DataObject) -> None:
    script = data.draw(target.scripts, label="script")
    with Fuzzed(target), connect(target) as sock:
        say_hello(sock)
        if script.outcome == "framing":
            send_quietly(sock, script.raw)
            assert error_codes(frames_until_closed(sock)) == [INVALID_ARGUMENT]
        elif script.outcome == "truncated":
            sock.sendall(script.raw)
            sock.shutdown(socket.SHUT_WR)
            assert frames_until_closed(sock) == []
        else:
            sock.sendall(script.raw)
            expect_answer(target, sock, script.expected)
            expect_known_run(target, sock, target.chain)  # the connection is still usable


# -- data plane: PUT payloads cut off or corrupted ------------------------------------------------


@dataclass(frozen=True)
class BrokenPut:
    num_known: int  # the known chain's leading blocks come first; the node already has them
    fresh: tuple[bytes, ...]
    parent: bytes | None
    seed: int
    how: str  # "cut", "cut_and_close", "flip" or "lie"
    position: int  # the byte cut at or flipped, or the block whose checksum lies
    flip: int


@st.composite
def broken_puts(draw: st.DrawFn, target: Target) -> BrokenPut:
    num_known = draw(st.integers(0, CHAIN_BLOCKS))
    fresh = draw(
        st.lists(RANDOM_KEY, min_size=1, max_size=4, unique=True).filter(lambda ks: not set(ks) & set(target.chain))
    )
    parent = draw(st.one_of(st.none(), RANDOM_KEY)) if num_known == 0 else None
    how = draw(st.sampled_from(["cut", "cut_and_close", "flip", "lie"]))
    limit = len(fresh) if how == "lie" else len(fresh) * target.namespace.block_bytes
    position = draw(st.integers(0, limit - 1))
    return BrokenPut(
        num_known, tuple(fresh), parent, draw(st.integers(0, 2**32)), how, position, draw(st.integers(1, 255))
    )


@FUZZ_SLOW
@given(data=st.data())
def test_put_cut_off_or_corrupted_stores_nothing(target: Target, data: st.DataObject) -> None:
    put = data.draw(target.broken_puts, label="put")
    keys = [*target.chain[: put.num_known], *put.fresh]
    payloads = [*target.payloads[: put.num_known], *factories.payloads(target.namespace, len(put.fresh), put.seed)]
    checksums = [checksum(payload) for payload in payloads]
    sent = bytearray(b"".join(payload.tobytes() for payload in payloads[put.num_known :]))
    if put.how == "lie":
        checksums[put.num_known + put.position] ^= put.flip
    elif put.how == "flip":
        sent[put.position] ^= put.flip

    with Fuzzed(target), connect(target) as sock:
        say_hello(sock)
        protocol.send_frame(sock, FrameType.PUT, put_body(target.namespace_id, keys, checksums, put.parent))
        kind, body = protocol.recv_frame(sock)
        assert kind is FrameType.PUT_READY
        assert protocol.parse_indexes(body, len(keys)) == list(range(put.num_known, len(keys)))
        if put.how == "cut_and_close":
            sock.sendall(sent[: put.position])
            return  # closed mid-payload; Fuzzed checks the reservation is gone
        if put.how == "cut":
            sock.sendall(sent[: put.position])
            sock.shutdown(socket.SHUT_WR)
            assert frames_until_closed(sock) == []  # no PUT_OK for a payload that never arrived
            return
        sock.sendall(sent)
        assert error_codes([protocol.recv_frame(sock)]) == [DATA_LOSS]
        expect_known_run(target, sock, keys)  # still usable, and nothing of the PUT is readable


# -- data plane: a peer answering Fetch with malformed replies ------------------------------------


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


@FUZZ_SLOW
@given(data=st.data())
def test_fetch_from_a_peer_with_malformed_replies_stores_nothing(target: Target, data: st.DataObject) -> None:
    seed = next(target.seeds)
    wanted = factories.chain(target.namespace_id, 3, seed=seed)
    block_bytes = target.namespace.block_bytes
    reply = data.draw(peer_replies(len(wanted), block_bytes), label="reply")
    payloads = factories.payloads(target.namespace, len(wanted) + 1, seed=seed)
    well_formed = reply.how == "get_ok" and (
        reply.count == 0
        or (reply.count <= len(wanted) and reply.block_bytes is None and reply.lie_at is None and reply.cut is None)
    )
    before, failures = fingerprint(target), servicer_failures(target.server)
    peer = FakePeer(reply, payloads, block_bytes)
    request = pb.FetchRequest(namespace_id=target.namespace_id, keys=b"".join(wanted), peer=peer.address)

    code, answer = call(target, "Fetch", request)
    peer.close()

    event(f"peer {reply.how}: {code.name}")
    if well_formed:
        assert code is GRPC.OK, (code, answer)
        assert (answer.num_fetched, answer.num_present) == (reply.count, 0)
        got = target.client.get_blocks(target.namespace_id, wanted)
        assert [block.tobytes() for block in got] == [payload.tobytes() for payload in payloads[: reply.count]]
        assert remove_after_reads(target, wanted) == (reply.count, 0)
    else:
        assert code in FETCH_REJECTIONS, (code, answer)
        assert_unchanged(target, before)
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert_serves_everyone(target)


# -- bugs this fuzzing found, fixed: each test failed before its fix ------------------------------


@pytest.fixture(scope="module")
def short_ttl_node(tmp_path_factory: pytest.TempPathFactory, thread_errors: ThreadErrors) -> Iterator[NodeServer]:
    """Reservations and leases expire after SHORT_TTL_S; 12 MiB of DRAM for long GETs."""
    with running_node(
        tmp_path_factory.mktemp("short-ttl"),
        token=TOKEN,
        dram_kib=12 * 1024,
        nvme_kib=0,
        store__reservation_ttl_s=SHORT_TTL_S,
        store__lease_ttl_s=SHORT_TTL_S,
    ) as server:
        yield server


def tcp_client(server: NodeServer) -> tuple[Client, Namespace, NamespaceId]:
    client = Client(server.grpc_address, transport=Transport.TCP, token=TOKEN)
    namespace = factories.namespace()
    return client, namespace, client.register_namespace(namespace)


def raw_connection(server: NodeServer, *, receive_buffer_bytes: int | None = None) -> socket.socket:
    host, port = protocol.split_address(server.data_address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer_bytes is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    sock.settimeout(SOCKET_TIMEOUT_S)
    sock.connect((host, port))
    say_hello(sock)
    return sock


def test_grpc_undecodable_request_is_invalid_argument(target: Target) -> None:
    send: grpc.UnaryUnaryMultiCallable[bytes, bytes] = target.channel.unary_unary("/kvstore.v1.KVStore/Lookup")
    with pytest.raises(grpc.RpcError) as raised:
        send(b"\xff\xff\xff", metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=CALL_TIMEOUT_S)
    assert raised.value.code() is GRPC.INVALID_ARGUMENT


@pytest.mark.parametrize("code", [999, NOT_FOUND])
def test_fetch_relays_no_peer_error_as_internal(short_ttl_node: NodeServer, code: int) -> None:
    client, namespace, namespace_id = tcp_client(short_ttl_node)
    with client:
        reply = PeerReply("get_error", protocol.pack_error(code, "", "peer says no"))
        peer = FakePeer(reply, [], namespace.block_bytes)
        keys = factories.chain(namespace_id, 2, seed=7)
        with pytest.raises(errors.KVStoreError) as raised:
            client.fetch(namespace_id, keys, peer.address)
        peer.close()
        assert status.code_of(raised.value) in FETCH_REJECTIONS


def test_put_stalled_past_its_reservation_cannot_overwrite_another_block(short_ttl_node: NodeServer) -> None:
    client, namespace, namespace_id = tcp_client(short_ttl_node)
    with client, raw_connection(short_ttl_node) as sock:
        stalled, other = factories.chain(namespace_id, 1, seed=1), factories.chain(namespace_id, 1, seed=2)
        stalled_payload, other_payload = factories.payloads(namespace, 1, seed=1), factories.payloads(namespace, 1, 2)
        protocol.send_frame(sock, FrameType.PUT, put_body(namespace_id, stalled, [checksum(stalled_payload[0])]))
        assert protocol.recv_frame(sock)[0] is FrameType.PUT_READY
        half = namespace.block_bytes // 2
        sock.sendall(stalled_payload[0].tobytes()[:half])
        time.sleep(SHORT_TTL_S + 0.1)  # the writer stalls past the node's configured reservation TTL

        # A transfer's reservation lives as long as its transfer may (transfers.transfer_budget_s),
        # not the client TTL: the other writer gets another slot, and the stalled PUT completes.
        assert client.put_blocks(namespace_id, other, other_payload).num_written == 1
        sock.sendall(stalled_payload[0].tobytes()[half:])
        assert protocol.recv_frame(sock)[0] is FrameType.PUT_OK

        for keys, payload in ((other, other_payload), (stalled, stalled_payload)):
            got = client.get_blocks(namespace_id, keys)
            assert [block.tobytes() for block in got] == [payload[0].tobytes()]


def test_put_stalled_past_its_reservation_then_dropped_raises_in_no_thread(
    short_ttl_node: NodeServer, thread_errors: ThreadErrors
) -> None:
    client, _, namespace_id = tcp_client(short_ttl_node)
    threads = connection_threads()
    with client, raw_connection(short_ttl_node) as sock:
        keys = factories.chain(namespace_id, 1, seed=3)
        protocol.send_frame(sock, FrameType.PUT, put_body(namespace_id, keys, [0]))
        assert protocol.recv_frame(sock)[0] is FrameType.PUT_READY
        sock.sendall(b"x" * 100)
        time.sleep(SHORT_TTL_S + 0.1)
        short_ttl_node.store.manager.expire()  # what housekeeping does within a second
    join_connection_threads(threads)
    assert short_ttl_node.store.stats().num_reservations == 0
    assert thread_errors.take() == []


def test_get_read_slower_than_its_lease_raises_in_no_thread(
    short_ttl_node: NodeServer, thread_errors: ThreadErrors
) -> None:
    client, namespace, namespace_id = tcp_client(short_ttl_node)
    num_blocks = 1024  # 8 MiB: more than the kernel buffers between the node and a slow reader
    keys = factories.chain(namespace_id, num_blocks, seed=4)
    with client:
        assert client.put_blocks(namespace_id, keys, factories.payloads(namespace, 1) * num_blocks).num_written
        threads = connection_threads()
        with raw_connection(short_ttl_node, receive_buffer_bytes=4096) as sock:
            protocol.send_frame(sock, FrameType.GET, protocol.pack_get(GetRequest(namespace_id, keys, False)))
            assert wait_until(lambda: short_ttl_node.store.stats().num_leases == 1)
            time.sleep(SHORT_TTL_S + 0.1)  # the reader stalls past its lease's TTL
            short_ttl_node.store.manager.expire()
            kind, body = protocol.recv_frame(sock)
            reply = protocol.parse_get_ok(protocol.expect(kind, FrameType.GET_OK, body), num_blocks)
            protocol.recv_exactly_into(sock, memoryview(bytearray(reply.block_bytes * len(reply.checksums))))
        join_connection_threads(threads)
        client.remove(namespace_id, keys)
    assert thread_errors.take() == []
