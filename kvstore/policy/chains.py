"""Helpers for queue-based policies that respect the prefix constraint: the order a committed
chain enters a queue, a block's counted parent, and which waiting parents a departure frees."""

from __future__ import annotations

from collections.abc import Container, Sequence

from kvstore.table import BlockTable
from kvstore.types import TierKind


def leaf_first(rows: Sequence[int], table: BlockTable) -> Sequence[int]:
    """`rows` in the order they enter a queue: a chain named root first is reversed (a heuristic
    on the first two rows; it only affects efficiency, never which rows may go)."""
    if len(rows) > 1 and table.parents[rows[1]] == table.keys[rows[0]]:
        return rows[::-1]
    return rows


def parent_row(table: BlockTable, row: int, tier: TierKind) -> int | None:
    """The row whose resident children in `tier` count `row`, if any."""
    parent = table.parents[row]
    if parent is None or not table.counted.item(row) & (1 << tier):
        return None
    return table.ids[parent]


def freed_parents(rows: Sequence[int], table: BlockTable, tier: TierKind, parked: Container[int]) -> list[int]:
    """Parked rows whose last resident children in `tier` are among `rows` (leaving it)."""
    leaving: dict[int, int] = {}
    for row in rows:
        parent = parent_row(table, row, tier)
        if parent is not None and parent in parked:
            leaving[parent] = leaving.get(parent, 0) + 1
    return [row for row, count in leaving.items() if table.children.item(row, tier) <= count]
