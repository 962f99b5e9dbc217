"""A decision's log line names where the request goes and every term of its prediction."""

from __future__ import annotations

from conductor.conductor import explain
from conductor.types import Decision, DecodeScore, PrefillScore


def test_an_accepted_decision_explains_its_breakdown() -> None:
    prefill = PrefillScore("a", 1.5, 0.25, 1.0, 0.125, 0.125, 48, 32, fetch_tokens=16, fetch_from="b")
    decision = Decision("r1", "kv-centric", prefill, DecodeScore("d", 0.02, 0.01, 1000))
    assert explain(decision) == (
        "request 'r1' -> prefill a (TTFT 1.5000 s = queue 0.2500 + load 0.1250 + fetch 0.1250 + prefill "
        "1.0000; 48 tokens reused, 32 local, 16 fetched from b), decode d (TBT 0.0200 s, 1000 KV tokens free after)"
    )


def test_a_rejection_explains_its_reason() -> None:
    decision = Decision("r2", "prefix-flow", None, None, "no live decode node")
    assert explain(decision) == "request 'r2' rejected by prefix-flow: no live decode node"
