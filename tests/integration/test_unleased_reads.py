"""Reads that take no lease (same-host clients copying blocks the shared index places in DRAM)
never deliver bytes of another block, also while the node evicts and reuses the slots under
them; and they still count for the node's policy and statistics."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvstore.client import Client, Transport
from kvstore.shared_index import supported
from kvstore.types import TierKind
from tests import factories
from tests.nodes import daemon, running_node

pytestmark = pytest.mark.skipif(not supported(), reason="the shared index is published on x86-64 only")


def _payload(key: bytes, size: int) -> np.ndarray:
    """A block whose every byte says which key it belongs to."""
    return np.frombuffer(key * (size // len(key)), dtype=np.uint8)


def test_no_read_delivers_another_blocks_bytes_while_slots_are_reused(tmp_path):
    # 64 KiB of DRAM (8 blocks of 8 KiB), no NVMe: every put evicts, and slots are reused at once.
    with daemon(tmp_path, dram_kib=64, nvme_kib=0) as node, Client(node.grpc_address) as writer:
        namespace = factories.namespace()
        namespace_id = writer.register_namespace(namespace)
        size = namespace.block_bytes
        written: list[list[bytes]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                for seed in range(100_000):
                    if stop.is_set():
                        return
                    chain = factories.chain(namespace_id, 2, seed=seed)
                    writer.put_blocks(namespace_id, chain, [_payload(key, size) for key in chain])
                    written.append(chain)
            except BaseException as error:
                errors.append(error)
                stop.set()

        thread = threading.Thread(target=write)
        thread.start()
        wrong = delivered = 0
        try:
            with Client(node.grpc_address) as reader:
                assert reader.uses_shared_index
                dests = [np.empty(size, dtype=np.uint8) for _ in range(2)]
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline and not stop.is_set():
                    if not written:
                        continue
                    chain = written[-1 - (delivered % min(len(written), 4))]  # recent: some still held
                    count = reader.get_into(namespace_id, chain, dests)
                    delivered += count
                    wrong += sum(not np.array_equal(dests[i], _payload(chain[i], size)) for i in range(count))
        finally:
            stop.set()
            thread.join(30)
        assert not errors
        assert delivered > 100
        assert wrong == 0


def test_reads_without_a_lease_count_for_recency_and_hits(tmp_path):
    # DRAM holds 8 blocks; no NVMe. A block read (without a lease) just before the node must
    # evict survives; one not read goes, as LRU has it.
    with running_node(tmp_path, dram_kib=64, nvme_kib=0) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        chains = [factories.chain(namespace_id, 1, seed=seed) for seed in range(8)]
        for seed, chain in enumerate(chains):
            client.put_blocks(namespace_id, chain, factories.payloads(namespace, 1, seed=seed))
        hits_before = {tier.kind: tier.hits for tier in client.status().tiers}[TierKind.DRAM]
        dest = [np.empty(namespace.block_bytes, dtype=np.uint8)]
        assert client.get_into(namespace_id, chains[0], dest) == 1  # the oldest, now the most recent
        np.testing.assert_array_equal(dest[0], factories.payloads(namespace, 1, seed=0)[0].view(np.uint8).ravel())
        with Client(server.grpc_address, transport=Transport.TCP) as remote:  # no shared index: exact counts

            def dram_hits() -> int:
                return {tier.kind: tier.hits for tier in remote.status().tiers}[TierKind.DRAM]

            deadline = time.monotonic() + 5
            while dram_hits() != hits_before + 1 and time.monotonic() < deadline:
                time.sleep(0.02)  # READ_DONE has no reply: the node counts it when it reads it
            assert dram_hits() == hits_before + 1
            client.put_blocks(namespace_id, factories.chain(namespace_id, 1, seed=99), factories.payloads(namespace, 1))
            assert remote.lookup(namespace_id, chains[0]).num_hits == 1  # read: kept
            assert remote.lookup(namespace_id, chains[1]).num_hits == 0  # the least recent: evicted


def test_a_block_evicted_and_overwritten_between_locating_and_copying_is_not_delivered(tmp_path):
    """The race made to happen: the reader locates a block, the node evicts it and hands its
    slot to another block, then the reader copies. The copy is refused, and the read falls
    back to asking the node (which no longer has the block)."""
    with running_node(tmp_path, dram_kib=64, nvme_kib=0) as server, Client(server.grpc_address) as client:
        namespace = factories.namespace()
        namespace_id = client.register_namespace(namespace)
        size = namespace.block_bytes
        victim = factories.chain(namespace_id, 1, seed=0)
        client.put_blocks(namespace_id, victim, [_payload(victim[0], size)])
        index = client._index  # the mechanism under test
        assert index is not None
        located = index.locate

        def locate_then_evict(namespace_id, keys):
            plan = located(namespace_id, keys)
            for seed in range(1, 9):  # 8 more blocks: the victim goes, its slot is reused
                chain = factories.chain(namespace_id, 1, seed=seed)
                client.put_blocks(namespace_id, chain, [_payload(chain[0], size)])
            return plan

        index.locate = locate_then_evict  # type: ignore[method-assign]
        dest = [np.empty(size, dtype=np.uint8)]
        assert client.get_into(namespace_id, victim, dest) == 0
        index.locate = located  # type: ignore[method-assign]
        plan = index.locate(namespace_id, victim)
        assert plan is not None and plan.count == 0 and plan.ends_at_miss
