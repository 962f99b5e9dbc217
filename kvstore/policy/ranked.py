"""Victims of one tier by a rank held per row, leaves first: the scan leaf-first LRU (rank =
the last access's stamp) and prefix-lrfu (rank = the weight) share.

One vectorised pass over the table finds the candidates (resident, unleased, unpinned rows
with no resident child in the tier) and sorts them by rank, lowest first; a parent joins, by
its own rank, once the pass has named its last resident child. Nothing is kept between calls
(no queue per copy), so a victim the caller kept is simply found again next time. The pass is
O(n) in the tier's rows, plus a sort of the lowest few hundred candidates (of all of them only
if a caller wants more), and is amortised over the victims of one call (the tier manager
evicts in batches, from a high to a low watermark).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from kvstore.table import BlockTable
from kvstore.types import TierKind

FIRST_SORTED = 256  # candidates sorted before the first victim is named; the rest only if wanted


def evictable(table: BlockTable, tier: TierKind) -> npt.NDArray[np.bool_]:
    """Rows resident in `tier` that hold no lease and are not pinned."""
    mask: npt.NDArray[np.bool_] = table.resident_mask(tier) & (table.leases == 0) & ~table.pinned
    return mask


def leaves(table: BlockTable, tier: TierKind, free: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    """Rows of `free` (an `evictable` mask) with no resident child in `tier`."""
    return np.flatnonzero(free & (table.children[:, tier] == 0))


def by_rank(table: BlockTable, tier: TierKind, free: npt.NDArray[np.bool_], rank: npt.NDArray[Any]) -> Iterator[int]:
    """The rows of `free` (an `evictable` mask) by ascending `rank`, never a row before its
    resident children in `tier`; ties go to the lower row."""
    candidates = leaves(table, tier, free)
    ordered = _ascending(candidates, rank[candidates])
    upcoming = next(ordered, None)
    remaining: dict[int, int] = {}  # parent row -> resident children left after our picks
    newly_leaf: list[tuple[Any, int]] = []  # (rank, row): parents whose last child was named
    bit = 1 << tier
    while upcoming is not None or newly_leaf:
        if upcoming is None or (newly_leaf and newly_leaf[0][0] < rank.item(upcoming)):
            row = heapq.heappop(newly_leaf)[1]
        else:
            row, upcoming = upcoming, next(ordered, None)
        yield row
        parent = table.parents[row]
        if parent is None or not table.counted.item(row) & bit:
            continue
        parent_row = table.ids[parent]
        left = remaining.get(parent_row, int(table.children.item(parent_row, tier))) - 1
        remaining[parent_row] = left
        if left == 0 and free.item(parent_row):
            heapq.heappush(newly_leaf, (rank.item(parent_row), parent_row))


def _ascending(candidates: npt.NDArray[np.intp], ranks: npt.NDArray[Any]) -> Iterator[int]:
    """`candidates` (in row order) by ascending rank, ties by row, as one stable sort would
    give them; but only the lowest `FIRST_SORTED` (and their ties) are sorted up front, the
    rest when a caller wants more than those (most want a few dozen)."""
    if len(candidates) > FIRST_SORTED:
        threshold = np.partition(ranks, FIRST_SORTED - 1)[FIRST_SORTED - 1]
        head = ranks <= threshold
        yield from candidates[head][np.argsort(ranks[head], kind="stable")].tolist()
        rest = ~head
        candidates, ranks = candidates[rest], ranks[rest]
    yield from candidates[np.argsort(ranks, kind="stable")].tolist()
