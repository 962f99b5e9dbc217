"""Membership in etcd: one lease per node, so several conductors (or a restarted one) share it.

A node's registration is a JSON record of its `NodeInfo` at `<prefix>/nodes/<node_id>`,
attached to a lease of the node's time to live. Each heartbeat the node sends refreshes that
lease (`renew`); when the node stops, the lease runs out and etcd deletes the record, so
every conductor stops seeing it. The lease id is read back from the record's metadata, so a
conductor that restarted renews leases it never granted.

The client is `etcd3gw` (etcd's HTTP/JSON gateway, synchronous; etcd 3.4 serves /v3/).
Every etcd failure becomes `MembershipUnavailableError` naming the endpoint.

Owner: the conductor's service threads; a lock serialises calls (one HTTP session).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import etcd3gw
import requests
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

from conductor.membership import MembershipUnavailableError, check_ttl
from conductor.types import NodeInfo, Role
from kvstore.errors import InvalidArgumentError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/kvstore/conductor"


class EtcdMembership:
    def __init__(self, endpoints: str | Sequence[str], *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 5.0) -> None:
        endpoint = endpoints if isinstance(endpoints, str) else (endpoints[0] if endpoints else "")
        host, _, port = endpoint.removeprefix("http://").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgumentError(f"etcd endpoint must be host:port, got {endpoint!r}")
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise InvalidArgumentError(f"etcd prefix must start with '/' and not end with one, got {prefix!r}")
        if not timeout_s > 0:
            raise InvalidArgumentError(f"etcd timeout_s must be positive, got {timeout_s}")
        self.endpoint = f"{host}:{port}"
        self._dir = f"{prefix}/nodes/"
        self._client = etcd3gw.client(host=host, port=int(port), timeout=timeout_s)
        self._lock = threading.Lock()

    def _key(self, node_id: str) -> str:
        return self._dir + node_id

    @contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        with self._lock:
            try:
                yield
            except (Etcd3Exception, requests.RequestException) as error:
                raise MembershipUnavailableError(f"etcd at {self.endpoint}: {what} failed: {error}") from None

    def register(self, info: NodeInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        if not info.node_id or "/" in info.node_id:
            raise InvalidArgumentError(f"node_id must be non-empty and without '/', got {info.node_id!r}")
        record = json.dumps(
            {
                "node_id": info.node_id,
                "role": info.role.value,
                "grpc_address": info.grpc_address,
                "data_address": info.data_address,
                "profile": info.profile,
                "kv_capacity_tokens": info.kv_capacity_tokens,
            }
        )
        with self._calling(f"registering {info.node_id}"):
            old = self._lease_of(info.node_id)
            lease = self._client.lease(ttl=max(1, math.ceil(ttl_s)))
            self._client.put(self._key(info.node_id), record, lease=lease)
            if old is not None and old.id != lease.id:
                old.revoke()

    def renew(self, node_id: str) -> bool:
        with self._calling(f"renewing {node_id}"):
            lease = self._lease_of(node_id)
            return lease is not None and lease.refresh() > 0

    def remove(self, node_id: str) -> None:
        with self._calling(f"removing {node_id}"):
            lease = self._lease_of(node_id)
            if lease is not None:
                lease.revoke()
            self._client.delete(self._key(node_id))

    def live(self) -> dict[str, NodeInfo]:
        with self._calling("listing nodes"):
            records = self._client.get_prefix(self._dir)
        found: dict[str, NodeInfo] = {}
        for value, metadata in records:
            key = _text(metadata.get("key", b""))
            info = _parse(value)
            if info is None or key != self._key(info.node_id):
                log.warning("skipping a malformed membership record at %s: %r", key, value[:200])
                continue
            found[info.node_id] = info
        return found

    def close(self) -> None:
        with self._lock:
            self._client.session.close()

    def _lease_of(self, node_id: str) -> Lease | None:
        records = self._client.get(self._key(node_id), metadata=True)
        if not records:
            return None
        lease_id = int(records[0][1].get("lease", 0) or 0)
        return Lease(lease_id, self._client) if lease_id else None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _parse(value: bytes | str) -> NodeInfo | None:
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
    except (ValueError, KeyError, TypeError):
        return None
