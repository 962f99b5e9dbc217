"""A cache tier without payloads: the store's block table and a real policy over C slots.

The tier manager's eviction, admission and lookup, driven in the order it drives them
(kvstore/manager.py, kvstore/movement.py), with the payloads and the slab allocator left out: a
slot is a number. The policy benchmark (tools/bench/policy_sim.py) replays traces through one;
the conductor's simulator (conductor/simulate/) gives one to every simulated node, and learns
where blocks live through the table's residency listener, as the real node's index does.

Per request (`serve_keys`), as an engine using the store would see it:

1. lookup + acquire: the hit is the run of leading keys resident in the tier, up to the first
   miss (`BlockTable.leading_run`, the store's own lookup). The run is leased and `on_access`
   is called on it.
2. reserve: the request's blocks from the first miss on that are not resident need slots. When
   the tier is short, `victims` names blocks to evict (never leased ones, never an ancestor
   before its resident children); `on_evict` then `clear_resident` take them out. If the tier
   cannot make room for all, only the leading blocks that fit are stored.
3. commit: the new blocks get rows (parent = the previous key of the chain) and become
   resident; the policy sees `resize`, `on_access`, `on_insert` (it was `attach`ed to the table
   first). The lease is released.

Owner: one replay or one simulated node, single-threaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvstore.config import ALIGNMENT_BYTES
from kvstore.errors import InvalidArgumentError
from kvstore.policy.base import EvictionPolicy
from kvstore.table import BlockTable
from kvstore.types import BlockKey, Slot, TierKind

TIER = TierKind.DRAM
_NAMESPACE = 0


def block_key(hash_id: int) -> BlockKey:
    """The store key standing for a trace's hash id (16 bytes, as every key is)."""
    return BlockKey(hash_id.to_bytes(16, "big"))


class SimulatedTier:
    """One tier of `capacity_blocks` slots, a block table and a policy, used as the store uses
    them. Owner: one replay, single-threaded."""

    def __init__(self, policy: EvictionPolicy, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise InvalidArgumentError(f"a simulated tier needs at least one block, got {capacity_blocks}")
        self.policy = policy
        self.table = BlockTable()
        self.table.namespace_bytes.append(ALIGNMENT_BYTES)
        self._free_slots = list(range(capacity_blocks - 1, -1, -1))
        self.policy_ns = 0
        self._timed(policy.attach, self.table)
        self._timed(policy.resize, self.table.capacity)

    def serve(self, hash_ids: Sequence[int]) -> int:
        """Look up a request's chain, then store its missing blocks; returns the hit blocks."""
        return self.serve_keys([block_key(hash_id) for hash_id in hash_ids])

    def serve_keys(self, keys: Sequence[BlockKey]) -> int:
        """`serve` for a chain of keys."""
        table = self.table
        hit_rows, hit_index, _ = table.leading_run(keys, _NAMESPACE)
        table.leases[hit_index] += 1
        if hit_rows:
            self._timed(self.policy.on_access, hit_index)
        missing: list[tuple[BlockKey, BlockKey | None]] = []
        for position in range(len(hit_rows), len(keys)):
            row = table.ids.get(keys[position])
            if row is None or not table.is_resident(row):
                missing.append((keys[position], keys[position - 1] if position else None))
        room = self._make_room(len(missing))
        self._store(missing[:room])
        table.leases[hit_index] -= 1
        return len(hit_rows)

    def leading_run(self, keys: Sequence[BlockKey]) -> int:
        """How many leading `keys` are resident; no side effects."""
        return len(self.table.leading_run(keys, _NAMESPACE)[0])

    def touch(self, keys: Sequence[BlockKey]) -> int:
        """Read the resident leading run of `keys` (another node fetching it): the policy sees
        the access. Returns the run's length."""
        hit_rows, hit_index, _ = self.table.leading_run(keys, _NAMESPACE)
        if hit_rows:
            self._timed(self.policy.on_access, hit_index)
        return len(hit_rows)

    def _make_room(self, count: int) -> int:
        """Evict until `count` slots are free, or as many as can be; returns the free slots."""
        short = count - len(self._free_slots)
        if short <= 0:
            return count
        started = time.perf_counter_ns()
        victims: list[int] = []
        for row in self.policy.victims(TIER, self.table):
            victims.append(row)
            if len(victims) == short:
                break
        self.policy_ns += time.perf_counter_ns() - started
        if victims:
            self._timed(self.policy.on_evict, victims, TIER)
        for row in victims:
            slot = self.table.slot_of(row, TIER)
            assert slot is not None  # the policy yields resident rows only
            self._free_slots.append(slot // ALIGNMENT_BYTES)
            self.table.clear_resident(row, TIER)
        return min(count, len(self._free_slots))

    def _store(self, blocks: list[tuple[BlockKey, BlockKey | None]]) -> None:
        if not blocks:
            return
        table = self.table
        keys, parents = [key for key, _ in blocks], [parent for _, parent in blocks]
        rows = table.insert_many(keys, parents, _NAMESPACE, [0] * len(blocks))  # tombstones return, as in the manager
        free = self._free_slots
        table.set_resident_many(rows, TIER, [Slot(free.pop() * ALIGNMENT_BYTES) for _ in rows])
        self._timed(self.policy.resize, table.capacity)
        self._timed(self.policy.on_access, rows)
        self._timed(self.policy.on_insert, rows, TIER)

    def _timed(self, method: Callable[..., object], *args: object) -> None:
        started = time.perf_counter_ns()
        method(*args)
        self.policy_ns += time.perf_counter_ns() - started
