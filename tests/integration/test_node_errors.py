"""Every call's bad-input path against a real node: the right status code, a message naming
what is wrong, and proof that nothing changed."""

from __future__ import annotations

import socket

import grpc
import pytest

from kvstore.client import Client, Transport
from kvstore.dataplane import local_frames, protocol
from kvstore.dataplane.protocol import FrameType, PutRequest
from kvstore.errors import ChecksumError
from kvstore.hashing import checksum
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import LookupResult, NamespaceId, TierKind
from tests import factories
from tests.nodes import eventually, running_node


@pytest.fixture
def setup(tmp_path):
    """A node without NVMe whose DRAM holds 8 blocks, 3 of them stored and pinned."""
    with running_node(tmp_path, dram_kib=64, nvme_kib=0) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 3)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
        client.pin(namespace_id, keys)
        stub = pb_grpc.KVStoreStub(grpc.insecure_channel(server.grpc_address))
        yield server, client, stub, namespace_id, keys


def fingerprint(server):
    manager = server.store.manager
    stats = server.store.stats()
    blocks, _ = manager.list_blocks(None, start_row=0, limit=10**6)
    return stats.num_blocks, stats.num_leases, stats.num_reservations, sorted((b.key, b.tiers) for b in blocks)


def _code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=5)
    return caught.value.code(), caught.value.details()


CASES = [
    ("Lookup", lambda ns, keys: pb.LookupRequest(namespace_id=ns, keys=b"x" * 17), "INVALID_ARGUMENT", "17 bytes"),
    ("Lookup", lambda ns, keys: pb.LookupRequest(namespace_id=b"short", keys=keys[0]), "INVALID_ARGUMENT", "16 bytes"),
    ("Lookup", lambda ns, keys: pb.LookupRequest(namespace_id=b"\1" * 16, keys=keys[0]), "NOT_FOUND", "not registered"),
    ("Reserve", lambda ns, keys: pb.ReserveRequest(namespace_id=ns, keys=keys[0] * 2), "INVALID_ARGUMENT", "repeat"),
    (
        "Reserve",
        lambda ns, keys: pb.ReserveRequest(namespace_id=ns, keys=b"".join(keys), parent=b"p"),
        "INVALID_ARGUMENT",
        "parent",
    ),
    ("Commit", lambda ns, keys: pb.CommitRequest(reservation_id=999), "NOT_FOUND", "never issued"),
    ("Abort", lambda ns, keys: pb.AbortRequest(reservation_id=999), "NOT_FOUND", "never issued"),
    ("Release", lambda ns, keys: pb.ReleaseRequest(lease_id=999), "NOT_FOUND", "never issued"),
    ("ReportLookups", lambda ns, keys: pb.ReportLookupsRequest(lookups=1 << 60), "INVALID_ARGUMENT", "implausible"),
    ("ReportReads", lambda ns, keys: pb.ReportReadsRequest(namespace_id=ns, keys=b"k" * 17), "INVALID_ARGUMENT", "17"),
    (
        "ReportReads",
        lambda ns, keys: pb.ReportReadsRequest(namespace_id=b"\3" * 16, keys=keys[0]),
        "NOT_FOUND",
        "not registered",
    ),
    ("Acquire", lambda ns, keys: pb.AcquireRequest(namespace_id=ns, keys=b"k" * 15), "INVALID_ARGUMENT", "15 bytes"),
    ("Fetch", lambda ns, keys: pb.FetchRequest(namespace_id=ns, keys=keys[0]), "INVALID_ARGUMENT", "peer"),
    ("Remove", lambda ns, keys: pb.RemoveRequest(namespace_id=b"", keys=keys[0]), "INVALID_ARGUMENT", "namespace_id"),
    ("Pin", lambda ns, keys: pb.PinRequest(namespace_id=b"\2" * 16, keys=keys[0]), "NOT_FOUND", "not registered"),
    ("ListBlocks", lambda ns, keys: pb.ListBlocksRequest(page_token=b"bad"), "INVALID_ARGUMENT", "page_token"),
    ("ListBlocks", lambda ns, keys: pb.ListBlocksRequest(page_size=10**6), "INVALID_ARGUMENT", "page_size"),
    ("RegisterNamespace", lambda ns, keys: pb.RegisterNamespaceRequest(), "INVALID_ARGUMENT", "namespace is required"),
    (
        "RegisterNamespace",
        lambda ns, keys: pb.RegisterNamespaceRequest(
            namespace=pb.Namespace(model_id="m", dtype="float99", layout=pb.KVLayout(num_layers=1), block_tokens=4)
        ),
        "INVALID_ARGUMENT",
        "float99",
    ),
]


@pytest.mark.parametrize(("method", "build", "code", "message"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(setup, method, build, code, message):
    server, _, stub, namespace_id, keys = setup
    before = fingerprint(server)
    got_code, details = _code(getattr(stub, method), build(namespace_id, keys))
    assert got_code.name == code
    assert message in details
    assert fingerprint(server) == before


def test_a_namespace_mismatch_is_failed_precondition(setup):
    server, client, stub, _, keys = setup
    other = client.register_namespace(factories.namespace("other-model"))
    before = fingerprint(server)
    code, details = _code(stub.Reserve, pb.ReserveRequest(namespace_id=other, keys=keys[0]))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "another namespace" in details
    assert fingerprint(server) == before


def test_a_full_node_is_resource_exhausted(setup):
    server, _, stub, namespace_id, _ = setup
    before = fingerprint(server)
    keys = factories.chain(namespace_id, 6, seed=4)  # 3 pinned + 6 > 8 slots
    code, details = _code(stub.Reserve, pb.ReserveRequest(namespace_id=namespace_id, keys=b"".join(keys)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "evict" in details or "room" in details or "full" in details
    assert fingerprint(server) == before


def test_too_many_keys_in_one_call_are_refused(tmp_path):
    with running_node(tmp_path, nvme_kib=0, server__max_keys_per_call=4) as server:
        stub = pb_grpc.KVStoreStub(grpc.insecure_channel(server.grpc_address))
        code, details = _code(stub.Lookup, pb.LookupRequest(namespace_id=b"\0" * 16, keys=b"\0" * 16 * 5))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 4" in details


def test_a_corrupted_data_plane_put_is_never_committed(setup):
    server, _, _, namespace_id, _ = setup
    namespace = factories.namespace()
    keys = factories.chain(namespace_id, 2, seed=7)
    payloads = factories.payloads(namespace, 2)
    sums = [checksum(p) for p in payloads]
    before = fingerprint(server)
    with Client(server.grpc_address, transport=Transport.TCP) as client:
        corrupt = [payloads[0], payloads[1].copy()]
        corrupt[1][100] ^= 0xFF
        with (
            client._pool.connection(client.data_address) as connection,
            pytest.raises(ChecksumError, match="fail their checksum"),
        ):
            connection.put(namespace_id, keys, None, sums, [memoryview(p.data) for p in corrupt])
        assert fingerprint(server) == before
        assert client.put_blocks(namespace_id, keys, payloads).num_written == 2  # the connection still works


def test_a_truncated_data_plane_put_is_never_committed(setup):
    server, _, _, namespace_id, _ = setup
    namespace = factories.namespace()
    keys = factories.chain(namespace_id, 2, seed=8)
    payloads = factories.payloads(namespace, 2)
    before = fingerprint(server)
    host, port = protocol.split_address(server.data_address)
    with socket.create_connection((host, port), timeout=5) as sock:
        protocol.send_frame(sock, FrameType.HELLO)
        assert protocol.recv_frame(sock)[0] is FrameType.HELLO_OK
        request = PutRequest(namespace_id, keys, None, [checksum(p) for p in payloads])
        protocol.send_frame(sock, FrameType.PUT, protocol.pack_put(request))
        kind, body = protocol.recv_frame(sock)
        assert protocol.parse_indexes(protocol.expect(kind, FrameType.PUT_READY, body), 2) == [0, 1]
        sock.sendall(payloads[0].tobytes() + payloads[1].tobytes()[:100])  # then hang up mid-block
    assert eventually(lambda: fingerprint(server) == before)  # the server notices the hang-up, then aborts


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (FrameType.RESERVE, b"short", "shorter than its fixed part"),
        (FrameType.ACQUIRE, b"\0" * 33 + b"x" * 5, "not a multiple of 16"),
        (FrameType.COMMIT, b"\0" * 12 + b"\1", "COMMIT claims"),
        (FrameType.ABORT, b"\0" * 3, "id body is 8 bytes"),
        (FrameType.LOOKUPS_DONE, b"\0" * 23, "LOOKUPS_DONE body is 24 bytes"),
        (FrameType.READ_DONE, b"\0" * 33 + b"x" * 5, "not a multiple of 16"),
    ],
)
def test_malformed_local_frames_end_only_their_connection(setup, kind, body, message):
    server, client, _, namespace_id, keys = setup
    before = fingerprint(server)
    sock = protocol.connect(server.node.local_address, timeout_s=5)
    with sock:
        protocol.send_frame(sock, FrameType.HELLO)
        assert protocol.recv_frame(sock)[0] is FrameType.HELLO_OK
        protocol.send_frame(sock, kind, body)
        reply_kind, reply = protocol.recv_frame(sock)
        assert reply_kind is FrameType.ERROR
        assert message in protocol.parse_error(reply).message
        assert sock.recv(1) == b""  # the node hung up
    assert fingerprint(server) == before
    assert client.lookup(namespace_id, keys).num_hits == 3  # everyone else is served on


def test_local_calls_with_unknown_ids_answer_not_found_and_the_connection_serves_on(setup):
    server, _, _, namespace_id, keys = setup
    before = fingerprint(server)
    sock = protocol.connect(server.node.local_address, timeout_s=5)
    with sock:
        protocol.send_frame(sock, FrameType.HELLO)
        protocol.recv_frame(sock)
        protocol.send_frame(sock, FrameType.ABORT, local_frames.pack_id(424242))
        kind, reply = protocol.recv_frame(sock)
        assert kind is FrameType.ERROR
        assert protocol.parse_error(reply).error_name == "UnknownReservationError"
        protocol.send_frame(sock, FrameType.RELEASE, local_frames.pack_id(424242))  # no reply, logged
        unknown = local_frames.ChainRequest(NamespaceId(b"\x07" * 16), keys)
        protocol.send_frame(sock, FrameType.READ_DONE, local_frames.pack_chain(unknown))  # no reply, logged
        huge = local_frames.pack_lookups_done(1 << 60, 0, 0)
        protocol.send_frame(sock, FrameType.LOOKUPS_DONE, huge)  # no reply, logged, not counted
        request = local_frames.ChainRequest(namespace_id, keys)
        protocol.send_frame(sock, FrameType.LOOKUP, local_frames.pack_chain(request))
        kind, reply = protocol.recv_frame(sock)
        result = local_frames.parse_lookup_ok(protocol.expect(kind, FrameType.LOOKUP_OK, reply))
        assert result == LookupResult(3, (TierKind.DRAM,) * 3)
    assert fingerprint(server) == before
    assert server.node.lookup_counts().lookups < 1 << 60
