"""A same-host client answers Lookups from the node's shared index exactly as the node would,
through stores, removals and evictions; the node counts them; and it can be turned off."""

from __future__ import annotations

import pytest

from kvstore.client import Client, Transport
from kvstore.errors import UnknownNamespaceError
from kvstore.shared_index import supported
from kvstore.types import NamespaceId, TierKind
from tests import factories
from tests.nodes import eventually, running_node

pytestmark = pytest.mark.skipif(not supported(), reason="the shared index is published on x86-64 only")


def test_index_answers_equal_the_nodes_through_stores_removals_and_evictions(tmp_path):
    # DRAM holds 8 blocks of 8 KiB (64 KiB), NVMe 16: evictions demote, then drop.
    with (
        running_node(tmp_path, dram_kib=64, nvme_kib=128) as server,
        Client(server.grpc_address) as local,
        Client(server.grpc_address, transport=Transport.TCP) as remote,
    ):
        assert local.uses_shared_index and not remote.uses_shared_index
        namespace = factories.namespace()
        namespace_id = local.register_namespace(namespace)
        chains = [factories.chain(namespace_id, 6, seed=seed) for seed in range(5)]

        def agree() -> None:
            for chain in chains:
                assert local.lookup(namespace_id, chain) == remote.lookup(namespace_id, chain)

        for seed, chain in enumerate(chains):
            local.put_blocks(namespace_id, chain, factories.payloads(namespace, 6, seed=seed))
            agree()
        assert {tier for chain in chains for tier in local.lookup(namespace_id, chain).tiers} == {
            TierKind.DRAM,
            TierKind.NVME,
        }
        local.remove(namespace_id, chains[-1][3:])
        agree()
        assert local.lookup(namespace_id, chains[-1]).num_hits == 3

        other = local.register_namespace(factories.namespace("other-model"))
        assert local.lookup(other, chains[-1]).num_hits == 0  # a block of another namespace is a miss
        with pytest.raises(UnknownNamespaceError):
            local.lookup(NamespaceId(b"\x07" * 16), chains[0])


def test_the_node_counts_lookups_answered_from_the_index(tmp_path):
    with running_node(tmp_path, nvme_kib=0) as server:
        with Client(server.grpc_address) as client:
            namespace = factories.namespace()
            namespace_id = client.register_namespace(namespace)
            keys = factories.chain(namespace_id, 3)
            client.put_blocks(namespace_id, keys, factories.payloads(namespace, 3))
            for _ in range(4):
                assert client.lookup(namespace_id, keys + factories.chain(namespace_id, 2, seed=9)).num_hits == 3
        # Reported when the client closes (or every second while it runs), without a reply.
        counts = server.node.lookup_counts
        assert eventually(lambda: (counts().lookups, counts().hit_blocks, counts().miss_blocks) == (4, 12, 8))


def test_a_node_can_publish_no_index(tmp_path):
    with (
        running_node(tmp_path, nvme_kib=0, server__shared_index_blocks=-1) as server,
        Client(server.grpc_address) as client,
    ):
        assert client.uses_shared_memory and not client.uses_shared_index
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, 2)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, 2))
        assert client.lookup(namespace_id, keys).num_hits == 2
    with running_node(tmp_path / "b", nvme_kib=0) as server, Client(server.grpc_address, shared_index=False) as client:
        assert not client.uses_shared_index
