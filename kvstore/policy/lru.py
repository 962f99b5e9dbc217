"""Leaf-first LRU: the baseline eviction policy.

Least recently used first, but never a block before its resident descendants. Recency is a
stamp per row; a chain is stamped so that every ancestor is newer than its descendants
(a read of a prefix is a read of all its ancestors), so plain LRU order already puts leaves
first, and the leaf check only repairs the cases where it does not.

Victim selection is one vectorised pass over the table (candidates = resident unleased
unpinned leaves, sorted by stamp) merged with the parents that become leaves as their last
child is taken (ranked.py, shared with prefix-lrfu); the manager evicts in batches (high to
low watermark), so the pass is amortised over many victims.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from kvstore.policy import ranked
from kvstore.table import BlockTable
from kvstore.types import TierKind


class LeafFirstLRU:
    name = "leaf-first-lru"

    def __init__(self) -> None:
        self._stamp = np.zeros(0, dtype=np.uint64)
        self._tick = 1

    def attach(self, table: BlockTable) -> None:
        """Nothing to keep: `victims` is handed the table."""

    def resize(self, num_rows: int) -> None:
        if num_rows > len(self._stamp):
            grown = np.zeros(num_rows, dtype=np.uint64)
            grown[: len(self._stamp)] = self._stamp
            self._stamp = grown

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None:
        count = len(rows)
        if count:
            self._stamp[rows] = np.arange(self._tick + count, self._tick, -1, dtype=np.uint64)
            self._tick += count + 1

    def on_insert(self, rows: Sequence[int], tier: TierKind) -> None:
        """Moving between tiers is not an access: recency stays."""

    def on_evict(self, rows: Sequence[int], tier: TierKind) -> None:
        """Nothing to forget: a row that is reused is stamped again by its first access."""

    def admit(self, rows: Sequence[int], tier: TierKind) -> list[bool]:
        return [True] * len(rows)

    def victims(self, tier: TierKind, table: BlockTable) -> Iterator[int]:
        return ranked.by_rank(table, tier, ranked.evictable(table, tier), self._stamp)
