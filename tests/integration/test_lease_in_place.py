"""`Client.lease_in_place`: a same-host client leases a run of blocks in the node's shared
memory and reads them where they are (as a GPU kernel reading a registered segment does); the
lease holds the slots until the `with` block ends, a corrupt slot ends a verified run, and a
client that cannot map the segment is refused."""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest

from kvstore.client import Client, Transport
from kvstore.errors import InvalidArgumentError
from kvstore.node.server import NodeServer
from tests import factories
from tests.nodes import running_node


def leased_count(server: NodeServer) -> int:
    return int(server.store.manager._table.leases.sum())


def wait_for_no_leases(server: NodeServer) -> None:
    """A release is sent without waiting for an answer: give the node a moment to apply it."""
    deadline = time.monotonic() + 5
    while leased_count(server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leased_count(server) == 0


def test_leased_slots_hold_the_blocks_until_the_block_ends(tmp_path):
    with running_node(tmp_path) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        chain = factories.chain(namespace_id, 4, seed=1)
        payloads = factories.payloads(namespace, 3, seed=1)
        client.put_blocks(namespace_id, chain[:3], payloads)
        with client.lease_in_place(namespace_id, chain) as leased:
            assert len(leased) == 3 and leased.block_bytes == namespace.block_bytes
            assert not leased.expired()
            for address, payload in zip(leased.addresses, payloads, strict=True):
                assert ctypes.string_at(address, leased.block_bytes) == payload.tobytes()
            assert leased_count(server) == 3
            segment = client.shared_memory
            assert segment is not None
            start = segment.ctypes.data
            assert all(start <= address < start + segment.nbytes for address in leased.addresses)
        wait_for_no_leases(server)


def test_a_corrupt_slot_ends_a_verified_run(tmp_path):
    with running_node(tmp_path) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        chain = factories.chain(namespace_id, 3, seed=2)
        client.put_blocks(namespace_id, chain, factories.payloads(namespace, 3, seed=2))
        with client.lease_in_place(namespace_id, chain) as leased:
            segment = client.shared_memory
            assert segment is not None
            offset = leased.addresses[1] - segment.ctypes.data
            segment[offset] ^= 0xFF  # a flipped bit in block 1's slot
        with client.lease_in_place(namespace_id, chain, verify=True) as verified:
            assert len(verified) == 1
        with client.lease_in_place(namespace_id, chain) as unverified:
            assert len(unverified) == 3  # without verify, the caller checks (or trusts) the bytes
        wait_for_no_leases(server)


def test_nothing_stored_and_no_keys_lease_nothing(tmp_path):
    with running_node(tmp_path) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        with client.lease_in_place(namespace_id, factories.chain(namespace_id, 2, seed=3)) as leased:
            assert len(leased) == 0
        with client.lease_in_place(namespace_id, []) as empty:
            assert len(empty) == 0
        wait_for_no_leases(server)


def test_a_client_off_the_nodes_host_is_refused(tmp_path):
    with running_node(tmp_path) as server, Client(server.grpc_address, transport=Transport.TCP) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        assert client.shared_memory is None
        chain = factories.chain(namespace_id, 1, seed=4)
        client.put_blocks(namespace_id, chain, factories.payloads(namespace, 1, seed=4))
        with pytest.raises(InvalidArgumentError, match="shared memory"), client.lease_in_place(namespace_id, chain):
            pass
        assert leased_count(server) == 0
        assert np.array_equal(client.get_blocks(namespace_id, chain)[0], factories.payloads(namespace, 1, seed=4)[0])
