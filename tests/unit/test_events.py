"""The event ring: consecutive sequence numbers, reads from a point, and lag made explicit."""

from __future__ import annotations

import threading

import pytest

from kvstore.events import EventKind, EventLog, WatchLagError, tiers_of_mask
from kvstore.types import BlockKey, NamespaceId, TierKind

NS = NamespaceId(b"\0" * 16)


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def record(log: EventLog, count: int) -> None:
    for i in range(count):
        log.record(EventKind.STORED, NS, key(i), None, (TierKind.DRAM,))


def test_events_after_a_sequence_come_in_order():
    log = EventLog(capacity=8)
    record(log, 5)
    assert [e.sequence for e in log.after(2, timeout_s=0)] == [3, 4, 5]
    assert log.after(5, timeout_s=0) == []
    assert log.last_sequence == 5


def test_a_watcher_behind_the_ring_is_told_to_resync():
    log = EventLog(capacity=4)
    record(log, 10)
    assert [e.sequence for e in log.after(6, timeout_s=0)] == [7, 8, 9, 10]
    with pytest.raises(WatchLagError, match=r"events 6\.\.6 are no longer held"):
        log.after(5, timeout_s=0)


def test_a_waiting_watcher_wakes_on_the_next_event_and_on_close():
    log = EventLog()
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.extend(e.sequence for e in log.after(0, timeout_s=10)))
    waiter.start()
    record(log, 1)
    waiter.join(5)
    assert got == [1]
    closer = threading.Thread(target=lambda: got.extend(e.sequence for e in log.after(1, timeout_s=10)))
    closer.start()
    log.close()
    closer.join(5)
    assert not closer.is_alive() and got == [1]


def test_tier_masks_name_tiers_fastest_first():
    assert tiers_of_mask(0b110) == (TierKind.DRAM, TierKind.NVME)
    assert tiers_of_mask(0) == ()


def test_a_batch_is_numbered_in_order_after_what_came_before():
    log = EventLog(capacity=8)
    record(log, 2)
    log.record_many([(EventKind.STORED, NS, key(i), key(i - 1), (TierKind.NVME,)) for i in range(10, 13)])
    events = log.after(0, timeout_s=0)
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert [e.key for e in events[2:]] == [key(10), key(11), key(12)]
    assert events[3].parent == key(10)
