"""ExpiringRegistry (kvstore/expiry.py): handles live until finished or due, in deadline order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import kvstore.expiry
from kvstore.expiry import ExpiringRegistry, Outcome


@dataclass(frozen=True, slots=True)
class Handle:
    handle: int
    name: str


def make_registry(deadlines: dict[str, float]) -> tuple[ExpiringRegistry[Handle], dict[str, Handle]]:
    """A registry holding one handle per name, added in the dict's order."""
    registry: ExpiringRegistry[Handle] = ExpiringRegistry()
    items = {
        name: registry.add(lambda handle, name=name: Handle(handle, name), deadline)
        for name, deadline in deadlines.items()
    }
    return registry, items


def names(items: list[Handle]) -> list[str]:
    return [item.name for item in items]


def test_handles_are_fresh_ascending_ids() -> None:
    registry, items = make_registry({"a": 5.0, "b": 1.0, "c": 3.0})
    assert [item.handle for item in items.values()] == [1, 2, 3]
    assert len(registry) == 3
    assert registry.get(2) == Handle(2, "b")
    assert registry.get(4) is None
    assert names(registry.items()) == ["a", "b", "c"]


def test_expired_pops_due_handles_in_deadline_order() -> None:
    registry, _ = make_registry({"late": 9.0, "first": 1.0, "middle": 4.0, "second": 2.0})
    assert registry.expired(0.5) == []
    assert names(registry.expired(4.0)) == ["first", "second", "middle"]  # a deadline equal to now is due
    assert len(registry) == 1
    assert registry.expired(8.999) == []
    assert names(registry.expired(100.0)) == ["late"]
    assert len(registry) == 0
    assert registry.expired(1000.0) == []


def test_equal_deadlines_expire_in_the_order_they_were_added() -> None:
    registry, _ = make_registry({"x": 2.0, "y": 2.0, "z": 2.0, "w": 1.0})
    assert names(registry.expired(2.0)) == ["w", "x", "y", "z"]


def test_expired_handles_remember_their_outcome() -> None:
    registry, items = make_registry({"a": 1.0, "b": 2.0})
    registry.expired(1.0)
    assert registry.get(items["a"].handle) is None
    assert registry.outcome(items["a"].handle) is Outcome.EXPIRED
    assert registry.outcome(items["b"].handle) is None  # still live: no outcome yet
    assert registry.get(items["b"].handle) == items["b"]


@pytest.mark.parametrize("outcome", list(Outcome))
def test_finish_removes_the_handle_and_remembers_how_it_ended(outcome: Outcome) -> None:
    registry, items = make_registry({"a": 1.0, "b": 2.0})
    assert registry.finish(items["a"].handle, outcome) == items["a"]
    assert registry.get(items["a"].handle) is None
    assert registry.outcome(items["a"].handle) is outcome
    assert len(registry) == 1
    assert names(registry.items()) == ["b"]


def test_a_finished_handle_does_not_expire_later() -> None:
    registry, items = make_registry({"a": 1.0, "b": 2.0, "c": 3.0})
    registry.finish(items["b"].handle, Outcome.COMMITTED)
    assert names(registry.expired(10.0)) == ["a", "c"]
    assert registry.outcome(items["b"].handle) is Outcome.COMMITTED  # not overwritten by EXPIRED
    assert registry.outcome(items["a"].handle) is Outcome.EXPIRED


def test_finishing_a_handle_that_is_not_live_raises_and_changes_nothing() -> None:
    registry, items = make_registry({"a": 1.0})
    registry.finish(items["a"].handle, Outcome.RELEASED)
    with pytest.raises(KeyError):
        registry.finish(items["a"].handle, Outcome.ABORTED)
    assert registry.outcome(items["a"].handle) is Outcome.RELEASED
    with pytest.raises(KeyError):
        registry.finish(99, Outcome.ABORTED)
    assert registry.outcome(99) is None


def test_handles_are_never_reused_after_finish_or_expiry() -> None:
    registry, items = make_registry({"a": 1.0, "b": 2.0})
    registry.finish(items["a"].handle, Outcome.ABORTED)
    registry.expired(5.0)
    later = registry.add(lambda handle: Handle(handle, "c"), 10.0)
    assert later == Handle(3, "c")


def test_only_the_most_recent_outcomes_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvstore.expiry, "_REMEMBERED_FINISHED", 2)
    registry, items = make_registry({"a": 1.0, "b": 2.0, "c": 3.0})
    registry.finish(items["b"].handle, Outcome.COMMITTED)
    registry.finish(items["a"].handle, Outcome.ABORTED)
    registry.expired(3.0)
    assert registry.outcome(items["b"].handle) is None  # the oldest outcome is forgotten
    assert registry.outcome(items["a"].handle) is Outcome.ABORTED
    assert registry.outcome(items["c"].handle) is Outcome.EXPIRED
