"""What the conductor knows about the cluster: members, their load, the global index, the cost
models, and the namespaces in use. Placement reads it; the router and the feeds write it.

Loads are the nodes' own reports, plus the conductor's placements since (optimistic
accounting): `charge` adds a placed request's predicted prefill work to its prefill node and its
KV reservation to its decode node at once, so a burst of requests does not all see the same idle
node; the node's next report replaces the guess with the truth.

Owner: callers serialise writers (the service holds one lock; the simulator is single-threaded).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from conductor.costs import CostModel, Profile
from conductor.index import GlobalIndex
from conductor.types import Decision, NodeInfo, NodeLoad, RouteRequest
from kvstore.types import NamespaceId

INCOMING_SWEEP = 64  # sequences on their way to one decode node before the joined ones are swept out


@dataclass(frozen=True, slots=True)
class Slo:
    """The latency a request must meet; policies that reject early use these."""

    ttft_s: float = 30.0
    tbt_s: float = 0.1


class ClusterState:
    def __init__(self, costs: CostModel, slo: Slo | None = None) -> None:
        self.costs = costs
        self.slo = slo or Slo()
        self.nodes: dict[str, NodeInfo] = {}
        self.loads: dict[str, NodeLoad] = {}
        self.index = GlobalIndex()
        self.namespaces: set[NamespaceId] = set()
        self._reporting: set[str] = set()  # nodes whose loads come from their own reports
        self._releases: list[tuple[float, str, int]] = []  # (when, decode node, KV tokens) to release
        # decode node -> min-heap of (pause it tolerates, predicted join) of each sequence placed
        # there that has not joined its batch yet: the engine cannot see those, the conductor
        # sent them. Joined ones leave when they reach the top, or in a sweep as the heap grows.
        self._incoming: dict[str, list[tuple[float, float]]] = {}
        self._incoming_sweep_at: dict[str, int] = {}
        self._prefill: list[NodeInfo] = []
        self._decode: list[NodeInfo] = []

    # -- membership ----------------------------------------------------------------------------

    def join(self, info: NodeInfo) -> None:
        """Add or update a member (its profile must be known)."""
        self.costs.profile(info.profile)
        self.nodes[info.node_id] = info
        self.loads.setdefault(info.node_id, NodeLoad())
        self._refresh_roles()

    def leave(self, node_id: str) -> bool:
        """Remove a member and everything it held from the index; False if it was unknown."""
        if self.nodes.pop(node_id, None) is None:
            return False
        self.loads.pop(node_id, None)
        self._reporting.discard(node_id)
        self._incoming.pop(node_id, None)
        self._incoming_sweep_at.pop(node_id, None)
        self.index.drop_node(node_id)
        self._refresh_roles()
        return True

    def _refresh_roles(self) -> None:
        members = sorted(self.nodes.values(), key=lambda info: info.node_id)
        self._prefill = [info for info in members if info.role.prefills]
        self._decode = [info for info in members if info.role.decodes]

    @property
    def prefill_nodes(self) -> list[NodeInfo]:
        return self._prefill

    @property
    def decode_nodes(self) -> list[NodeInfo]:
        return self._decode

    def profile_of(self, node_id: str) -> Profile:
        return self.costs.profile(self.nodes[node_id].profile)

    def kv_capacity_tokens(self, info: NodeInfo) -> int:
        return info.kv_capacity_tokens or self.costs.profile(info.profile).kv_capacity_tokens

    # -- load ----------------------------------------------------------------------------------

    def report_load(self, node_id: str, load: NodeLoad) -> None:
        """The node's own account of its load; from now on its reports are the truth."""
        if node_id in self.nodes:
            self.loads[node_id] = load
            self._reporting.add(node_id)

    def stop_reporting(self, node_id: str) -> None:
        """The node reports no load any more (its engines went quiet): its last report is stale,
        so the conductor's own account takes over, from nothing placed."""
        if node_id in self._reporting:
            self._reporting.discard(node_id)
            self.loads[node_id] = NodeLoad()

    def is_reporting(self, node_id: str) -> bool:
        return node_id in self._reporting

    def charge(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        """Account for a placement until the nodes report again. On a decode node that does not
        report its load, the request's KV reservation ends when its output is predicted done."""
        if decision.prefill is not None:
            load = self.loads[decision.prefill.node_id]
            start = max(now_s, load.prefill_busy_until_s, now_s + decision.prefill.fetch_s)
            load.prefill_busy_until_s = start + decision.prefill.load_s + decision.prefill.prefill_s
            load.queued_prefill_tokens += request.prompt_tokens - decision.prefill.reused_tokens
        if decision.decode is not None:
            node_id = decision.decode.node_id
            load = self.loads[node_id]
            tokens = request.prompt_tokens + request.max_output_tokens
            load.running_decodes += 1
            load.decode_kv_tokens += tokens
            ttft_s = decision.prefill.ttft_s if decision.prefill is not None else 0.0
            join_s = now_s + ttft_s + decision.decode.transfer_s
            tolerance_s = max(0.0, self.slo.tbt_s - decision.decode.tbt_s) * request.max_output_tokens
            self._add_incoming(node_id, tolerance_s, join_s, now_s)
            if node_id not in self._reporting:
                done_s = join_s + request.max_output_tokens * decision.decode.tbt_s
                heapq.heappush(self._releases, (done_s, node_id, tokens))

    def incoming_pause_s(self, node_id: str, now_s: float) -> float:
        """How long the decode node's batch may pause for the sequences placed there that have
        not joined it yet (each may join during the pause and wait for the rest of it): the
        least any of them tolerates, (TBT SLO - its predicted TBT) x its output tokens; inf
        when none is on its way. Its engine's pause budget covers only the sequences it holds."""
        incoming = self._incoming.get(node_id)
        while incoming and incoming[0][1] <= now_s:  # joined: the engine's budget covers it now
            heapq.heappop(incoming)
        return incoming[0][0] if incoming else math.inf

    def _add_incoming(self, node_id: str, tolerance_s: float, join_s: float, now_s: float) -> None:
        incoming = self._incoming.setdefault(node_id, [])
        heapq.heappush(incoming, (tolerance_s, join_s))
        if len(incoming) >= self._incoming_sweep_at.get(node_id, INCOMING_SWEEP):
            incoming[:] = [entry for entry in incoming if entry[1] > now_s]
            heapq.heapify(incoming)
            self._incoming_sweep_at[node_id] = max(INCOMING_SWEEP, 2 * len(incoming))  # amortised O(1)

    def expire(self, now_s: float) -> None:
        """End the predicted decode reservations that are over (nodes that do not report)."""
        releases = self._releases
        while releases and releases[0][0] <= now_s:
            _, node_id, tokens = heapq.heappop(releases)
            load = self.loads.get(node_id)
            if load is not None and node_id not in self._reporting:
                load.running_decodes = max(0, load.running_decodes - 1)
                load.decode_kv_tokens = max(0, load.decode_kv_tokens - tokens)
