"""The TCP data plane's wire format (DESIGN.md 4): small frames, then raw payload bytes.

Every frame is a 10-byte header (magic "KVDP", version, type, body length as little-endian
uint32) and a body. Payloads are not inside frames: after a GET_OK (or a PUT_READY) the bytes of
the blocks follow back to back, so both ends move them with `sendall` from and `recv_into`
straight into pool slots, never through an intermediate buffer.

    client                                     server
    HELLO  token                        ->
                                        <-     HELLO_OK | ERROR (UNAUTHENTICATED), close
    GET    namespace, flags, keys       ->
                                        <-     GET_OK count, block_bytes, checksums; payloads
    PUT    namespace, flags, parent,    ->
           keys, checksums
                                        <-     PUT_READY indexes (the blocks it lacks)
           payloads of those blocks     ->
                                        <-     PUT_OK written, present | ERROR (DATA_LOSS)

Any request may be answered by ERROR (a gRPC status code number, the error's class name and a
message); the connection stays usable unless the error is about the framing itself. A GET
returns the longest stored leading run of its keys (count may be 0). The receiver checks each
payload against its checksum before anything becomes visible.

All parsing validates lengths before slicing and raises `ProtocolError`; nothing here touches
the store.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import xxhash

from kvstore.errors import InvalidArgumentError, PeerUnavailableError, ProtocolError
from kvstore.status import error_from_code_number
from kvstore.types import KEY_BYTES, BlockKey, NamespaceId, unpack_keys

MAGIC = b"KVDP"
VERSION = 1
HEADER = struct.Struct("<4sBBI")
MAX_BODY_BYTES = 16 * 1024 * 1024  # a million keys; payloads never count against this
MAX_TOKEN_BYTES = 4096
# Bulk payloads are received, and hashed, this many bytes at a time. Small reads keep the
# receiver draining the socket while the sender writes: on loopback, 32 KiB reads moved 64 MiB
# 1.3-1.5x faster than one read per 2 MiB block, and 1.1-1.2x faster than 256 KiB reads (the
# hash then also reads from L1/L2). Measured with tools/bench/node.py's raw socket reference.
RECV_CHUNK_BYTES = 32 * 1024
# Payloads are sent this many bytes per `sendall`: on loopback, 64 MiB sent in 1 MiB pieces
# arrived 1.05-1.2x sooner than in one call (2 MiB pieces as fast; 4 MiB and more slower).
SEND_PIECE_BYTES = 1024 * 1024
# The send and receive buffers a data-plane TCP socket asks for (the kernel doubles the request
# and caps it at net.core.rmem_max / wmem_max). With the kernel's autotuning instead, the
# receive buffer of a pooled connection, which alternates requests and 64 MiB bursts, stayed
# at 1-2.6 MiB, and gets of 32 x 2 MiB ran at 0.29-0.71x of a raw socket against 0.62-0.84x
# with fixed buffers (alternated call by call). 0 leaves the sizing to the kernel.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
_REPLY_READ_BYTES = 16 * 1024  # holds a reply of ~1000 slots in one read

_U32 = struct.Struct("<I")
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds
_GET_OK = struct.Struct("<IQ")
_PUT_OK = struct.Struct("<II")
_ERROR = struct.Struct("<HB")
FLAG_VERIFY = 1  # GET: the server verifies memory-tier copies too before sending
FLAG_HAS_PARENT = 1  # PUT: `parent` is meaningful


class FrameType(IntEnum):
    HELLO = 1
    HELLO_OK = 2
    GET = 3
    GET_OK = 4
    PUT = 5
    PUT_READY = 6
    PUT_OK = 7
    ERROR = 8
    # the local control channel (Unix socket only; see local_frames)
    LOOKUP = 9
    LOOKUP_OK = 10
    RESERVE = 11
    RESERVE_OK = 12
    COMMIT = 13
    ABORT = 14
    ACQUIRE = 15
    ACQUIRE_OK = 16
    RELEASE = 17
    OK = 18
    LOOKUPS_DONE = 19
    READ_DONE = 20
    FETCH = 21
    FETCH_OK = 22


@dataclass(frozen=True, slots=True)
class GetRequest:
    namespace_id: NamespaceId
    keys: list[BlockKey]
    verify: bool


@dataclass(frozen=True, slots=True)
class GetReply:
    block_bytes: int
    checksums: list[int]


@dataclass(frozen=True, slots=True)
class PutRequest:
    namespace_id: NamespaceId
    keys: list[BlockKey]
    parent: BlockKey | None
    checksums: list[int]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: int  # a gRPC status code number
    error_name: str
    message: str


# -- framing ---------------------------------------------------------------------------------


def frame(kind: FrameType, body: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def send_frame(sock: socket.socket, kind: FrameType, body: bytes = b"") -> None:
    sock.sendall(frame(kind, body))


def recv_frame(sock: socket.socket, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[FrameType, bytes]:
    """The next frame. EOF before a header raises ConnectionResetError (the peer left);
    a bad header raises ProtocolError."""
    header = bytearray(HEADER.size)
    recv_exactly_into(sock, memoryview(header))
    frame_type, length = parse_header(header, max_body_bytes)
    body = bytearray(length)
    if length:
        recv_exactly_into(sock, memoryview(body))
    return frame_type, bytes(body)


def recv_reply(sock: socket.socket, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[FrameType, bytes]:
    """The next frame, read greedily (usually one `recv` for header and body): only for a
    connection where nothing follows a reply until the next request (the local control
    channel). Bytes beyond the frame raise ProtocolError."""
    data = b""
    while len(data) < HEADER.size:
        chunk = sock.recv(_REPLY_READ_BYTES)
        if not chunk:
            raise ConnectionResetError(f"peer closed the connection after {len(data)} bytes of a reply")
        data += chunk
    kind, length = parse_header(data, max_body_bytes)
    end = HEADER.size + length
    if len(data) > end:
        raise ProtocolError(f"{len(data) - end} bytes follow a {kind.name} reply")
    if len(data) == end:
        return kind, data[HEADER.size :]
    body = bytearray(length)
    have = len(data) - HEADER.size
    body[:have] = data[HEADER.size :]
    recv_exactly_into(sock, memoryview(body)[have:])
    return kind, bytes(body)


def parse_header(buffer: bytes | bytearray, max_body_bytes: int) -> tuple[FrameType, int]:
    """The type and body length of the frame whose header starts `buffer`; ProtocolError for
    a header that is not ours or a body over `max_body_bytes`."""
    magic, version, kind, length = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (expected {MAGIC!r}): not a kvstore data plane peer")
    if version != VERSION:
        raise ProtocolError(f"data plane protocol version {version} is not supported (this side speaks {VERSION})")
    try:
        frame_type = FrameType(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}") from None
    if length > max_body_bytes:
        raise ProtocolError(f"frame body of {length} bytes exceeds the limit of {max_body_bytes}")
    return frame_type, length


def recv_exactly_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket; ConnectionResetError when the peer closes first, TimeoutError
    when `deadline` (time.monotonic) passes first."""
    received, total = 0, len(view)
    while received < total:
        if deadline is not None:
            sock.settimeout(_remaining(deadline))
        count = sock.recv_into(view[received:], total - received)
        if count == 0:
            raise ConnectionResetError(f"peer closed the connection after {received} of {total} bytes")
        received += count


def recv_blocks_hashed(sock: socket.socket, views: Sequence[memoryview], deadline: float | None = None) -> list[int]:
    """Fill each of `views` in turn from the socket by `deadline` (time.monotonic), hashing
    (xxh3_64) every chunk while it is still in cache: a second pass over a block afterwards
    would read it from memory again. Returns one checksum per view.

    Bulk payloads are read with the socket blocking and MSG_WAITALL, bounded by SO_RCVTIMEO:
    one system call per chunk. A socket with a Python timeout polls before every recv and the
    kernel hands back whatever has arrived, several calls per chunk. SO_RCVTIMEO is re-armed
    to the time left at most every REARM_S (a system call per chunk cost ~6% of a transfer
    with 256 KiB chunks, ~25% with 32 KiB ones), so a transfer may run up to REARM_S past its
    deadline; callers keep a larger margin between a deadline and the expiry of what they
    hold. Without a deadline, SO_RCVTIMEO is the socket's timeout, set once: each read must
    finish within it, as for a plain recv. The socket's timeout is restored afterwards, also
    when the transfer fails."""
    timeout = sock.gettimeout()
    sock.settimeout(None)
    alarm = _ReceiveTimeout(sock)
    try:
        if deadline is None and timeout is not None:
            alarm.set_per_read(timeout)
        checksums = []
        for view in views:
            hasher = xxhash.xxh3_64()
            for start in range(0, len(view), RECV_CHUNK_BYTES):
                chunk = view[start : start + RECV_CHUNK_BYTES]
                _recv_waitall(sock, chunk, deadline, alarm)
                hasher.update(chunk)
            checksums.append(hasher.intdigest())
        return checksums
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 0))
        sock.settimeout(timeout)


REARM_S = 0.05


class _ReceiveTimeout:
    """The socket's SO_RCVTIMEO: either the time left before a deadline, set again only once
    REARM_S has passed since it was last set (or when the deadline changes), or a fixed limit
    on every read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._armed_at = -math.inf
        self._deadline: float | None = None

    def arm(self, deadline: float) -> None:
        now = time.monotonic()
        if deadline == self._deadline and now - self._armed_at < REARM_S:
            return
        self._set(_remaining(deadline))
        self._armed_at, self._deadline = now, deadline

    def set_per_read(self, seconds: float) -> None:
        self._set(seconds)

    def _set(self, seconds: float) -> None:
        whole = int(seconds)
        microseconds = max(1, int((seconds - whole) * 1e6))  # (0, 0) would mean no limit
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, microseconds))


def _recv_waitall(sock: socket.socket, view: memoryview, deadline: float | None, alarm: _ReceiveTimeout) -> None:
    """Fill `view`: by `deadline`, or (without one) each read within the SO_RCVTIMEO in force."""
    received, total = 0, len(view)
    while received < total:
        if deadline is not None:
            alarm.arm(deadline)
        try:
            count = sock.recv_into(view[received:], total - received, socket.MSG_WAITALL)
        except BlockingIOError:  # SO_RCVTIMEO expired with nothing received
            if deadline is None:
                raise TimeoutError(
                    f"no bytes arrived within the socket's timeout after {received} of {total}"
                ) from None
            _remaining(deadline)  # raises once the deadline has passed
            continue
        if count == 0:
            raise ConnectionResetError(f"peer closed the connection after {received} of {total} bytes")
        received += count


def send_all_by(sock: socket.socket, view: memoryview, deadline: float) -> None:
    """`sendall` that gives up (TimeoutError) when `deadline` (time.monotonic) passes, in
    pieces of SEND_PIECE_BYTES."""
    for start in range(0, len(view), SEND_PIECE_BYTES):
        sock.settimeout(_remaining(deadline))
        sock.sendall(view[start : start + SEND_PIECE_BYTES])  # the timeout bounds the whole call


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the transfer's deadline passed")
    return remaining


def expect(kind: FrameType, wanted: FrameType, body: bytes) -> bytes:
    """`body` when the frame is of the wanted type; the peer's error, raised, when it is ERROR."""
    if kind is wanted:
        return body
    if kind is FrameType.ERROR:
        reply = parse_error(body)
        raise error_from_code_number(reply.code, reply.message, reply.error_name)
    raise ProtocolError(f"expected a {wanted.name} frame, got {kind.name}")


UNIX_PREFIX = "unix:"  # "unix:@name" is a Linux abstract socket, "unix:/path" a socket file
MAX_ADDRESS_BYTES = 1024


def check_peer_address(address: str) -> None:
    """Refuse, before anything happens, a peer address no data plane could have."""
    if not address:
        raise InvalidArgumentError("peer (host:port of the peer's data plane) is required")
    size = len(address.encode())
    if size > MAX_ADDRESS_BYTES:
        raise InvalidArgumentError(f"peer address of {size} bytes; at most {MAX_ADDRESS_BYTES}")


def size_buffers(sock: socket.socket, buffer_bytes: int) -> None:
    """Ask for `buffer_bytes` of send and receive buffer on a TCP socket (0: the kernel's
    autotuning). Set before connect or listen, so the window scale agreed on covers it."""
    if buffer_bytes < 0:
        raise InvalidArgumentError(f"a socket buffer of {buffer_bytes} bytes; 0 leaves it to the kernel")
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)


def connect(address: str, timeout_s: float, buffer_bytes: int = SOCKET_BUFFER_BYTES) -> socket.socket:
    """A connected socket to `host:port` (its buffers sized by `size_buffers`), or to a Unix
    socket `unix:@name` / `unix:/path`."""
    try:
        if address.startswith(UNIX_PREFIX):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(unix_path(address))
            except BaseException:
                sock.close()
                raise
            return sock
        host, port = split_address(address)
        sock = _connect_tcp(host, port, timeout_s, buffer_bytes)
    except OSError as error:
        raise PeerUnavailableError(f"data plane at {address} is unreachable: {error}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect_tcp(host: str, port: int, timeout_s: float, buffer_bytes: int) -> socket.socket:
    """`socket.create_connection`, with the buffers sized before connecting."""
    failure: OSError | None = None
    for family, kind, proto, _, peer in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            size_buffers(sock, buffer_bytes)
            sock.settimeout(timeout_s)
            sock.connect(peer)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise failure or OSError(f"no address for {host}")


def unix_path(address: str) -> str:
    """The socket path of a `unix:` address; a leading @ becomes the abstract namespace's NUL."""
    path = address.removeprefix(UNIX_PREFIX)
    if not path:
        raise ProtocolError(f"a Unix socket address is unix:@name or unix:/path, got {address!r}")
    return "\0" + path[1:] if path.startswith("@") else path


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"a data plane address is host:port, got {address!r}")
    return host.strip("[]"), int(port)


# -- bodies ----------------------------------------------------------------------------------


def pack_get(request: GetRequest) -> bytes:
    return request.namespace_id + bytes([FLAG_VERIFY if request.verify else 0]) + b"".join(request.keys)


def parse_get(body: bytes, max_keys: int) -> GetRequest:
    if len(body) < KEY_BYTES + 1:
        raise ProtocolError(f"GET body of {len(body)} bytes is shorter than its fixed part")
    keys = unpack_keys(body[KEY_BYTES + 1 :], max_keys=max_keys, what="GET keys", error=ProtocolError)
    return GetRequest(NamespaceId(body[:KEY_BYTES]), keys, bool(body[KEY_BYTES] & FLAG_VERIFY))


def pack_get_ok(block_bytes: int, checksums: list[int]) -> bytes:
    return _GET_OK.pack(len(checksums), block_bytes) + struct.pack(f"<{len(checksums)}Q", *checksums)


def parse_get_ok(body: bytes, max_keys: int) -> GetReply:
    if len(body) < _GET_OK.size:
        raise ProtocolError("GET_OK body is shorter than its fixed part")
    count, block_bytes = _GET_OK.unpack_from(body)
    if count > max_keys or len(body) != _GET_OK.size + 8 * count:
        raise ProtocolError(f"GET_OK claims {count} blocks in a {len(body)}-byte body")
    return GetReply(block_bytes, list(struct.unpack_from(f"<{count}Q", body, _GET_OK.size)))


def pack_put(request: PutRequest) -> bytes:
    flags = FLAG_HAS_PARENT if request.parent is not None else 0
    return b"".join(
        [
            request.namespace_id,
            bytes([flags]),
            request.parent or bytes(KEY_BYTES),
            _U32.pack(len(request.keys)),
            *request.keys,
            struct.pack(f"<{len(request.checksums)}Q", *request.checksums),
        ]
    )


def parse_put(body: bytes, max_keys: int) -> PutRequest:
    fixed = 2 * KEY_BYTES + 1 + _U32.size
    if len(body) < fixed:
        raise ProtocolError(f"PUT body of {len(body)} bytes is shorter than its fixed part")
    (count,) = _U32.unpack_from(body, 2 * KEY_BYTES + 1)
    if count > max_keys:
        raise ProtocolError(f"PUT of {count} blocks exceeds the limit of {max_keys}")
    if len(body) != fixed + count * (KEY_BYTES + 8):
        raise ProtocolError(f"PUT claims {count} blocks in a {len(body)}-byte body")
    keys = unpack_keys(body[fixed : fixed + count * KEY_BYTES], max_keys=max_keys, what="PUT keys", error=ProtocolError)
    checksums = list(struct.unpack_from(f"<{count}Q", body, fixed + count * KEY_BYTES))
    has_parent = body[KEY_BYTES] & FLAG_HAS_PARENT
    parent = BlockKey(body[KEY_BYTES + 1 : 2 * KEY_BYTES + 1]) if has_parent else None
    return PutRequest(NamespaceId(body[:KEY_BYTES]), keys, parent, checksums)


def pack_indexes(indexes: list[int]) -> bytes:
    return _U32.pack(len(indexes)) + struct.pack(f"<{len(indexes)}I", *indexes)


def parse_indexes(body: bytes, num_keys: int) -> list[int]:
    if len(body) < _U32.size:
        raise ProtocolError("PUT_READY body is shorter than its fixed part")
    (count,) = _U32.unpack_from(body)
    if count > num_keys or len(body) != _U32.size * (count + 1):
        raise ProtocolError(f"PUT_READY claims {count} indexes in a {len(body)}-byte body")
    indexes = list(struct.unpack_from(f"<{count}I", body, _U32.size))
    if any(i >= num_keys for i in indexes) or indexes != sorted(set(indexes)):
        raise ProtocolError("PUT_READY indexes must be ascending, distinct and within the request")
    return indexes


def pack_put_ok(num_written: int, num_present: int) -> bytes:
    return _PUT_OK.pack(num_written, num_present)


def parse_put_ok(body: bytes) -> tuple[int, int]:
    if len(body) != _PUT_OK.size:
        raise ProtocolError(f"PUT_OK body must be {_PUT_OK.size} bytes, got {len(body)}")
    written, present = _PUT_OK.unpack(body)
    return int(written), int(present)


def pack_error(code: int, error_name: str, message: str) -> bytes:
    name = error_name.encode("ascii", "replace")[:255]
    return _ERROR.pack(code, len(name)) + name + message.encode("utf-8", "replace")[:65536]


def parse_error(body: bytes) -> ErrorReply:
    if len(body) < _ERROR.size:
        raise ProtocolError("ERROR body is shorter than its fixed part")
    code, name_length = _ERROR.unpack_from(body)
    name = body[_ERROR.size : _ERROR.size + name_length].decode("ascii", "replace")
    message = body[_ERROR.size + name_length :].decode("utf-8", "replace")
    return ErrorReply(code, name, message)
