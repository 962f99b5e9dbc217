"""The baselines Mooncake's FAST'25 paper compares its scheduler with: random placement,
round-robin, least-loaded (shortest prefill queue), and local cache-aware (shortest predicted
TTFT counting only the prefix a node already holds). None of them rejects a request.

Each still reports its prediction for the node it picked, so decisions read the same whatever
the policy. The decode node is the one with room and the shortest predicted time between tokens
(`pick_decode`); random placement picks that at random too.
"""

from __future__ import annotations

import random

from conductor.cluster import ClusterState
from conductor.placement.scoring import (
    NO_DECODE_ROOM,
    TOP_CANDIDATES,
    FetchTiming,
    pick_decode,
    ranked,
    score_decode,
    score_prefill,
)
from conductor.types import Decision, NodeInfo, PrefillScore, RouteRequest


def _decision(
    policy: str, request: RouteRequest, cluster: ClusterState, chosen: PrefillScore, others: list[PrefillScore]
) -> Decision:
    decode = pick_decode(request, cluster, chosen.node_id)
    if decode is None:
        return Decision(request.request_id, policy, None, None, NO_DECODE_ROOM)
    return Decision(request.request_id, policy, chosen, decode, candidates=tuple(others[:TOP_CANDIDATES]))


def _score(request: RouteRequest, info: NodeInfo, cluster: ClusterState, now_s: float) -> PrefillScore:
    """What a node that only reuses its own prefix predicts (for the breakdown)."""
    holdings = cluster.index.match(request.keys)
    return score_prefill(request, info, cluster, now_s, holdings=holdings, best=None, timing=FetchTiming.NONE)


class RandomPlacement:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed)

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        info = self._random.choice(cluster.prefill_nodes)
        chosen = _score(request, info, cluster, now_s)
        need = request.prompt_tokens + request.max_output_tokens
        roomy = [d for d in cluster.decode_nodes if score_decode(request, cluster, d, info.node_id, need) is not None]
        if not roomy:
            return Decision(request.request_id, self.name, None, None, NO_DECODE_ROOM)
        decode = score_decode(request, cluster, self._random.choice(roomy), info.node_id, need)
        return Decision(request.request_id, self.name, chosen, decode)


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        nodes = cluster.prefill_nodes
        info = nodes[self._next % len(nodes)]
        self._next += 1
        return _decision(self.name, request, cluster, _score(request, info, cluster, now_s), [])


class LeastLoaded:
    """The prefill node whose queue empties first (ties: fewer queued tokens, then node id)."""

    name = "least-loaded"

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        loads = cluster.loads
        info = min(
            cluster.prefill_nodes,
            key=lambda n: (loads[n.node_id].queue_s(now_s), loads[n.node_id].queued_prefill_tokens, n.node_id),
        )
        return _decision(self.name, request, cluster, _score(request, info, cluster, now_s), [])


class LocalCacheAware:
    """Shortest predicted TTFT (queue, then computing what the node does not hold itself); no
    prefix moves between nodes."""

    name = "cache-aware"

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        holdings = cluster.index.match(request.keys)
        scores = ranked(
            score_prefill(request, info, cluster, now_s, holdings=holdings, best=None, timing=FetchTiming.NONE)
            for info in cluster.prefill_nodes
        )
        return _decision(self.name, request, cluster, scores[0], scores[1:])
