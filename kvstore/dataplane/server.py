"""The data-plane server: moves block payloads between sockets and a node's pool slots.

One thread accepts; each connection gets a thread that first requires a HELLO carrying the
node's token (compared in constant time; a wrong or missing one gets ERROR UNAUTHENTICATED and
the connection is closed), then serves GET and PUT frames until the peer leaves. Payloads go
out with `sendall` straight from slot memory and come in with `recv_into` straight into
reserved slots (see `protocol`). A PUT is committed only after every block matched its
checksum; a connection that drops mid-payload aborts its reservation, so a truncated transfer
is never visible. A malformed frame ends that connection only; everyone else is served on.

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

from kvstore.dataplane import local_frames, protocol
from kvstore.dataplane.local_frames import Grant
from kvstore.dataplane.protocol import FrameType
from kvstore.errors import AuthenticationError, KVStoreError, ProtocolError, StoreFullError
from kvstore.status import code_number, code_of
from kvstore.types import BlockKey, LookupResult, NamespaceId

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


class LocalControl(Protocol):
    """The shared-memory path's metadata calls, served on the local (Unix socket) listener only.
    Calls may raise KVStoreError (sent as ERROR frames)."""

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult: ...

    def reserve(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], parent: BlockKey | None) -> Grant: ...

    def commit(self, reservation_id: int, checksums: Sequence[int] | None) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def acquire(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool) -> Grant: ...

    def release(self, lease_id: int) -> None: ...


class TransferObserver(Protocol):
    def transferred(self, direction: str, num_bytes: int, seconds: float) -> None: ...

    def connections_changed(self, delta: int) -> None: ...

    def local_call(self, method: str, code: str, seconds: float) -> None: ...


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
        local_address: str | None = None,
    ) -> None:
        """Listen on host:port (TCP) and, with `local_address` (`unix:@name`), on a Unix socket
        that also serves the local control frames."""
        self._service: BlockService | None = None
        self._control: LocalControl | None = None
        self._token = token.encode() if token is not None else None
        self._max_keys = max_keys
        self._observer = observer
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._listeners = [self._listener]
        self.local_address = local_address
        if local_address is not None:
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                local.bind(protocol.unix_path(local_address))
                local.listen(128)
            except BaseException:
                local.close()
                self._listener.close()
                raise
            self._listeners.append(local)
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._accept_loop, args=(listener,), name="dataplane-accept", daemon=True)
            for listener in self._listeners
        ]

    def start(self, service: BlockService, control: LocalControl | None = None) -> None:
        """Serve `service` (the listening sockets are bound already, so `port` is known before),
        and `control` on the local listener."""
        self._service = service
        self._control = control
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop accepting and cut every open connection (their reservations are aborted)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        local = listener.family == socket.AF_UNIX
        while not self._closed:
            try:
                connection, _ = listener.accept()
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
            threading.Thread(target=self._serve, args=(connection, local), name="dataplane-conn", daemon=True).start()

    def _serve(self, connection: socket.socket, local: bool) -> None:
        self._observer.connections_changed(1)
        try:
            if not local:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(HELLO_TIMEOUT_S)
            self._handshake(connection)
            while not self._closed:
                connection.settimeout(None)  # idle connections are pooled by clients
                kind, body = protocol.recv_frame(connection)
                connection.settimeout(IO_TIMEOUT_S)
                if local and kind in _LOCAL_REQUESTS:
                    self._serve_local(connection, kind, body)
                else:
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
            received = [
                protocol.recv_hashed_into(connection, incoming.views[index], incoming.deadline)
                for index in incoming.written
            ]
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

    def _serve_local(self, connection: socket.socket, kind: FrameType, body: bytes) -> None:
        control = self._control
        if control is None:
            raise ProtocolError("this node serves no local control calls")
        started, code = time.perf_counter(), "OK"
        try:
            self._answer_local(connection, control, kind, body)
        except ProtocolError:
            code = "INVALID_ARGUMENT"
            raise  # the framing is broken: this connection ends
        except KVStoreError as error:
            code = code_of(error).name  # answered with an ERROR frame; the connection serves on
        finally:
            self._observer.local_call(_METHOD_NAMES[kind], code, time.perf_counter() - started)

    def _answer_local(self, connection: socket.socket, control: LocalControl, kind: FrameType, body: bytes) -> None:
        try:
            if kind is FrameType.RELEASE:
                try:
                    control.release(local_frames.parse_id(body))
                except KVStoreError as error:  # no reply to send it in: the lease expires instead
                    log.info("local release failed", extra={"reason": str(error)})
                return
            reply_kind, reply = self._local_reply(control, kind, body)
        except ProtocolError:
            raise
        except KVStoreError as error:
            _send_error(connection, error)
            raise  # for the caller to count
        protocol.send_frame(connection, reply_kind, reply)

    def _local_reply(self, control: LocalControl, kind: FrameType, body: bytes) -> tuple[FrameType, bytes]:
        if kind is FrameType.COMMIT:
            control.commit(*local_frames.parse_commit(body, self._max_keys))
            return FrameType.OK, b""
        if kind is FrameType.ABORT:
            control.abort(local_frames.parse_id(body))
            return FrameType.OK, b""
        request = local_frames.parse_chain(body, self._max_keys)
        if kind is FrameType.LOOKUP:
            result = control.lookup(request.namespace_id, request.keys)
            return FrameType.LOOKUP_OK, local_frames.pack_lookup_ok(result.num_hits, [int(t) for t in result.tiers])
        if kind is FrameType.RESERVE:
            grant = control.reserve(request.namespace_id, request.keys, request.parent)
            return FrameType.RESERVE_OK, local_frames.pack_reserve_ok(grant)
        grant = control.acquire(request.namespace_id, request.keys, verify=request.verify)
        return FrameType.ACQUIRE_OK, local_frames.pack_acquire_ok(grant)


_METHOD_NAMES = {  # the proto's names, so metrics count a call the same whichever way it came
    FrameType.LOOKUP: "Lookup",
    FrameType.RESERVE: "Reserve",
    FrameType.COMMIT: "Commit",
    FrameType.ABORT: "Abort",
    FrameType.ACQUIRE: "Acquire",
    FrameType.RELEASE: "Release",
}
_LOCAL_REQUESTS = frozenset(_METHOD_NAMES)


def _send_error(connection: socket.socket, error: KVStoreError) -> None:
    body = protocol.pack_error(code_number(error), type(error).__name__, str(error))
    protocol.send_frame(connection, FrameType.ERROR, body)
