"""A client's reports to its node go out in batches: at most one per EVERY_S from a busy
client, within QUIET_S from a quiet one, and everything on close."""

from __future__ import annotations

import time

from kvstore.client import reports
from kvstore.client.reports import NodeReports
from kvstore.types import BlockKey, NamespaceId

NAMESPACE = NamespaceId(b"n" * 16)


class Recorder:
    """Records what would have been sent to the node."""

    reports_reads = True

    def __init__(self) -> None:
        self.lookups: list[tuple[int, int, int]] = []
        self.reads: list[tuple[NamespaceId, list[BlockKey]]] = []

    def report_lookups(self, lookups: int, hit_blocks: int, miss_blocks: int) -> None:
        self.lookups.append((lookups, hit_blocks, miss_blocks))

    def read_done(self, namespace_id: NamespaceId, keys: list[BlockKey]) -> None:
        self.reads.append((namespace_id, list(keys)))


def _keys(count: int, start: int = 0) -> list[BlockKey]:
    return [BlockKey(i.to_bytes(16, "little")) for i in range(start, start + count)]


def test_a_busy_client_sends_one_batch_per_interval(monkeypatch):
    monkeypatch.setattr(reports, "QUIET_S", 60.0)  # only the calls themselves send here
    monkeypatch.setattr(reports, "EVERY_S", 0.3)
    control = Recorder()
    tally = NodeReports(control)  # type: ignore[arg-type]
    for start in range(0, 40, 4):
        tally.read(NAMESPACE, _keys(4, start))
        tally.lookup(3, 1)
    assert control.reads == [] and control.lookups == []  # all within the first interval
    time.sleep(reports.EVERY_S * 1.5)
    tally.lookup(2, 0)  # the next call after the interval sends everything owed
    assert control.reads == [(NAMESPACE, _keys(40))]
    assert control.lookups == [(11, 32, 10)]
    tally.close()


def test_a_quiet_client_still_sends_and_close_sends_the_rest(monkeypatch):
    monkeypatch.setattr(reports, "QUIET_S", 0.05)
    monkeypatch.setattr(reports, "MAX_KEYS_PER_REPORT", 3)
    control = Recorder()
    tally = NodeReports(control)  # type: ignore[arg-type]
    tally.read(NAMESPACE, _keys(5))
    deadline = time.monotonic() + 5
    while not control.reads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert control.reads == [(NAMESPACE, _keys(3)), (NAMESPACE, _keys(2, 3))]  # split at 3 keys
    tally.lookup(0, 7)
    tally.close()
    assert control.lookups == [(1, 0, 7)]
