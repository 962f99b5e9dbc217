"""Predicting what a candidate placement costs: the parts every policy shares.

`score_prefill` predicts one prefill node's TTFT for a request, from its queue, the prefix it
holds (and where), and optionally a prefix fetched from the best other holder;
`pick_decode` chooses a decode node by predicted time between tokens among those with room for
the request's KV. All times come from the cluster's cost models (conductor/costs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

from conductor.cluster import ClusterState
from conductor.types import DecodeScore, NodeInfo, PrefillScore, PrefixHolding, RouteRequest

NO_DECODE_ROOM = "no decode node has room for the request's KV"
TOP_CANDIDATES = 3  # candidates a decision reports besides the chosen one


class FetchTiming(Enum):
    """How a prefix fetch is expected to combine with the wait in the queue."""

    NONE = "none"  # never fetch; reuse only what the candidate holds
    SERIAL = "serial"  # fetch, then prefill, after the queue (Mooncake's Algorithm 1)
    OVERLAPPED = "overlapped"  # the fetch runs while the request waits in the queue


def reusable_tokens(request: RouteRequest, blocks: int) -> int:
    """Prompt tokens `blocks` leading blocks cover; the last prompt token is always computed."""
    return max(0, min(blocks * request.block_tokens, request.prompt_tokens - 1))


def score_prefill(
    request: RouteRequest,
    info: NodeInfo,
    cluster: ClusterState,
    now_s: float,
    *,
    holdings: Mapping[str, PrefixHolding],
    best: PrefixHolding | None,
    timing: FetchTiming,
) -> PrefillScore:
    """Predicted TTFT of `request` on prefill node `info`, reusing its own prefix and, unless
    `timing` is NONE, fetching the rest of `best`'s longer prefix when that beats computing it."""
    profile = cluster.costs.profile(info.profile)
    queue_s = cluster.loads[info.node_id].queue_s(now_s)
    own = holdings.get(info.node_id)
    local_tokens = reusable_tokens(request, own.blocks) if own else 0
    load_s = profile.load_s(own.by_tier, request.block_tokens) if own else 0.0
    compute_s = profile.prefill.seconds(request.prompt_tokens - local_tokens, local_tokens)
    score = PrefillScore(
        info.node_id, queue_s + load_s + compute_s, queue_s, compute_s, load_s, 0.0, local_tokens, local_tokens
    )
    if timing is FetchTiming.NONE or best is None or best.node_id == info.node_id:
        return score
    fetched_tokens = reusable_tokens(request, best.blocks) - local_tokens
    if fetched_tokens <= 0:
        return score
    holder = cluster.costs.profile(cluster.nodes[best.node_id].profile)
    # The holder reads the blocks from its own tiers while sending; the slower of the two bounds it.
    fetch_s = max(cluster.costs.transfer_s(profile, fetched_tokens), holder.load_s(best.by_tier, request.block_tokens))
    reused = local_tokens + fetched_tokens
    with_fetch_s = profile.prefill.seconds(request.prompt_tokens - reused, reused)
    before_compute = max(queue_s, fetch_s) if timing is FetchTiming.OVERLAPPED else queue_s + fetch_s
    ttft_s = before_compute + load_s + with_fetch_s
    if ttft_s >= score.ttft_s:
        return score  # computing the missing part is faster than fetching it
    return PrefillScore(
        info.node_id, ttft_s, queue_s, with_fetch_s, load_s, fetch_s, reused, local_tokens, fetched_tokens, best.node_id
    )


def best_holding(holdings: Mapping[str, PrefixHolding], among: Iterable[str] | None = None) -> PrefixHolding | None:
    """The longest run (ties: fewest NVMe blocks, then node id, for determinism)."""
    chosen: PrefixHolding | None = None
    candidates = holdings.values() if among is None else (holdings[n] for n in among if n in holdings)
    for holding in candidates:
        if chosen is None or _better(holding, chosen):
            chosen = holding
    return chosen


def _better(a: PrefixHolding, b: PrefixHolding) -> bool:
    return (a.blocks, -a.by_tier[2], b.node_id) > (b.blocks, -b.by_tier[2], a.node_id)


def pick_decode(
    request: RouteRequest, cluster: ClusterState, prefill_node: str, candidates: Iterable[NodeInfo] | None = None
) -> DecodeScore | None:
    """The decode node with room for the request's KV that predicts the shortest time between
    tokens once it joins (ties: more room left). None when no node has room."""
    need = request.prompt_tokens + request.max_output_tokens
    best: DecodeScore | None = None
    for info in cluster.decode_nodes if candidates is None else candidates:
        score = score_decode(request, cluster, info, prefill_node, need)
        if score is not None and (best is None or _rank(score) < _rank(best)):
            best = score
    return best


def _rank(score: DecodeScore) -> tuple[float, int]:
    return score.tbt_s, -score.free_kv_tokens


def score_decode(
    request: RouteRequest, cluster: ClusterState, info: NodeInfo, prefill_node: str, need: int
) -> DecodeScore | None:
    """`info` as the decode node: None when it lacks room for `need` KV tokens."""
    load = cluster.loads[info.node_id]
    free = cluster.kv_capacity_tokens(info) - load.decode_kv_tokens - need
    if free < 0:
        return None
    profile = cluster.costs.profile(info.profile)
    tbt_s = profile.decode.step_s(load.running_decodes + 1, load.decode_kv_tokens + request.prompt_tokens)
    transfer_s = 0.0 if info.node_id == prefill_node else cluster.costs.transfer_s(profile, request.prompt_tokens)
    return DecodeScore(info.node_id, tbt_s, transfer_s, free)


def ranked(scores: Iterable[PrefillScore]) -> list[PrefillScore]:
    """Lowest predicted TTFT first (ties: node id, for determinism)."""
    return sorted(scores, key=lambda score: (score.ttft_s, score.node_id))
