"""The local control server (the shared-memory path's Unix socket) against a real node: one
loop serves every engine, so what one connection does must never hold up another."""

from __future__ import annotations

import contextlib
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


def _fetch_frame(namespace_id, keys, peer: str) -> bytes:
    request = local_frames.FetchRequest(peer, local_frames.ChainRequest(namespace_id, keys))
    return protocol.frame(FrameType.FETCH, local_frames.pack_fetch(request))


def test_a_fetch_is_answered_before_the_frames_sent_after_it(node, tmp_path):
    server, _, namespace_id, keys = node
    with running_node(tmp_path / "b", nvme_kib=0) as other, Client(other.grpc_address) as other_client:
        other_client.register_namespace(factories.namespace())
        with _connect(other) as sock:
            # One write: the LOOKUP is in the node's inbox while the FETCH still runs.
            sock.sendall(_fetch_frame(namespace_id, keys, server.data_address) + _lookup_frame(namespace_id, keys))
            kind, body = protocol.recv_frame(sock)
            result = local_frames.parse_fetch_ok(protocol.expect(kind, FrameType.FETCH_OK, body))
            assert (result.num_fetched, result.num_present) == (3, 0)
            assert _lookup_reply(sock) == LookupResult(3, (TierKind.DRAM,) * 3)  # it saw the fetched blocks


def test_a_fetch_waiting_on_a_silent_peer_holds_up_no_other_connection(node):
    server, client, namespace_id, keys = node
    client.remove(namespace_id, keys)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, then never answers the GET
        peer = f"127.0.0.1:{silent.getsockname()[1]}"
        with _connect(server) as waiting:
            waiting.sendall(_fetch_frame(namespace_id, keys, peer))
            accepted, _ = silent.accept()
            with accepted:
                started = time.monotonic()
                with _connect(server) as other:
                    other.sendall(_lookup_frame(namespace_id, keys))
                    assert _lookup_reply(other).num_hits == 0
                assert client.lookup(namespace_id, keys).num_hits == 0
                assert time.monotonic() - started < 2.0
            # The peer hangs up: the FETCH fails with nothing stored, and its connection serves on.
            kind, body = protocol.recv_frame(waiting)
            assert kind is FrameType.ERROR and protocol.parse_error(body).error_name == "PeerUnavailableError"
            waiting.sendall(_lookup_frame(namespace_id, keys))
            assert _lookup_reply(waiting).num_hits == 0
    assert server.store.stats().num_reservations == 0


def test_a_client_that_floods_while_its_fetch_runs_is_dropped(node):
    server, client, namespace_id, keys = node
    client.remove(namespace_id, keys)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        peer = f"127.0.0.1:{silent.getsockname()[1]}"
        with _connect(server) as flooder:
            flooder.sendall(_fetch_frame(namespace_id, keys, peer))
            accepted, _ = silent.accept()
            with accepted:
                flood = _lookup_frame(namespace_id, keys) * 40000  # ~3.6 MiB: more than a frame may be
                with contextlib.suppress(OSError):
                    flooder.sendall(flood)
                assert eventually(lambda: server.local_control.num_connections == 1)  # the client's own
    assert client.lookup(namespace_id, keys).num_hits == 0
    assert eventually(lambda: server.store.stats().num_reservations == 0)


def test_a_malformed_fetch_is_refused_and_closes_its_connection(node):
    server, client, namespace_id, keys = node
    with _connect(server) as sock:
        body = (5000).to_bytes(2, "little") + b"127.0.0.1:1"  # claims a longer address than it has
        protocol.send_frame(sock, FrameType.FETCH, body)
        kind, reply = protocol.recv_frame(sock)
        assert kind is FrameType.ERROR
        assert "FETCH claims a 5000-byte peer address" in protocol.parse_error(reply).message
        assert sock.recv(1) == b""
    assert client.lookup(namespace_id, keys).num_hits == 3
