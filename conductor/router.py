"""Routing one request: check it, ask the placement policy, account for the decision.

The service's `Route` and the simulator both call `Router.route`, so they run the same code.
Bad input raises `InvalidArgumentError` naming what is wrong and changes nothing; a cluster
that cannot take the request (no live node of a role) gets an explicit rejection with its
reason, never a silent pick.
"""

from __future__ import annotations

from conductor.cluster import ClusterState
from conductor.placement.base import PlacementPolicy
from conductor.types import Decision, RouteRequest
from kvstore.errors import InvalidArgumentError, UnknownNamespaceError
from kvstore.types import KEY_BYTES


class Router:
    def __init__(self, cluster: ClusterState, policy: PlacementPolicy) -> None:
        self.cluster = cluster
        self.policy = policy

    def route(self, request: RouteRequest, now_s: float) -> Decision:
        check_request(request, self.cluster)
        self.cluster.expire(now_s)
        if not self.cluster.prefill_nodes:
            return Decision(request.request_id, self.policy.name, None, None, "no live prefill node")
        if not self.cluster.decode_nodes:
            return Decision(request.request_id, self.policy.name, None, None, "no live decode node")
        decision = self.policy.place(request, self.cluster, now_s)
        if decision.accepted:
            self.cluster.charge(request, decision, now_s)
        return decision


def check_request(request: RouteRequest, cluster: ClusterState) -> None:
    """InvalidArgumentError (or UnknownNamespaceError) naming what is wrong with `request`."""
    where = f"request {request.request_id!r}"
    if request.prompt_tokens <= 0:
        raise InvalidArgumentError(f"{where}: empty prompt (prompt_tokens={request.prompt_tokens})")
    if request.block_tokens <= 0:
        raise InvalidArgumentError(f"{where}: block_tokens must be positive, got {request.block_tokens}")
    if request.max_output_tokens < 0:
        raise InvalidArgumentError(f"{where}: max_output_tokens must not be negative, got {request.max_output_tokens}")
    full = request.prompt_tokens // request.block_tokens
    partial = -(-request.prompt_tokens // request.block_tokens)
    if not full <= len(request.keys) <= partial:
        raise InvalidArgumentError(
            f"{where}: {len(request.keys)} block keys for a {request.prompt_tokens}-token prompt "
            f"of {request.block_tokens}-token blocks (expected {full} or {partial})"
        )
    for position, key in enumerate(request.keys):
        if len(key) != KEY_BYTES:
            raise InvalidArgumentError(f"{where}: key {position} has {len(key)} bytes, not {KEY_BYTES}")
    if request.namespace_id not in cluster.namespaces:
        raise UnknownNamespaceError(f"{where}: namespace {request.namespace_id.hex()} is not registered on any node")
