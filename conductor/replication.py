"""Hot prefixes whose holders are busy get a copy on an idle prefill node (DESIGN.md 5).

`HotPrefixes` is policy only: it counts, per reused prefix, how often requests reuse it (a
count that halves every `half_life_s`), and `plan` names copies to make: for a prefix reused
at least `min_rate_per_s` whose every holder's prefill queue is longer than `busy_s`, the
least busy prefill node that lacks it pulls it from the holder with the shortest queue, at
most `max_copies_per_round` a plan (0: never). The conductor asks for a plan every reconcile
round and carries it out with the target node's `Fetch` (conductor/conductor.py). The
settings are the conductor's `[replication]` section (`HotPrefixSettings`).

Placement already pulls a prefix when a request lands away from its holder; this moves it
before the requests come, so they find it local instead of waiting for the transfer.

Owner: the conductor, under its lock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from conductor.cluster import ClusterState
from conductor.types import Decision, RouteRequest
from kvstore.types import BlockKey, NamespaceId


@dataclass(frozen=True, slots=True)
class Replication:
    namespace_id: NamespaceId
    keys: tuple[BlockKey, ...]
    source: str  # node id holding the prefix
    target: str  # node id that pulls it


@dataclass(frozen=True, slots=True)
class HotPrefixSettings:
    half_life_s: float = 60.0  # a prefix's reuse count halves in this long
    min_rate_per_s: float = 0.5  # hot: reused at least this often (a decayed rate)
    busy_s: float = 2.0  # copy only when every holder's prefill queue is longer than this
    cooldown_s: float = 30.0  # at most one copy of a prefix in this long
    max_copies_per_round: int = 4  # copies started per reconcile round; 0: replication off
    max_tracked: int = 4096  # prefixes counted (the least recently reused are forgotten)


@dataclass(slots=True)
class _Prefix:
    namespace_id: NamespaceId
    keys: tuple[BlockKey, ...]
    count: float
    at_s: float
    copied_at_s: float = -math.inf


class HotPrefixes:
    def __init__(self, settings: HotPrefixSettings = HotPrefixSettings()) -> None:
        self._decay = math.log(2) / settings.half_life_s
        self._min_count = settings.min_rate_per_s / self._decay  # the steady count of that rate
        self._busy_s = settings.busy_s
        self._cooldown_s = settings.cooldown_s
        self._max_tracked = settings.max_tracked
        self._max_per_plan = settings.max_copies_per_round
        self._prefixes: OrderedDict[BlockKey, _Prefix] = OrderedDict()

    def observe(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        """Count the prefix `decision` reuses (none: nothing to count)."""
        if decision.prefill is None or not decision.prefill.reused_tokens:
            return
        blocks = min(len(request.keys), -(-decision.prefill.reused_tokens // request.block_tokens))
        end = request.keys[blocks - 1]
        prefix = self._prefixes.get(end)
        if prefix is None:
            prefix = self._prefixes[end] = _Prefix(request.namespace_id, request.keys[:blocks], 0.0, now_s)
            if len(self._prefixes) > self._max_tracked:
                self._prefixes.popitem(last=False)
        else:
            self._prefixes.move_to_end(end)
        prefix.count = prefix.count * math.exp(-self._decay * (now_s - prefix.at_s)) + 1.0
        prefix.at_s = now_s

    def plan(self, cluster: ClusterState, now_s: float) -> list[Replication]:
        copies: list[Replication] = []
        if not self._max_per_plan:
            return copies
        for prefix in reversed(self._prefixes.values()):  # most recently reused first
            if len(copies) >= self._max_per_plan:
                break
            count = prefix.count * math.exp(-self._decay * (now_s - prefix.at_s))
            if count < self._min_count or now_s - prefix.copied_at_s < self._cooldown_s:
                continue
            holdings = cluster.index.match(prefix.keys)
            holders = [node for node, held in holdings.items() if held.blocks == len(prefix.keys)]
            prefill = [info.node_id for info in cluster.prefill_nodes]
            queue = {node: cluster.loads[node].queue_s(now_s) for node in prefill if node in cluster.loads}
            holders = [node for node in holders if node in queue]
            if not holders or min(queue[node] for node in holders) <= self._busy_s:
                continue
            full, quiet_s = len(prefix.keys), self._busy_s / 2
            lacking = [node for node in prefill if node not in holdings or holdings[node].blocks < full]
            idle = [node for node in lacking if queue.get(node, math.inf) < quiet_s]
            if not idle:
                continue
            source = min(holders, key=lambda node: (queue[node], node))
            target = min(idle, key=lambda node: (queue[node], node))
            copies.append(Replication(prefix.namespace_id, prefix.keys, source, target))
            prefix.copied_at_s = now_s
        return copies
