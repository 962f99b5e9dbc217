"""The hot-prefix plan: copy only prefixes reused often whose holders are all busy, to the
least busy node lacking them, once per cooldown."""

from __future__ import annotations

import math

from conductor.cluster import ClusterState
from conductor.costs import CostModel, DecodeModel, Link, PrefillModel, Profile
from conductor.replication import HotPrefixes, HotPrefixSettings, Replication
from conductor.types import Decision, NodeInfo, NodeLoad, PrefillScore, Role, RouteRequest
from kvstore.types import BlockKey, NamespaceId, TierKind

NS = NamespaceId(b"n" * 16)
PROFILE = Profile(
    "tiny",
    1000,
    PrefillModel(0.0, 0.001, 0.0),
    DecodeModel(0.01, 0.0, 0.0),
    10_000,
    (Link(math.inf), Link(math.inf), Link(math.inf)),
)
KEYS = tuple(BlockKey(i.to_bytes(16, "big")) for i in range(1, 5))


def cluster() -> ClusterState:
    state = ClusterState(CostModel({"default": PROFILE}, Link(1e9)))
    for name in ("a", "b", "c"):
        state.join(NodeInfo(name, Role.PREFILL))
    state.index.set_many("a", KEYS, (TierKind.DRAM,))
    return state


def reuse(hot: HotPrefixes, times: int, start_s: float, every_s: float) -> None:
    request = RouteRequest("r", NS, (*KEYS, BlockKey(b"x" * 16)), 500, 10, 100)
    score = PrefillScore("a", 1.0, 0.5, 0.1, 0.0, 0.0, 400, 400)
    for i in range(times):
        hot.observe(request, Decision("r", "p", score, None), start_s + i * every_s)


def test_a_hot_prefix_on_a_busy_holder_is_copied_to_the_least_busy_node_once() -> None:
    state = cluster()
    state.loads["a"] = NodeLoad(prefill_busy_until_s=100.0)  # busy
    state.loads["b"] = NodeLoad(prefill_busy_until_s=1000.0)  # busy too: not a target
    hot = HotPrefixes(HotPrefixSettings(half_life_s=60, min_rate_per_s=0.5, busy_s=2.0, cooldown_s=30))
    reuse(hot, 120, 0.0, 0.5)  # two reuses a second for a minute
    assert hot.plan(state, 60.0) == [Replication(NS, KEYS, "a", "c")]
    assert hot.plan(state, 61.0) == []  # cooling down
    assert hot.plan(state, 91.0) == [Replication(NS, KEYS, "a", "c")]


def test_nothing_is_copied_when_the_holder_is_free_or_the_prefix_is_cold() -> None:
    state = cluster()
    hot = HotPrefixes(HotPrefixSettings(half_life_s=60, min_rate_per_s=0.5, busy_s=2.0))
    reuse(hot, 120, 0.0, 0.5)
    assert hot.plan(state, 60.0) == []  # a's queue is empty
    state.loads["a"] = NodeLoad(prefill_busy_until_s=1000.0)
    cold = HotPrefixes(HotPrefixSettings(half_life_s=60, min_rate_per_s=0.5, busy_s=2.0))
    reuse(cold, 10, 0.0, 6.0)  # one reuse every 6 s
    assert cold.plan(state, 60.0) == []
    assert hot.plan(state, 60.0 + 600) == []  # ten half-lives later it is cold too


def test_no_copy_when_every_other_node_is_busy_too() -> None:
    state = cluster()
    for name in ("a", "b", "c"):
        state.loads[name] = NodeLoad(prefill_busy_until_s=100.0)
    hot = HotPrefixes()
    reuse(hot, 200, 0.0, 0.25)
    assert hot.plan(state, 50.0) == []


def test_no_copy_when_replication_is_off() -> None:
    state = cluster()
    state.loads["a"] = NodeLoad(prefill_busy_until_s=100.0)
    off = HotPrefixes(HotPrefixSettings(max_copies_per_round=0))
    on = HotPrefixes(HotPrefixSettings())
    for hot in (off, on):
        reuse(hot, 120, 0.0, 0.5)
    assert off.plan(state, 60.0) == []
    assert on.plan(state, 60.0) == [Replication(NS, KEYS, "a", "b")]  # b and c are idle: the first by name
