"""What a same-host client tells its node without waiting for an answer, in batches.

A client that answers Lookups from the node's shared index, or copies blocks out of DRAM
without a lease, leaves the node unaware: its statistics would miss the Lookups, and its
policy would miss the reads (recency). Telling it per call would cost a wake-up of the node per
call (~30 us on a busy host), about what the shared index saved. So the client keeps a tally
and sends it (LOOKUPS_DONE, READ_DONE; no reply) when a call finds the last batch older than
EVERY_S, and from a background thread when the client has gone quiet, within QUIET_S.

Owner: the Client. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kvstore.client.control import SlotControl
from kvstore.types import BlockKey, NamespaceId

EVERY_S = 0.01  # a batch at most this often from a busy client
QUIET_S = 0.05  # what a quiet client still owes is sent within this
MAX_KEYS_PER_REPORT = 4096


class NodeReports:
    def __init__(self, control: SlotControl) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._lookups = [0, 0, 0]  # calls, hit blocks, missed blocks
        self._reads: dict[NamespaceId, list[BlockKey]] = {}
        self._sent_at = time.monotonic()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def lookup(self, hits: int, misses: int) -> None:
        with self._lock:
            counts = self._lookups
            counts[0] += 1
            counts[1] += hits
            counts[2] += misses
        self._after_update()

    def read(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> None:
        with self._lock:
            self._reads.setdefault(namespace_id, []).extend(keys)
        self._after_update()

    def send(self) -> None:
        """Send everything owed now."""
        with self._lock:
            lookups, self._lookups = self._lookups, [0, 0, 0]
            reads, self._reads = self._reads, {}
            self._sent_at = time.monotonic()
        if lookups[0]:
            self._control.report_lookups(*lookups)
        for namespace_id, keys in reads.items():
            for start in range(0, len(keys), MAX_KEYS_PER_REPORT):
                self._control.read_done(namespace_id, keys[start : start + MAX_KEYS_PER_REPORT])

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.send()

    def _after_update(self) -> None:
        if time.monotonic() - self._sent_at >= EVERY_S:
            self.send()
        elif self._thread is None and not self._closed.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._send_when_quiet, name="kvstore-reports", daemon=True)
                    self._thread.start()

    def _send_when_quiet(self) -> None:
        while not self._closed.wait(QUIET_S):
            with self._lock:
                owed = self._lookups[0] or self._reads
                due = time.monotonic() - self._sent_at >= QUIET_S
            if owed and due:
                self.send()
