"""The store end to end on real parts: shared memory, slab files, LMDB. Exact state asserted."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from kvstore.clock import ManualClock
from kvstore.config import WritePolicy
from kvstore.errors import (
    DuplicateCommitError,
    InvalidArgumentError,
    LayoutMismatchError,
    NamespaceMismatchError,
    PayloadSizeError,
    StoreFullError,
    UnknownLeaseError,
    UnknownNamespaceError,
    UnknownReservationError,
)
from kvstore.policy import POLICIES
from kvstore.tiers.nvme import slab_file_name
from kvstore.types import TierKind
from tests import factories as f


def snapshot(store):
    """Everything observable about a store's contents, for 'nothing changed' checks."""
    stats = store.stats()
    return (stats, {t.kind: t.used_bytes for t in stats.tiers})


def flip_byte(nvme_dir, offset):
    """Corrupt one byte of the NVMe tier's first slab file, behind the store's back."""
    with open(nvme_dir / slab_file_name(0), "r+b") as slab:
        slab.seek(offset)
        byte = slab.read(1)
        slab.seek(offset)
        slab.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def ns():
    return f.namespace()


def test_put_then_lookup_and_get_return_the_bytes(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 5), f.payloads(ns, 5)
        result = store.put_blocks(nid, keys, data)
        assert (result.num_written, result.num_present) == (5, 0)
        assert store.lookup(nid, keys).num_hits == 5
        assert store.lookup(nid, keys).tiers == (TierKind.DRAM,) * 5
        got = store.get_blocks(nid, keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        assert store.put_blocks(nid, keys, data).num_present == 5


def test_lookup_is_the_longest_leading_run(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 6)
        store.put_blocks(nid, keys[:2], f.payloads(ns, 2))
        store.put_blocks(nid, keys[3:], f.payloads(ns, 3), parent=keys[2])
        assert store.lookup(nid, keys).num_hits == 2
        assert store.lookup(nid, keys[3:]).num_hits == 3
        assert store.lookup(nid, []).num_hits == 0


def test_reserved_but_uncommitted_blocks_are_invisible(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 3)
        reservation = store.manager.reserve(nid, keys)
        assert store.lookup(nid, keys).num_hits == 0
        lease = store.manager.acquire(nid, keys)
        assert lease.blocks == ()
        store.manager.release(lease.lease_id)
        again = store.manager.reserve(nid, keys)  # a second writer is told they are in progress
        assert again.keys == () and again.num_present == 3
        store.manager.commit(reservation.reservation_id)
        assert store.lookup(nid, keys).num_hits == 3


def test_abort_and_expiry_free_the_slots(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 4)
        empty = store.stats().tier(TierKind.DRAM).used_bytes
        reservation = store.manager.reserve(nid, keys)
        assert store.stats().tier(TierKind.DRAM).used_bytes == empty + 4 * ns.block_bytes
        store.manager.abort(reservation.reservation_id)
        assert store.stats().tier(TierKind.DRAM).used_bytes == empty
        with pytest.raises(DuplicateCommitError, match="aborted"):
            store.manager.commit(reservation.reservation_id)

        expiring = store.manager.reserve(nid, keys)
        clock.advance(10.0)
        store.manager.expire()
        assert store.stats().num_reservations == 0
        assert store.stats().tier(TierKind.DRAM).used_bytes == empty
        with pytest.raises(UnknownReservationError, match="expired"):
            store.manager.commit(expiring.reservation_id)
        assert store.manager.reserve(nid, keys).keys == tuple(keys)  # the keys are free to write again


def test_duplicate_commit_is_refused_and_changes_nothing(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 2)
        reservation = store.manager.reserve(nid, keys)
        store.manager.commit(reservation.reservation_id)
        before = snapshot(store)
        with pytest.raises(
            DuplicateCommitError, match=f"reservation {reservation.reservation_id} was already committed"
        ):
            store.manager.commit(reservation.reservation_id)
        with pytest.raises(UnknownReservationError, match="never issued"):
            store.manager.commit(10**6)
        assert snapshot(store) == before


def test_bad_payloads_raise_typed_errors_and_change_nothing(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 2)
        good = f.payloads(ns, 2)
        before = snapshot(store)
        with pytest.raises(PayloadSizeError, match=f"payload 1 has 100 bytes.*{ns.block_bytes}"):
            store.put_blocks(nid, keys, [good[0], b"x" * 100])
        wrong_dtype = np.zeros(ns.block_shape, dtype=np.float32)
        with pytest.raises(LayoutMismatchError, match="dtype float32"):
            store.put_blocks(nid, keys, [good[0], wrong_dtype])
        wrong_shape = np.zeros((2, 2, 4, 8, 32), dtype=np.float16)
        with pytest.raises(LayoutMismatchError, match=r"shape \(2, 2, 4, 8, 32\)"):
            store.put_blocks(nid, keys, [wrong_shape, good[1]])
        with pytest.raises(InvalidArgumentError, match="2 keys but 1 payloads"):
            store.put_blocks(nid, keys, good[:1])
        with pytest.raises(UnknownNamespaceError, match="not registered"):
            store.put_blocks(f.namespace("other").namespace_id, keys, good)
        with pytest.raises(InvalidArgumentError, match="16 bytes"):
            store.put_blocks(nid, [b"short", keys[1]], good)
        with pytest.raises(InvalidArgumentError, match="repeat"):
            store.put_blocks(nid, [keys[0], keys[0]], good)
        assert snapshot(store) == before
        assert store.lookup(nid, keys).num_hits == 0
        typed = np.frombuffer(good[0].tobytes(), dtype=np.float16).reshape(ns.block_shape)
        assert store.put_blocks(nid, keys[:1], [typed]).num_written == 1


def test_release_of_an_unknown_or_expired_lease_is_refused(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 2)
        store.put_blocks(nid, keys, f.payloads(ns, 2))
        with pytest.raises(UnknownLeaseError, match="never issued"):
            store.manager.release(12345)
        lease = store.manager.acquire(nid, keys)
        clock.advance(10.0)
        with pytest.raises(UnknownLeaseError, match="expired"):
            store.manager.release(lease.lease_id)
        other = store.manager.acquire(nid, keys)
        store.manager.release(other.lease_id)
        with pytest.raises(UnknownLeaseError, match="already released"):
            store.manager.release(other.lease_id)
        assert store.stats().num_leases == 0


def test_a_block_of_another_namespace_is_a_miss(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        other = store.register_namespace(f.namespace("other-model"))
        keys = f.chain(nid, 3)
        store.put_blocks(nid, keys, f.payloads(ns, 3))
        assert store.lookup(other, keys).num_hits == 0
        assert store.get_blocks(other, keys) == []
        with pytest.raises(NamespaceMismatchError):
            store.put_blocks(other, keys[:1], f.payloads(ns, 1))


def test_leased_and_pinned_blocks_are_never_evicted(ns, clock):
    with f.store(f.config(dram_blocks=16), clock) as store:  # DRAM only: eviction drops
        nid = store.register_namespace(ns)
        leased, pinned, rest = f.chain(nid, 4, seed=1), f.chain(nid, 4, seed=2), f.chain(nid, 8, seed=3)
        store.put_blocks(nid, leased, f.payloads(ns, 4))
        store.put_blocks(nid, pinned, f.payloads(ns, 4))
        store.put_blocks(nid, rest, f.payloads(ns, 8))
        lease = store.manager.acquire(nid, leased)
        assert store.pin(nid, pinned) == 4
        fresh = f.chain(nid, 8, seed=4)
        store.put_blocks(nid, fresh, f.payloads(ns, 8))  # the store is full: 8 must go
        assert store.lookup(nid, leased).num_hits == 4
        assert store.lookup(nid, pinned).num_hits == 4
        assert store.lookup(nid, rest).num_hits == 0
        assert store.lookup(nid, fresh).num_hits == 8
        before = snapshot(store)
        with pytest.raises(StoreFullError, match="dram tier is full"):
            store.put_blocks(nid, f.chain(nid, 9, seed=5), f.payloads(ns, 9))
        assert snapshot(store) == before  # evicted nothing: 8 evictable blocks cannot hold 9
        store.manager.release(lease.lease_id)


def test_eviction_takes_descendants_before_ancestors(ns, clock):
    with f.store(f.config(dram_blocks=8), clock) as store:
        nid = store.register_namespace(ns)
        old, new = f.chain(nid, 6, seed=1), f.chain(nid, 2, seed=2)
        store.put_blocks(nid, old[:3], f.payloads(ns, 3))
        store.put_blocks(nid, new, f.payloads(ns, 2))
        store.put_blocks(nid, old[3:], f.payloads(ns, 3), parent=old[2])  # newer than `new`
        # old[0..2] were written first but are ancestors of old[3..5]: leaf-first LRU takes
        # `new` (the oldest leaves), then old's tail from the leaf up.
        store.put_blocks(nid, f.chain(nid, 3, seed=3), f.payloads(ns, 3))
        assert store.lookup(nid, new).num_hits == 0
        assert store.lookup(nid, old).num_hits == 5


def test_eviction_demotes_to_nvme_and_a_hit_promotes_back(ns, clock, tmp_path):
    with f.store(f.config(tmp_path, dram_blocks=8), clock) as store:
        nid = store.register_namespace(ns)
        first, second = f.chain(nid, 8, seed=1), f.chain(nid, 8, seed=2)
        data = f.payloads(ns, 8, seed=1)
        store.put_blocks(nid, first, data)
        store.put_blocks(nid, second, f.payloads(ns, 8, seed=2))
        assert store.lookup(nid, first).tiers == (TierKind.NVME,) * 8
        assert store.stats().tier(TierKind.NVME).demotions_in == 8
        got = store.get_blocks(nid, first)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        assert store.lookup(nid, first).tiers == (TierKind.DRAM,) * 8
        stats = store.stats()
        assert stats.tier(TierKind.DRAM).promotions_in == 8
        assert stats.tier(TierKind.NVME).num_blocks == 16  # clean copies stay; `second` was demoted
        assert stats.num_blocks == 16


def test_high_watermark_evicts_down_to_the_low_one(ns, clock):
    with f.store(f.config(dram_blocks=64, high=0.5, low=0.25), clock) as store:
        nid = store.register_namespace(ns)
        store.put_blocks(nid, f.chain(nid, 32), f.payloads(ns, 32))
        assert store.stats().tier(TierKind.DRAM).num_blocks == 32  # at 50%: not past it
        store.put_blocks(nid, f.chain(nid, 1, seed=9), f.payloads(ns, 1))
        dram = store.stats().tier(TierKind.DRAM)
        assert dram.num_blocks == 16 and dram.evictions == 17


def test_a_flipped_byte_on_nvme_is_detected_counted_and_a_miss(ns, clock, tmp_path):
    with f.store(f.config(tmp_path, promote_on_hit=False), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 4), f.payloads(ns, 4)
        store.put_blocks(nid, keys, data, tier=TierKind.NVME)
        slot = store.manager.block_ref(keys[2]).slot
        flip_byte(tmp_path, slot + 100)
        dests = [np.zeros(ns.block_bytes, dtype=np.uint8) for _ in keys]
        assert store.get_into(nid, keys, dests) == 2
        assert np.array_equal(dests[1], data[1])
        assert not dests[2].any()  # the corrupt bytes were never handed out
        assert store.stats().tier(TierKind.NVME).checksum_failures == 1
        assert store.lookup(nid, keys).num_hits == 2  # the corrupt block is gone


def test_a_corrupt_block_found_during_promotion_ends_the_run(ns, clock, tmp_path):
    with f.store(f.config(tmp_path), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 3)
        store.put_blocks(nid, keys, f.payloads(ns, 3), tier=TierKind.NVME)
        slot = store.manager.block_ref(keys[1]).slot
        flip_byte(tmp_path, slot)
        lease = store.manager.acquire(nid, keys)
        assert [b.tier for b in lease.blocks] == [TierKind.DRAM]
        store.manager.release(lease.lease_id)
        assert store.stats().tier(TierKind.NVME).checksum_failures == 1
        assert store.lookup(nid, keys).num_hits == 1


def test_restart_serves_every_committed_nvme_block(ns, tmp_path):
    cfg = f.config(tmp_path, write_policy=WritePolicy.WRITE_THROUGH)
    with f.store(cfg) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 6), f.payloads(ns, 6)
        store.put_blocks(nid, keys, data)
        assert store.lookup(nid, keys).tiers == (TierKind.DRAM,) * 6
        uncommitted = store.manager.reserve(nid, f.chain(nid, 2, seed=7), tier=TierKind.NVME)
        assert len(uncommitted.slots) == 2
    with f.store(cfg) as store:
        assert store.lookup(nid, keys).tiers == (TierKind.NVME,) * 6
        got = store.get_blocks(nid, keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))
        assert store.stats().tier(TierKind.NVME).num_blocks == 6
        assert store.stats().tier(TierKind.NVME).used_bytes == 6 * ns.block_bytes


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_after_a_restart_the_reloaded_nvme_blocks_are_evictable(ns, tmp_path, policy):
    cfg = replace(
        f.config(tmp_path, dram_blocks=8, nvme_blocks=8, write_policy=WritePolicy.WRITE_THROUGH), eviction_policy=policy
    )
    with f.store(cfg) as store:
        nid = store.register_namespace(ns)
        old = f.chain(nid, 8, seed=1)
        store.put_blocks(nid, old, f.payloads(ns, 8))
    with f.store(cfg) as store:  # NVMe is full of blocks the policy only saw reloaded
        new = f.chain(nid, 8, seed=2)
        store.put_blocks(nid, new, f.payloads(ns, 8, seed=2))  # written through: room is made in NVMe
        assert store.lookup(nid, new).num_hits == 8
        assert store.stats().tier(TierKind.NVME).num_blocks == 8
        assert store.lookup(nid, old).num_hits == 0


def test_remove_skips_leased_blocks(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 4)
        store.put_blocks(nid, keys, f.payloads(ns, 4))
        lease = store.manager.acquire(nid, keys[:1])
        result = store.remove(nid, keys)
        assert (result.num_removed, result.num_busy) == (3, 1)
        assert store.lookup(nid, keys).num_hits == 1
        store.manager.release(lease.lease_id)
        assert store.remove(nid, keys).num_removed == 1
        assert store.stats().tier(TierKind.DRAM).used_bytes == 0


def test_hbm_evictions_demote_to_dram(ns, clock):
    with f.store(f.config(hbm_blocks=8, dram_blocks=16), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 12), f.payloads(ns, 12)
        store.put_blocks(nid, keys[:8], data[:8], tier=TierKind.HBM)
        store.put_blocks(nid, keys[8:], data[8:], parent=keys[7], tier=TierKind.HBM)
        # When the second batch reserved, keys[7] was the chain's leaf: the tail of what was
        # stored (keys[4..7]) went down to DRAM, leaf first.
        tiers = store.lookup(nid, keys).tiers
        assert tiers == (TierKind.HBM,) * 4 + (TierKind.DRAM,) * 4 + (TierKind.HBM,) * 4
        assert store.stats().tier(TierKind.DRAM).demotions_in == 4
        got = store.get_blocks(nid, keys)
        assert all(np.array_equal(a, b) for a, b in zip(got, data, strict=True))


def test_concurrent_writers_and_readers_keep_the_index_consistent(ns):
    with f.store(f.config(dram_blocks=128)) as store:
        nid = store.register_namespace(ns)
        chains = [f.chain(nid, 8, seed=s) for s in range(16)]
        data = {s: f.payloads(ns, 8, seed=s) for s in range(16)}
        errors: list[str] = []

        def work(worker: int) -> None:
            for round_ in range(20):
                s = (worker * 7 + round_) % 16
                store.put_blocks(nid, chains[s], data[s])
                got = store.get_blocks(nid, chains[s])
                for index, block in enumerate(got):
                    if not np.array_equal(block, data[s][index]):
                        errors.append(f"worker {worker} chain {s} block {index}")

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        stats = store.stats()
        assert stats.num_leases == 0 and stats.num_reservations == 0
        dram = stats.tier(TierKind.DRAM)
        assert dram.used_bytes == dram.num_blocks * ns.block_bytes
        present = sum(store.lookup(nid, c).num_hits for c in chains)
        assert present == dram.num_blocks == stats.num_blocks


def test_a_block_larger_than_a_slab_cannot_be_registered(clock):
    with f.store(f.config(), clock) as store:
        with pytest.raises(InvalidArgumentError, match="does not fit a slab"):
            store.register_namespace(f.namespace("huge", num_layers=32))
        assert store.stats().num_blocks == 0


def test_namespaces_are_remembered_across_restarts(ns, tmp_path):
    with f.store(f.config(tmp_path)) as store:
        nid = store.register_namespace(ns)
    with f.store(f.config(tmp_path)) as store:
        assert store.manager.namespace(nid) == ns


def test_destinations_are_checked_like_payloads_before_anything_is_read(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 2), f.payloads(ns, 2)
        store.put_blocks(nid, keys, data)
        good = [np.zeros(ns.block_bytes, dtype=np.uint8) for _ in keys]
        with pytest.raises(LayoutMismatchError, match="destination 1 has dtype float32"):
            store.get_into(nid, keys, [good[0], np.zeros(ns.block_shape, dtype=np.float32)])
        with pytest.raises(InvalidArgumentError, match="destination 0 is read-only"):
            store.get_into(nid, keys, [bytes(ns.block_bytes), good[1]])
        with pytest.raises(PayloadSizeError, match="destination 1 has 8 bytes"):
            store.get_into(nid, keys, [good[0], np.zeros(8, dtype=np.uint8)])
        assert not good[0].any()  # nothing was copied by the refused calls
        typed = [np.zeros(ns.block_shape, dtype=np.float16) for _ in keys]
        assert store.get_into(nid, keys, typed) == 2
        assert typed[1].tobytes() == data[1].tobytes()


def test_get_into_one_buffer_copies_runs_of_adjacent_slots(ns, clock, tmp_path):
    with f.store(f.config(tmp_path, hbm_blocks=8, dram_blocks=16, promote_on_hit=False), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 12), f.payloads(ns, 12)
        store.put_blocks(nid, keys[:4], data[:4], tier=TierKind.HBM)
        store.put_blocks(nid, keys[4:8], data[4:8], parent=keys[3])
        store.put_blocks(nid, keys[8:], data[8:], parent=keys[7], tier=TierKind.HBM)
        assert store.lookup(nid, keys).tiers == (TierKind.HBM,) * 4 + (TierKind.DRAM,) * 4 + (TierKind.HBM,) * 4
        typed = np.zeros((12, *ns.block_shape), dtype=np.float16)
        assert store.get_into_buffer(nid, keys, typed) == 12
        assert typed.tobytes() == b"".join(d.tobytes() for d in data)
        flat = bytearray(12 * ns.block_bytes)
        assert store.get_into_buffer(nid, keys, flat, verify=True) == 12
        assert bytes(flat) == typed.tobytes()
        assert store.get_into_buffer(nid, f.chain(nid, 3, seed=9), bytearray(3 * ns.block_bytes)) == 0
        store.manager.release(store.manager.acquire(nid, keys).lease_id)
        assert store.stats().num_leases == 0


def test_get_into_one_buffer_reads_nvme_blocks_verified(ns, clock, tmp_path):
    with f.store(f.config(tmp_path, promote_on_hit=False), clock) as store:
        nid = store.register_namespace(ns)
        keys, data = f.chain(nid, 3), f.payloads(ns, 3)
        store.put_blocks(nid, keys, data, tier=TierKind.NVME)
        slot = store.manager.block_ref(keys[1]).slot
        flip_byte(tmp_path, slot + 7)
        buffer = np.zeros(3 * ns.block_bytes, dtype=np.uint8)
        assert store.get_into_buffer(nid, keys, buffer) == 1
        assert buffer[: ns.block_bytes].tobytes() == data[0].tobytes()
        assert not buffer[ns.block_bytes : 2 * ns.block_bytes].any()
        assert store.stats().tier(TierKind.NVME).checksum_failures == 1


def test_get_into_one_buffer_refuses_a_wrong_buffer_before_reading(ns, clock):
    with f.store(f.config(), clock) as store:
        nid = store.register_namespace(ns)
        keys = f.chain(nid, 2)
        store.put_blocks(nid, keys, f.payloads(ns, 2))
        with pytest.raises(LayoutMismatchError, match=r"buffer has shape \(3, 2, 2, 4, 4, 64\)"):
            store.get_into_buffer(nid, keys, np.zeros((3, *ns.block_shape), dtype=np.float16))
        with pytest.raises(PayloadSizeError, match=f"buffer has 100 bytes, expected {2 * ns.block_bytes}"):
            store.get_into_buffer(nid, keys, bytearray(100))
        with pytest.raises(InvalidArgumentError, match="buffer is read-only"):
            store.get_into_buffer(nid, keys, bytes(2 * ns.block_bytes))
        assert store.stats().num_leases == 0
