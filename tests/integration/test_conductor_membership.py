"""Membership with real node daemons: a node that stops heartbeating lapses, one that drains
leaves at once, a restarted conductor rebuilds from etcd or from the nodes' re-registrations,
and a node serves while its conductor is down."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest

from conductor.config import load_conductor_config
from conductor.server import ConductorServer
from kvstore.client import Client
from kvstore.proto import kvstore_pb2 as pb
from tests import factories
from tests.conductors import (
    conductor_server,
    node,
    put_chain,
    route_message,
    status,
    stub,
)
from tests.etcd import EtcdProcess
from tests.nodes import eventually, running_node


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
    index = conductor.conductor.cluster.index
    assert index.blocks_of("b") == 0
    # the reconcile thread sweeps b's entries out of the index afterwards
    assert eventually(lambda: index.stale_mask == 0 and not any(key in index.snapshot_keys() for key in keys), 10)


def test_a_node_that_drains_leaves_at_once(tmp_path: Path) -> None:
    conductor = conductor_server()
    try:
        # b's lease would take 10 minutes to lapse: only its leaving can make it go sooner
        with (
            node(tmp_path, "a", conductor, "both"),
            node(tmp_path, "b", conductor, "prefill", conductor__ttl_s=600) as b,
        ):
            namespace_id, keys = put_chain(b, 4, seed=5)
            assert eventually(lambda: status(conductor).get("b", pb.ClusterNode()).indexed_blocks == 4, 10)
            with Client(b.grpc_address) as client:
                client.drain(flush=False)
            assert set(status(conductor)) == {"a"}  # gone before Drain returned
            reply = stub(conductor).Route(route_message(namespace_id, keys))
            assert reply.prefill.node_id == "a" and reply.prefill.local_tokens == 0
            assert conductor.conductor.cluster.index.blocks_of("b") == 0
            time.sleep(1.0)  # b sends no more heartbeats, so it does not register again
            assert set(status(conductor)) == {"a"}
            # leaving again, or a node never seen, is no error
            assert not stub(conductor).Leave(pb.LeaveRequest(node_id="b")).was_member
            assert not stub(conductor).Leave(pb.LeaveRequest(node_id="nobody")).was_member
            with pytest.raises(grpc.RpcError) as caught:
                stub(conductor).Leave(pb.LeaveRequest())
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "node_id is empty" in (caught.value.details() or "")
    finally:
        conductor.shutdown()


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
                    f"membership.etcd_endpoints={etcd.endpoint}",
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


def test_a_restarted_conductor_without_etcd_is_rebuilt_by_the_nodes(tmp_path: Path) -> None:
    first = conductor_server()
    with node(tmp_path, "a", first, "prefill") as a, node(tmp_path, "d", first, "decode"):
        assert eventually(lambda: set(status(first)) == {"a", "d"}, 10)
        namespace_id, keys = put_chain(a, 5, seed=10)
        assert eventually(lambda: status(first)["a"].indexed_blocks == 5, 10)
        first.shutdown()
        restarted = conductor_server(grpc_port=first.grpc_port)  # knows nothing: memory membership
        try:
            heartbeat = pb.HeartbeatRequest(node_id="nobody")
            assert stub(restarted).Heartbeat(heartbeat, wait_for_ready=True, timeout=10).register_again
            # The nodes' next heartbeats are told to register again (or fail, and they retry);
            # their registrations start the feeds, and the feeds' snapshots rebuild the index.
            assert eventually(lambda: set(status(restarted)) == {"a", "d"}, 10)
            assert eventually(lambda: status(restarted)["a"].indexed_blocks == 5, 10)
            reply = stub(restarted).Route(route_message(namespace_id, keys))
            assert reply.prefill.node_id == "a" and reply.prefill.local_tokens == 5 * factories.BLOCK_TOKENS - 1
            assert reply.decode.node_id == "d"
        finally:
            restarted.shutdown()


def test_a_node_serves_while_its_conductor_is_down_and_joins_when_it_comes(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = {"node__node_id": "a", "conductor__address": f"127.0.0.1:{port}", "conductor__role": "both"}
    settings |= {"conductor__ttl_s": 2, "conductor__heartbeat_interval_s": 0.3}
    with running_node(tmp_path / "a", **settings) as a:
        namespace_id, keys = put_chain(a, 3, seed=12)  # the node works without its conductor
        assert a.conductor_link is not None and not a.conductor_link.registered.is_set()
        conductor = conductor_server(grpc_port=port)
        try:
            assert eventually(lambda: "a" in status(conductor), 15)  # its retries find the conductor
            assert eventually(lambda: status(conductor)["a"].indexed_blocks == 3, 10)
            assert stub(conductor).Route(route_message(namespace_id, keys)).prefill.node_id == "a"
        finally:
            conductor.shutdown()
