"""Helpers for queue-based policies that respect the prefix constraint: the order a committed
chain enters a queue, a block's counted parent, which waiting parents a departure frees, and the
plumbing of a policy with queues per tier."""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

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


class TierQueues(Protocol):
    """One tier's queues in a queue-based policy."""

    def insert(self, rows: Sequence[int], table: BlockTable) -> None: ...

    def evict(self, rows: Sequence[int], table: BlockTable) -> None: ...

    def victims(self, table: BlockTable) -> Iterator[int]: ...


Queues = TypeVar("Queues", bound=TierQueues)


class PerTierPolicy(Generic[Queues]):
    """The `EvictionPolicy` plumbing of a policy that keeps one set of queues per tier (made on
    the tier's first insert): a subclass supplies `_queues(kind)` and `on_access`."""

    name: str

    def __init__(self) -> None:
        self._table: BlockTable | None = None
        self._tiers: dict[TierKind, Queues] = {}

    def _queues(self, kind: TierKind) -> Queues:
        raise NotImplementedError

    def attach(self, table: BlockTable) -> None:
        self._table = table

    def resize(self, num_rows: int) -> None:
        """State is kept in dicts per queued row: nothing to grow."""

    def on_insert(self, rows: Sequence[int], tier: TierKind) -> None:
        if rows:
            table = self._require_table()
            state = self._tiers.get(tier) or self._tiers.setdefault(tier, self._queues(tier))
            state.insert(leaf_first(rows, table), table)

    def on_evict(self, rows: Sequence[int], tier: TierKind) -> None:
        state = self._tiers.get(tier)
        if rows and state is not None:
            state.evict(rows, self._require_table())

    def admit(self, rows: Sequence[int], tier: TierKind) -> list[bool]:
        return [True] * len(rows)

    def victims(self, tier: TierKind, table: BlockTable) -> Iterator[int]:
        state = self._tiers.get(tier)
        if state is not None:
            yield from state.victims(table)

    def _require_table(self) -> BlockTable:
        if self._table is None:
            raise RuntimeError(f"{type(self).__name__} used before attach(table)")
        return self._table
