"""S3-FIFO, leaf-first: a baseline for the policy benchmark.

The algorithm (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023). Each
tier is one S3-FIFO cache (a block with copies in several tiers is queued in each):
- a small FIFO queue S, 10% of the tier, receives new blocks; a main FIFO queue M holds the rest;
- every block has a 2-bit access counter (0..3), raised by each access while it is cached;
- when S holds at least 10% of the tier, its oldest block is examined: accessed at least once
  while in S, it moves to M with its counter cleared; else it is evicted and its key enters the
  ghost queue G;
- otherwise M's oldest block is examined: with a non-zero counter it goes back to M's tail with
  the counter decremented (a 2-bit CLOCK), else it is evicted;
- G is a FIFO of the keys of blocks evicted from S, as many as M holds (90% of the tier); a block
  inserted while its key is in G goes straight to M.
A policy is not told a tier's size: it is taken as the most blocks the tier has held, which is its
capacity once it has filled.

Adapted to the store:
- A commit or a promotion names a chain root first; its blocks enter the queue leaf first, so the
  chain leaves leaf first (a demotion names children first already and keeps its order).
- Rows are reused: state is kept per (row, incarnation), and ghosts remember keys, not rows.
- Prefix constraint. A block whose turn has come while it still has resident children in the
  tier is parked: taken out of its queue's order (it still counts in the queue's size) and put
  back at the head of that queue when its last resident child leaves (`on_evict` of the child,
  or the child's yield within one `victims` pass). It goes right after its children, as if left
  in place, and no pass looks at it meanwhile. A leased or pinned block whose turn has come is
  left in place for the pass (set aside and put back at the head).
- `victims` decides, `on_evict` commits: a pass takes the rows it yields out of the queues and
  puts them back at the head when it ends, so a caller that evicts fewer loses nothing; the
  moves from S to M and the CLOCK decrements a pass makes are the algorithm's own steps and stay.
  `on_evict` removes the rows, sending the keys of those from S to G.
- A copy dropped without `on_evict` is forgotten when its turn comes; a parked block whose
  children were dropped so is found when the queues run dry.
- `admit` admits every block.

Cost: O(1) amortised per access, insertion and victim (ordered dicts as queues: a block is
removed by row in O(1)); only leased or pinned blocks at a queue's head are looked at again by
every pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from kvstore.policy import chains
from kvstore.table import ABSENT, BlockTable
from kvstore.types import BlockKey, TierKind

_SMALL_SHARE = 0.1  # S's share of the tier
_MAX_FREQ = 3  # a 2-bit counter
_ABSENT = int(ABSENT)


class _Tier(chains.TwoQueues):
    """One tier's S3-FIFO cache: S (the first queue), M (the second), G and the counters."""

    def __init__(self, kind: TierKind) -> None:
        super().__init__(kind)
        self.ghost: OrderedDict[BlockKey, None] = OrderedDict()  # G, oldest first
        self.born: dict[int, int] = {}  # every row queued here -> the incarnation it was queued at
        self.freq: dict[int, int] = {}  # ... -> its access counter
        self.size = 0  # the tier's size in blocks: the most it has held

    def insert(self, rows: Sequence[int], table: BlockTable) -> None:
        for row in rows:
            incarnation = table.incarnation.item(row)
            if self.born.get(row) == incarnation:
                continue  # told twice
            self.forget(row)
            self.born[row] = incarnation
            self.freq[row] = 0
            key = table.keys[row]
            if key is not None and key in self.ghost:
                del self.ghost[key]
                self.second[row] = None
            else:
                self.first[row] = None
        self.size = max(self.size, len(self.born))

    def evict(self, rows: Sequence[int], table: BlockTable) -> None:
        for row in rows:
            key = table.keys[row]
            if self.forget(row) and key is not None:
                self.ghost[key] = None
                self.ghost.move_to_end(key)
        limit = self.size - int(_SMALL_SHARE * self.size)  # as many as M holds
        while len(self.ghost) > limit:
            self.ghost.popitem(last=False)
        self.children_left(rows, table)

    def forget(self, row: int) -> bool:
        """Take `row` out of the cache; True when it was in S."""
        if self.born.pop(row, None) is None:
            return False
        del self.freq[row]
        in_small = self.parked.get(row, row in self.first)
        self.remove(row, in_small)
        return in_small

    def victims(self, table: BlockTable) -> Iterator[int]:
        small, main, freq = self.first, self.second, self.freq
        slot, children = table.slot[:, self.kind], table.children[:, self.kind]
        leases, pinned = table.leases, table.pinned
        remaining: dict[int, int] = {}  # parent row -> resident children left after our picks
        popped: list[tuple[int, bool]] = []  # yielded or set aside, in order: back at the head at the end
        held_small = 0  # set aside from S: still in it
        swept = False
        try:
            while True:
                small_size = len(small) + self.parked_first + held_small
                from_small = bool(small) and (small_size >= _SMALL_SHARE * self.size or not main)
                queue = small if from_small else main
                if not queue:
                    if swept or not self.sweep(table, remaining, self.forget):
                        return
                    swept = True
                    continue
                row = queue.popitem(last=False)[0]
                if slot.item(row) == _ABSENT:  # dropped without on_evict
                    self.born.pop(row, None)
                    freq.pop(row, None)
                    continue
                count = freq[row]
                if count:  # accessed: S -> M with the counter cleared, or M's second chance
                    freq[row] = 0 if from_small else count - 1
                    main[row] = None
                    continue
                if leases.item(row) or pinned.item(row):
                    popped.append((row, from_small))
                    held_small += from_small
                    continue
                if remaining.get(row, children.item(row)) > 0:
                    self.park(row, from_small)
                    continue
                popped.append((row, from_small))
                yield row
                self.child_taken(row, table, remaining)
        finally:
            self.put_back(popped, self.born)


class S3FIFO(chains.PerTierPolicy[_Tier]):
    name = "s3-fifo"

    def _queues(self, kind: TierKind) -> _Tier:
        return _Tier(kind)

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None:
        if not len(rows) or not self._tiers:
            return
        row_list: Sequence[int] = rows.tolist() if isinstance(rows, np.ndarray) else rows
        for tier in self._tiers.values():
            freq = tier.freq
            for row in row_list:
                count = freq.get(row)
                if count is not None and count < _MAX_FREQ:
                    freq[row] = count + 1
