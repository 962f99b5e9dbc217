"""The conductor with real node daemons on loopback: nodes register themselves, their events
build the global index, requests go where their prefix is, lapsed nodes get nothing, a
restarted conductor rebuilds from etcd and the nodes' snapshots; and every bad input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from conductor.config import load_conductor_config
from conductor.replication import Replication
from conductor.server import ConductorServer
from kvstore.client import Client
from kvstore.node.auth import bearer
from kvstore.node.server import NodeServer
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, NamespaceId
from tests import factories
from tests.etcd import EtcdProcess
from tests.nodes import eventually, running_node

CONDUCTOR_TOKEN = "conductor-token-0123456789"


def conductor_server(
    *, etcd: EtcdProcess | None = None, token: str | None = None, policy: str = "prefix-flow"
) -> ConductorServer:
    overrides = [
        "server.grpc_port=0",
        "server.metrics_port=-1",
        "membership.reconcile_interval_s=0.2",
        f"placement.policy={policy}",
    ]
    if etcd is not None:
        overrides += ["membership.backend=etcd", f"membership.etcd_endpoint={etcd.endpoint}"]
    environ = {"CONDUCTOR_AUTH_TOKEN": token} if token else {}
    server = ConductorServer(load_conductor_config(None, environ=environ, overrides=overrides))
    server.start()
    return server


@contextmanager
def node(
    tmp_path: Path, name: str, conductor: ConductorServer, role: str, *, token: str | None = None
) -> Iterator[NodeServer]:
    extra = {
        "node__node_id": name,
        "conductor__address": conductor.grpc_address,
        "conductor__role": role,
        "conductor__ttl_s": 2,
        "conductor__heartbeat_interval_s": 0.3,
    }
    if token:
        extra["conductor__token_file"] = str(_token_file(tmp_path, token))
    with running_node(tmp_path / name, **extra) as server:
        yield server


def _token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "conductor-token"
    path.write_text(token)
    return path


def stub(server: ConductorServer) -> pb_grpc.ConductorStub:
    return pb_grpc.ConductorStub(grpc.insecure_channel(server.grpc_address))


def status(server: ConductorServer) -> dict[str, pb.ClusterNode]:
    return {n.node.node_id: n for n in stub(server).ClusterStatus(pb.ClusterStatusRequest()).nodes}


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
            stack.close()
            conductor.shutdown()


def test_a_request_goes_to_the_node_holding_its_prefix(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 6)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 6, 10)
    new_key = factories.chain(namespace_id, 7, seed=99)[6]
    reply = stub(conductor).Route(route_message(namespace_id, [*keys, new_key]))
    assert reply.rejected == ""
    assert reply.prefill.node_id == "a" and reply.decode.node_id == "d"
    assert reply.prefill.local_tokens == 6 * factories.BLOCK_TOKENS
    assert reply.prefill.ttft_s > 0 and reply.candidates[0].node_id == "b"
    assert reply.candidates[0].local_tokens == 0


def test_removed_blocks_leave_the_index(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 4, seed=3)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 4, 10)
    with Client(nodes["a"].grpc_address) as client:
        client.remove(namespace_id, keys[2:])
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 2, 10)


def test_a_node_that_stops_heartbeating_lapses_and_gets_nothing(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["b"], 5, seed=4)
    assert eventually(lambda: status(conductor)["b"].indexed_blocks == 5, 10)
    assert nodes["b"].conductor_link is not None
    nodes["b"].conductor_link.stop()  # b is alive but silent
    assert eventually(lambda: "b" not in status(conductor), 10)
    replies = [stub(conductor).Route(route_message(namespace_id, keys, request_id=str(n))) for n in range(5)]
    assert {reply.prefill.node_id for reply in replies} == {"a"}  # b held the whole prefix, but it is gone
    assert replies[0].prefill.local_tokens == 0  # (later ones are credited with the first, queued on a)
    assert conductor.conductor.cluster.index.blocks_of("b") == 0


def test_with_etcd_a_restarted_conductor_rebuilds_and_a_silent_node_lapses(tmp_path: Path, etcd: EtcdProcess) -> None:
    first = conductor_server(etcd=etcd)
    restarted = None
    with node(tmp_path, "a", first, "prefill") as a, node(tmp_path, "d", first, "decode"):
        assert eventually(lambda: set(status(first)) == {"a", "d"}, 10)
        namespace_id, keys = put_chain(a, 5, seed=5)
        assert eventually(lambda: status(first)["a"].indexed_blocks == 5, 10)
        first.shutdown()
        # A new conductor on the same port: the nodes' heartbeats renew their etcd leases; the
        # members come from etcd and the index from the nodes' snapshots.
        overrides_port = first.grpc_port
        restarted = ConductorServer(
            load_conductor_config(
                None,
                environ={},
                overrides=[
                    f"server.grpc_port={overrides_port}",
                    "server.metrics_port=-1",
                    "membership.reconcile_interval_s=0.2",
                    "membership.backend=etcd",
                    f"membership.etcd_endpoint={etcd.endpoint}",
                ],
            )
        )
        restarted.start()
        try:
            assert set(status(restarted)) == {"a", "d"}  # from etcd, before any re-registration
            assert eventually(lambda: status(restarted)["a"].indexed_blocks == 5, 10)
            reply = stub(restarted).Route(route_message(namespace_id, keys))
            assert reply.prefill.node_id == "a" and reply.prefill.local_tokens == 5 * factories.BLOCK_TOKENS - 1
            # a stops heartbeating: its etcd lease runs out and the conductor drops it.
            assert a.conductor_link is not None
            a.conductor_link.stop()
            assert eventually(lambda: set(status(restarted)) == {"d"}, 10)
            assert restarted.conductor.cluster.index.blocks_of("a") == 0
            assert stub(restarted).Route(route_message(namespace_id, keys)).rejected == "no live prefill node"
        finally:
            restarted.shutdown()


def test_bad_routes_are_refused_and_change_nothing(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 3, seed=6)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 3, 10)
    before = {name: (n.prefill_queue_s > 0, n.load.decode_kv_tokens) for name, n in status(conductor).items()}
    client = stub(conductor)
    cases = [
        (route_message(NamespaceId(b"z" * 16), keys), grpc.StatusCode.NOT_FOUND, "not registered"),
        (
            pb.RouteRequest(request_id="x", namespace_id=namespace_id, block_tokens=4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "empty prompt",
        ),
        (
            pb.RouteRequest(
                request_id="x", namespace_id=namespace_id, keys=b"\x01" * 17, prompt_tokens=4, block_tokens=4
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a multiple of 16",
        ),
        (
            pb.RouteRequest(
                request_id="x", namespace_id=namespace_id, keys=b"".join(keys), prompt_tokens=40, block_tokens=4
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "3 block keys for a 40-token prompt",
        ),
        (
            pb.RouteRequest(
                request_id="x", namespace_id=b"short", keys=b"".join(keys), prompt_tokens=12, block_tokens=4
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "namespace_id must be 16 bytes",
        ),
    ]
    for message, code, text in cases:
        with pytest.raises(grpc.RpcError) as caught:
            client.Route(message)
        assert caught.value.code() is code and text in caught.value.details()
    garbage = grpc.insecure_channel(conductor.grpc_address).unary_unary("/kvstore.v1.Conductor/Route")
    with pytest.raises(grpc.RpcError) as caught:
        garbage(b"\xff\xff\xff")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = {name: (n.prefill_queue_s > 0, n.load.decode_kv_tokens) for name, n in status(conductor).items()}
    assert after == before
    assert client.ClusterStatus(pb.ClusterStatusRequest()).routed == 0


def test_no_live_decode_node_is_an_explicit_rejection(tmp_path: Path) -> None:
    conductor = conductor_server()
    try:
        with node(tmp_path, "a", conductor, "prefill") as a:
            assert eventually(lambda: set(status(conductor)) == {"a"}, 10)
            namespace_id, keys = put_chain(a, 2, seed=7)
            assert eventually(lambda: status(conductor)["a"].indexed_blocks == 2, 10)
            reply = stub(conductor).Route(route_message(namespace_id, keys))
            assert reply.rejected == "no live decode node" and not reply.HasField("prefill")
    finally:
        conductor.shutdown()


@pytest.mark.parametrize(
    ("description", "ttl", "text"),
    [
        (pb.NodeDescription(node_id="", role=pb.NODE_ROLE_PREFILL, grpc_address="127.0.0.1:1"), 5.0, "node_id"),
        (pb.NodeDescription(node_id="x", role=pb.NODE_ROLE_UNSPECIFIED, grpc_address="127.0.0.1:1"), 5.0, "role"),
        (
            pb.NodeDescription(node_id="x", role=pb.NODE_ROLE_PREFILL, grpc_address="127.0.0.1:1", profile="h100"),
            5.0,
            "unknown cost profile",
        ),
        (pb.NodeDescription(node_id="x", role=pb.NODE_ROLE_PREFILL, grpc_address="127.0.0.1:1"), 0.1, "ttl_s"),
        (pb.NodeDescription(node_id="x", role=pb.NODE_ROLE_PREFILL), 5.0, "grpc_address"),
    ],
)
def test_bad_registrations_are_refused(description: pb.NodeDescription, ttl: float, text: str) -> None:
    conductor = conductor_server()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub(conductor).Register(pb.RegisterRequest(node=description, ttl_s=ttl))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT and text in caught.value.details()
        assert status(conductor) == {}
    finally:
        conductor.shutdown()


def test_a_token_is_required_when_configured(tmp_path: Path) -> None:
    conductor = conductor_server(token=CONDUCTOR_TOKEN)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub(conductor).ClusterStatus(pb.ClusterStatusRequest())
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with node(tmp_path, "a", conductor, "both", token=CONDUCTOR_TOKEN):
            authorized = (("authorization", bearer(CONDUCTOR_TOKEN)),)
            assert eventually(
                lambda: len(stub(conductor).ClusterStatus(pb.ClusterStatusRequest(), metadata=authorized).nodes) == 1,
                10,
            )
    finally:
        conductor.shutdown()


def test_decisions_are_streamed_to_watchers(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 2, seed=8)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 2, 10)
    stream = stub(conductor).WatchDecisions(pb.WatchDecisionsRequest())
    assert eventually(lambda: len(conductor.conductor._watchers) == 1, 5)
    stub(conductor).Route(route_message(namespace_id, keys, request_id="watched"))
    first = next(stream)
    assert first.request_id == "watched" and first.prefill.node_id == "a"
    stream.cancel()


def test_a_replication_makes_the_target_pull_the_prefix(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 4, seed=9)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 4, 10)
    copy = Replication(namespace_id, tuple(BlockKey(k) for k in keys), source="a", target="b")
    assert conductor.conductor.replicate(copy)
    assert eventually(lambda: status(conductor)["b"].indexed_blocks == 4, 10)  # learnt from b's events
    with Client(nodes["b"].grpc_address) as client:
        assert client.lookup(namespace_id, keys).num_hits == 4
    assert not conductor.conductor.replicate(Replication(namespace_id, copy.keys, source="a", target="gone"))
