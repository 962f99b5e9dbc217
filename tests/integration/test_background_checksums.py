"""Checksums computed off the commit path: blocks are visible at once, hashed soon after, and
anything that needs a checksum earlier gets a correct one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.checksums import ChecksumBook
from kvstore.client import Client, Transport
from kvstore.types import TierKind
from tests import factories as f
from tests.nodes import running_node


def test_blocks_are_hashed_after_commit_and_the_pins_go(tmp_path):
    ns = f.namespace()
    with f.store(f.config(tmp_path, checksum_in_background=True)) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 8), f.payloads(ns, 8)
        store.put_blocks(nid, keys, data)
        assert store.lookup(nid, keys).num_hits == 8  # visible before hashing finishes
        store.manager.drain_checksums()
        assert store.stats().num_unhashed == 0
        for key, payload in zip(keys, data, strict=True):
            assert store.manager.block_ref(key).checksum == xxhash.xxh3_64_intdigest(payload)
        assert int(store.manager._table.leases.sum()) == 0  # no pin outlives its hashing


def test_a_verifying_reader_and_a_demotion_never_wait_for_the_thread(tmp_path):
    ns = f.namespace()
    with f.store(f.config(tmp_path, dram_blocks=8, checksum_in_background=True)) as store:
        nid = store.register_namespace(ns)
        first, second = f.chain(nid, 8, seed=1), f.chain(nid, 8, seed=2)
        data = f.payloads(ns, 8, seed=1)
        store.put_blocks(nid, first, data)
        dests = [np.zeros(ns.block_bytes, dtype=np.uint8) for _ in first]
        assert store.get_into(nid, first, dests, verify=True) == 8
        assert all(np.array_equal(a, b) for a, b in zip(dests, data, strict=True))
        # The DRAM tier is full of blocks that may still be unhashed (pinned): making room
        # settles them synchronously, then demotes them to NVMe with their real checksums.
        store.put_blocks(nid, second, f.payloads(ns, 8, seed=2))
        assert store.lookup(nid, first).tiers == (TierKind.NVME,) * 8
        store.manager.drain_checksums()
        got = store.get_blocks(nid, first)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        assert store.stats().tier(TierKind.NVME).checksum_failures == 0


def test_remove_does_not_mistake_a_hashing_pin_for_a_reader():
    ns = f.namespace()
    with f.store(f.config(checksum_in_background=True)) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 4)
        store.put_blocks(nid, keys, f.payloads(ns, 4))
        result = store.remove(nid, keys)
        assert (result.num_removed, result.num_busy) == (4, 0)
        store.manager.drain_checksums()
        assert store.stats().tier(TierKind.DRAM).used_bytes == 0


def test_blocks_below_the_size_floor_are_hashed_before_commit_returns():
    ns = f.namespace()  # 8 KiB blocks
    with f.store(f.config(checksum_in_background=True, background_min_bytes=ns.block_bytes + 1)) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 4), f.payloads(ns, 4)
        store.put_blocks(nid, keys, data)
        assert store.stats().num_unhashed == 0
        assert int(store.manager._table.leases.sum()) == 0
        assert store.manager.block_ref(keys[3]).checksum == xxhash.xxh3_64_intdigest(data[3])


@pytest.fixture
def hashing_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Nodes started while this is active hash nothing in the background until it is set."""
    release = threading.Event()
    original = ChecksumBook._run

    def held(self: ChecksumBook) -> None:
        release.wait()
        original(self)

    monkeypatch.setattr(ChecksumBook, "_run", held)
    yield release
    release.set()


def test_blocks_still_unhashed_are_sent_with_their_real_checksums(tmp_path: Path, hashing_held) -> None:
    """A peer checks every block it receives: a Fetch or a remote get right after a put of
    big blocks (hashed in the background) must not send the placeholder of a checksum."""
    ns = f.namespace(num_layers=32)  # 128 KiB blocks: the node hashes them after the commit
    settings = {"nvme_kib": 0, "dram_kib": 8192, "store__dram_slab_bytes": "1 MiB"}
    with (
        running_node(tmp_path / "a", **settings) as a,
        running_node(tmp_path / "b", **settings) as b,
        Client(a.grpc_address) as writer,
        Client(b.grpc_address) as puller,
    ):
        try:
            nid = writer.register_namespace(ns)
            puller.register_namespace(ns)
            keys, data = f.chain(nid, 4), f.payloads(ns, 4)
            writer.put_blocks(nid, keys, data)
            assert a.store.stats().num_unhashed == 4  # the background hashing is held
            assert puller.fetch(nid, keys, a.data_address).num_fetched == 4
            with Client(a.grpc_address, transport=Transport.TCP) as remote:
                dests = [np.zeros(ns.block_bytes, dtype=np.uint8) for _ in keys]
                assert remote.get_into(nid, keys, dests) == 4
            assert all(np.array_equal(got, want) for got, want in zip(dests, data, strict=True))
        finally:
            hashing_held.set()  # before the nodes stop: their hashing threads must end
