"""A node's account of its engines' loads (kvstore/node/engine_loads.py): the sum its heartbeats
carry, reports replaced and expired, and bad reports refused without a change."""

from __future__ import annotations

import math

import pytest

from kvstore.errors import InvalidArgumentError
from kvstore.node import engine_loads
from kvstore.node.engine_loads import EngineLoads
from kvstore.types import EngineLoad


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_node_load_sums_its_engines_and_takes_the_smallest_pause_budget() -> None:
    loads = EngineLoads(max_age_s=5.0, clock=Clock())
    assert loads.total() is None  # nobody reported: the heartbeat carries no load
    loads.report("prefill-0", EngineLoad(queued_prefill_tokens=4000))
    loads.report("decode-0", EngineLoad(running_decodes=3, decode_kv_tokens=900, decode_pause_budget_s=2.5))
    loads.report("decode-1", EngineLoad(running_decodes=1, decode_kv_tokens=100, decode_pause_budget_s=0.5))
    assert loads.total() == EngineLoad(4000, 4, 1000, 0.0)  # prefill-0 knows no budget: none for the node
    loads.report("prefill-0", EngineLoad(queued_prefill_tokens=10, decode_pause_budget_s=9.0))  # replaces
    assert loads.total() == EngineLoad(10, 4, 1000, 0.5)


def test_a_report_older_than_the_max_age_no_longer_counts() -> None:
    clock = Clock()
    loads = EngineLoads(max_age_s=5.0, clock=clock)
    loads.report("a", EngineLoad(queued_prefill_tokens=1))
    clock.now += 3.0
    loads.report("b", EngineLoad(queued_prefill_tokens=2))
    clock.now += 2.5  # a's report is 5.5 s old, b's 2.5 s
    assert loads.engines() == {"b": EngineLoad(queued_prefill_tokens=2)}
    clock.now += 3.0
    assert loads.total() is None


@pytest.mark.parametrize(
    ("engine_id", "load", "message"),
    [
        ("", EngineLoad(), "engine_id must be 1-128 printable characters"),
        ("x" * 129, EngineLoad(), "engine_id must be 1-128"),
        ("tab\there", EngineLoad(), "engine_id must be 1-128"),
        ("e", EngineLoad(queued_prefill_tokens=-1), "queued_prefill_tokens must be in"),
        ("e", EngineLoad(running_decodes=1 << 48), "running_decodes must be in"),
        ("e", EngineLoad(decode_kv_tokens=-5), "decode_kv_tokens must be in"),
        ("e", EngineLoad(decode_pause_budget_s=-1.0), "decode_pause_budget_s must be a finite number >= 0"),
        ("e", EngineLoad(decode_pause_budget_s=math.nan), "decode_pause_budget_s"),
        ("e", EngineLoad(decode_pause_budget_s=math.inf), "decode_pause_budget_s"),
    ],
)
def test_a_bad_report_is_refused_by_name_and_changes_nothing(engine_id: str, load: EngineLoad, message: str) -> None:
    loads = EngineLoads(max_age_s=5.0, clock=Clock())
    loads.report("e", EngineLoad(queued_prefill_tokens=7))
    with pytest.raises(InvalidArgumentError, match=message):
        loads.report(engine_id, load)
    assert loads.engines() == {"e": EngineLoad(queued_prefill_tokens=7)}


def test_engines_past_the_limit_are_refused_until_others_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_loads, "MAX_ENGINES", 2)
    clock = Clock()
    loads = EngineLoads(max_age_s=5.0, clock=clock)
    loads.report("a", EngineLoad())
    loads.report("b", EngineLoad())
    with pytest.raises(InvalidArgumentError, match="2 engines already report to this node"):
        loads.report("c", EngineLoad())
    loads.report("a", EngineLoad(running_decodes=1))  # one already known may report again
    clock.now += 6.0
    loads.report("c", EngineLoad())  # a and b expired
    assert set(loads.engines()) == {"c"}


def test_a_max_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_age_s must be positive"):
        EngineLoads(max_age_s=0.0)
