"""Moving blocks between tiers: making room, demotion, promotion, dropping.

The mechanism half of eviction. The policy names victims (`EvictionPolicy.victims`); this
module plans how many it takes so that an allocation that cannot succeed evicts nothing, then
demotes them one tier down (HBM -> DRAM -> NVMe, write-back) or drops them, and copies NVMe
hits up to DRAM. Every copy between tiers is checked against the block's checksum; a block
whose bytes no longer match is dropped everywhere and counted, never served.

Owner: the tier manager, which calls every method under its lock (the copies run under it).
"""

from __future__ import annotations

import numpy as np

from kvstore.checksums import ChecksumBook
from kvstore.config import StoreConfig
from kvstore.errors import StoreFullError
from kvstore.policy.base import EvictionPolicy
from kvstore.stats import TierCounters
from kvstore.table import BlockTable
from kvstore.tiers.base import Tier
from kvstore.tiers.nvme import NvmeTier
from kvstore.tiers.nvme_index import NvmeRecord
from kvstore.types import BlockKey, Namespace, Slot, TierKind


class TierMover:
    def __init__(
        self,
        config: StoreConfig,
        tiers: dict[TierKind, Tier],
        *,
        checksums: ChecksumBook,
        table: BlockTable,
        policy: EvictionPolicy,
        counters: dict[TierKind, TierCounters],
        namespaces: list[Namespace],
    ) -> None:
        self._config = config
        self._tiers = tiers
        self._checksums = checksums
        self._table = table
        self._policy = policy
        self._counters = counters
        self._namespaces = namespaces  # shared with the manager, which appends to it
        nvme = tiers.get(TierKind.NVME)
        self._nvme = nvme if isinstance(nvme, NvmeTier) else None

    def allocate(self, tier: Tier, size_bytes: int, count: int) -> list[Slot]:
        """Slots, evicting the policy's victims when needed; all or nothing."""
        try:
            return tier.allocate(size_bytes, count)
        except StoreFullError:
            pass
        try:
            victims = self._plan_room(tier, size_bytes, count)
        except StoreFullError:
            unhashed = self._checksums.pending_in(tier.kind)
            if not unhashed:
                raise
            self._checksums.settle_now(unhashed)  # their hashing pins may be what blocks eviction
            victims = self._plan_room(tier, size_bytes, count)
        self._evict(tier.kind, victims)
        return tier.allocate(size_bytes, count)

    def _plan_room(self, tier: Tier, size_bytes: int, count: int) -> list[int]:
        """Victims whose eviction frees `count` slots of this size, or StoreFullError."""
        allocator = tier.allocator
        slot_bytes = allocator.slot_bytes(size_bytes)
        have = allocator.num_available(size_bytes)
        freed_in_slab: dict[int, int] = {}
        victims: list[int] = []
        if have >= count:
            return victims
        for row in self._policy.victims(tier.kind, self._table):
            victims.append(row)
            victim_slot = self._table.slot_of(row, tier.kind)
            assert victim_slot is not None  # victims are resident in the tier
            if allocator.slot_bytes(self._table.size_of(row)) == slot_bytes:
                have += 1
            else:
                slab = allocator.slab_of(victim_slot)
                freed_in_slab[slab] = freed_in_slab.get(slab, 0) + 1
                if freed_in_slab[slab] == allocator.slab_used(slab):
                    have += allocator.slots_per_slab(size_bytes)
            if have >= count:
                return victims
        raise StoreFullError(
            f"{tier.kind.label} tier is full: {count} blocks of {size_bytes} bytes requested, "
            f"{allocator.used_bytes} of {allocator.capacity_bytes} bytes in use and nothing more is evictable "
            "(leased, pinned or reserved)"
        )

    def enforce_watermark(self, kind: TierKind) -> None:
        tier = self._tiers[kind]
        allocator = tier.allocator
        if allocator.used_bytes <= self._config.high_watermark_fraction * allocator.capacity_bytes:
            return
        excess = allocator.used_bytes - self._config.low_watermark_fraction * allocator.capacity_bytes
        victims: list[int] = []
        for row in self._policy.victims(kind, self._table):
            victims.append(row)
            excess -= allocator.slot_bytes(self._table.size_of(row))
            if excess <= 0:
                break
        self._evict(kind, victims)

    def _evict(self, kind: TierKind, rows: list[int]) -> None:
        """Take `rows` out of tier `kind`: demote the dirty ones one tier down when the policy
        admits them there and room can be made, drop the rest."""
        if not rows:
            return
        self._counters[kind].evictions += len(rows)
        lower = [tier for tier in self._tiers if tier > kind]
        if lower:
            dirty = [row for row in rows if all(self._table.slot_of(row, t) is None for t in lower)]
            admitted = self._admitted(dirty, lower[0])
            if admitted:
                self.copy_down(admitted, kind, lower[0])
        if kind is TierKind.NVME and self._nvme is not None:
            self._nvme.remove_records([self._key(row) for row in rows])  # before the slots are reused
        self._release_copies(rows, kind)

    def _admitted(self, rows: list[int], target: TierKind) -> list[int]:
        """The rows that get a copy in `target`: all of them when it has free room (a copy that
        evicts nothing costs nothing), else those the policy admits."""
        if not rows:
            return rows
        allocator = self._tiers[target].allocator
        needed: dict[int, int] = {}
        for row in rows:
            size = self._table.size_of(row)
            needed[size] = needed.get(size, 0) + 1
        if all(allocator.num_available(size) >= count for size, count in needed.items()):
            return rows
        return [row for row, ok in zip(rows, self._policy.admit(rows, target), strict=True) if ok]

    def copy_down(self, rows: list[int], source: TierKind, target: TierKind) -> None:
        """Copy rows from `source` into `target` (best effort: rows that find no room stay
        where they are). A copy whose bytes no longer match the block's checksum is dropped."""
        by_size: dict[int, list[int]] = {}
        for row in rows:
            by_size.setdefault(self._table.size_of(row), []).append(row)
        for size, group in by_size.items():
            try:
                slots = self.allocate(self._tiers[target], size, len(group))
            except StoreFullError:
                continue
            matches = self._copy_rows(group, size, source, target, slots)
            good = [(row, slot) for row, slot, ok in zip(group, slots, matches, strict=True) if ok]
            bad = [(row, slot) for row, slot, ok in zip(group, slots, matches, strict=True) if not ok]
            if bad:
                self._tiers[target].free(size, [slot for _, slot in bad])
                self._counters[source].checksum_failures += len(bad)
            if target is TierKind.NVME and self._nvme is not None and good:
                self._nvme.commit_records([self._record(row, slot) for row, slot in good])
            self._table.set_resident_many([row for row, _ in good], target, [slot for _, slot in good])
            self._policy.on_insert([row for row, _ in good], target)
            self._counters[target].demotions_in += len(good)
            for row, _ in bad:
                self.drop_everywhere(row)

    def _copy_rows(
        self, rows: list[int], size: int, source: TierKind, target: TierKind, slots: list[Slot]
    ) -> list[bool]:
        """Move bytes between tiers; True per block whose bytes still match its checksum."""
        src, dst = self._tiers[source], self._tiers[target]
        self._checksums.settle_now(rows)
        expected = [int(self._table.checksum[row]) for row in rows]
        src_slots = [self._slot(row, source) for row in rows]
        dst_views = [dst.host_view(slot, size) for slot in slots]
        if all(view is not None for view in dst_views):
            return src.read_into(src_slots, size, [v for v in dst_views if v is not None], expected)
        src_views = [src.host_view(slot, size) for slot in src_slots]
        if any(view is None for view in src_views):  # neither side host-addressable: bounce
            bounce = [np.empty(size, dtype=np.uint8) for _ in rows]
            src.read_into(src_slots, size, bounce)
            written = dst.write(slots, size, bounce)
        else:
            written = dst.write(slots, size, [v for v in src_views if v is not None])
        return [got == want for got, want in zip(written, expected, strict=True)]

    def promote(self, rows: list[int], fastest: list[int]) -> list[int]:
        """Copy NVMe-only rows of a leased run (`fastest`: each row's fastest tier) up to DRAM;
        truncate the run at a corrupt block."""
        dram = self._tiers.get(TierKind.DRAM)
        if not self._config.promote_on_hit or dram is None or self._nvme is None:
            return rows
        table = self._table
        candidates = [row for row, tier in zip(rows, fastest, strict=True) if tier == TierKind.NVME]
        admitted = self._admitted(candidates, TierKind.DRAM)
        corrupt: set[int] = set()
        by_size: dict[int, list[int]] = {}
        for row in admitted:
            by_size.setdefault(table.size_of(row), []).append(row)
        for size, group in by_size.items():
            try:
                slots = self.allocate(dram, size, len(group))
            except StoreFullError:
                continue
            matches = self._copy_rows(group, size, TierKind.NVME, TierKind.DRAM, slots)
            for row, slot, ok in zip(group, slots, matches, strict=True):
                if not ok:
                    dram.free(size, [slot])
                    corrupt.add(row)
            promoted = [row for row, ok in zip(group, matches, strict=True) if ok]
            table.set_resident_many(
                promoted, TierKind.DRAM, [slot for slot, ok in zip(slots, matches, strict=True) if ok]
            )
            self._policy.on_insert(promoted, TierKind.DRAM)
            self._counters[TierKind.DRAM].promotions_in += len(promoted)
        if not corrupt:
            return rows
        cut = min(rows.index(row) for row in corrupt)
        table.leases[rows[cut:]] -= 1
        self._counters[TierKind.NVME].checksum_failures += len(corrupt)
        for row in corrupt:
            self.drop_everywhere(row)
        return rows[:cut]

    def drop_everywhere(self, row: int) -> None:
        for kind in reversed(list(self._tiers)):
            if self._table.slot_of(row, kind) is not None:
                if kind is TierKind.NVME and self._nvme is not None:
                    self._nvme.remove_records([self._key(row)])
                self._release_copies([row], kind)

    def _release_copies(self, rows: list[int], kind: TierKind) -> None:
        """Free the slots of `rows` in tier `kind` and forget those copies."""
        tier = self._tiers[kind]
        self._policy.on_evict(rows, kind)
        for row in rows:
            slot = self._table.slot_of(row, kind)
            if slot is None:
                continue
            size = self._table.size_of(row)
            self._table.clear_resident(row, kind)  # listeners (the shared index) forget it first,
            tier.free(size, [slot])  # then its slot may be reused

    def _slot(self, row: int, kind: TierKind) -> Slot:
        slot = self._table.slot_of(row, kind)
        assert slot is not None, f"row {row} has no copy in {kind.label}"  # callers pass resident rows
        return slot

    def _key(self, row: int) -> BlockKey:
        key = self._table.keys[row]
        assert key is not None, f"row {row} is free"  # callers pass rows of stored blocks only
        return key

    def _record(self, row: int, slot: Slot) -> NvmeRecord:
        namespace = self._namespaces[int(self._table.namespace[row])]
        return NvmeRecord(
            self._key(row),
            namespace.namespace_id,
            self._table.parents[row],
            slot,
            self._table.size_of(row),
            int(self._table.checksum[row]),
        )
