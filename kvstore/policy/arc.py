"""ARC, leaf-first: a baseline for the policy benchmark.

The algorithm (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003).
Each tier is one ARC cache of c blocks (a block with copies in several tiers is listed in each):
- T1 holds blocks seen once since they entered, T2 blocks seen at least twice, each in LRU order;
  a hit in either moves the block to T2's most recent end;
- B1 and B2 are ghost lists: the keys of blocks evicted from T1 and from T2, in LRU order;
- the target p for T1's size adapts: a block inserted while its key is in B1 (T1 was too small)
  raises p by max(|B2| / |B1|, 1), up to c; one whose key is in B2 lowers p by
  max(|B1| / |B2|, 1), down to 0; either enters T2, any other new block enters T1;
- REPLACE evicts T1's least recent block when |T1| > p, else T2's (into B1 or B2);
- the directory is bounded: |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c (the least
  recent ghosts go first, B1's for the first bound, B2's for the second).
A policy is not told a tier's size: c is the most blocks the tier has held, its capacity once it
has filled.

Adapted to the store:
- The store evicts (`victims`) before it inserts the missing blocks, and learns which they are
  only at `on_insert`: p adapts at the insertion, after the eviction it would have steered in the
  paper, and the tie rule of REPLACE (x in B2 and |T1| = p) is left out (x is not known yet).
- A chain is accessed and inserted leaf first (it is named root first), so an ancestor is more
  recent than its descendants, as in `LeafFirstLRU` (a demotion names children first already and
  keeps its order).
- Rows are reused: state is kept per (row, incarnation), and ghosts remember keys, not rows.
- Prefix constraint. A block whose turn has come while it still has resident children in the
  tier is parked: taken out of its list's order (it still counts in the list's size) and put back
  at the least recent end when its last resident child leaves (`on_evict` of the child, or the
  child's yield within one `victims` pass): it goes right after its children, as if left in
  place, and no pass looks at it meanwhile. A hit moves a parked block to T2 as any other. A
  leased or pinned block whose turn has come is left in place for the pass (set aside and put
  back).
- `victims` decides, `on_evict` commits: a pass takes the rows it yields out of the lists and puts
  them back when it ends, so a caller that evicts fewer loses nothing; `on_evict` removes them and
  enters their keys in B1 or B2.
- A copy dropped without `on_evict` is forgotten when its turn comes; a parked block whose
  children were dropped so is found when the lists run dry.
- `admit` admits every block.

Cost: O(1) amortised per access, insertion and victim (ordered dicts as LRU lists); only leased
or pinned blocks at a list's least recent end are looked at again by every pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from kvstore.policy import chains
from kvstore.table import ABSENT, BlockTable
from kvstore.types import BlockKey, TierKind

_ABSENT = int(ABSENT)


class _Tier(chains.TwoQueues):
    """One tier's ARC cache: T1 (the first queue), T2 (the second), B1, B2 and p."""

    def __init__(self, kind: TierKind) -> None:
        super().__init__(kind)
        self.b1: OrderedDict[BlockKey, None] = OrderedDict()  # least recent first
        self.b2: OrderedDict[BlockKey, None] = OrderedDict()
        self.born: dict[int, int] = {}  # every row listed here -> the incarnation it was listed at
        self.in_t1: dict[int, bool] = {}  # ... -> in T1 (else T2)
        self.p = 0.0  # target size of T1
        self.size = 0  # c: the most blocks the tier has held

    def access(self, rows: Sequence[int]) -> None:
        t2, in_t1 = self.second, self.in_t1
        for row in reversed(rows):  # leaf first: the root ends most recent
            first = in_t1.get(row)
            if first is None:
                continue
            if not first and row in t2:
                t2.move_to_end(row)
                continue
            self.remove(row, first)
            t2[row] = None
            in_t1[row] = False

    def insert(self, rows: Sequence[int], table: BlockTable) -> None:
        b1, b2 = self.b1, self.b2
        for row in rows:
            incarnation = table.incarnation.item(row)
            if self.born.get(row) == incarnation:
                continue  # told twice
            self.forget(row)
            self.born[row] = incarnation
            key = table.keys[row]
            if key is not None and key in b1:  # T1 was too small for it
                self.p = min(float(max(self.size, len(self.born))), self.p + max(len(b2) / len(b1), 1.0))
                del b1[key]
            elif key is not None and key in b2:  # T2 was too small for it
                self.p = max(0.0, self.p - max(len(b1) / len(b2), 1.0))
                del b2[key]
            else:
                self.first[row] = None
                self.in_t1[row] = True
                continue
            self.second[row] = None
            self.in_t1[row] = False
        self.size = max(self.size, len(self.born))
        self._bound_ghosts()

    def evict(self, rows: Sequence[int], table: BlockTable) -> None:
        for row in rows:
            in_t1 = self.forget(row)
            key = table.keys[row]
            if in_t1 is None or key is None:
                continue
            ghosts, other = (self.b1, self.b2) if in_t1 else (self.b2, self.b1)
            other.pop(key, None)
            ghosts[key] = None
            ghosts.move_to_end(key)
        self._bound_ghosts()
        self.children_left(rows, table)

    def forget(self, row: int) -> bool | None:
        """Take `row` out of the cache; whether it was in T1, or None when it was not listed."""
        if self.born.pop(row, None) is None:
            return None
        in_t1 = self.in_t1.pop(row)
        self.remove(row, in_t1)
        return in_t1

    def victims(self, table: BlockTable) -> Iterator[int]:
        t1, t2 = self.first, self.second
        slot, children = table.slot[:, self.kind], table.children[:, self.kind]
        leases, pinned = table.leases, table.pinned
        remaining: dict[int, int] = {}  # parent row -> resident children left after our picks
        popped: list[tuple[int, bool]] = []  # yielded or set aside, in order: put back at the end
        held_t1 = 0  # set aside from T1: still in it
        swept = False
        try:
            while True:
                from_t1 = bool(t1) and (len(t1) + self.parked_first + held_t1 > self.p or not t2)  # REPLACE
                queue = t1 if from_t1 else t2
                if not queue:
                    if swept or not self.sweep(table, remaining, self.forget):
                        return
                    swept = True
                    continue
                row = queue.popitem(last=False)[0]
                if slot.item(row) == _ABSENT:  # dropped without on_evict
                    self.born.pop(row, None)
                    self.in_t1.pop(row, None)
                    continue
                if leases.item(row) or pinned.item(row):
                    popped.append((row, from_t1))
                    held_t1 += from_t1
                    continue
                if remaining.get(row, children.item(row)) > 0:
                    self.park(row, from_t1)
                    continue
                popped.append((row, from_t1))
                yield row
                self.child_taken(row, table, remaining)
        finally:
            self.put_back(popped, self.born)

    def _bound_ghosts(self) -> None:
        """|T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c."""
        b1, b2, c = self.b1, self.b2, self.size
        t1_size = len(self.first) + self.parked_first
        while b1 and t1_size + len(b1) > c:
            b1.popitem(last=False)
        excess = len(self.born) + len(b1) + len(b2) - 2 * c
        for _ in range(max(0, excess)):
            (b2 if b2 else b1).popitem(last=False)


class ARC(chains.PerTierPolicy[_Tier]):
    name = "arc"

    def _queues(self, kind: TierKind) -> _Tier:
        return _Tier(kind)

    def target(self, tier: TierKind) -> float:
        """p: the size ARC currently aims at for T1 in `tier`, in blocks."""
        state = self._tiers.get(tier)
        return state.p if state is not None else 0.0

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None:
        if len(rows) and self._tiers:
            row_list: Sequence[int] = rows.tolist() if isinstance(rows, np.ndarray) else rows
            for tier in self._tiers.values():
                tier.access(row_list)
