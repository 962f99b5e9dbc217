"""Expiring handles: the registry behind reservations and read leases.

A handle (reservation or lease) lives until it is finished explicitly or its deadline passes.
`expired(now)` pops every handle whose deadline is due, so a client that dies holding one
leaks nothing. Finished ids are remembered (bounded) so that a second commit or release can
say *why* it is refused: already finished, or expired.

Owner: the tier manager, under its lock.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")

_REMEMBERED_FINISHED = 65536


class Outcome(StrEnum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    RELEASED = "released"
    EXPIRED = "expired"


class ExpiringRegistry(Generic[T]):
    def __init__(self) -> None:
        self._live: dict[int, tuple[T, float]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._finished: OrderedDict[int, Outcome] = OrderedDict()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._live)

    def add(self, make: Callable[[int], T], deadline_s: float) -> T:
        """Register `make(handle)` under a fresh handle until `deadline_s`."""
        handle = self._next_id
        self._next_id += 1
        item = make(handle)
        self._live[handle] = (item, deadline_s)
        heapq.heappush(self._deadlines, (deadline_s, handle))
        return item

    def get(self, handle: int) -> T | None:
        entry = self._live.get(handle)
        return None if entry is None else entry[0]

    def outcome(self, handle: int) -> Outcome | None:
        """How a handle that is no longer live ended, if still remembered."""
        return self._finished.get(handle)

    def finish(self, handle: int, outcome: Outcome) -> T:
        item, _ = self._live.pop(handle)
        self._remember(handle, outcome)
        return item

    def expired(self, now_s: float) -> list[T]:
        """Remove and return every live handle whose deadline is at or before `now_s`."""
        due: list[T] = []
        while self._deadlines and self._deadlines[0][0] <= now_s:
            _, handle = heapq.heappop(self._deadlines)
            entry = self._live.pop(handle, None)
            if entry is not None:
                due.append(entry[0])
                self._remember(handle, Outcome.EXPIRED)
        return due

    def items(self) -> list[T]:
        return [item for item, _ in self._live.values()]

    def _remember(self, handle: int, outcome: Outcome) -> None:
        self._finished[handle] = outcome
        if len(self._finished) > _REMEMBERED_FINISHED:
            self._finished.popitem(last=False)
