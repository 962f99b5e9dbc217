"""The data plane's bulk receive: exact bytes and checksums, the deadline, a peer that leaves."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import xxhash

from kvstore.dataplane import protocol


@pytest.fixture
def pair():
    left, right = socket.socketpair()
    left.settimeout(3.0)
    yield left, right
    left.close()
    right.close()


def test_receives_every_view_and_hashes_what_arrived(pair):
    receiver, sender = pair
    payloads = [bytes(range(256)) * 2048, b"\x07" * (protocol.RECV_CHUNK_BYTES + 5), b"x"]
    views = [memoryview(bytearray(len(p))) for p in payloads]
    threading.Thread(target=sender.sendall, args=(b"".join(payloads),), daemon=True).start()

    checksums = protocol.recv_blocks_hashed(receiver, views, time.monotonic() + 3)

    assert [bytes(v) for v in views] == payloads
    assert checksums == [xxhash.xxh3_64_intdigest(p) for p in payloads]
    assert receiver.gettimeout() == 3.0  # the socket's own timeout is back


def test_a_stalled_sender_runs_into_the_deadline(pair):
    receiver, sender = pair
    sender.sendall(b"a" * 1000)  # then nothing
    started = time.monotonic()

    with pytest.raises(TimeoutError):
        protocol.recv_blocks_hashed(receiver, [memoryview(bytearray(4096))], started + 0.3)

    assert 0.25 <= time.monotonic() - started < 2.0
    assert receiver.gettimeout() == 3.0


def test_without_a_deadline_the_socket_timeout_bounds_each_chunk(pair):
    receiver, _ = pair
    receiver.settimeout(0.2)
    with pytest.raises(TimeoutError):
        protocol.recv_blocks_hashed(receiver, [memoryview(bytearray(10))])
    assert receiver.gettimeout() == 0.2


def test_without_a_deadline_a_slow_sender_that_keeps_sending_is_not_cut_off(pair):
    receiver, sender = pair
    receiver.settimeout(0.25)
    pieces = [b"p" * 1000, b"q" * 1000, b"r" * 1000]

    def trickle() -> None:
        for piece in pieces:
            sender.sendall(piece)
            time.sleep(0.15)

    threading.Thread(target=trickle, daemon=True).start()
    view = memoryview(bytearray(3000))
    started = time.monotonic()

    checksums = protocol.recv_blocks_hashed(receiver, [view])

    assert time.monotonic() - started > 0.25  # longer in all than the timeout, which bounds each read
    assert bytes(view) == b"".join(pieces)
    assert checksums == [xxhash.xxh3_64_intdigest(b"".join(pieces))]


def test_a_peer_that_closes_midway_is_a_reset(pair):
    receiver, sender = pair
    sender.sendall(b"b" * 100)
    sender.close()
    with pytest.raises(ConnectionResetError, match="after 100 of 200 bytes"):
        protocol.recv_blocks_hashed(receiver, [memoryview(bytearray(200))], time.monotonic() + 3)
