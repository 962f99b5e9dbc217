"""The conductor with real node daemons on loopback: nodes register themselves, their events
build the global index, requests go where their prefix is, engines' loads arrive through
their nodes, a feed that falls behind resyncs; `conductor serve` as a process; and every bad
input. Membership (lapses, leaving, restarts) is in test_conductor_membership.py."""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conductor.cli import main as conductor_cli
from conductor.replication import Replication
from kvstore.client import Client
from kvstore.errors import InvalidArgumentError
from kvstore.node.auth import bearer
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, EngineLoad, NamespaceId
from tests import factories
from tests.conductors import (
    CONDUCTOR_TOKEN,
    conductor_server,
    node,
    put_chain,
    report,
    route_message,
    scrape,
    status,
    stub,
    token_file_of,
)
from tests.nodes import eventually, self_signed_certificate


def test_a_request_goes_to_the_node_holding_its_prefix(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 6)
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 6, 10)
    new_key = factories.chain(namespace_id, 7, seed=99)[6]
    asked_ms = time.monotonic() * 1000
    reply = stub(conductor).Route(route_message(namespace_id, [*keys, new_key]))
    answered_ms = time.monotonic() * 1000
    assert reply.rejected == ""
    # prefix-flow's serve order: the arrival on the conductor's clock + 3 x the predicted prefill
    prefill_ms = 3000 * (reply.prefill.load_s + reply.prefill.prefill_s)
    assert asked_ms + prefill_ms - 1 <= reply.priority <= answered_ms + prefill_ms + 1
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


def test_the_engines_loads_reach_the_conductor_through_their_nodes_until_they_go_quiet(
    cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 2, seed=6)
    report(nodes["d"], "decode-0", EngineLoad(running_decodes=3, decode_kv_tokens=900, decode_pause_budget_s=2.5))
    report(nodes["d"], "decode-1", EngineLoad(running_decodes=1, decode_kv_tokens=100, decode_pause_budget_s=0.5))
    summed = pb.NodeLoad(running_decodes=4, decode_kv_tokens=1000, decode_pause_budget_s=0.5)
    assert eventually(lambda: status(conductor)["d"].load == summed, 10)  # the next heartbeat carries it
    assert status(conductor)["d"].load_reported and not status(conductor)["a"].load_reported
    assert eventually(lambda: status(conductor)["a"].indexed_blocks == 2, 10)
    metrics = scrape(conductor)  # each member's load, and whose account it is
    reported = '{node="d",role="decode",source="reported"}'
    assert metrics["conductor_node_running_decodes" + reported] == 4
    assert metrics["conductor_node_decode_kv_tokens" + reported] == 1000
    assert metrics["conductor_node_decode_pause_budget_seconds" + reported] == 0.5
    assert metrics['conductor_node_indexed_blocks{node="a",role="prefill",source="own"}'] == 2
    assert conductor_cli(["status", "--address", conductor.grpc_address], environ={}) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    # NODE ROLE PROFILE | PREFILL WAIT (2 words) | QUEUED DECODING KV | PAUSE BUDGET (2 words, or -) | LOAD ...
    assert rows["d"][:3] + rows["d"][5:11] == ["d", "decode", "default", "0", "4", "1000", "0.50", "s", "reported"]
    assert rows["a"][:3] + rows["a"][8:10] == ["a", "prefill", "default", "-", "own"]
    assert conductor_cli(["status", "--address", conductor.grpc_address, "--json"], environ={}) == 0
    members = {member["node_id"]: member for member in json.loads(capsys.readouterr().out)["nodes"]}
    assert (members["d"]["running_decodes"], members["d"]["decode_pause_budget_s"]) == (4, 0.5)
    assert members["d"]["load_reported"] and not members["b"]["load_reported"]
    # A placement is charged on top of the report until the next heartbeat replaces it.
    assert stub(conductor).Route(route_message(namespace_id, keys)).decode.node_id == "d"
    assert eventually(lambda: status(conductor)["d"].load == summed, 10)
    # The engines go quiet: past the node's ttl (2 s) their reports no longer count, the
    # heartbeats carry no load, and the conductor's own account starts from nothing.
    assert eventually(lambda: status(conductor)["d"].load == pb.NodeLoad(), 10)
    # A bad report is refused by name (checked by the node too, for clients that do not check).
    with grpc.insecure_channel(nodes["d"].grpc_address) as channel:
        node_stub = pb_grpc.KVStoreStub(channel)
        bad = pb.ReportLoadRequest(engine_id="e", load=pb.NodeLoad(decode_pause_budget_s=math.nan))
        with pytest.raises(grpc.RpcError) as refused:
            node_stub.ReportLoad(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decode_pause_budget_s" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            node_stub.ReportLoad(pb.ReportLoadRequest(engine_id=""))
        assert "engine_id must be 1-128" in (refused.value.details() or "")
    with pytest.raises(InvalidArgumentError, match="running_decodes must be in"):
        report(nodes["d"], "e", EngineLoad(running_decodes=-1))
    assert nodes["d"].node.engine_loads.total() is None


def test_a_decode_node_reporting_a_pause_budget_computes_prefills_when_the_prefill_nodes_are_busy(cluster) -> None:
    conductor, nodes = cluster
    namespace_id, keys = put_chain(nodes["a"], 4, seed=5)
    conductor_stub = stub(conductor)
    busy = EngineLoad(queued_prefill_tokens=50_000)  # about 20 s of prefill queued
    for name in ("a", "b"):
        report(nodes[name], "prefill", busy)
    report(nodes["d"], "decode", EngineLoad(running_decodes=1, decode_kv_tokens=100))
    assert eventually(lambda: all(status(conductor)[name].load.queued_prefill_tokens == 50_000 for name in "ab"), 10)
    assert eventually(lambda: status(conductor)["d"].load.running_decodes == 1, 10)
    # Without a budget from d, its batch is not paused: the prefill waits on a or b.
    reply = conductor_stub.Route(route_message(namespace_id, keys, request_id="1"))
    assert reply.prefill.node_id in {"a", "b"} and reply.decode.node_id == "d"
    report(nodes["d"], "decode", EngineLoad(running_decodes=1, decode_kv_tokens=100, decode_pause_budget_s=600.0))
    assert eventually(lambda: status(conductor)["d"].load.decode_pause_budget_s == 600.0, 10)
    reply = conductor_stub.Route(route_message(namespace_id, keys, request_id="2"))
    assert (reply.prefill.node_id, reply.decode.node_id) == ("d", "d")
    assert reply.decode.transfer_s == 0.0 and reply.candidates[0].node_id in {"a", "b"}
    # A budget that is not a finite number >= 0 is refused by the conductor too, and changes nothing.
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(grpc.RpcError) as refused:
            conductor_stub.Heartbeat(pb.HeartbeatRequest(node_id="d", load=pb.NodeLoad(decode_pause_budget_s=bad)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "decode_pause_budget_s" in (refused.value.details() or "")
    assert status(conductor)["d"].load.decode_pause_budget_s == 600.0


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


def test_no_live_decode_node_is_an_explicit_rejection_and_counted(tmp_path: Path) -> None:
    conductor = conductor_server()
    try:
        with node(tmp_path, "a", conductor, "prefill") as a:
            assert eventually(lambda: set(status(conductor)) == {"a"}, 10)
            namespace_id, keys = put_chain(a, 2, seed=7)
            assert eventually(lambda: status(conductor)["a"].indexed_blocks == 2, 10)
            reply = stub(conductor).Route(route_message(namespace_id, keys))
            assert reply.rejected == "no live decode node" and not reply.HasField("prefill")
            assert not reply.HasField("decode") and list(reply.candidates) == []
            assert conductor.conductor.cluster.loads["a"].queued_prefill_tokens == 0  # nothing charged
            metrics = scrape(conductor)
            assert metrics['conductor_routes_total{outcome="rejected",policy="prefix-flow"}'] == 1
            assert metrics['conductor_rejections_total{reason="no_node"}'] == 1
            assert metrics["conductor_decision_seconds_count"] == 1
            assert metrics['conductor_live_nodes{role="prefill"}'] == 1
            assert metrics['conductor_live_nodes{role="decode"}'] == 0
            assert metrics["conductor_indexed_blocks"] == 2
            assert metrics['conductor_calls_total{code="OK",method="Route"}'] == 1
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


def test_a_token_is_required_when_configured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conductor = conductor_server(token=CONDUCTOR_TOKEN)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub(conductor).ClusterStatus(pb.ClusterStatusRequest())
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(conductor.grpc_address) as channel:  # probes need no token
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with node(tmp_path, "a", conductor, "both", token=CONDUCTOR_TOKEN):
            authorized = (("authorization", bearer(CONDUCTOR_TOKEN)),)
            assert eventually(
                lambda: len(stub(conductor).ClusterStatus(pb.ClusterStatusRequest(), metadata=authorized).nodes) == 1,
                10,
            )
            # `conductor status` presents the token from its file, or says how to give it
            address = ["status", "--address", conductor.grpc_address]
            assert conductor_cli(address, environ={}) == 1
            assert "refused the call" in capsys.readouterr().err
            token_file = token_file_of(tmp_path, CONDUCTOR_TOKEN)
            assert conductor_cli([*address, "--token-file", str(token_file), "--json"], environ={}) == 0
            assert [n["node_id"] for n in json.loads(capsys.readouterr().out)["nodes"]] == ["a"]
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


def test_a_feed_that_falls_behind_resyncs_from_a_fresh_snapshot(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="conductor.watch")
    conductor = conductor_server()
    try:
        # A ring of one event: a put of several blocks (one commit, several events) outruns
        # the feed, whose next read is refused (WatchLagError, ABORTED); it subscribes again.
        with node(tmp_path, "a", conductor, "both", store__event_ring_events=1) as a:
            assert eventually(lambda: "a" in status(conductor) and status(conductor)["a"].resyncs == 0, 10)
            feed = conductor.conductor.feed_of("a")
            assert feed is not None and feed.synced.wait(10)
            put_chain(a, 6, seed=11)
            assert eventually(lambda: status(conductor)["a"].resyncs >= 1, 10)
            assert eventually(lambda: status(conductor)["a"].indexed_blocks == 6, 10)
            reasons = [getattr(record, "reason", "") for record in caplog.records]
            assert any(reason.startswith("stream ended: ABORTED: events") for reason in reasons), reasons
            metrics = scrape(conductor)
            assert metrics['conductor_index_resyncs_total{node="a"}'] == status(conductor)["a"].resyncs
    finally:
        conductor.shutdown()


def test_a_profile_from_the_config_file_can_be_registered(tmp_path: Path) -> None:
    path = tmp_path / "conductor.toml"
    numbers = {
        "kv_bytes_per_token": 131072,
        "kv_capacity_tokens": 400000,
        "prefill_fixed_s": 0.01,
        "prefill_per_token_s": 4e-5,
        "prefill_per_pair_s": 1.3e-9,
        "decode_fixed_s": 0.008,
        "decode_per_sequence_s": 5e-5,
        "decode_per_kv_token_s": 6.5e-8,
        "hbm_load_bytes_per_s": "inf",
        "hbm_load_latency_s": 0,
        "dram_load_bytes_per_s": 25e9,
        "dram_load_latency_s": 1e-4,
        "nvme_load_bytes_per_s": 6e9,
        "nvme_load_latency_s": 5e-4,
    }
    path.write_text("[profiles.small]\n" + "".join(f"{key} = {value}\n" for key, value in numbers.items()))
    conductor = conductor_server(config_file=path)
    try:
        description = pb.NodeDescription(
            node_id="x", role=pb.NODE_ROLE_DECODE, grpc_address="127.0.0.1:1", profile="small"
        )
        stub(conductor).Register(pb.RegisterRequest(node=description, ttl_s=0))  # 0: membership.node_ttl_s
        assert status(conductor)["x"].node.profile == "small"
    finally:
        conductor.shutdown()


def test_conductor_serve_runs_until_sigterm_then_ends_its_streams_and_exits_0(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "conductor.cli", "serve", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--set", "logging.format=json", "--policy", "kv-centric"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stderr is not None
        ready = json.loads(process.stdout.readline())
        assert ready["ready"] and ready["policy"] == "kv-centric" and ready["membership"] == "memory"
        channel = grpc.insecure_channel(ready["grpc"])
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvstore.v1.Conductor"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        conductor = pb_grpc.ConductorStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            conductor.Route(route_message(NamespaceId(b"z" * 16), [b"k" * 16]), timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        stream = conductor.WatchDecisions(pb.WatchDecisionsRequest(), timeout=30)
        url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert b'conductor_calls_total{code="NOT_FOUND",method="Route"} 1.0' in response.read()
        process.send_signal(signal.SIGTERM)
        assert list(stream) == []  # the open stream ends cleanly
        assert process.wait(15) == 0
        logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.strip()]
        assert any(entry["msg"].startswith("stopping") for entry in logs)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for stream_ in (process.stdout, process.stderr):
            if stream_ is not None:
                stream_.close()


def test_with_tls_on_both_sides_nodes_register_and_the_index_follows_them(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    tls = (f"auth.tls_cert_file={cert}", f"auth.tls_key_file={key}", f"auth.node_tls_ca_file={cert}")
    conductor = conductor_server(extra=tls)
    try:
        node_tls = {"auth__tls_cert_file": cert, "auth__tls_key_file": key, "conductor__tls_ca_file": cert}
        with node(tmp_path, "a", conductor, "both", **node_tls) as server:
            channel = grpc.secure_channel(conductor.grpc_address, grpc.ssl_channel_credentials(cert.read_bytes()))
            tls_stub = pb_grpc.ConductorStub(channel)

            def indexed() -> int:
                nodes = tls_stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5).nodes
                return nodes[0].indexed_blocks if nodes else -1

            with Client(server.grpc_address, tls_root_certificates=cert.read_bytes()) as client:
                namespace_id = client.register_namespace(factories.namespace())
                keys = factories.chain(namespace_id, 3)
                client.put_blocks(namespace_id, keys, factories.payloads(factories.namespace(), 3))
            assert eventually(lambda: indexed() == 3, 10)  # registered over TLS, events followed over TLS
            reply = tls_stub.Route(route_message(namespace_id, keys), timeout=5)
            assert reply.prefill.node_id == "a" and reply.prefill.local_tokens > 0
            with pytest.raises(grpc.RpcError):  # plaintext against the conductor's TLS port
                stub(conductor).ClusterStatus(pb.ClusterStatusRequest(), timeout=2)
            channel.close()
    finally:
        conductor.shutdown()


def test_conductor_status_names_a_conductor_it_cannot_reach_and_a_file_it_cannot_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    assert conductor_cli(["status", "--address", address, "--timeout", "1"], environ={}) == 1
    assert f"cannot reach the conductor at {address}" in capsys.readouterr().err
    # a token or CA file that cannot be read is a usage error, before any call
    assert conductor_cli(["status", "--address", address, "--token-file", "/nonexistent/token"], environ={}) == 2
    assert "cannot read /nonexistent/token" in capsys.readouterr().err
