"""Helpers for queue-based policies that respect the prefix constraint: the order a committed
chain enters a queue, a block's counted parent, which waiting parents a departure frees, and the
plumbing of a policy with queues per tier."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from kvstore.table import ABSENT, BlockTable
from kvstore.types import TierKind

ABSENT_ROW = int(ABSENT)  # a slot column's value where the block has no copy


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


class TwoQueues:
    """The mechanism two-queue policies (S3-FIFO's S and M, ARC's T1 and T2) share: two queues
    of rows, oldest first, and the rows parked out of them. A row whose turn came while it still
    had resident children is parked: out of its queue's order (it still counts in the queue's
    size) until its last resident child leaves, then back at the head of its queue, as if it had
    stayed in place. A victim pass puts back, at the head, what it popped and the caller did not
    take away."""

    def __init__(self, kind: TierKind) -> None:
        self.kind = kind
        self.first: OrderedDict[int, None] = OrderedDict()  # parked rows are out
        self.second: OrderedDict[int, None] = OrderedDict()
        self.parked: dict[int, bool] = {}  # row -> parked from the first queue
        self.parked_first = 0

    def queue(self, in_first: bool) -> OrderedDict[int, None]:
        return self.first if in_first else self.second

    def remove(self, row: int, in_first: bool) -> None:
        """Take `row` out of its queue, or out of the parked rows."""
        parked = self.parked.pop(row, None)
        if parked is None:
            self.queue(in_first).pop(row, None)
        else:
            self.parked_first -= parked

    def park(self, row: int, in_first: bool) -> None:
        self.parked[row] = in_first
        self.parked_first += in_first

    def unpark(self, row: int) -> None:
        """Back at the head of its queue: its turn had come."""
        in_first = self.parked.pop(row)
        self.parked_first -= in_first
        queue = self.queue(in_first)
        queue[row] = None
        queue.move_to_end(row, last=False)

    def children_left(self, rows: Sequence[int], table: BlockTable) -> None:
        """`rows` left the tier: unpark the parents they were the last resident children of."""
        if self.parked:
            for row in freed_parents(rows, table, self.kind, self.parked):
                self.unpark(row)

    def child_taken(self, row: int, table: BlockTable, remaining: dict[int, int]) -> None:
        """A victim pass yielded `row`: count it off its parent's resident children
        (`remaining`), and unpark the parent when it was the last."""
        parent = parent_row(table, row, self.kind)
        if parent is not None:
            left = remaining.get(parent, table.children.item(parent, self.kind)) - 1
            remaining[parent] = left
            if left == 0 and parent in self.parked:
                self.unpark(parent)

    def put_back(self, popped: Sequence[tuple[int, bool]], listed: Container[int]) -> None:
        """End of a pass: rows it popped (yielded or set aside), still `listed` and not back in a
        queue, return to the head of theirs in the order they were popped."""
        for row, in_first in reversed(popped):
            queue = self.queue(in_first)
            if row in listed and row not in queue:
                queue[row] = None
                queue.move_to_end(row, last=False)

    def sweep(self, table: BlockTable, remaining: dict[int, int], forget: Callable[[int], object]) -> bool:
        """When the queues ran dry: unpark rows whose children left unseen (dropped without
        `on_evict`) and `forget` parked rows dropped so; True when some came back."""
        slot, children = table.slot[:, self.kind], table.children[:, self.kind]
        back = False
        for row in list(self.parked):
            if slot.item(row) == ABSENT_ROW:
                forget(row)
            elif remaining.get(row, children.item(row)) <= 0:
                self.unpark(row)
                back = True
        return back
