"""Membership in etcd: one lease per node, so several conductors (or a restarted one) share it.

A node's registration is a JSON record of its `NodeInfo` at `<prefix>/nodes/<node_id>`,
attached to a lease of the node's time to live. Each heartbeat the node sends refreshes that
lease (`renew`); when the node stops, the lease runs out and etcd deletes the record, so
every conductor stops seeing it. The lease id is read back from the record's metadata, so a
conductor that restarted renews leases it never granted.

The client is `etcd3gw` (etcd's HTTP/JSON gateway, synchronous), on the gateway path of etcd
3.4 and later (/v3/). Leases last whole seconds: a ttl is rounded up, and etcd lengthens one
below its own minimum (1.5 election timeouts, 2 s with etcd's defaults).

Failures: each call tries the endpoint that answered last, then each other one in turn; when
none answers (refused, or no reply within `timeout_s` per request) it raises
`MembershipUnavailableError` naming every endpoint and its error. A failed call changes nothing
the conductor can see, except that a lease it granted may stay behind, holding no key, until
its ttl runs out.

Owner: the conductor's gRPC threads and its reconcile thread; one lock serialises the calls (a
`requests` session is not thread-safe), so a silent etcd holds every caller up to the timeout.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from etcd3gw.lease import Lease

from conductor.membership import MembershipUnavailableError, check_ttl
from conductor.types import NodeInfo, Role
from kvstore.errors import InvalidArgumentError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/kvstore/conductor"
API_PATH = "/v3/"  # etcd >= 3.4; explicit, so the client neither probes /version nor reads ETCD3GW_API_PATH
T = TypeVar("T")


class EtcdMembership:
    """`Membership` on one or more etcd endpoints ("host:port", "[ipv6]:port", optionally
    after "http://") of one cluster. Building it connects to nothing."""

    def __init__(self, endpoints: str | Sequence[str], *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 5.0) -> None:
        addresses = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not addresses:
            raise InvalidArgumentError("etcd endpoints must name at least one host:port, got none")
        hosts = [_parse_endpoint(address) for address in addresses]
        if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise InvalidArgumentError(
                f"etcd prefix must start with '/' and neither end with '/' nor hold '//', got {prefix!r}"
            )
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgumentError(f"etcd timeout_s must be a positive number of seconds, got {timeout_s}")
        self.endpoints = tuple(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in hosts)
        self._dir = f"{prefix}/nodes/"
        self._clients = [
            etcd3gw.client(host=host, port=port, timeout=timeout_s, api_path=API_PATH) for host, port in hosts
        ]
        self._active = 0  # the endpoint that answered last
        self._lock = threading.Lock()

    def register(self, info: NodeInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        if not info.node_id or "/" in info.node_id:
            raise InvalidArgumentError(f"node_id must be non-empty and without '/', got {info.node_id!r}")
        key, record, ttl = self._key(info.node_id), _encode(info), math.ceil(ttl_s)

        def put(client: Etcd3Client) -> None:
            old = _lease_of(client, key)
            client.put(key, record, lease=client.lease(ttl=ttl))
            if old is not None:
                _revoke(old)  # the record moved to the new lease: the old one holds nothing now

        self._call(f"registering {info.node_id}", put)

    def renew(self, node_id: str) -> bool:
        def refresh(client: Etcd3Client) -> bool:
            lease = _lease_of(client, self._key(node_id))
            return lease is not None and lease.refresh() > 0  # <= 0: the lease ran out after the read

        return self._call(f"renewing {node_id}", refresh)

    def remove(self, node_id: str) -> None:
        def delete(client: Etcd3Client) -> None:
            key = self._key(node_id)
            lease = _lease_of(client, key)
            if lease is not None:
                _revoke(lease)  # deletes the record with it
            client.delete(key)  # a record without a lease (written by hand) goes too

        self._call(f"removing {node_id}", delete)

    def live(self) -> dict[str, NodeInfo]:
        """The records under the prefix, one range read. A record that does not parse, or
        whose key is not its node's, is logged with its key and skipped."""
        records = self._call("listing nodes", lambda client: client.get_prefix(self._dir))
        found: dict[str, NodeInfo] = {}
        for value, metadata in records:
            key = metadata["key"].decode("utf-8", "replace")
            info = _decode(value)
            if info is None or key != self._key(info.node_id):
                log.warning("skipping a malformed membership record at %s: %r", key, value[:200])
                continue
            found[info.node_id] = info
        return found

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.session.close()

    def _key(self, node_id: str) -> str:
        return self._dir + node_id

    def _call(self, what: str, operation: Callable[[Etcd3Client], T]) -> T:
        """`operation` on the endpoint that answered last, else on the next that answers;
        every operation may be repeated from its start on another endpoint."""
        failures: list[str] = []
        with self._lock:
            for attempt in range(len(self._clients)):
                index = (self._active + attempt) % len(self._clients)
                try:
                    result = operation(self._clients[index])
                except (Etcd3Exception, requests.RequestException) as error:
                    failures.append(f"{self.endpoints[index]}: {_describe(error)}")
                    continue
                self._active = index
                return result
        raise MembershipUnavailableError(f"etcd: {what} failed at every endpoint ({'; '.join(failures)})")


def _parse_endpoint(address: str) -> tuple[str, int]:
    bad = InvalidArgumentError(f"etcd endpoint must be host:port, got {address!r}")
    try:
        parts = urlsplit(f"http://{address.removeprefix('http://')}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port out of range, an unclosed '['
        raise bad from None
    if not host or not port or parts.path or parts.query or parts.fragment or parts.username is not None:
        raise bad
    if any(character.isspace() for character in address):
        raise bad
    return host, port


def _lease_of(client: Etcd3Client, key: str) -> Lease | None:
    """The lease holding `key`: None when the key is gone (lapsed, removed) or has no lease."""
    records = client.get(key, metadata=True)
    lease_id = int(records[0][1].get("lease", 0)) if records else 0
    return Lease(lease_id, client) if lease_id else None


def _revoke(lease: Lease) -> None:
    """Revoke a lease whose key the caller moves or deletes next, so a refusal (mostly: it ran
    out in the meantime) costs nothing: the lease lapses by itself, holding no key."""
    try:
        lease.revoke()
    except (ConnectionFailedError, ConnectionTimeoutError):
        raise
    except Etcd3Exception as error:
        log.info("etcd did not revoke lease %x (it lapses by itself): %s", lease.id, _describe(error))


def _describe(error: Exception) -> str:
    """etcd3gw keeps an error's text (the HTTP body, the connection error) out of str()."""
    detail = error.detail_text if isinstance(error, Etcd3Exception) else None
    text = " ".join(part.strip() for part in (detail, str(error)) if part and part.strip())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _encode(info: NodeInfo) -> str:
    return json.dumps(
        {
            "node_id": info.node_id,
            "role": info.role.value,
            "grpc_address": info.grpc_address,
            "data_address": info.data_address,
            "profile": info.profile,
            "kv_capacity_tokens": info.kv_capacity_tokens,
        }
    )


def _decode(value: bytes) -> NodeInfo | None:
    try:
        record: Any = json.loads(value)
        return NodeInfo(
            node_id=str(record["node_id"]),
            role=Role(record["role"]),
            grpc_address=str(record["grpc_address"]),
            data_address=str(record["data_address"]),
            profile=str(record["profile"]),
            kv_capacity_tokens=int(record["kv_capacity_tokens"]),
        )
    except (ValueError, KeyError, TypeError):  # not JSON (or not UTF-8), not an object, a field missing or mistyped
        return None
