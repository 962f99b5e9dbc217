"""What the engines on a node report about their load, for the node's heartbeats to the conductor.

An engine (the process whose scheduler knows its queue and its batch) reports its load to its
node with `ReportLoad` every so often, under an id of its own choosing. The node keeps the
latest report of each engine, and its heartbeat carries their sum (DESIGN.md 5, Load):

- queued prefill tokens, running decode sequences and their KV tokens add up;
- the decode pause budget is the smallest reported (a prefill placed on a decode-only node
  pauses whichever batch computes it), so one engine that reports none (0: it does not know)
  keeps prefills off the node.

A report older than `max_age_s` (the node's membership ttl) is dropped: an engine that went
quiet, or away, no longer speaks for the node. With no report left, the heartbeat carries no
load, and the conductor goes back to its own account of what it placed there.

Owner: the node. Thread-safe: reports come from gRPC threads, reads from the conductor link.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from kvstore.errors import InvalidArgumentError
from kvstore.types import EngineLoad

MAX_ENGINE_ID = 128  # characters
MAX_ENGINES = 1024  # distinct engines reporting to one node at a time


def check_engine_id(engine_id: str) -> None:
    if not 0 < len(engine_id) <= MAX_ENGINE_ID or not engine_id.isprintable():
        raise InvalidArgumentError(f"engine_id must be 1-{MAX_ENGINE_ID} printable characters, got {engine_id!r}")


class EngineLoads:
    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[float, EngineLoad]] = {}  # engine id -> (when, its last report)

    def report(self, engine_id: str, load: EngineLoad) -> None:
        """Take an engine's report, replacing its previous one. A bad id or load raises
        InvalidArgumentError and changes nothing; so does a new engine past MAX_ENGINES."""
        check_engine_id(engine_id)
        load.check()
        now = self._clock()
        with self._lock:
            self._expire(now)
            if engine_id not in self._latest and len(self._latest) >= MAX_ENGINES:
                raise InvalidArgumentError(
                    f"{len(self._latest)} engines already report to this node (at most {MAX_ENGINES}); "
                    f"engine_id {engine_id!r} refused"
                )
            self._latest[engine_id] = (now, load)

    def engines(self) -> dict[str, EngineLoad]:
        """The engines whose reports are fresh, and what each said last."""
        with self._lock:
            self._expire(self._clock())
            return {engine_id: load for engine_id, (_, load) in self._latest.items()}

    def total(self) -> EngineLoad | None:
        """The node's load from the fresh reports (`total_of`); None when no engine reported
        within `max_age_s`."""
        return total_of(self.engines().values())

    def _expire(self, now: float) -> None:
        stale = [engine_id for engine_id, (when, _) in self._latest.items() if now - when > self._max_age_s]
        for engine_id in stale:
            del self._latest[engine_id]


def total_of(loads: Iterable[EngineLoad]) -> EngineLoad | None:
    """A node's load from its engines': the counts summed, the smallest pause budget; None for none."""
    loads = list(loads)
    if not loads:
        return None
    return EngineLoad(
        queued_prefill_tokens=sum(load.queued_prefill_tokens for load in loads),
        running_decodes=sum(load.running_decodes for load in loads),
        decode_kv_tokens=sum(load.decode_kv_tokens for load in loads),
        decode_pause_budget_s=min(load.decode_pause_budget_s for load in loads),
    )
