"""A running conductor: the gRPC server (Conductor, health, reflection), the metrics endpoint,
and the `Conductor` behind them with its membership."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from conductor.cluster import ClusterState
from conductor.conductor import Conductor
from conductor.config import ConductorConfig, MembershipBackend
from conductor.membership import InMemoryMembership, Membership
from conductor.metrics import ConductorMetrics, MemberLoads
from conductor.placement import make_placement
from conductor.replication import HotPrefixes
from conductor.service import ConductorService
from kvstore.node.auth import Access, TokenInterceptor, bind
from kvstore.node.service import generic_handler
from kvstore.proto import kvstore_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Conductor"].full_name


def make_membership(config: ConductorConfig) -> Membership:
    settings = config.membership
    if settings.backend is MembershipBackend.ETCD:
        from conductor.membership_etcd import EtcdMembership  # noqa: PLC0415 - only with an etcd backend

        return EtcdMembership(settings.endpoints, prefix=settings.etcd_prefix, timeout_s=settings.etcd_timeout_s)
    return InMemoryMembership()


class ConductorServer:
    def __init__(self, config: ConductorConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        cluster = ClusterState(config.costs, config.slo_targets)
        self.metrics = ConductorMetrics(self.registry, cluster)
        self.conductor = Conductor(
            cluster,
            make_placement(config.placement.policy, config.placement.seed),
            make_membership(config),
            node_access=Access(config.node_token, config.node_tls_root_certificates),
            reconcile_interval_s=config.membership.reconcile_interval_s,
            default_ttl_s=config.membership.node_ttl_s,
            on_resync=lambda node_id, reason: self.metrics.resyncs.labels(node_id).inc(),
            on_replicate=lambda copy, done: self.metrics.replications.labels("done" if done else "failed").inc(),
            hot_prefixes=HotPrefixes(config.replication),
        )
        self.registry.register(MemberLoads(self.conductor.status))
        self._health = health.HealthServicer()
        self._grpc, self.grpc_port = self._build_grpc()
        self._metrics_server: Any = None
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    @property
    def grpc_address(self) -> str:
        return f"{self.config.server.bind_host}:{self.grpc_port}"

    def start(self) -> None:
        self.conductor.start()
        self._grpc.start()
        if self.config.server.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(
                self.config.server.metrics_port, addr=self.config.server.bind_host, registry=self.registry
            )
            self.metrics_port = self._metrics_server.server_port
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def wait(self) -> None:
        self._stopped.wait()

    def shutdown(self, grace_s: float = 2.0) -> None:
        """Refuse new calls, end the streams, stop the feeds. Idempotent."""
        if self._stopped.is_set():
            return
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.conductor.close()
        self._grpc.stop(grace_s).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._stopped.set()

    def _build_grpc(self) -> tuple[grpc.Server, int]:
        config = self.config
        interceptors: list[grpc.ServerInterceptor] = [TokenInterceptor(config.token)] if config.token else []
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.server.max_workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
        )
        service = ConductorService(self.conductor, self.metrics)
        server.add_generic_rpc_handlers((generic_handler(service, "Conductor"),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.server.bind_host}:{config.server.grpc_port}"
        port = bind(server, address, config.auth.tls_cert_file, config.auth.tls_key_file)
        if port == 0:
            raise OSError(f"cannot bind the gRPC port at {address}")
        return server, port
