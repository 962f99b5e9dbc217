"""Placement policies and the router: scores, picks, rejections and bad input, on a small
cluster built from real objects (a ClusterState with a global index and loads)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conductor.cluster import INCOMING_SWEEP, ClusterState, Slo
from conductor.costs import CostModel, DecodeModel, Link, PrefillModel, Profile
from conductor.placement import make_placement
from conductor.placement.flow import PrefixFlow
from conductor.placement.kv_centric import KVCentric
from conductor.router import Router
from conductor.types import NodeInfo, NodeLoad, Role, RouteRequest
from kvstore.errors import ConfigError, InvalidArgumentError, UnknownNamespaceError
from kvstore.types import BlockKey, NamespaceId, TierKind

NS = NamespaceId(b"n" * 16)
BLOCK = 100
TINY = Profile(
    name="tiny",
    kv_bytes_per_token=1000,
    prefill=PrefillModel(0.0, 0.001, 0.0),  # 1 ms per computed token
    decode=DecodeModel(0.01, 0.001, 0.0),  # 10 ms + 1 ms per sequence
    kv_capacity_tokens=10_000,
    tier_loads=(Link(math.inf), Link(math.inf), Link(1e6)),  # NVMe: 1 MB/s
)


def cluster(prefill: int = 2, decode: int = 2, network: float = 1e7, slo: Slo | None = None) -> ClusterState:
    state = ClusterState(CostModel({"default": TINY}, Link(network)), slo)
    state.namespaces.add(NS)
    for i in range(prefill):
        state.join(NodeInfo(f"p{i}", Role.PREFILL))
    for i in range(decode):
        state.join(NodeInfo(f"d{i}", Role.DECODE))
    return state


def chain(n: int, start: int = 1) -> tuple[BlockKey, ...]:
    return tuple(BlockKey(i.to_bytes(16, "big")) for i in range(start, start + n))


def request(blocks: int = 10, output: int = 10, request_id: str = "r", start: int = 1) -> RouteRequest:
    return RouteRequest(request_id, NS, chain(blocks, start), blocks * BLOCK, output, BLOCK)


def test_kv_centric_reuses_a_holders_prefix_and_reports_the_breakdown() -> None:
    state = cluster()
    state.index.set_many("p1", chain(6), (TierKind.DRAM,))
    decision = Router(state, KVCentric()).route(request(), now_s=0.0)
    assert decision.accepted and decision.prefill is not None and decision.decode is not None
    assert decision.prefill.node_id == "p1"
    assert decision.prefill.local_tokens == 600
    assert decision.prefill.prefill_s == pytest.approx(0.4)  # 400 tokens left
    assert decision.candidates[0].node_id == "p0"


def test_kv_centric_fetches_when_faster_than_computing_and_not_otherwise() -> None:
    state = cluster(network=1e7)
    state.index.set_many("p1", chain(6), (TierKind.DRAM,))
    state.loads["p1"] = NodeLoad(prefill_busy_until_s=5.0)  # the holder is busy for 5 s
    fast = KVCentric().place(request(), state, 0.0)
    # p0: fetch 600 tokens (0.6 MB at 10 MB/s = 0.06 s) + compute 400 (0.4 s) beats computing 1,000.
    assert fast.prefill is not None and fast.prefill.node_id == "p0"
    assert (fast.prefill.fetch_from, fast.prefill.fetch_tokens) == ("p1", 600)
    assert fast.prefill.ttft_s == pytest.approx(0.46)
    slow = KVCentric().place(request(), cluster_with_holder(network=1e5), 0.0)
    # 6 s to fetch: computing all 1,000 tokens (1 s) is faster.
    assert slow.prefill is not None and slow.prefill.fetch_tokens == 0 and slow.prefill.ttft_s == pytest.approx(1.0)


def cluster_with_holder(network: float) -> ClusterState:
    state = cluster(network=network)
    state.index.set_many("p1", chain(6), (TierKind.DRAM,))
    state.loads["p1"] = NodeLoad(prefill_busy_until_s=5.0)
    return state


def test_prefix_flow_overlaps_the_fetch_with_the_queue() -> None:
    # p0 is busy 0.5 s and the prefix (on p1, busy 5 s) takes 0.3 s to fetch. Algorithm 1 adds
    # the two: 0.5 + 0.3 + 0.4 = 1.2 s (computing all 1,000 tokens after the queue: 1.5 s; p1:
    # 5.4 s). Prefix-flow knows the fetch runs during the wait: max(0.5, 0.3) + 0.4 = 0.9 s.
    state = cluster(network=2e6)
    state.index.set_many("p1", chain(6), (TierKind.DRAM,))
    state.loads["p1"] = NodeLoad(prefill_busy_until_s=5.0)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=0.5)
    serial = KVCentric().place(request(), state, 0.0)
    overlapped = PrefixFlow().place(request(), state, 0.0)
    assert serial.prefill is not None and overlapped.prefill is not None
    assert serial.prefill.ttft_s == pytest.approx(0.5 + 0.3 + 0.4)
    assert overlapped.prefill.ttft_s == pytest.approx(0.9)
    assert overlapped.prefill.fetch_from == "p1"
    # the serve order: arrival + 3 x the predicted prefill (0.4 s); Algorithm 1 keeps arrival order
    assert overlapped.priority_s == pytest.approx(0.0 + 3 * 0.4)
    assert serial.priority_s is None


def test_prefix_flow_sends_a_burst_sharing_a_new_prefix_to_one_node() -> None:
    state = cluster(prefill=4)
    router = Router(state, PrefixFlow())
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=0.5)  # the first lands on p1 (idle; ties by id)
    first = router.route(request(request_id="a"), now_s=0.0)
    # At 0.9 s the first still runs (until 1 s), so nothing is stored: the index is empty. The
    # second shares 9 of its 10 blocks: behind it on p1, 0.1 s wait + 0.1 s; elsewhere 1 s.
    second_request = RouteRequest("b", NS, chain(9) + chain(1, start=500), 1000, 10, BLOCK)
    blind = KVCentric().place(second_request, state, 0.9)
    second = router.route(second_request, now_s=0.9)
    assert first.prefill is not None and second.prefill is not None and blind.prefill is not None
    assert first.prefill.node_id == "p1"
    assert (second.prefill.node_id, second.prefill.local_tokens) == ("p1", 900)
    assert second.prefill.ttft_s == pytest.approx(0.2)
    assert blind.prefill.node_id == "p0" and blind.prefill.ttft_s == pytest.approx(1.0)  # idle since 0.5 s
    # The first is served at 0 + 3 x 1 s; the second, 0.1 s of prefill at 0.9 s, would come
    # first at 0.9 + 0.3 s, ahead of the request computing its prefix: it goes right after it.
    assert first.priority_s == pytest.approx(3.0)
    assert second.priority_s == pytest.approx(3.0)


def test_the_decode_node_has_room_and_the_least_predicted_tbt() -> None:
    state = cluster(decode=3)
    state.loads["d0"] = NodeLoad(running_decodes=5, decode_kv_tokens=1000)
    state.loads["d1"] = NodeLoad(running_decodes=1, decode_kv_tokens=9_500)  # too full for 1,010 tokens
    state.loads["d2"] = NodeLoad(running_decodes=2, decode_kv_tokens=2000)
    decision = KVCentric().place(request(), state, 0.0)
    assert decision.decode is not None and decision.decode.node_id == "d2"
    assert decision.decode.tbt_s == pytest.approx(0.01 + 0.003)
    assert decision.decode.free_kv_tokens == 10_000 - 2000 - 1010


def test_no_decode_room_and_broken_slos_are_rejected_with_their_reason() -> None:
    state = cluster(decode=1)
    state.loads["d0"] = NodeLoad(decode_kv_tokens=9_999)
    assert "no decode node has room" in KVCentric().place(request(), state, 0.0).rejected
    slow = cluster(slo=Slo(ttft_s=0.5))
    assert "TTFT 1.00 s exceeds the SLO of 0.5 s" in KVCentric().place(request(), slow, 0.0).rejected
    tight = cluster(slo=Slo(tbt_s=0.005))
    assert "TBT 11.0 ms exceeds the SLO of 5 ms" in KVCentric().place(request(), tight, 0.0).rejected


def test_the_router_charges_accepted_placements_and_nothing_else() -> None:
    state = cluster(slo=Slo(ttft_s=0.5))
    before = {node: dataclasses.replace(load) for node, load in state.loads.items()}
    rejected = Router(state, KVCentric()).route(request(), now_s=0.0)
    assert not rejected.accepted
    assert state.loads == before
    accepted_state = cluster()
    decision = Router(accepted_state, KVCentric()).route(request(), now_s=2.0)
    assert decision.prefill is not None and decision.decode is not None
    assert accepted_state.loads[decision.prefill.node_id].prefill_busy_until_s == pytest.approx(3.0)
    assert accepted_state.loads[decision.decode.node_id].decode_kv_tokens == 1010


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (RouteRequest("x", NS, (), 0, 10, BLOCK), "empty prompt"),
        (RouteRequest("x", NS, chain(2), 1000, 10, BLOCK), "2 block keys for a 1000-token prompt"),
        (RouteRequest("x", NS, (BlockKey(b"short"),), 100, 10, BLOCK), "key 0 has 5 bytes"),
        (RouteRequest("x", NS, chain(1), 100, -1, BLOCK), "max_output_tokens"),
        (RouteRequest("x", NS, chain(1), 100, 1, 0), "block_tokens"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(bad: RouteRequest, message: str) -> None:
    state = cluster()
    loads = {node: (load.prefill_busy_until_s, load.decode_kv_tokens) for node, load in state.loads.items()}
    with pytest.raises(InvalidArgumentError, match=message):
        Router(state, KVCentric()).route(bad, 0.0)
    assert {node: (load.prefill_busy_until_s, load.decode_kv_tokens) for node, load in state.loads.items()} == loads


def test_unknown_namespace_and_missing_roles() -> None:
    state = cluster()
    with pytest.raises(UnknownNamespaceError, match="not registered"):
        Router(state, KVCentric()).route(RouteRequest("x", NamespaceId(b"z" * 16), chain(1), 100, 1, BLOCK), 0.0)
    no_decode = cluster(decode=0)
    assert Router(no_decode, KVCentric()).route(request(), 0.0).rejected == "no live decode node"
    no_prefill = cluster(prefill=0)
    assert Router(no_prefill, KVCentric()).route(request(), 0.0).rejected == "no live prefill node"


def test_baselines_pick_as_their_names_say() -> None:
    state = cluster(prefill=3)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=3.0)
    state.loads["p1"] = NodeLoad(prefill_busy_until_s=1.0)
    state.loads["p2"] = NodeLoad(prefill_busy_until_s=1.5)
    state.index.set_many("p2", chain(10), (TierKind.DRAM,))
    picks = lambda name: make_placement(name, seed=3).place(request(), state, 0.0)  # noqa: E731
    assert picks("least-loaded").prefill.node_id == "p1"  # type: ignore[union-attr]
    assert picks("cache-aware").prefill.node_id == "p2"  # type: ignore[union-attr]  # 1.5 s + 1 token < 1 s + 1,000
    robin = make_placement("round-robin")
    assert [robin.place(request(), state, 0.0).prefill.node_id for _ in range(4)] == ["p0", "p1", "p2", "p0"]  # type: ignore[union-attr]
    one, two = make_placement("random", seed=5), make_placement("random", seed=5)
    first = [one.place(request(), state, 0.0).prefill.node_id for _ in range(20)]  # type: ignore[union-attr]
    again = [two.place(request(), state, 0.0).prefill.node_id for _ in range(20)]  # type: ignore[union-attr]
    assert first == again and len(set(first)) == 3


def test_unknown_placement_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown placement policy 'best'.*kv-centric"):
        make_placement("best")


def test_prefix_flow_sheds_long_prompts_only_when_overloaded() -> None:
    policy = PrefixFlow()
    state = cluster(prefill=1, slo=Slo(ttft_s=30.0))
    # Learn what a usual prefill takes: 64 placements of 1 block (0.1 s) on an idle node.
    for number in range(64):
        assert policy.place(request(blocks=1, request_id=str(number), start=1000 + number), state, 0.0).accepted
    long_request = request(blocks=20, request_id="long", start=5000)  # 2 s of prefill
    assert policy.place(long_request, state, 0.0).accepted  # idle: never shed
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=16.0)  # past half the SLO
    shed = policy.place(request(blocks=20, request_id="long-2", start=7000), state, 0.0)
    assert not shed.accepted and shed.rejected.startswith("overloaded: the queue is 16.0 s")
    short = policy.place(request(blocks=1, request_id="short", start=6000), state, 0.0)
    assert short.accepted  # as short as the usual ones: admitted behind the queue


def test_reservations_on_a_node_that_does_not_report_end_when_predicted() -> None:
    state = cluster(decode=1)
    router = Router(state, KVCentric())
    first = router.route(request(request_id="a"), now_s=0.0)
    assert first.decode is not None and state.loads["d0"].decode_kv_tokens == 1010
    # Predicted done: TTFT 1 s + hand-off 0.1 s + 10 tokens x 11 ms = 1.21 s.
    router.route(request(request_id="b", start=100), now_s=1.0)
    assert state.loads["d0"].decode_kv_tokens == 2020  # the first is still decoding
    router.route(request(request_id="c", start=200), now_s=5.0)
    assert (state.loads["d0"].decode_kv_tokens, state.loads["d0"].running_decodes) == (1010, 1)
    # Once a node reports, its reports are the truth: nothing more is released on its behalf.
    state.report_load("d0", NodeLoad(running_decodes=3, decode_kv_tokens=3000))
    router.route(request(request_id="d", start=300), now_s=100.0)
    assert state.loads["d0"].decode_kv_tokens == 4010
    # A node that stops reporting goes back to the conductor's account, from nothing: its last
    # report is stale, and what is placed from then on is released when predicted done.
    state.stop_reporting("d0")
    assert state.loads["d0"] == NodeLoad() and not state.is_reporting("d0")
    router.route(request(request_id="e", start=400), now_s=200.0)
    assert state.loads["d0"].decode_kv_tokens == 1010
    state.expire(300.0)
    assert (state.loads["d0"].decode_kv_tokens, state.loads["d0"].running_decodes) == (0, 0)


def test_prefix_flow_orders_a_request_with_little_slack_early() -> None:
    # TTFT SLO 10 s; both nodes busy 6 s; the prefill takes 1 s. Shortest-first alone would
    # order it at 3 x 1 s; what the SLO leaves it (10 - 6 - 1 = 3 s) caps that at 0.6 x 3 s.
    state = cluster(slo=Slo(ttft_s=10.0, tbt_s=1.0))
    for node in ("p0", "p1"):
        state.loads[node] = NodeLoad(prefill_busy_until_s=6.0)
    decision = PrefixFlow().place(request(), state, 0.0)
    assert decision.accepted and decision.prefill is not None
    assert decision.prefill.queue_s == pytest.approx(6.0)
    assert decision.priority_s == pytest.approx(0.6 * 3.0)


def test_prefix_flow_prefills_on_a_decode_node_only_within_its_pause_budget() -> None:
    state = cluster(prefill=1, decode=2)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=5.0)  # 5 s of queue
    req = request(blocks=10, output=10)  # 1 s to compute
    # Decode nodes that report no pause budget (the default) never prefill.
    decision = Router(state, PrefixFlow()).route(req, now_s=0.0)
    assert decision.prefill is not None and decision.prefill.node_id == "p0"
    assert decision.prefill.ttft_s == pytest.approx(6.0)
    # d1 can pause 1.5 s: the prefill runs there, and so does the decode (no transfer).
    state = cluster(prefill=1, decode=2)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=5.0)
    state.loads["d1"] = NodeLoad(decode_pause_budget_s=1.5)
    decision = Router(state, PrefixFlow()).route(req, now_s=0.0)
    assert decision.accepted and decision.prefill is not None and decision.decode is not None
    assert (decision.prefill.node_id, decision.decode.node_id) == ("d1", "d1")
    assert decision.prefill.ttft_s == pytest.approx(1.0)
    assert decision.decode.transfer_s == 0.0
    assert decision.candidates[0].node_id == "p0"  # the best prefill node stays in the breakdown
    assert state.loads["d1"].prefill_busy_until_s == pytest.approx(1.0)  # charged to d1
    # A second one would make the batch wait 2 s, past its 1.5 s budget: back to p0.
    second = Router(state, PrefixFlow()).route(request(blocks=10, output=10, request_id="r2", start=50), 0.0)
    assert second.prefill is not None and second.prefill.node_id == "p0"
    # Algorithm 1 never prefills on a decode node.
    state = cluster(prefill=1, decode=2)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=5.0)
    state.loads["d1"] = NodeLoad(decode_pause_budget_s=100.0)
    decision = Router(state, KVCentric()).route(req, now_s=0.0)
    assert decision.prefill is not None and decision.prefill.node_id == "p0"


def test_a_sequence_on_its_way_to_a_decode_node_limits_how_long_its_batch_may_pause() -> None:
    # The engine's budget covers the sequences it holds; the conductor adds those it sent there
    # that have not joined yet, each tolerating (SLO 0.1 - its predicted TBT) x its output tokens.
    state = cluster(prefill=1, decode=1)
    state.loads["p0"] = NodeLoad(prefill_busy_until_s=5.0)
    state.loads["d0"] = NodeLoad(decode_pause_budget_s=100.0)
    router = Router(state, PrefixFlow())
    first = router.route(request(blocks=10, output=10, request_id="r1"), now_s=0.0)
    assert first.prefill is not None and first.prefill.node_id == "d0"  # joins d0's batch at 1 s
    assert state.incoming_pause_s("d0", 0.0) == pytest.approx((0.1 - 0.011) * 10)
    # r2 would pause the batch 2 s (r1's prefill, then its own), and r1, joining at 1 s, can
    # wait 0.89 s: p0 computes it, and r2 (1,000 tokens out) heads for d0 too.
    second = router.route(request(blocks=10, output=1000, request_id="r2", start=100), now_s=0.0)
    assert second.prefill is not None and second.prefill.node_id == "p0"
    # Once r1 has joined, the engine's budget speaks for it; r2, still on its way, tolerates
    # (0.1 - 0.012) x 1000 = 88 s: r3 computes on d0.
    assert state.incoming_pause_s("d0", 1.5) == pytest.approx(88.0)
    third = router.route(request(blocks=10, output=10, request_id="r3", start=200), now_s=1.5)
    assert third.prefill is not None and third.prefill.node_id == "d0"
    assert state.incoming_pause_s("d0", 1.5) == pytest.approx((0.1 - 0.012) * 10)  # r3, joining at 2.5 s


def test_sequences_that_joined_stop_counting_and_do_not_pile_up() -> None:
    state = cluster(prefill=1, decode=1)
    router = Router(state, KVCentric())
    for index in range(300):  # each joins d0 (1 s of prefill on p0) long before the next comes
        output = 1000 if index % 2 else 10
        router.route(request(blocks=10, output=output, request_id=f"r{index}", start=100 * index), 10.0 * index)
    # only the last (1,000 tokens out) is on its way at 2,990.5 s; 299 others joined
    assert state.incoming_pause_s("d0", 2990.5) == pytest.approx((0.1 - 0.011) * 1000)
    assert len(state._incoming["d0"]) <= 2 * INCOMING_SWEEP  # swept as it grew (private: memory, not behaviour)
    assert state.incoming_pause_s("d0", 3000.0) == math.inf
