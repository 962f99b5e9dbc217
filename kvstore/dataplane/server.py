"""The data-plane server: moves block payloads between sockets and a node's pool slots.

One thread accepts; each connection gets a thread that first requires a HELLO carrying the
node's token (compared in constant time; a wrong or missing one gets ERROR UNAUTHENTICATED and
the connection is closed), then serves GET and PUT frames until the peer leaves. Payloads go
out with `sendall` straight from slot memory and come in with `recv_into` straight into
reserved slots (see `protocol`). A PUT is committed only after every block matched its
checksum; a connection that drops mid-payload aborts its reservation, so a truncated transfer
is never visible. A malformed frame ends that connection only; everyone else is served on.
(The shared-memory path's metadata calls have a server of their own: `local_server`.)

Mechanism only: what to read or reserve comes from a `BlockService` (the node).
Owner: the node server, which starts and closes it. Thread-safe.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType
from kvstore.errors import AuthenticationError, KVStoreError, ProtocolError, StoreFullError
from kvstore.status import code_number
from kvstore.types import BlockKey, NamespaceId

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0  # a connection that does not authenticate by then is dropped
IO_TIMEOUT_S = 60.0  # a peer silent this long mid-transfer is gone


class Outgoing(Protocol):
    block_bytes: int
    checksums: list[int]
    views: list[memoryview]
    deadline: float  # time.monotonic by which the bytes must be sent; the lease outlives it

    def close(self) -> None: ...


class Incoming(Protocol):
    written: list[int]
    num_present: int
    views: list[memoryview]
    deadline: float  # time.monotonic by which the bytes must have arrived; the reservation outlives it

    def commit(self, expected: Sequence[int], received: Sequence[int] | None = None) -> int: ...

    def abort(self) -> None: ...


class BlockService(Protocol):
    """What a data-plane server serves. Calls may raise KVStoreError (sent as ERROR frames)."""

    def open_read(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> Outgoing: ...

    def open_write(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Incoming: ...


class TransferObserver(Protocol):
    def transferred(self, direction: str, num_bytes: int, seconds: float) -> None: ...

    def connections_changed(self, delta: int) -> None: ...


class DataPlaneServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        max_connections: int,
        max_keys: int,
        observer: TransferObserver,
        buffer_bytes: int = protocol.SOCKET_BUFFER_BYTES,
    ) -> None:
        """Listen on host:port now (so `port` is known before `start`); accepted connections
        inherit buffers of `buffer_bytes` (`protocol.size_buffers`)."""
        self._service: BlockService | None = None
        self._token = token.encode() if token is not None else None
        self._max_keys = max_keys
        self._observer = observer
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        try:
            protocol.size_buffers(self._listener, buffer_bytes)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="dataplane-accept", daemon=True)

    def start(self, service: BlockService) -> None:
        self._service = service
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and cut every open connection (their reservations are aborted)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    connection.settimeout(1.0)
                    _send_error(connection, StoreFullError("too many data plane connections; try again"))
                connection.close()
                continue
            with self._lock:
                if self._closed:
                    connection.close()
                    self._slots.release()
                    return
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), name="dataplane-conn", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        self._observer.connections_changed(1)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(HELLO_TIMEOUT_S)
            self._handshake(connection)
            while not self._closed:
                connection.settimeout(None)  # idle connections are pooled by clients
                kind, body = protocol.recv_frame(connection)
                connection.settimeout(IO_TIMEOUT_S)
                self._dispatch(connection, kind, body)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the peer left, stalled, or we are closing: its transfer was aborted
        except (ProtocolError, AuthenticationError) as error:
            log.info("data plane connection refused", extra={"reason": str(error)})
            with contextlib.suppress(OSError):
                _send_error(connection, error)
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()
            self._slots.release()
            self._observer.connections_changed(-1)

    def _handshake(self, connection: socket.socket) -> None:
        kind, body = protocol.recv_frame(connection, protocol.MAX_TOKEN_BYTES)
        if kind is not FrameType.HELLO:
            raise ProtocolError(f"the first frame must be HELLO, got {kind.name}")
        if self._token is not None and not hmac.compare_digest(body, self._token):
            raise AuthenticationError("missing or wrong data plane token")
        protocol.send_frame(connection, FrameType.HELLO_OK)

    def _dispatch(self, connection: socket.socket, kind: FrameType, body: bytes) -> None:
        if kind is FrameType.GET:
            self._serve_get(connection, protocol.parse_get(body, self._max_keys))
        elif kind is FrameType.PUT:
            self._serve_put(connection, protocol.parse_put(body, self._max_keys))
        else:
            raise ProtocolError(f"unexpected {kind.name} frame from a client")

    def _require_service(self) -> BlockService:
        assert self._service is not None  # set by start(), before any connection is accepted
        return self._service

    # -- requests -----------------------------------------------------------------------------

    def _serve_get(self, connection: socket.socket, request: protocol.GetRequest) -> None:
        try:
            outgoing = self._require_service().open_read(request.namespace_id, request.keys, verify=request.verify)
        except KVStoreError as error:
            _send_error(connection, error)
            return
        try:
            started = time.perf_counter()
            protocol.send_frame(
                connection, FrameType.GET_OK, protocol.pack_get_ok(outgoing.block_bytes, outgoing.checksums)
            )
            for view in outgoing.views:
                protocol.send_all_by(connection, view, outgoing.deadline)
            num_bytes = outgoing.block_bytes * len(outgoing.checksums)
            self._observer.transferred("sent", num_bytes, time.perf_counter() - started)
        finally:
            outgoing.close()

    def _serve_put(self, connection: socket.socket, request: protocol.PutRequest) -> None:
        if len(request.checksums) != len(request.keys):
            raise ProtocolError("a PUT carries one checksum per key")
        try:
            incoming = self._require_service().open_write(request.namespace_id, request.keys, request.parent)
        except KVStoreError as error:
            _send_error(connection, error)
            return
        try:
            started = time.perf_counter()
            protocol.send_frame(connection, FrameType.PUT_READY, protocol.pack_indexes(incoming.written))
            received = protocol.recv_blocks_hashed(
                connection, [incoming.views[index] for index in incoming.written], incoming.deadline
            )
        except BaseException:
            incoming.abort()  # truncated, stalled or closing: nothing becomes visible
            raise
        num_bytes = sum(len(incoming.views[index]) for index in incoming.written)
        try:
            written = incoming.commit(request.checksums, received)
        except KVStoreError as error:  # a block that failed its checksum: aborted
            _send_error(connection, error)
            return
        self._observer.transferred("received", num_bytes, time.perf_counter() - started)
        protocol.send_frame(connection, FrameType.PUT_OK, protocol.pack_put_ok(written, incoming.num_present))


def _send_error(connection: socket.socket, error: KVStoreError) -> None:
    body = protocol.pack_error(code_number(error), type(error).__name__, str(error))
    protocol.send_frame(connection, FrameType.ERROR, body)
