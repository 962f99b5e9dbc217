"""The global prefix index: which node holds which block, in which tiers (DESIGN.md 5).

Built from every node's `WatchEvents` (conductor/watch.py) or, in the simulator, from the
simulated nodes' residency changes; both call `set_tiers`. A node that leaves is dropped with
`drop_node`, at once: its slot stops counting in every query. Its bits are cleared later, by a
sweep the owner runs in chunks (`stale_mask`, `snapshot_keys`, `sweep`, `release`), so that a
node leaving a million-block index does not hold the caller's lock for the whole pass (~0.2 s);
until then its slot is not given to another node, and a write to an entry clears them there.

Layout, for speed: each node gets a slot number b, and each key one Python int whose bits
4b+t (t = TierKind) say node b holds a copy in tier t. Matching a request's chain against all
nodes is then one dictionary lookup and a few integer operations per key, whatever the number
of nodes: 1M keys and 64 nodes take ~150 MB and match a 64-block chain in tens of
microseconds.

Owner: one writer at a time (callers hold the cluster's lock); `match` is read-only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from conductor.types import PrefixHolding
from kvstore.types import BlockKey, TierKind

_BITS = 4  # bits per node: HBM, DRAM, NVMe, unused (keeps slots aligned for the masks below)
_TIER_BITS = 0b111


class GlobalIndex:
    def __init__(self) -> None:
        self._entries: dict[BlockKey, int] = {}
        self._slot_of: dict[str, int] = {}
        self._node_at: list[str | None] = []
        self._ones = 0  # bit 4b set for every live slot b
        self._stale = 0  # the tier bits of dropped slots not yet swept (those slots are not reused)
        self._blocks_per_node: dict[str, int] = {}

    # -- nodes -----------------------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        return list(self._slot_of)

    def __len__(self) -> int:
        """Entries, counting those only dropped nodes held until they are swept."""
        return len(self._entries)

    def blocks_of(self, node_id: str) -> int:
        return self._blocks_per_node.get(node_id, 0)

    def _slot(self, node_id: str) -> int:
        slot = self._slot_of.get(node_id)
        if slot is None:
            free = [
                at
                for at, node in enumerate(self._node_at)
                if node is None and not self._stale >> (_BITS * at) & _TIER_BITS
            ]
            slot = free[0] if free else len(self._node_at)
            if slot == len(self._node_at):
                self._node_at.append(node_id)
            else:
                self._node_at[slot] = node_id
            self._slot_of[node_id] = slot
            self._ones |= 1 << (_BITS * slot)
            self._blocks_per_node[node_id] = 0
        return slot

    def drop_node(self, node_id: str) -> int:
        """Forget every block `node_id` holds (it left, or is about to resync); returns how many.
        O(1): its bits are swept later (see the module's docstring)."""
        slot = self._slot_of.pop(node_id, None)
        if slot is None:
            return 0
        self._stale |= _TIER_BITS << (_BITS * slot)
        self._node_at[slot] = None
        self._ones &= ~(1 << (_BITS * slot))
        return self._blocks_per_node.pop(node_id)

    @property
    def stale_mask(self) -> int:
        """The bits of dropped nodes still to be swept (0: nothing to do)."""
        return self._stale

    def snapshot_keys(self) -> list[BlockKey]:
        """Every key now indexed, for a sweep to walk (entries added later are written after
        the drop, so carry no stale bits)."""
        return list(self._entries)

    def sweep(self, keys: Iterable[BlockKey], mask: int) -> None:
        """Clear `mask`'s bits from these entries, deleting those left empty."""
        entries = self._entries
        keep = ~mask
        for key in keys:
            bits = entries.get(key)
            if bits is not None and bits & mask:
                if bits & keep:
                    entries[key] = bits & keep
                else:
                    del entries[key]

    def release(self, mask: int) -> None:
        """After a sweep of a snapshot taken with `stale_mask == mask`: those slots are clean."""
        self._stale &= ~mask

    def sweep_all(self) -> None:
        """The whole sweep in one call (for owners with no lock to share: tests, the simulator)."""
        mask = self._stale
        if mask:
            self.sweep(self.snapshot_keys(), mask)
            self.release(mask)

    # -- updates ---------------------------------------------------------------------------------

    def set_tiers(self, node_id: str, key: BlockKey, tiers: Iterable[TierKind]) -> None:
        """`node_id` now holds `key` in `tiers` (none: it no longer holds it)."""
        slot = self._slot(node_id)
        shift = _BITS * slot
        mask = 0
        for tier in tiers:
            mask |= 1 << tier
        raw = self._entries.get(key, 0)
        old = raw & ~self._stale  # a dropped node's bits go as soon as the entry is written
        had = old >> shift & _TIER_BITS
        bits = (old & ~(_TIER_BITS << shift)) | (mask << shift)
        if bits:
            self._entries[key] = bits
        elif raw:
            del self._entries[key]
        self._blocks_per_node[node_id] += (mask != 0) - (had != 0)

    def set_many(self, node_id: str, keys: Sequence[BlockKey], tiers: Iterable[TierKind]) -> None:
        tiers = tuple(tiers)
        for key in keys:
            self.set_tiers(node_id, key, tiers)

    # -- queries ---------------------------------------------------------------------------------

    def holders(self, key: BlockKey) -> dict[str, tuple[TierKind, ...]]:
        """Every node holding `key`, with its tiers (fastest first)."""
        bits = self._entries.get(key, 0)
        found: dict[str, tuple[TierKind, ...]] = {}
        for node_id, slot in self._slot_of.items():
            mask = bits >> (_BITS * slot) & _TIER_BITS
            if mask:
                found[node_id] = tuple(tier for tier in TierKind if mask >> tier & 1)
        return found

    def match(self, keys: Sequence[BlockKey]) -> dict[str, PrefixHolding]:
        """Per node holding at least the first block: its leading run of `keys`, by fastest
        tier. Nodes holding none of the prefix are absent."""
        entries = self._entries
        ones = self._ones
        alive = ones  # slots whose run is still unbroken, one bit each (bit 4b)
        ends: dict[int, int] = {}  # slot -> run length
        depth = 0
        for depth, key in enumerate(keys):
            bits = entries.get(key, 0)
            present = (bits | bits >> 1 | bits >> 2) & ones
            stopped = alive & ~present
            if stopped:
                if depth:  # a run of length 0 is no holding
                    _record(stopped, depth, ends)
                alive &= present
                if not alive:
                    break
        else:
            depth = len(keys)
        if alive and depth:
            _record(alive, depth, ends)
        holdings: dict[str, PrefixHolding] = {}
        for slot, length in ends.items():
            node_id = self._node_at[slot]
            assert node_id is not None
            holdings[node_id] = PrefixHolding(node_id, length, self._by_tier(keys, length, slot))
        return holdings

    def _by_tier(self, keys: Sequence[BlockKey], length: int, slot: int) -> tuple[int, int, int]:
        shift = _BITS * slot
        counts = [0, 0, 0]
        entries = self._entries
        for key in keys[:length]:
            mask = entries[key] >> shift & _TIER_BITS
            counts[(mask & -mask).bit_length() - 1] += 1  # the fastest tier holding it
        return counts[0], counts[1], counts[2]


def _record(slots_mask: int, depth: int, ends: dict[int, int]) -> None:
    """Note run length `depth` for every slot whose bit is set in `slots_mask`."""
    while slots_mask:
        low = slots_mask & -slots_mask
        ends[(low.bit_length() - 1) // _BITS] = depth
        slots_mask ^= low
