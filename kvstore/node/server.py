"""`NodeServer`: one node daemon assembled from its config (what `kvstore serve` runs).

It owns the store, the gRPC server (the `KVStore` service, standard health and reflection,
the token interceptor, optional TLS), the data-plane server, the local control server (the
shared-memory path's Unix socket), the Prometheus endpoint and a housekeeping thread that
expires the leases and reservations of clients that died.

Shutdown (`shutdown`, called on SIGTERM): health turns NOT_SERVING, new reads and writes
are refused and the node leaves its conductor's cluster (as on a `Drain` call); leases and
writes in flight get up to `drain_timeout_s` to finish; memory-only
blocks are flushed to NVMe; then the servers stop and the store closes (unlinking its
shared memory). Owner: the process's main thread.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from kvstore.dataplane.client import DataPlanePool
from kvstore.dataplane.local_server import LocalControlServer
from kvstore.dataplane.server import DataPlaneServer
from kvstore.events import EventLog
from kvstore.node.auth import Access, TokenInterceptor, bind
from kvstore.node.conductor_link import ConductorLink
from kvstore.node.config import NodeConfig
from kvstore.node.metrics import NodeMetrics, StoreCollector
from kvstore.node.node import Node
from kvstore.node.service import KVStoreService, generic_handler
from kvstore.proto import kvstore_pb2 as pb
from kvstore.shared_index import IndexListener, IndexWriter, buckets_for, supported
from kvstore.store import Store
from kvstore.tiers.dram import DramTier
from kvstore.types import TierKind

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
HOUSEKEEPING_INTERVAL_S = 1.0
PEER_TIMEOUT_S = 10.0


class NodeServer:
    def __init__(self, config: NodeConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        server = config.server
        self.store = Store(config.store_config(), events=EventLog(config.store.event_ring_events))
        self._grpc: grpc.Server | None = None
        self._metrics_server: Any = None
        self.conductor_link: ConductorLink | None = None
        self.dataplane: DataPlaneServer | None = None
        self.local_control: LocalControlServer | None = None
        self.shared_index: IndexWriter | None = None
        try:
            dram = self.store.tiers[TierKind.DRAM]
            assert isinstance(dram, DramTier)  # Store always builds its DRAM tier as one
            self.metrics = NodeMetrics(self.registry)
            self.dataplane = DataPlaneServer(
                server.bind_host,
                server.data_port,
                token=config.token,
                max_connections=server.max_data_connections,
                max_keys=server.max_keys_per_call,
                observer=self.metrics,
                buffer_bytes=server.data_socket_buffer_bytes,
            )
            self.local_control = LocalControlServer(
                f"unix:@{dram.segment.name}.sock",
                token=config.token,
                max_connections=server.max_data_connections,
                max_keys=server.max_keys_per_call,
                observer=self.metrics,
            )
            advertise = server.advertise_host or server.bind_host
            self.node = Node(
                self.store,
                node_id=config.node_id,
                data_address=f"{advertise}:{self.dataplane.port}",
                local_address=self.local_control.address,
                metrics=self.metrics,
                peers=DataPlanePool(
                    token=config.token, timeout_s=PEER_TIMEOUT_S, buffer_bytes=server.data_socket_buffer_bytes
                ),
                engine_load_max_age_s=config.conductor.ttl_s,
            )
            self._publish_index(f"{dram.segment.name}.index")
            self.registry.register(
                StoreCollector(
                    self.store.stats,
                    lambda: self.store.manager.events.last_sequence,
                    self.node.lookup_counts,
                )
            )
            self._health = health.HealthServicer()
            self._grpc, self.grpc_port = self._build_grpc()
        except BaseException:
            self._close_parts()
            raise
        self.metrics_port: int | None = None
        self._stop_housekeeping = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        self._stopped = threading.Event()

    @property
    def grpc_address(self) -> str:
        return f"{self.config.server.bind_host}:{self.grpc_port}"

    @property
    def data_address(self) -> str:
        return self.node.data_address

    def start(self) -> None:
        assert self._grpc is not None and self.dataplane is not None and self.local_control is not None
        self.dataplane.start(self.node)
        self.local_control.start(self.node)
        self._grpc.start()
        if self.config.server.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(
                self.config.server.metrics_port, addr=self.config.server.bind_host, registry=self.registry
            )
            self.metrics_port = self._metrics_server.server_port
        self._housekeeping.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.conductor.address:
            host = self.config.server.advertise_host or self.config.server.bind_host
            self.conductor_link = ConductorLink(
                self.config.conductor,
                self.node.node_id,
                f"{host}:{self.grpc_port}",
                self.data_address,
                Access(self.config.conductor_token, self.config.conductor_tls_root_certificates),
                load=self.node.engine_loads.total,
            )
            self.conductor_link.start()
            self.node.add_drain_listener(self.conductor_link.leave)  # draining: leave the cluster now
        log.info(
            "node serving",
            extra={
                "node_id": self.node.node_id,
                "grpc": self.grpc_address,
                "data": self.data_address,
                "metrics_port": self.metrics_port,
                "segment": self.node.segment_name,
                "tls": self.config.auth.tls_cert_file is not None,
                "auth": self.config.token is not None,
            },
        )

    def wait(self) -> None:
        """Block until `shutdown` has finished."""
        self._stopped.wait()

    def shutdown(self) -> None:
        """Drain, flush, stop. Idempotent."""
        if self._stopped.is_set():
            return
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.node.drain(flush=False)
        idle = self.node.wait_idle(self.config.shutdown.drain_timeout_s)
        if not idle:
            log.warning("drain deadline passed with leases or writes still open; they are dropped")
        flushed = self.store.manager.flush() if self.config.shutdown.flush_to_nvme else 0
        log.info("node stopping", extra={"flushed_to_nvme": flushed, "idle": idle})
        self._close_parts()
        self._stopped.set()

    def _close_parts(self) -> None:
        if self.conductor_link is not None:
            self.conductor_link.stop()  # left already when the drain began; stop() is idempotent
        self._stop_housekeeping.set()
        self.store.manager.events.close()  # open WatchEvents streams end now, not after the grace period
        if self._grpc is not None:
            self._grpc.stop(grace=1.0).wait()
        if self.dataplane is not None:
            self.dataplane.close()
        if self.local_control is not None:
            self.local_control.close()
        if self.shared_index is not None:
            self.shared_index.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        node = getattr(self, "node", None)
        if node is not None:
            node.close()
        else:
            self.store.close()

    def _publish_index(self, name: str) -> None:
        blocks = self.config.shared_index_blocks()
        if not blocks:
            return
        if not supported():
            log.info("no shared index on this CPU architecture: same-host Lookups go to the node")
            return
        writer = IndexWriter(name, buckets_for(blocks))
        self.shared_index = writer
        self.store.manager.add_residency_listener(lambda table, namespaces: IndexListener(writer, table, namespaces))
        self.node.index_segment = name

    def _build_grpc(self) -> tuple[grpc.Server, int]:
        config = self.config
        limit = config.server.max_message_bytes
        interceptors: list[grpc.ServerInterceptor] = [TokenInterceptor(config.token)] if config.token else []
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.max_workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        service = KVStoreService(self.node, max_keys_per_call=config.server.max_keys_per_call)
        server.add_generic_rpc_handlers((generic_handler(service),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.server.bind_host}:{config.server.grpc_port}"
        port = bind(server, address, config.auth.tls_cert_file, config.auth.tls_key_file)
        if port == 0:
            raise OSError(f"cannot bind the gRPC port at {address}")
        return server, port

    def _housekeep(self) -> None:
        """Expire what dead clients left behind, even when no call arrives to do it."""
        while not self._stop_housekeeping.wait(HOUSEKEEPING_INTERVAL_S):
            try:
                self.store.manager.expire()
            except Exception:
                log.exception("housekeeping failed")
