"""The store's error hierarchy.

Every error the store raises on purpose is a `KVStoreError`. Each subclass names one kind of
failure so that callers (and, from the node daemon on, the single gRPC status mapping) can react
to it without parsing messages. Every message names the offending value. An operation that
raises one of these has changed nothing.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises deliberately."""


class InvalidArgumentError(KVStoreError, ValueError):
    """The caller passed something malformed (wrong type, negative count, bad config value)."""


class ConfigError(InvalidArgumentError):
    """A configuration value is missing, malformed or inconsistent."""


class PayloadSizeError(InvalidArgumentError):
    """A payload's byte length differs from its namespace's block size."""


class LayoutMismatchError(KVStoreError):
    """A payload's dtype or shape differs from the layout its namespace registered."""


class UnknownNamespaceError(KVStoreError, LookupError):
    """The namespace id was never registered with this store."""


class NamespaceMismatchError(KVStoreError):
    """A block exists under the key but belongs to a different namespace."""


class DuplicateCommitError(KVStoreError):
    """The reservation was already committed or aborted."""


class UnknownReservationError(KVStoreError, LookupError):
    """The reservation id is unknown, already finished, or expired."""


class UnknownLeaseError(KVStoreError, LookupError):
    """The lease id is unknown, already released, or expired."""


class StoreFullError(KVStoreError):
    """A tier cannot make room: everything that could be evicted is leased, pinned or too small."""


class ChecksumError(KVStoreError):
    """Bytes read back do not match the checksum recorded when they were written."""


class StoreClosedError(KVStoreError):
    """The store (or tier) was closed and refuses new work."""


class StorageFormatError(KVStoreError):
    """On-disk state (slab files, LMDB index) is unreadable or was written with another geometry."""


class NodeDrainingError(KVStoreError):
    """The node is shutting down or draining and takes no new reads or writes."""


class PeerUnavailableError(KVStoreError):
    """A peer node (or the node itself, seen from a client) cannot be reached in time."""


class AuthenticationError(KVStoreError):
    """The caller presented no token, or the wrong one."""


class ProtocolError(InvalidArgumentError):
    """A data-plane frame is malformed: bad magic or version, unknown type, impossible lengths."""


class TraceFormatError(InvalidArgumentError):
    """A request trace file (Mooncake's JSON-lines format) has a malformed line; the message
    names the file, the 1-based line number and what is wrong."""
