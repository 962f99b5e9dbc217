"""Time as a dependency: the store reads the clock only through a `Clock`, so tests control it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A monotonic clock in seconds. `now()` never goes backwards."""

    def now(self) -> float: ...


class MonotonicClock:
    """The real clock (`time.monotonic`)."""

    def now(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to; for tests and simulators. Not thread-safe."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = start_s

    def now(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards ({seconds} s)")
        self._now_s += seconds
