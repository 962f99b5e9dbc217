"""kvstore's own placement: Mooncake's Algorithm 1, predicting what actually happens, and
shedding the longest prompts first when the cluster is overloaded.

Measured in the simulator (docs/conductor.md), against Algorithm 1 in the same runs:

1. **A fetch overlaps the queue.** The conductor asks the target node to pull the missing
   prefix as soon as it places the request, so the transfer runs while the request waits its
   turn; what delays the prefill is the longer of the two, not their sum. Algorithm 1 adds
   them, and so turns down fetches that would cost nothing, computing tokens that another
   node already holds.
2. **Prefixes already on their way count.** A request placed on a node a moment ago has not
   stored its blocks yet, so the index does not show them; but the node computes them before
   anything queued behind it. This policy remembers, per node, the chains it placed there
   until the node has had time to store them, and credits a candidate with the longer of what
   it holds and what is queued there. Bursts of requests sharing a new prefix (a new document,
   a new system prompt) then go to one node and compute it once, instead of once per node.
3. **Short prefills go first.** Each decision carries a serve order for its prefill node
   (`Decision.priority_s`, an engine's request priority): the arrival time plus
   `SHORT_FIRST_WEIGHT` times the predicted prefill, but no more than `SLACK_SHARE` of the
   slack its TTFT SLO leaves after its predicted wait and prefill. A node serves its queue
   lowest first. Under FIFO each long prefill delays every short one behind it; here a prefill
   of p seconds is overtaken only by requests arriving within 3 x (p - theirs) after it, and a
   request short of slack is not overtaken for long. A request that counts on a prefix queued
   on its node is ordered after the request computing it. Algorithm 1 serves in arrival order.
4. **Overload is shed at the long end.** Algorithm 1 admits requests until their predicted
   TTFT reaches the SLO, so under overload every queue fills to nearly the SLO and every
   request waits that long. Once even the best node's queue is past `SHED_WAIT_FRACTION` of the
   TTFT SLO, this policy also rejects requests whose prefill would take longer than
   `SHED_QUANTILE` of the recent ones: each of those would hold a node as long as many short
   ones. Queues stay shorter for the rest; about as many requests are rejected in all, since
   Algorithm 1's SLO check rejects mostly long prompts too once queues are long.

5. **Idle decode GPUs compute prefills.** A decode server has the same GPUs as a prefill
   server, and its batch mostly waits on memory, well inside the TBT SLO. When every prefill
   node is busy, a decode-only node that can pause its batch long enough computes the prefill
   itself and then decodes it: no hand-off of the prompt's KV, and no wait. The node says how
   long its batch can pause with every running sequence still within the TBT SLO
   (`NodeLoad.decode_pause_budget_s`), and the conductor lowers that for the sequences it sent
   there that have not joined yet (`ClusterState.incoming_pause_s`); the prefills queued there
   plus this one must fit in it. A node that does not report it is never asked. Algorithm 1 prefills only on prefill
   nodes (conditional disaggregation of this kind is what NVIDIA Dynamo's router does for short
   prompts).

The rest is Algorithm 1's: the least predicted TTFT wins, the decode node is chosen by
predicted TBT among those with room, and predictions that break an SLO are rejected early.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from conductor.cluster import ClusterState
from conductor.placement.kv_centric import decide_within_slo
from conductor.placement.scoring import FetchTiming, best_holding, ranked, score_decode, score_prefill
from conductor.types import Decision, DecodeScore, PrefillScore, PrefixHolding, RouteRequest
from kvstore.types import BlockKey

PENDING_SLACK_S = 1.0  # a placed chain stays credited this long past its predicted completion
SHORT_FIRST_WEIGHT = 3.0  # serve order: arrival + this x the predicted prefill ...
SLACK_SHARE = 0.6  # ... but no later than arrival + this share of the TTFT SLO's slack
SHED_WAIT_FRACTION = 0.5  # overloaded: the chosen node's predicted wait exceeds this share of the TTFT SLO
SHED_QUANTILE = 0.95  # then shed prefills longer than this quantile of the recent ones ...
SHED_WINDOW = 2048  # ... the last this many placed
SHED_REFRESH = 64  # placements between recomputations of the quantile


class PrefixFlow:
    name = "prefix-flow"

    def __init__(self) -> None:
        # node -> key -> (when the credit ends, the serve order of the request computing it); and
        # the expiry order, to forget old credits cheaply.
        self._pending: dict[str, dict[BlockKey, tuple[float, float]]] = {}
        self._expiry: deque[tuple[float, str, tuple[BlockKey, ...]]] = deque()
        self._recent_prefill_s: deque[float] = deque(maxlen=SHED_WINDOW)
        self._long_prefill_s = math.inf
        self._placed = 0

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        self._forget(now_s, cluster)
        holdings = cluster.index.match(request.keys)
        best = best_holding(holdings)  # fetch only what is stored somewhere, not what is queued
        credited = self._with_pending(request, holdings)
        scores = ranked(
            score_prefill(request, info, cluster, now_s, holdings=credited, best=best, timing=FetchTiming.OVERLAPPED)
            for info in cluster.prefill_nodes
        )
        decision = decide_within_slo(self.name, request, cluster, scores)
        if decision.accepted and decision.prefill is not None:
            local = self._on_decode_node(request, cluster, now_s, credited, best)
            if local is not None and local.prefill is not None and local.prefill.ttft_s < decision.prefill.ttft_s:
                decision = dataclasses.replace(local, candidates=(decision.prefill, *decision.candidates[:-1]))
        if not decision.accepted or decision.prefill is None:
            return decision
        chosen = decision.prefill
        if self._shed(chosen, cluster):
            return Decision(
                request.request_id,
                self.name,
                chosen,
                None,
                f"overloaded: the queue is {chosen.queue_s:.1f} s and this prefill "
                f"({chosen.load_s + chosen.prefill_s:.1f} s) is longer than {SHED_QUANTILE:.0%} of recent ones",
                decision.candidates,
            )
        done_s = now_s + max(chosen.queue_s, chosen.fetch_s) + chosen.load_s + chosen.prefill_s
        # After whatever computes the queued prefix it counts on: ahead of it, it would compute it too.
        order_s = max(self._serve_order(chosen, cluster, now_s), self._after(chosen, request))
        self._remember(chosen.node_id, request.keys, done_s + PENDING_SLACK_S, order_s)
        return dataclasses.replace(decision, priority_s=order_s)

    def _on_decode_node(
        self,
        request: RouteRequest,
        cluster: ClusterState,
        now_s: float,
        credited: dict[str, PrefixHolding],
        best: PrefixHolding | None,
    ) -> Decision | None:
        """The best decode-only node to compute the prefill and then decode it, or None: only
        nodes whose batch can pause for the prefills queued there and this one (their reported
        pause budget) with room for the request's KV and a predicted TBT within the SLO."""
        need = request.prompt_tokens + request.max_output_tokens
        # A node's score depends only on its queue, its own part of the prefix and its profile:
        # among the nodes of one profile holding none of it, the first that qualifies in order
        # of queue is the best, and the others need no scoring.
        options = []
        for info in cluster.decode_nodes:
            if info.role.prefills:
                continue  # a prefill candidate already
            budget_s = cluster.loads[info.node_id].decode_pause_budget_s
            queue_s = cluster.loads[info.node_id].queue_s(now_s)
            if budget_s > queue_s:
                budget_s = min(budget_s, cluster.incoming_pause_s(info.node_id, now_s))
            if budget_s <= queue_s:
                continue  # not even the prefills queued there fit
            options.append((info.node_id not in credited, queue_s, info.node_id, budget_s, info))
        options.sort(key=lambda option: option[:3])
        chosen: tuple[PrefillScore, DecodeScore] | None = None
        settled: set[str] = set()  # profiles whose best node holding nothing is known
        for holds_nothing, _, _, budget_s, info in options:
            if holds_nothing and info.profile in settled:
                continue
            score = score_prefill(
                request, info, cluster, now_s, holdings=credited, best=best, timing=FetchTiming.OVERLAPPED
            )
            # The batch waits for everything queued ahead and for this prefill.
            if score.queue_s + score.load_s + score.prefill_s > budget_s:
                continue
            decode = score_decode(request, cluster, info, info.node_id, need)
            if decode is None or decode.tbt_s > cluster.slo.tbt_s:
                continue
            if holds_nothing:
                settled.add(info.profile)
            if chosen is None or (score.ttft_s, score.node_id) < (chosen[0].ttft_s, chosen[0].node_id):
                chosen = (score, decode)
        if chosen is None:
            return None
        return Decision(request.request_id, self.name, chosen[0], chosen[1])

    def _shed(self, chosen: PrefillScore, cluster: ClusterState) -> bool:
        """Note the prefill's length; True when the cluster is overloaded and it is a long one."""
        prefill_s = chosen.load_s + chosen.prefill_s
        self._recent_prefill_s.append(prefill_s)
        self._placed += 1
        if self._placed % SHED_REFRESH == 0:
            ordered = sorted(self._recent_prefill_s)
            self._long_prefill_s = ordered[int(SHED_QUANTILE * (len(ordered) - 1))]
        return chosen.queue_s > SHED_WAIT_FRACTION * cluster.slo.ttft_s and prefill_s > self._long_prefill_s

    def _with_pending(self, request: RouteRequest, holdings: dict[str, PrefixHolding]) -> dict[str, PrefixHolding]:
        """Holdings credited with the chains queued on each node."""
        credited = dict(holdings)
        first = request.keys[0] if request.keys else None
        for node_id, pending in self._pending.items():
            if first is None or first not in pending:
                continue
            run = 0
            for key in request.keys:
                if key not in pending:
                    break
                run += 1
            held = holdings.get(node_id)
            if held is None or run > held.blocks:
                # Queued blocks are computed into the engine: they cost no load from a lower tier.
                base = held.by_tier if held is not None else (0, 0, 0)
                credited[node_id] = PrefixHolding(node_id, run, base)
        return credited

    @staticmethod
    def _serve_order(chosen: PrefillScore, cluster: ClusterState, now_s: float) -> float:
        """Shortest prefill first, but no request ordered so late that the ones overtaking it
        eat most of what its TTFT SLO leaves after its predicted wait and prefill."""
        prefill_s = chosen.load_s + chosen.prefill_s
        slack_s = max(0.0, cluster.slo.ttft_s - max(chosen.queue_s, chosen.fetch_s) - prefill_s)
        return now_s + min(SHORT_FIRST_WEIGHT * prefill_s, SLACK_SHARE * slack_s)

    def _after(self, chosen: PrefillScore, request: RouteRequest) -> float:
        """The latest serve order among the queued requests computing the blocks `chosen`
        reuses on its node (-inf when it reuses none of theirs)."""
        pending = self._pending.get(chosen.node_id)
        if not pending or not chosen.local_tokens:
            return -math.inf
        latest = -math.inf
        for key in request.keys[: -(-chosen.local_tokens // request.block_tokens)]:
            queued = pending.get(key)
            if queued is None:
                break
            latest = max(latest, queued[1])
        return latest

    def _remember(self, node_id: str, keys: tuple[BlockKey, ...], until_s: float, order_s: float) -> None:
        """Credit `node_id` with `keys` until `until_s`; the request computing them is served at
        `order_s` (a key queued twice keeps the first request to compute it)."""
        pending = self._pending.setdefault(node_id, {})
        for key in keys:
            queued = pending.get(key)
            pending[key] = (until_s, order_s) if queued is None else (max(queued[0], until_s), min(queued[1], order_s))
        self._expiry.append((until_s, node_id, keys))

    def _forget(self, now_s: float, cluster: ClusterState) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now_s:
            _, node_id, keys = expiry.popleft()
            pending = self._pending.get(node_id)
            if pending is None:
                continue
            for key in keys:
                queued = pending.get(key)
                if queued is not None and queued[0] <= now_s:
                    del pending[key]
            if not pending:
                del self._pending[node_id]
        for node_id in [n for n in self._pending if n not in cluster.nodes]:
            del self._pending[node_id]  # left the cluster
