"""The data-plane client: one authenticated connection to a node's data port, and a pool.

Used by a node pulling blocks from a peer (`Fetch`) and by the SDK for a node on another host.
A GET is two steps so the caller can decide where the bytes go once it knows how many are
coming: `request_get` returns the count, block size and checksums; `receive_into` then reads
the payloads straight into the caller's buffers (pool slots, or an engine's staging memory).
The caller verifies the checksums (the receiver is the trust boundary). A connection whose
exchange failed midway is closed, never reused.

Owner: one thread at a time per connection; the pool is thread-safe.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType, GetReply, GetRequest, PutRequest
from kvstore.errors import KVStoreError, PeerUnavailableError, ProtocolError
from kvstore.types import BlockKey, NamespaceId

MAX_REPLY_KEYS = 1 << 20


class DataPlaneConnection:
    def __init__(
        self, address: str, *, token: str | None, timeout_s: float, buffer_bytes: int = protocol.SOCKET_BUFFER_BYTES
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._sock = protocol.connect(address, timeout_s, buffer_bytes)
        self._pending = 0  # payload bytes announced by GET_OK and not yet received
        try:
            protocol.send_frame(self._sock, FrameType.HELLO, (token or "").encode())
            kind, body = protocol.recv_frame(self._sock)
            protocol.expect(kind, FrameType.HELLO_OK, body)
        except (OSError, ConnectionError) as error:
            self.close()
            raise PeerUnavailableError(f"data plane handshake with {address} failed: {error}") from None
        except BaseException:
            self.close()
            raise

    @property
    def is_idle(self) -> bool:
        return self._pending == 0

    def request_get(self, namespace_id: NamespaceId, keys: Sequence[BlockKey], *, verify: bool = False) -> GetReply:
        """Ask for the longest stored leading run of `keys`; the payloads follow (`receive_into`)."""
        self._send(FrameType.GET, protocol.pack_get(GetRequest(namespace_id, list(keys), verify)))
        reply = protocol.parse_get_ok(self._expect(FrameType.GET_OK), MAX_REPLY_KEYS)
        self._pending = reply.block_bytes * len(reply.checksums)
        return reply

    def receive_into(self, views: Sequence[memoryview], deadline: float | None = None) -> list[int]:
        """Read the announced payloads into `views` (one per block, adding up to exactly the
        announced size) by `deadline` (time.monotonic; the receiver's slots are only held until
        then). Returns each block's xxh3_64, hashed as it arrived, for the caller to check."""
        total = sum(len(view) for view in views)
        if total != self._pending:
            raise ProtocolError(f"{total} bytes of buffers for {self._pending} announced bytes")
        try:
            received = protocol.recv_blocks_hashed(self._sock, views, deadline)
        except OSError as error:
            self.close()
            raise PeerUnavailableError(f"data plane transfer from {self.address} broke off: {error}") from None
        self._pending = 0
        return received

    def put(
        self,
        namespace_id: NamespaceId,
        keys: Sequence[BlockKey],
        parent: BlockKey | None,
        checksums: Sequence[int],
        payloads: Sequence[memoryview],
    ) -> tuple[int, int]:
        """Store a chain on the node: it answers which blocks it lacks, only those are sent.
        Returns (written, already present)."""
        self._send(FrameType.PUT, protocol.pack_put(PutRequest(namespace_id, list(keys), parent, list(checksums))))
        indexes = protocol.parse_indexes(self._expect(FrameType.PUT_READY), len(keys))
        try:
            for index in indexes:
                self._sock.sendall(payloads[index])
        except OSError as error:
            self.close()
            raise PeerUnavailableError(f"data plane transfer to {self.address} broke off: {error}") from None
        return protocol.parse_put_ok(self._expect(FrameType.PUT_OK))

    def call(self, kind: FrameType, body: bytes, reply: FrameType) -> bytes:
        """One request, one reply of type `reply` (the local control channel, where no payload
        follows a reply, so it is read greedily)."""
        self._send(kind, body)
        try:
            got, reply_body = protocol.recv_reply(self._sock)
        except (OSError, ConnectionError) as error:
            self.close()
            raise PeerUnavailableError(f"data plane at {self.address}: {error}") from None
        except ProtocolError:
            self.close()
            raise
        return protocol.expect(got, reply, reply_body)

    def send_only(self, kind: FrameType, body: bytes) -> None:
        """A request the server does not answer (RELEASE)."""
        self._send(kind, body)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _send(self, kind: FrameType, body: bytes) -> None:
        if self._pending:
            raise ProtocolError("the previous GET's payloads were not received")
        try:
            protocol.send_frame(self._sock, kind, body)
        except OSError as error:
            self.close()
            raise PeerUnavailableError(f"data plane at {self.address}: {error}") from None

    def _expect(self, wanted: FrameType) -> bytes:
        try:
            kind, body = protocol.recv_frame(self._sock)
        except (OSError, ConnectionError) as error:
            self.close()
            raise PeerUnavailableError(f"data plane at {self.address}: {error}") from None
        return protocol.expect(kind, wanted, body)


class DataPlanePool:
    """Idle connections per address, reused across calls."""

    def __init__(
        self,
        *,
        token: str | None,
        timeout_s: float,
        max_idle_per_address: int = 8,
        buffer_bytes: int = protocol.SOCKET_BUFFER_BYTES,
    ) -> None:
        self._token = token
        self._timeout_s = timeout_s
        self._buffer_bytes = buffer_bytes
        self._max_idle = max_idle_per_address
        self._idle: dict[str, list[DataPlaneConnection]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self, address: str) -> Iterator[DataPlaneConnection]:
        """A connection to `address`; returned to the pool only when the exchange completed
        (an error from the peer that leaves the stream in step still counts as completed)."""
        with self._lock:
            idle = self._idle.get(address)
            connection = idle.pop() if idle else None
        if connection is None:
            connection = DataPlaneConnection(
                address, token=self._token, timeout_s=self._timeout_s, buffer_bytes=self._buffer_bytes
            )
        reusable = False
        try:
            yield connection
            reusable = connection.is_idle
        except KVStoreError as error:
            reusable = connection.is_idle and not isinstance(error, PeerUnavailableError | ProtocolError)
            raise
        finally:
            kept = False
            if reusable:
                with self._lock:
                    idle = self._idle.setdefault(address, [])
                    if len(idle) < self._max_idle:
                        idle.append(connection)
                        kept = True
            if not kept:
                connection.close()

    def close(self) -> None:
        with self._lock:
            connections = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for connection in connections:
            connection.close()
