"""Frames of the local control channel: the shared-memory path's metadata calls over a Unix
socket, in the data plane's framing (`protocol`).

Why: a Python gRPC round trip costs 0.5-1.6 ms on these machines, a Unix-socket round trip
about 20 us, and the local path needs two per batch (Reserve + Commit, Acquire + Release):
at 64 KiB blocks gRPC alone took ten times longer than copying the bytes. The calls and their
meaning are those of the proto (`Lookup`, `Reserve`, `Commit`, `Abort`, `Acquire`, `Release`);
only the encoding differs, and errors come back as the same ERROR frames and exception
classes. FETCH (`Fetch`: the node pulls blocks from a peer) is here too, for the engine that
asks its own node for a prefix another node holds: over gRPC its round trip cost as much as
receiving a tenth of a 64 MiB transfer. RELEASE has no reply: a reader does not wait for it
(the node logs a failure, and an unreleased lease expires).

    LOOKUP   namespace, keys                   -> LOOKUP_OK   num_hits, tier per hit
    RESERVE  namespace, flags, parent, keys    -> RESERVE_OK  id, block_bytes, expires_in_s,
                                                              node_hashes, indexes, offsets
    COMMIT   id, checksums (none: node hashes) -> OK
    ABORT    id                                -> OK
    ACQUIRE  namespace, flags, keys            -> ACQUIRE_OK  id, block_bytes, expires_in_s,
                                                              offsets, checksums
    RELEASE  id                                   (no reply)
    FETCH    peer, namespace, flags, parent, keys -> FETCH_OK  num_fetched, num_present,
                                                              bytes_moved
    LOOKUPS_DONE  lookups, hit blocks, missed blocks  (no reply) ReportLookups
    READ_DONE  namespace, flags, keys              (no reply) ReportReads
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FLAG_HAS_PARENT, FLAG_VERIFY
from kvstore.errors import ProtocolError
from kvstore.types import KEY_BYTES, BlockKey, FetchResult, LookupResult, NamespaceId, tier_kinds, unpack_keys

_ID = struct.Struct("<Q")
_LOOKUPS = struct.Struct("<QQQ")
_COUNT = struct.Struct("<I")
_RESERVE_OK = struct.Struct("<QQdBI")
_ACQUIRE_OK = struct.Struct("<QQdI")
_PEER_LENGTH = struct.Struct("<H")
_FETCH_OK = struct.Struct("<IIQ")


@dataclass(frozen=True, slots=True)
class ChainRequest:
    """LOOKUP, RESERVE and ACQUIRE: a namespace, a chain of keys, a parent, a verify flag."""

    namespace_id: NamespaceId
    keys: list[BlockKey]
    parent: BlockKey | None = None
    verify: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """RESERVE_OK and ACQUIRE_OK: slots in the shared-memory segment for a while."""

    grant_id: int
    block_bytes: int
    expires_in_s: float
    offsets: list[int]
    indexes: list[int]  # RESERVE: request positions to write; ACQUIRE: empty
    checksums: list[int]  # ACQUIRE: per leased block; RESERVE: empty
    node_hashes: bool = False  # RESERVE: commit without checksums


def pack_chain(request: ChainRequest) -> bytes:
    flags = (FLAG_VERIFY if request.verify else 0) | (FLAG_HAS_PARENT if request.parent is not None else 0)
    return request.namespace_id + bytes([flags]) + (request.parent or bytes(KEY_BYTES)) + b"".join(request.keys)


def parse_chain(body: bytes, max_keys: int) -> ChainRequest:
    fixed = 2 * KEY_BYTES + 1
    if len(body) < fixed:
        raise ProtocolError(f"request body of {len(body)} bytes is shorter than its fixed part")
    flags = body[KEY_BYTES]
    parent = BlockKey(body[KEY_BYTES + 1 : fixed]) if flags & FLAG_HAS_PARENT else None
    keys = unpack_keys(body[fixed:], max_keys=max_keys, what="request keys", error=ProtocolError)
    return ChainRequest(NamespaceId(body[:KEY_BYTES]), keys, parent, bool(flags & FLAG_VERIFY))


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """FETCH: pull the blocks of `chain` the node lacks from `peer` (a data address)."""

    peer: str
    chain: ChainRequest


def pack_fetch(request: FetchRequest) -> bytes:
    protocol.check_peer_address(request.peer)
    peer = request.peer.encode()
    return _PEER_LENGTH.pack(len(peer)) + peer + pack_chain(request.chain)


def parse_fetch(body: bytes, max_keys: int) -> FetchRequest:
    if len(body) < _PEER_LENGTH.size:
        raise ProtocolError("FETCH body is shorter than its fixed part")
    (length,) = _PEER_LENGTH.unpack_from(body)
    end = _PEER_LENGTH.size + length
    if length > protocol.MAX_ADDRESS_BYTES or len(body) < end:
        raise ProtocolError(f"FETCH claims a {length}-byte peer address in a {len(body)}-byte body")
    try:
        peer = body[_PEER_LENGTH.size : end].decode()
    except UnicodeDecodeError:
        raise ProtocolError("FETCH peer address is not UTF-8") from None
    return FetchRequest(peer, parse_chain(body[end:], max_keys))


def pack_fetch_ok(result: FetchResult) -> bytes:
    return _FETCH_OK.pack(result.num_fetched, result.num_present, result.bytes_moved)


def parse_fetch_ok(body: bytes) -> FetchResult:
    if len(body) != _FETCH_OK.size:
        raise ProtocolError(f"FETCH_OK body is {_FETCH_OK.size} bytes, got {len(body)}")
    fetched, present, moved = _FETCH_OK.unpack(body)
    return FetchResult(int(fetched), int(present), int(moved))


def pack_id(value: int) -> bytes:
    return _ID.pack(value)


def parse_id(body: bytes) -> int:
    if len(body) != _ID.size:
        raise ProtocolError(f"an id body is {_ID.size} bytes, got {len(body)}")
    (value,) = _ID.unpack(body)
    return int(value)


def pack_commit(reservation_id: int, checksums: list[int]) -> bytes:
    return _ID.pack(reservation_id) + _COUNT.pack(len(checksums)) + struct.pack(f"<{len(checksums)}Q", *checksums)


def parse_commit(body: bytes, max_keys: int) -> tuple[int, list[int] | None]:
    if len(body) < _ID.size + _COUNT.size:
        raise ProtocolError("COMMIT body is shorter than its fixed part")
    (reservation_id,) = _ID.unpack_from(body)
    (count,) = _COUNT.unpack_from(body, _ID.size)
    if count > max_keys or len(body) != _ID.size + _COUNT.size + 8 * count:
        raise ProtocolError(f"COMMIT claims {count} checksums in a {len(body)}-byte body")
    checksums = list(struct.unpack_from(f"<{count}Q", body, _ID.size + _COUNT.size))
    return int(reservation_id), checksums or None


def pack_lookups_done(lookups: int, hit_blocks: int, miss_blocks: int) -> bytes:
    return _LOOKUPS.pack(lookups, hit_blocks, miss_blocks)


def parse_lookups_done(body: bytes) -> tuple[int, int, int]:
    if len(body) != _LOOKUPS.size:
        raise ProtocolError(f"LOOKUPS_DONE body is {_LOOKUPS.size} bytes, got {len(body)}")
    lookups, hits, misses = _LOOKUPS.unpack(body)
    return int(lookups), int(hits), int(misses)


def pack_lookup_ok(result: LookupResult) -> bytes:
    return _COUNT.pack(result.num_hits) + bytes(result.tiers)


def parse_lookup_ok(body: bytes) -> LookupResult:
    if len(body) < _COUNT.size:
        raise ProtocolError("LOOKUP_OK body is shorter than its fixed part")
    (num_hits,) = _COUNT.unpack_from(body)
    if len(body) != _COUNT.size + num_hits:
        raise ProtocolError(f"LOOKUP_OK claims {num_hits} hits in a {len(body)}-byte body")
    try:
        return LookupResult(int(num_hits), tier_kinds(body[_COUNT.size :]))
    except ValueError as error:
        raise ProtocolError(f"LOOKUP_OK: {error}") from None


def pack_reserve_ok(grant: Grant) -> bytes:
    count = len(grant.offsets)
    head = _RESERVE_OK.pack(grant.grant_id, grant.block_bytes, grant.expires_in_s, grant.node_hashes, count)
    return head + struct.pack(f"<{count}I{count}Q", *grant.indexes, *grant.offsets)


def parse_reserve_ok(body: bytes, max_keys: int) -> Grant:
    if len(body) < _RESERVE_OK.size:
        raise ProtocolError("RESERVE_OK body is shorter than its fixed part")
    grant_id, block_bytes, expires_in_s, node_hashes, count = _RESERVE_OK.unpack_from(body)
    if count > max_keys or len(body) != _RESERVE_OK.size + 12 * count:
        raise ProtocolError(f"RESERVE_OK claims {count} slots in a {len(body)}-byte body")
    values = struct.unpack_from(f"<{count}I{count}Q", body, _RESERVE_OK.size)
    return Grant(grant_id, block_bytes, expires_in_s, list(values[count:]), list(values[:count]), [], bool(node_hashes))


def pack_acquire_ok(grant: Grant) -> bytes:
    count = len(grant.offsets)
    head = _ACQUIRE_OK.pack(grant.grant_id, grant.block_bytes, grant.expires_in_s, count)
    return head + struct.pack(f"<{2 * count}Q", *grant.offsets, *grant.checksums)


def parse_acquire_ok(body: bytes, max_keys: int) -> Grant:
    if len(body) < _ACQUIRE_OK.size:
        raise ProtocolError("ACQUIRE_OK body is shorter than its fixed part")
    grant_id, block_bytes, expires_in_s, count = _ACQUIRE_OK.unpack_from(body)
    if count > max_keys or len(body) != _ACQUIRE_OK.size + 16 * count:
        raise ProtocolError(f"ACQUIRE_OK claims {count} slots in a {len(body)}-byte body")
    values = struct.unpack_from(f"<{2 * count}Q", body, _ACQUIRE_OK.size)
    return Grant(grant_id, block_bytes, expires_in_s, list(values[:count]), [], list(values[count:]))
