"""The bugs fuzzing the node found, each pinned by the test that failed before its fix:
undecodable bytes answered INTERNAL, a peer's unmapped error relayed as INTERNAL, and transfers
whose lease or reservation expired under a stalled socket (slots reused while still being
written)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from kvstore import errors, status
from kvstore.client import Client, Transport
from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType, GetRequest
from kvstore.hashing import checksum
from kvstore.node.server import NodeServer
from kvstore.types import Namespace, NamespaceId
from tests import factories
from tests.fuzzing import (
    CALL_TIMEOUT_S,
    FETCH_REJECTIONS,
    GRPC,
    NOT_FOUND,
    SHORT_TTL_S,
    SOCKET_TIMEOUT_S,
    FakePeer,
    PeerReply,
    Target,
    ThreadErrors,
    connection_threads,
    join_connection_threads,
    put_body,
    say_hello,
    wait_until,
)
from tests.nodes import TOKEN, running_node


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
