"""Mooncake's KV-centric scheduling (FAST'25, Algorithm 1), the baseline to beat.

For every prefill node: TTFT = queue time + the time to fetch, from the node holding the
longest prefix, what it lacks of that prefix (when fetching is faster than computing it) + the
prefill of the tokens it must still compute. The node of least TTFT wins; the decode node is
the one with room and the least predicted time between tokens, and its KV is reserved
(`ClusterState.charge`). A request whose predicted TTFT or TBT breaks the SLO is rejected
before anything runs.

As in the paper, the fetch is taken to happen after the queue wait, before the prefill.
"""

from __future__ import annotations

from conductor.cluster import ClusterState
from conductor.placement.scoring import (
    NO_DECODE_ROOM,
    TOP_CANDIDATES,
    FetchTiming,
    best_holding,
    pick_decode,
    ranked,
    score_prefill,
)
from conductor.types import Decision, PrefillScore, RouteRequest


class KVCentric:
    name = "kv-centric"
    timing = FetchTiming.SERIAL

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        holdings = cluster.index.match(request.keys)
        best = best_holding(holdings)
        scores = ranked(
            score_prefill(request, info, cluster, now_s, holdings=holdings, best=best, timing=self.timing)
            for info in cluster.prefill_nodes
        )
        return decide_within_slo(self.name, request, cluster, scores)


def decide_within_slo(
    policy: str, request: RouteRequest, cluster: ClusterState, scores: list[PrefillScore]
) -> Decision:
    """The best-ranked prefill node and the best decode node for it, or a rejection naming the
    SLO the prediction breaks."""
    chosen = scores[0]
    others = tuple(scores[1 : 1 + TOP_CANDIDATES])
    decode = pick_decode(request, cluster, chosen.node_id)
    rejected = ""
    if chosen.ttft_s > cluster.slo.ttft_s:
        decode, rejected = None, f"predicted TTFT {chosen.ttft_s:.2f} s exceeds the SLO of {cluster.slo.ttft_s:g} s"
    elif decode is None:
        rejected = NO_DECODE_ROOM
    elif decode.tbt_s > cluster.slo.tbt_s:
        rejected = f"predicted TBT {decode.tbt_s * 1e3:.1f} ms exceeds the SLO of {cluster.slo.tbt_s * 1e3:g} ms"
    return Decision(request.request_id, policy, chosen, decode, rejected, others)
