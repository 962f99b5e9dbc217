"""The placement interface: one object per policy, each turning a request into a decision.

A policy reads the cluster (members, loads, the global index, cost models) and returns a
`Decision` carrying its score breakdown; it never changes the cluster. The router
(conductor/router.py) validates the request before and charges the decision after, so the
service and the simulator share everything but the clock.
"""

from __future__ import annotations

from typing import Protocol

from conductor.cluster import ClusterState
from conductor.types import Decision, RouteRequest


class PlacementPolicy(Protocol):
    name: str

    def place(self, request: RouteRequest, cluster: ClusterState, now_s: float) -> Decision:
        """Where `request` should run. The cluster has at least one prefill and one decode node
        and knows the request's namespace (the router checked)."""
        ...
