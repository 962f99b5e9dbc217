"""The local control server: the shared-memory path's metadata calls (`local_frames`), served to
every engine on this host by one thread over the node's Unix socket.

Why one thread and not one per connection: each call is tens of microseconds of Python under
the GIL. With a thread per connection, sixteen engines' calls hand the GIL from thread to
thread through the OS scheduler, and on a 2-core host the p99 of a Lookup was 2.5x that of one
loop serving whichever sockets are ready (tools/bench/node.py). The calls do no network I/O;
the one that can wait is an Acquire that promotes blocks from NVMe, which holds the store's
lock, and so every other caller, for as long anyway.

One call runs elsewhere: FETCH (the node pulls blocks from a peer) moves megabytes over the
network, so it runs on one of `FETCH_WORKERS` threads, and its connection reads no further
frames until it is answered (a client waits for the answer anyway; one that sends more than a
frame meanwhile is dropped). The loop keeps serving every other connection.

A connection first sends HELLO with the node's token (compared in constant time; a wrong or
missing one gets ERROR UNAUTHENTICATED and is closed, as is one silent past HELLO_TIMEOUT_S).
Then any number of calls, answered in order (RELEASE, LOOKUPS_DONE and READ_DONE get no answer). A call
the node refuses gets an ERROR frame and the connection serves on; a frame that breaks the
framing gets an ERROR frame and the connection is closed. Either way nothing else is disturbed.
Connections hold no state of their own: a client that dies leaves leases and reservations
that expire.

Mechanism only: what the calls do comes from a `LocalControl` (the node).
Owner: the node server, which starts and closes it. Thread-safe (`close` from any thread).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.dataplane import local_frames, protocol
from kvstore.dataplane.local_frames import FetchRequest, Grant
from kvstore.dataplane.protocol import HEADER, FrameType
from kvstore.errors import AuthenticationError, KVStoreError, ProtocolError, StoreFullError
from kvstore.status import code_number, code_of
from kvstore.types import KEY_BYTES, BlockKey, FetchResult, LookupResult, NamespaceId

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # a connection that does not authenticate by then is dropped
_RECV_BYTES = 256 * 1024
_SWEEP_S = 1.0  # how often unauthenticated connections are checked for their deadline
FETCH_WORKERS = 4  # FETCHes run at once; each holds its thread for its whole transfer


class LocalControl(Protocol):
    """The calls served. They may raise KVStoreError (sent back as ERROR frames)."""

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult: ...

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant: ...

    def commit(self, reservation_id: int, checksums: Sequence[int] | None) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> Grant: ...

    def release(self, lease_id: int) -> None: ...

    def count_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None: ...

    def touch(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None: ...

    def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None, peer: str
    ) -> FetchResult: ...


class ControlObserver(Protocol):
    def connections_changed(self, delta: int) -> None: ...

    def call_done(self, method: str, code: str, seconds: float) -> None: ...


@dataclass(eq=False)
class _Peer:
    sock: socket.socket
    opened_at: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    authenticated: bool = False
    closing: bool = False  # send what is queued, then close
    busy: bool = False  # a FETCH of its runs on a worker: its next frames wait


class LocalControlServer:
    def __init__(
        self, address: str, *, token: str | None, max_connections: int, max_keys: int, observer: ControlObserver
    ) -> None:
        """Bind the Unix socket `address` (`unix:@name` or `unix:/path`) now, so a clash shows at
        construction; serve from `start`."""
        self.address = address
        self._token = token.encode() if token is not None else None
        self._max_connections = max_connections
        self._max_keys = max_keys
        # the largest request: COMMIT, or a FETCH with the longest peer address
        self._max_body = 2 * KEY_BYTES + 1 + max_keys * (KEY_BYTES + 8) + 2 + protocol.MAX_ADDRESS_BYTES
        self._observer = observer
        self._control: LocalControl | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(protocol.unix_path(address))
            self._listener.listen(128)
            self._listener.setblocking(False)
            self._wake_reader, self._wake_writer = socket.socketpair()
            self._wake_reader.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._peers: set[_Peer] = set()
        self._workers = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="local-fetch")
        self._answered: deque[tuple[_Peer, bytes]] = deque()  # FETCH replies the workers made
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="local-control", daemon=True)

    @property
    def num_connections(self) -> int:
        return len(self._peers)

    def start(self, control: LocalControl) -> None:
        self._control = control
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every connection. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._workers.shutdown(wait=False, cancel_futures=True)  # a transfer under way ends by its deadline
        for peer in list(self._peers):
            self._drop(peer)
        self._selector.close()
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_S
        while not self._closed.is_set():
            for key, events in self._selector.select(timeout=_SWEEP_S):
                peer = key.data
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_reader:
                    self._send_answered()
                elif peer is not None:
                    try:
                        self._serve(peer, events)
                    except Exception:  # a bug must cost one connection, never the loop
                        log.exception("local control connection failed")
                        self._drop(peer)
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + _SWEEP_S

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("local control accept failed: %s", error)
                return
            sock.setblocking(False)
            if len(self._peers) >= self._max_connections:
                with contextlib.suppress(OSError):
                    sock.send(_error_frame(StoreFullError("too many local control connections; try again")))
                sock.close()
                continue
            peer = _Peer(sock, time.monotonic())
            self._peers.add(peer)
            self._selector.register(sock, selectors.EVENT_READ, peer)
            self._observer.connections_changed(1)

    def _serve(self, peer: _Peer, events: int) -> None:
        if events & selectors.EVENT_WRITE:  # registered for nothing else while replies wait
            self._flush(peer)
            return
        try:
            data = peer.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(peer)  # the client left
            return
        peer.inbox += data
        if peer.busy and len(peer.inbox) > HEADER.size + self._max_body:
            self._drop(peer)  # it does not wait for its FETCH's answer: a broken client
            return
        self._answer_frames(peer)
        self._flush(peer)

    def _answer_frames(self, peer: _Peer) -> None:
        """Answer every whole frame in the inbox (replies queue in the outbox, in order)."""
        inbox = peer.inbox
        while len(inbox) >= HEADER.size and not peer.closing and not peer.busy:
            limit = self._max_body if peer.authenticated else protocol.MAX_TOKEN_BYTES
            try:
                kind, length = protocol.parse_header(inbox, limit)
            except ProtocolError as error:
                self._refuse(peer, error)
                return
            end = HEADER.size + length
            if len(inbox) < end:
                return
            body = bytes(inbox[HEADER.size : end])
            del inbox[:end]
            if peer.authenticated:
                self._call(peer, kind, body)
            else:
                self._handshake(peer, kind, body)

    def _handshake(self, peer: _Peer, kind: FrameType, body: bytes) -> None:
        if kind is not FrameType.HELLO:
            self._refuse(peer, ProtocolError(f"the first frame must be HELLO, got {kind.name}"))
        elif self._token is not None and not hmac.compare_digest(body, self._token):
            self._refuse(peer, AuthenticationError("missing or wrong data plane token"))
        else:
            peer.authenticated = True
            peer.outbox += protocol.frame(FrameType.HELLO_OK)

    def _call(self, peer: _Peer, kind: FrameType, body: bytes) -> None:
        method = _METHOD_NAMES.get(kind)
        if method is None:
            self._refuse(peer, ProtocolError(f"unexpected {kind.name} frame on the local control socket"))
            return
        started, code = time.perf_counter(), "OK"
        if kind is FrameType.FETCH:
            try:
                request = local_frames.parse_fetch(body, self._max_keys)
            except ProtocolError as error:
                self._refuse(peer, error)
                self._observer.call_done(method, "INVALID_ARGUMENT", time.perf_counter() - started)
                return
            peer.busy = True
            self._workers.submit(self._fetch, peer, request, started)
            return
        try:
            reply = self._answer(kind, body)
            if reply is not None:
                peer.outbox += protocol.frame(*reply)
        except ProtocolError as error:
            code = "INVALID_ARGUMENT"
            self._refuse(peer, error)  # the framing is broken: this connection ends
        except KVStoreError as error:
            code = code_of(error).name
            if kind in _NO_REPLY:  # no reply to send it in (a lease not released expires)
                log.info("local %s failed", method, extra={"reason": str(error)})
            else:
                peer.outbox += _error_frame(error)  # the connection serves on
        finally:
            self._observer.call_done(method, code, time.perf_counter() - started)

    def _answer(self, kind: FrameType, body: bytes) -> tuple[FrameType, bytes] | None:
        control = self._control
        assert control is not None  # set by start(), before the loop runs
        if kind is FrameType.RELEASE:
            control.release(local_frames.parse_id(body))
            return None
        if kind is FrameType.LOOKUPS_DONE:
            control.count_lookups(*local_frames.parse_lookups_done(body))
            return None
        if kind is FrameType.COMMIT:
            control.commit(*local_frames.parse_commit(body, self._max_keys))
            return FrameType.OK, b""
        if kind is FrameType.ABORT:
            control.abort(local_frames.parse_id(body))
            return FrameType.OK, b""
        request = local_frames.parse_chain(body, self._max_keys)
        if kind is FrameType.READ_DONE:
            control.touch(request.namespace_id, request.keys)
            return None
        if kind is FrameType.LOOKUP:
            return FrameType.LOOKUP_OK, local_frames.pack_lookup_ok(control.lookup(request.namespace_id, request.keys))
        if kind is FrameType.RESERVE:
            grant = control.reserve(request.namespace_id, request.keys, request.parent)
            return FrameType.RESERVE_OK, local_frames.pack_reserve_ok(grant)
        grant = control.acquire(request.namespace_id, request.keys, verify=request.verify)
        return FrameType.ACQUIRE_OK, local_frames.pack_acquire_ok(grant)

    # -- FETCH, on a worker -------------------------------------------------------------------------

    def _fetch(self, peer: _Peer, request: FetchRequest, started: float) -> None:
        control = self._control
        assert control is not None  # set by start(), before the loop runs
        chain, code = request.chain, "OK"
        try:
            result = control.fetch(chain.namespace_id, chain.keys, chain.parent, request.peer)
            reply = protocol.frame(FrameType.FETCH_OK, local_frames.pack_fetch_ok(result))
        except KVStoreError as error:
            code, reply = code_of(error).name, _error_frame(error)
        except Exception as error:  # a bug must cost this call, never the connection's order
            log.exception("local Fetch failed")
            code, reply = "INTERNAL", _error_frame(KVStoreError(f"the node failed: {type(error).__name__}"))
        self._observer.call_done("Fetch", code, time.perf_counter() - started)
        self._answered.append((peer, reply))
        with contextlib.suppress(OSError):  # closed: the server is closing, and so is the connection
            self._wake_writer.send(b"x")

    def _send_answered(self) -> None:
        """On the loop: queue the replies the workers made, then serve what waited behind them."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_reader.recv(4096):
                pass
        while self._answered:
            peer, reply = self._answered.popleft()
            if peer not in self._peers:
                continue  # it left while its FETCH ran
            peer.busy = False
            peer.outbox += reply
            self._answer_frames(peer)
            self._flush(peer)

    # -- connections ------------------------------------------------------------------------------

    def _refuse(self, peer: _Peer, error: KVStoreError) -> None:
        log.info("local control connection refused", extra={"reason": str(error)})
        peer.outbox += _error_frame(error)
        peer.inbox.clear()
        peer.closing = True

    def _flush(self, peer: _Peer) -> None:
        """Send what the outbox holds; wait for writability (not reading meanwhile, so a client
        that does not read its replies stalls only itself) when the socket buffer is full."""
        outbox = peer.outbox
        try:
            while outbox:
                sent = peer.sock.send(outbox)
                del outbox[:sent]
        except (BlockingIOError, InterruptedError):
            self._selector.modify(peer.sock, selectors.EVENT_WRITE, peer)
            return
        except OSError:
            self._drop(peer)
            return
        if peer.closing:
            self._drop(peer)
        elif self._selector.get_key(peer.sock).events != selectors.EVENT_READ:
            self._selector.modify(peer.sock, selectors.EVENT_READ, peer)
            self._answer_frames(peer)  # frames that arrived while we waited to write
            if peer.outbox:
                self._flush(peer)

    def _sweep(self) -> None:
        deadline = time.monotonic() - HELLO_TIMEOUT_S
        for peer in [p for p in self._peers if not p.authenticated and p.opened_at < deadline]:
            self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        peer.sock.close()
        self._observer.connections_changed(-1)


_METHOD_NAMES = {  # the proto's names, so metrics count a call the same whichever way it came
    FrameType.LOOKUP: "Lookup",
    FrameType.RESERVE: "Reserve",
    FrameType.COMMIT: "Commit",
    FrameType.ABORT: "Abort",
    FrameType.ACQUIRE: "Acquire",
    FrameType.RELEASE: "Release",
    FrameType.LOOKUPS_DONE: "ReportLookups",
    FrameType.READ_DONE: "ReportReads",
    FrameType.FETCH: "Fetch",
}
_NO_REPLY = frozenset({FrameType.RELEASE, FrameType.LOOKUPS_DONE, FrameType.READ_DONE})


def _error_frame(error: KVStoreError) -> bytes:
    return protocol.frame(FrameType.ERROR, protocol.pack_error(code_number(error), type(error).__name__, str(error)))
