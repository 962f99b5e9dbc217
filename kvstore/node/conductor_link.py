"""A node's link to its conductor: register at start, then heartbeat from its own thread.

The conductor holds each node's membership as a lease of `conductor.ttl_s`; every heartbeat
renews it and reports the node's load. A conductor that answers "register again" (the lease
lapsed, or the conductor restarted with in-memory membership) gets a fresh registration. A
conductor that cannot be reached does not stop the node: the link logs, backs off, and keeps
trying; the node serves its clients meanwhile. A node that drains (`kvctl drain`, or SIGTERM)
`leave`s: it stops heartbeating and tells the conductor, which stops placing requests on it
and drops its blocks from the global index at once rather than when its lease runs out (which
is still what happens if the conductor cannot be told).

Each heartbeat carries the node's load, the sum of what its engines last reported
(`ReportLoad`; engine_loads.py), or no load when none has reported within the membership
ttl: the conductor then keeps its own account of what it placed on the node
(conductor/cluster.py).

Owner: its thread; `stop` from the server's shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from kvstore import wire
from kvstore.node.auth import Access
from kvstore.node.config import ConductorRole, ConductorSection
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import EngineLoad

log = logging.getLogger(__name__)

_ROLES = {
    ConductorRole.PREFILL: pb.NODE_ROLE_PREFILL,
    ConductorRole.DECODE: pb.NODE_ROLE_DECODE,
    ConductorRole.BOTH: pb.NODE_ROLE_BOTH,
    ConductorRole.STORAGE: pb.NODE_ROLE_STORAGE,
}
MAX_BACKOFF_S = 10.0


class ConductorLink:
    def __init__(
        self,
        settings: ConductorSection,
        node_id: str,
        grpc_address: str,
        data_address: str,
        access: Access,
        *,
        load: Callable[[], EngineLoad | None],
    ) -> None:
        """`load`: the node's load now, or None when its engines have not reported one."""
        self._settings = settings
        self._load = load
        self._description = pb.NodeDescription(
            node_id=node_id,
            role=_ROLES[settings.role],
            grpc_address=grpc_address,
            data_address=data_address,
            profile=settings.profile,
            kv_capacity_tokens=settings.kv_capacity_tokens,
        )
        self._access = access  # the conductor's token and the roots its certificate chains to
        self._metadata = access.metadata
        self._stop = threading.Event()
        self._leaving = threading.Lock()
        self._left = False
        self.registered = threading.Event()  # set while the conductor holds this node's registration
        self._thread = threading.Thread(target=self._run, name="conductor-link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No more heartbeats: the conductor drops the node when its lease runs out."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def leave(self) -> None:
        """Stop heartbeating and leave the cluster now. Once only; a conductor that does not
        answer is logged, and drops the node when its lease runs out."""
        with self._leaving:
            if self._left:
                return
            self._left = True
        self.stop()
        settings = self._settings
        try:
            with self._access.channel(settings.address) as channel:
                pb_grpc.ConductorStub(channel).Leave(
                    pb.LeaveRequest(node_id=self._description.node_id),
                    timeout=max(1.0, settings.heartbeat_interval_s),
                    metadata=self._metadata,
                )
            self.registered.clear()
            log.info("left the cluster of the conductor at %s", settings.address)
        except grpc.RpcError as error:
            log.warning(
                "could not tell the conductor at %s that this node leaves (%s); it drops the node after %.0f s",
                settings.address,
                error.code().name,
                settings.ttl_s,
            )

    def _run(self) -> None:
        settings = self._settings
        timeout = max(1.0, settings.heartbeat_interval_s)
        backoff = settings.heartbeat_interval_s
        with self._access.channel(settings.address) as channel:
            stub = pb_grpc.ConductorStub(channel)
            while not self._stop.is_set():
                try:
                    if not self.registered.is_set():
                        stub.Register(
                            pb.RegisterRequest(node=self._description, ttl_s=settings.ttl_s),
                            timeout=timeout,
                            metadata=self._metadata,
                        )
                        self.registered.set()
                        log.info("registered with the conductor at %s", settings.address)
                    reply = stub.Heartbeat(self._heartbeat(), timeout=timeout, metadata=self._metadata)
                    if reply.register_again:
                        self.registered.clear()
                        continue
                    backoff = settings.heartbeat_interval_s
                    self._stop.wait(settings.heartbeat_interval_s)
                except grpc.RpcError as error:
                    self.registered.clear()
                    log.warning(
                        "the conductor at %s did not answer (%s); retrying in %.1f s",
                        settings.address,
                        error.code().name,
                        backoff,
                    )
                    self._stop.wait(backoff)
                    backoff = min(MAX_BACKOFF_S, backoff * 2)

    def _heartbeat(self) -> pb.HeartbeatRequest:
        request = pb.HeartbeatRequest(node_id=self._description.node_id)
        load = self._load()
        if load is not None:
            request.load.CopyFrom(wire.load_to_proto(load))
        return request
