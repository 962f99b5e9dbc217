"""Helpers of the conductor's integration tests: a conductor server, node daemons that join it,
stubs, status, routes, chains of blocks and the metrics endpoint, and the `cluster` fixture
(a conductor with prefill nodes a and b and decode node d; tests/integration/conftest.py
makes it available to every integration test)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from conductor.config import load_conductor_config
from conductor.server import ConductorServer
from kvstore.client import Client
from kvstore.node.server import NodeServer
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import EngineLoad, NamespaceId
from tests import factories
from tests.etcd import EtcdProcess
from tests.nodes import eventually, running_node

CONDUCTOR_TOKEN = "conductor-token-0123456789"


def conductor_server(
    *,
    etcd: EtcdProcess | None = None,
    token: str | None = None,
    policy: str = "prefix-flow",
    grpc_port: int = 0,
    config_file: Path | None = None,
    extra: tuple[str, ...] = (),
) -> ConductorServer:
    overrides = [
        f"server.grpc_port={grpc_port}",
        "server.metrics_port=0",
        "membership.reconcile_interval_s=0.2",
        f"placement.policy={policy}",
        *extra,
    ]
    if etcd is not None:
        overrides += ["membership.backend=etcd", f"membership.etcd_endpoints={etcd.endpoint}"]
    environ = {"CONDUCTOR_AUTH_TOKEN": token} if token else {}
    server = ConductorServer(load_conductor_config(config_file, environ=environ, overrides=overrides))
    server.start()
    return server


@contextmanager
def node(
    tmp_path: Path, name: str, conductor: ConductorServer, role: str, *, token: str | None = None, **settings: object
) -> Iterator[NodeServer]:
    extra = {
        "node__node_id": name,
        "conductor__address": conductor.grpc_address,
        "conductor__role": role,
        "conductor__ttl_s": 2,
        "conductor__heartbeat_interval_s": 0.3,
        **settings,
    }
    if token:
        extra["conductor__token_file"] = str(token_file_of(tmp_path, token))
    with running_node(tmp_path / name, **extra) as server:
        yield server


def token_file_of(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "conductor-token"
    path.write_text(token)
    return path


def stub(server: ConductorServer) -> pb_grpc.ConductorStub:
    return pb_grpc.ConductorStub(grpc.insecure_channel(server.grpc_address))


def status(server: ConductorServer) -> dict[str, pb.ClusterNode]:
    # wait_for_ready: after a conductor restarts on the same port, this process's connections
    # to it (shared by every channel) may still be backing off from the old one's departure.
    reply = stub(server).ClusterStatus(pb.ClusterStatusRequest(), wait_for_ready=True, timeout=10)
    return {n.node.node_id: n for n in reply.nodes}


def route_message(namespace_id: NamespaceId, keys: list[bytes], request_id: str = "r") -> pb.RouteRequest:
    return pb.RouteRequest(
        request_id=request_id,
        namespace_id=namespace_id,
        keys=b"".join(keys),
        prompt_tokens=len(keys) * factories.BLOCK_TOKENS,
        max_output_tokens=8,
        block_tokens=factories.BLOCK_TOKENS,
    )


def put_chain(server: NodeServer, blocks: int, seed: int = 0) -> tuple[NamespaceId, list[bytes]]:
    with Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, blocks, seed=seed)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, blocks))
    return namespace_id, list(keys)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[ConductorServer, dict[str, NodeServer]]]:
    conductor = conductor_server()
    with ExitStack() as stack:
        nodes = {
            name: stack.enter_context(node(tmp_path, name, conductor, role))
            for name, role in (("a", "prefill"), ("b", "prefill"), ("d", "decode"))
        }
        assert eventually(lambda: set(status(conductor)) == {"a", "b", "d"}, 10)
        try:
            yield conductor, nodes
        finally:
            conductor.shutdown()  # first: its feeds' open WatchEvents would hold each node's stop a grace period
            stack.close()


def report(server: NodeServer, engine_id: str, load: EngineLoad) -> None:
    with Client(server.grpc_address) as client:
        client.report_load(engine_id, load)


def scrape(conductor: ConductorServer) -> dict[str, float]:
    """The conductor's /metrics as {'name{labels}': value} (labels sorted by name)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{conductor.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if "{" in name:
                base, _, labels = name.partition("{")
                name = base + "{" + ",".join(sorted(labels.rstrip("}").split(","))) + "}"
            values[name] = float(value)
    return values
