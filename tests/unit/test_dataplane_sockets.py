"""Data-plane TCP sockets ask for fixed buffers (or leave them to the kernel), on both ends."""

from __future__ import annotations

import socket

import pytest

from kvstore.client import Client
from kvstore.dataplane import protocol
from kvstore.errors import InvalidArgumentError

KiB = 1024


def buffers(sock: socket.socket) -> tuple[int, int]:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def connected_pair(buffer_bytes: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    protocol.size_buffers(listener, buffer_bytes)
    client = protocol.connect(f"127.0.0.1:{listener.getsockname()[1]}", 5.0, buffer_bytes)
    accepted, _ = listener.accept()
    return listener, client, accepted


def test_both_ends_get_the_buffers_asked_for():
    asked = 512 * KiB  # under any sane net.core.rmem_max; the kernel doubles it for bookkeeping
    sockets = connected_pair(asked)
    try:
        _, client, accepted = sockets
        for end in (client, accepted):
            received, sent = buffers(end)
            assert received == sent == 2 * asked
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for sock in sockets:
            sock.close()


def test_zero_leaves_the_buffers_to_the_kernel():
    sockets = connected_pair(0)
    try:
        _, client, _ = sockets
        with socket.create_connection(sockets[0].getsockname()) as plain:
            assert buffers(client) == buffers(plain)
        assert buffers(client)[0] != 2 * protocol.SOCKET_BUFFER_BYTES
    finally:
        for sock in sockets:
            sock.close()


def test_a_negative_buffer_is_refused_before_the_socket_changes():
    with socket.socket() as sock:
        before = buffers(sock)
        with pytest.raises(InvalidArgumentError, match="0 leaves it to the kernel"):
            protocol.size_buffers(sock, -1)
        assert buffers(sock) == before


def test_a_client_with_a_negative_buffer_is_refused_before_it_connects():
    with pytest.raises(InvalidArgumentError, match="data_socket_buffer_bytes is -1"):
        Client("127.0.0.1:1", data_socket_buffer_bytes=-1)  # nothing listens there: no connection is tried
