"""The local control server (the shared-memory path's Unix socket) against a real node: one
loop serves every engine, so what one connection does must never hold up another."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvstore.client import Client
from kvstore.dataplane import local_frames, local_server, protocol
from kvstore.dataplane.protocol import FrameType
from kvstore.errors import ProtocolError
from kvstore.types import LookupResult, TierKind
from tests import factories
from tests.nodes import TOKEN, eventually, running_node


@pytest.fixture
def node(tmp_path):
    """A node holding a chain of 3 blocks."""
    with (
        running_node(tmp_path, nvme_kib=0, server__max_data_connections=4) as server,
        Client(server.grpc_address) as client,
    ):
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 3)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
        yield server, client, namespace_id, keys


def _connect(server, token: str | None = None) -> socket.socket:
    sock = protocol.connect(server.node.local_address, timeout_s=5)
    protocol.send_frame(sock, FrameType.HELLO, (token or "").encode())
    kind, body = protocol.recv_frame(sock)
    protocol.expect(kind, FrameType.HELLO_OK, body)
    return sock


def _lookup_frame(namespace_id, keys) -> bytes:
    return protocol.frame(FrameType.LOOKUP, local_frames.pack_chain(local_frames.ChainRequest(namespace_id, keys)))


def _lookup_reply(sock) -> LookupResult:
    kind, body = protocol.recv_frame(sock)
    return local_frames.parse_lookup_ok(protocol.expect(kind, FrameType.LOOKUP_OK, body))


def test_pipelined_requests_are_answered_in_order(node):
    server, _, namespace_id, keys = node
    with _connect(server) as sock:
        abort = protocol.frame(FrameType.ABORT, local_frames.pack_id(999))
        sock.sendall(_lookup_frame(namespace_id, keys) + abort + _lookup_frame(namespace_id, keys[:1]))
        assert _lookup_reply(sock) == LookupResult(3, (TierKind.DRAM,) * 3)
        kind, body = protocol.recv_frame(sock)
        assert kind is FrameType.ERROR and protocol.parse_error(body).error_name == "UnknownReservationError"
        assert _lookup_reply(sock) == LookupResult(1, (TierKind.DRAM,))


def test_a_frame_arriving_a_byte_at_a_time_is_answered(node):
    server, _, namespace_id, keys = node
    with _connect(server) as sock:
        for byte in _lookup_frame(namespace_id, keys):
            sock.send(bytes([byte]))
        assert _lookup_reply(sock).num_hits == 3


def test_a_client_that_never_reads_its_replies_stalls_only_itself(node):
    server, client, namespace_id, keys = node
    flood = _lookup_frame(namespace_id, keys) * 2000  # ~100 KiB of requests, ~300 KiB of replies
    with _connect(server) as greedy:
        greedy.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until both socket buffers are full
            try:
                sent += greedy.send(flood[sent % len(flood) :])  # frames in order, never cut short
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sent += greedy.send(flood[sent % len(flood) :])
                except BlockingIOError:
                    break  # still full after the node had time to read: it stopped reading
        else:
            pytest.fail("the node kept reading from a client that reads nothing")
        assert client.lookup(namespace_id, keys).num_hits == 3  # everyone else is served on
        with _connect(server) as other:
            other.sendall(_lookup_frame(namespace_id, keys))
            assert _lookup_reply(other).num_hits == 3


def test_concurrent_clients_each_get_their_own_answers(node):
    server, _, namespace_id, keys = node
    errors: list[BaseException] = []

    def caller(count: int) -> None:
        try:
            with _connect(server) as sock:
                for _ in range(200):
                    sock.sendall(_lookup_frame(namespace_id, keys[:count]))
                    assert _lookup_reply(sock).num_hits == count
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(count,)) for count in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors


def test_connections_past_the_limit_are_refused(node):
    server, client, namespace_id, keys = node
    # The client holds one connection; the limit (4) leaves three.
    held = [_connect(server) for _ in range(3)]
    try:
        extra = protocol.connect(server.node.local_address, timeout_s=5)
        with extra:
            kind, body = protocol.recv_frame(extra)
            assert kind is FrameType.ERROR and protocol.parse_error(body).error_name == "StoreFullError"
    finally:
        for sock in held:
            sock.close()
    assert eventually(lambda: server.local_control.num_connections == 1)
    assert client.lookup(namespace_id, keys).num_hits == 3


def test_a_connection_that_never_says_hello_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(local_server, "HELLO_TIMEOUT_S", 0.2)
    monkeypatch.setattr(local_server, "_SWEEP_S", 0.05)
    with running_node(tmp_path, nvme_kib=0) as server:
        sock = protocol.connect(server.node.local_address, timeout_s=5)
        with sock:
            assert sock.recv(1) == b""  # closed by the node, without a word


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
def test_the_token_guards_the_local_socket(tmp_path, token):
    with running_node(tmp_path, nvme_kib=0, token=TOKEN) as server:
        with protocol.connect(server.node.local_address, timeout_s=5) as sock:
            protocol.send_frame(sock, FrameType.HELLO, (token or "").encode())
            kind, body = protocol.recv_frame(sock)
            assert kind is FrameType.ERROR and protocol.parse_error(body).error_name == "AuthenticationError"
            assert sock.recv(1) == b""
        _connect(server, TOKEN).close()


def test_a_reply_with_bytes_after_it_is_a_protocol_error():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(protocol.frame(FrameType.OK) + b"extra")
        with pytest.raises(ProtocolError, match="5 bytes follow"):
            protocol.recv_reply(left)


def test_a_reply_split_across_reads_is_put_together():
    left, right = socket.socketpair()
    with left, right:
        whole = protocol.frame(FrameType.LOOKUP_OK, local_frames.pack_lookup_ok(LookupResult(2, (TierKind.NVME,) * 2)))
        right.sendall(whole[:3])
        threading.Timer(0.05, right.sendall, args=(whole[3:],)).start()
        kind, body = protocol.recv_reply(left)
        assert kind is FrameType.LOOKUP_OK
        assert local_frames.parse_lookup_ok(body) == LookupResult(2, (TierKind.NVME, TierKind.NVME))


def test_a_reply_cut_off_inside_its_header_is_a_closed_connection():
    left, right = socket.socketpair()
    with left:
        right.sendall(protocol.frame(FrameType.OK)[:3])
        right.close()
        with pytest.raises(ConnectionResetError, match="after 3 bytes"):
            protocol.recv_reply(left)
