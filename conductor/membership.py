"""Membership: which nodes are alive, each kept alive by its own heartbeats (DESIGN.md 5).

A node registers with a time to live and renews it with every heartbeat; a node that stops
renewing lapses and leaves the cluster (the conductor then drops its blocks from the index and
places nothing more on it). Two implementations behind one interface:

- `InMemoryMembership`: one conductor process, one host; state dies with the process.
- `EtcdMembership` (conductor/membership_etcd.py): one etcd lease per node, renewed on each of
  its heartbeats, so several hosts share it and a restarted conductor finds the live nodes in
  etcd.

Owner: the conductor's service threads (implementations are thread-safe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from conductor.types import NodeInfo
from kvstore.errors import InvalidArgumentError, PeerUnavailableError

MIN_TTL_S = 1.0
MAX_TTL_S = 3600.0


class MembershipUnavailableError(PeerUnavailableError):
    """The membership store (etcd) could not be reached or failed; the message names it. A
    peer the conductor depends on being unavailable: UNAVAILABLE to callers, who retry."""


def check_ttl(ttl_s: float) -> None:
    if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
        raise InvalidArgumentError(f"membership ttl_s must be within [{MIN_TTL_S:g}, {MAX_TTL_S:g}] s, got {ttl_s}")


class Membership(Protocol):
    def register(self, info: NodeInfo, ttl_s: float) -> None:
        """Add `info` (or replace the node's previous registration) for `ttl_s` seconds."""
        ...

    def renew(self, node_id: str) -> bool:
        """Extend the node's lease by its ttl; False when it is not a live member (lapsed or
        never registered: it must register again)."""
        ...

    def remove(self, node_id: str) -> None:
        """The node leaves now (a graceful shutdown); unknown nodes are ignored."""
        ...

    def live(self) -> dict[str, NodeInfo]:
        """The live members by node id."""
        ...

    def close(self) -> None: ...


class InMemoryMembership:
    """Leases in a dictionary, against a monotonic clock (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._members: dict[str, tuple[NodeInfo, float, float]] = {}  # id -> (info, ttl, expires at)

    def register(self, info: NodeInfo, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._lock:
            self._members[info.node_id] = (info, ttl_s, self._clock() + ttl_s)

    def renew(self, node_id: str) -> bool:
        with self._lock:
            self._expire()
            member = self._members.get(node_id)
            if member is None:
                return False
            info, ttl_s, _ = member
            self._members[node_id] = (info, ttl_s, self._clock() + ttl_s)
            return True

    def remove(self, node_id: str) -> None:
        with self._lock:
            self._members.pop(node_id, None)

    def live(self) -> dict[str, NodeInfo]:
        with self._lock:
            self._expire()
            return {node_id: info for node_id, (info, _, _) in self._members.items()}

    def close(self) -> None:
        with self._lock:
            self._members.clear()

    def _expire(self) -> None:
        now = self._clock()
        for node_id in [n for n, (_, _, expires) in self._members.items() if expires <= now]:
            del self._members[node_id]
