"""A real node on loopback: the local (shared-memory) and TCP data paths, Fetch between two
nodes, WatchEvents, draining, metrics and the async client."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import AsyncClient, Client, Transport
from kvstore.errors import (
    InvalidArgumentError,
    NamespaceMismatchError,
    NodeDrainingError,
    PeerUnavailableError,
    UnknownNamespaceError,
)
from kvstore.events import EventKind
from kvstore.types import NamespaceId, TierKind
from tests import factories
from tests.nodes import eventually, running_node


@pytest.fixture
def node(tmp_path: Path):
    with running_node(tmp_path / "a") as server:
        yield server


@pytest.mark.parametrize("transport", [Transport.AUTO, Transport.TCP])
def test_put_then_get_returns_the_same_bytes(node, transport):
    with Client(node.grpc_address, transport=transport) as client:
        assert client.uses_shared_memory is (transport is Transport.AUTO)
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 6)
        payloads = factories.payloads(namespace, 6)
        assert client.put_blocks(namespace_id, keys[:4], payloads[:4]).num_written == 4
        result = client.put_blocks(namespace_id, keys, payloads)
        assert (result.num_written, result.num_present) == (2, 4)
        assert client.lookup(namespace_id, keys).num_hits == 6
        dests = [np.zeros(namespace.block_bytes, dtype=np.uint8) for _ in keys]
        assert client.get_into(namespace_id, keys, dests, verify=True) == 6
        for dest, payload in zip(dests, payloads, strict=True):
            np.testing.assert_array_equal(dest, payload)
        missing = factories.chain(namespace_id, 3, seed=9)
        assert client.get_into(namespace_id, missing, dests[:3]) == 0
    assert eventually(lambda: node.store.stats().num_leases == 0)
    stats = node.store.stats()
    assert (stats.num_blocks, stats.num_leases, stats.num_reservations) == (6, 0, 0)


@pytest.mark.parametrize("transport", [Transport.AUTO, Transport.TCP])  # B's Unix socket, or gRPC
def test_fetch_pulls_only_the_missing_blocks_from_a_peer(tmp_path, transport):
    with running_node(tmp_path / "a") as a, running_node(tmp_path / "b") as b:
        namespace = factories.namespace()
        with Client(a.grpc_address) as client_a, Client(b.grpc_address, transport=transport) as client_b:
            assert client_b.uses_shared_memory is (transport is Transport.AUTO)
            namespace_id = client_a.register_namespace(namespace)
            client_b.register_namespace(namespace)
            keys = factories.chain(namespace_id, 8)
            payloads = factories.payloads(namespace, 8)
            client_a.put_blocks(namespace_id, keys[:6], payloads[:6])
            client_b.put_blocks(namespace_id, keys[:2], payloads[:2])

            result = client_b.fetch(namespace_id, keys, a.data_address)

            assert (result.num_fetched, result.num_present) == (4, 2)  # a holds 6; b had the first 2
            assert result.bytes_moved == 4 * namespace.block_bytes
            got = client_b.get_blocks(namespace_id, keys)
            assert len(got) == 6
            for block, payload in zip(got, payloads, strict=False):
                np.testing.assert_array_equal(block, payload)
            again = client_b.fetch(namespace_id, keys[:6], a.data_address)
            assert (again.num_fetched, again.num_present) == (0, 6)


@pytest.mark.parametrize("transport", [Transport.AUTO, Transport.TCP])
def test_fetch_from_an_unreachable_peer_fails_and_changes_nothing(node, transport):
    with Client(node.grpc_address, transport=transport) as client:
        namespace_id = client.register_namespace(factories.namespace())
        keys = factories.chain(namespace_id, 4)
        with pytest.raises(PeerUnavailableError, match="unreachable"):
            client.fetch(namespace_id, keys, "127.0.0.1:1")
        with pytest.raises(InvalidArgumentError, match="peer"):
            client.fetch(namespace_id, keys, "")
        with pytest.raises(InvalidArgumentError, match="peer address of 2000 bytes"):
            client.fetch(namespace_id, keys, "h" * 1994 + ":12345")
        assert client.lookup(namespace_id, keys).num_hits == 0
        assert client.lookup(namespace_id, keys).num_hits == 0  # the connection serves on
    assert node.store.stats().num_reservations == 0


def test_watch_starts_with_a_snapshot_then_streams_numbered_events(node):
    namespace = factories.namespace()
    with Client(node.grpc_address) as client:
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 5)
        client.put_blocks(namespace_id, keys[:2], factories.payloads(namespace, 2))
        watch = client.watch_events()
        events = iter(watch)
        snapshot = [next(events) for _ in range(3)]
        assert [e.kind for e in snapshot] == [EventKind.SNAPSHOT, EventKind.SNAPSHOT, EventKind.SNAPSHOT_END]
        assert {e.key for e in snapshot[:2]} == set(keys[:2])
        assert all(e.tiers == (TierKind.DRAM,) for e in snapshot[:2])
        start = snapshot[-1].sequence

        client.put_blocks(namespace_id, keys[2:], factories.payloads(namespace, 3), parent=keys[1])
        client.remove(namespace_id, [keys[4]])

        deltas = [next(events) for _ in range(4)]
        watch.cancel()
    assert [e.sequence for e in deltas] == [start + 1, start + 2, start + 3, start + 4]
    assert [e.kind for e in deltas] == [EventKind.STORED] * 3 + [EventKind.REMOVED]
    assert [e.key for e in deltas] == [*keys[2:], keys[4]]
    assert deltas[0].parent == keys[1]
    assert deltas[-1].tiers == ()


def test_a_draining_node_refuses_new_work_and_flushes_to_nvme(node):
    namespace = factories.namespace()
    told: list[str] = []

    def failing() -> None:
        told.append("failing")
        raise RuntimeError("a listener that fails does not stop the drain")

    node.node.add_drain_listener(failing)
    node.node.add_drain_listener(lambda: told.append("next"))
    with Client(node.grpc_address) as client:
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 3)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
        assert client.drain(flush=True) == 3
        assert client.status().is_draining
        assert client.drain(flush=False) == 0
        assert told == ["failing", "next"]  # each once, the first drain only
        with pytest.raises(NodeDrainingError, match="draining"):
            client.put_blocks(namespace_id, factories.chain(namespace_id, 2, seed=5), factories.payloads(namespace, 2))
        assert client.lookup(namespace_id, keys).num_hits == 3  # the index still answers
    assert node.store.stats().tier(TierKind.NVME).num_blocks == 3


def test_metrics_endpoint_reports_tiers_and_calls(node):
    namespace = factories.namespace()
    with Client(node.grpc_address) as client:
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 2)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 2))
        client.lookup(namespace_id, keys + factories.chain(namespace_id, 1, seed=3))
        dests = [np.empty(namespace.block_bytes, dtype=np.uint8) for _ in keys]
        assert client.get_into(namespace_id, keys, dests) == 2  # through the shared index, no lease

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()

    # a same-host client answers the Lookup from the shared index and reports it to the node
    # without waiting for a reply (kvstore/client/reports.py): the count arrives a moment later
    assert eventually(lambda: 'kvstore_lookup_blocks_total{result="hit"} 2.0' in scrape())
    text = scrape()
    assert f'kvstore_tier_used_bytes{{tier="dram"}} {2 * namespace.block_bytes:.1f}' in text
    assert 'kvstore_tier_blocks{tier="dram"} 2.0' in text
    assert 'kvstore_rpc_seconds_count{code="OK",method="Commit"} 1.0' in text
    assert f'kvstore_local_bytes_total{{direction="reserved"}} {2 * namespace.block_bytes:.1f}' in text
    copied = f'kvstore_local_bytes_total{{direction="copied"}} {2 * namespace.block_bytes:.1f}'
    assert eventually(lambda: copied in scrape())


def test_async_client_round_trip(node):
    namespace = factories.namespace()

    async def scenario() -> list[np.ndarray]:
        async with await AsyncClient.connect(node.grpc_address) as client:
            namespace_id = await client.register_namespace(namespace)
            keys = factories.chain(namespace_id, 3)
            await client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
            assert (await client.lookup(namespace_id, keys)).num_hits == 3
            assert await client.namespaces() == (namespace,)
            listed = [info.key async for info in client.list_blocks(namespace_id, page_size=2)]
            assert sorted(listed) == sorted(keys)
            got = await client.get_blocks(namespace_id, keys)
            assert await client.drain(flush=False) == 0
            assert (await client.status()).is_draining
            return got

    got = asyncio.run(scenario())
    for block, payload in zip(got, factories.payloads(namespace, 3), strict=True):
        np.testing.assert_array_equal(block, payload)


def test_the_local_channel_serves_metadata_and_maps_errors_to_their_classes(node):
    namespace, other = factories.namespace(), factories.namespace("other-model")
    with Client(node.grpc_address) as client:
        assert client.uses_shared_memory
        assert node.node.local_address.startswith("unix:@")
        namespace_id = client.register_namespace(namespace)
        other_id = client.register_namespace(other)
        keys = factories.chain(namespace_id, 3)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
        before = node.store.stats()
        with pytest.raises(NamespaceMismatchError, match="another namespace"):
            client.put_blocks(other_id, keys, factories.payloads(other, 3))
        with pytest.raises(UnknownNamespaceError):
            client.lookup(NamespaceId(b"\7" * 16), keys)
        assert client.lookup(namespace_id, keys).tiers == (TierKind.DRAM,) * 3  # the connection serves on
    after = node.store.stats()
    assert (after.num_blocks, after.num_reservations) == (before.num_blocks, 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kvstore_rpc_seconds_count{code="FAILED_PRECONDITION",method="Reserve"} 1.0' in text


def test_without_the_node_socket_the_local_path_falls_back_to_grpc(node):
    node.node.local_address = "unix:@kvstore-test-no-such-socket"  # as from another network namespace
    namespace = factories.namespace()
    with Client(node.grpc_address, transport=Transport.SHARED_MEMORY) as client:
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 3)
        payloads = factories.payloads(namespace, 3)
        assert client.put_blocks(namespace_id, keys, payloads).num_written == 3
        assert client.lookup(namespace_id, keys).num_hits == 3
        dests = [np.zeros(namespace.block_bytes, dtype=np.uint8) for _ in keys]
        assert client.get_into(namespace_id, keys, dests, verify=True) == 3
        for dest, payload in zip(dests, payloads, strict=True):
            np.testing.assert_array_equal(dest, payload)
        assert client.get_into(namespace_id, keys, dests) == 3  # through the shared index, no lease
    assert eventually(lambda: node.store.stats().num_leases == 0)  # close waited for the gRPC release
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert 'kvstore_rpc_seconds_count{code="OK",method="Acquire"} 1.0' in text
    # What the client did without the node was reported over gRPC when it closed.
    assert 'kvstore_rpc_seconds_count{code="OK",method="ReportReads"} 1.0' in text
    assert 'kvstore_rpc_seconds_count{code="OK",method="ReportLookups"} 1.0' in text
    assert node.node.lookup_counts().lookups == 1
