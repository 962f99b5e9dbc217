"""The conductor's Prometheus metrics, served on `server.metrics_port`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conductor.cluster import ClusterState
from conductor.conductor import ClusterSnapshot
from conductor.types import Decision


class ConductorMetrics:
    def __init__(self, registry: CollectorRegistry, cluster: ClusterState) -> None:
        self.routes = Counter(
            "conductor_routes_total", "Route decisions, by policy and outcome", ["policy", "outcome"], registry=registry
        )
        self.rejections = Counter(
            "conductor_rejections_total", "Rejected requests, by the kind of reason", ["reason"], registry=registry
        )
        self.decision_seconds = Histogram(
            "conductor_decision_seconds",
            "Time to make one Route decision",
            buckets=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
            registry=registry,
        )
        self.resyncs = Counter(
            "conductor_index_resyncs_total", "Node event streams rebuilt from a snapshot", ["node"], registry=registry
        )
        self.calls = Counter(
            "conductor_calls_total", "gRPC calls, by method and status", ["method", "code"], registry=registry
        )
        self.replications = Counter(
            "conductor_replications_total",
            "Hot prefixes copied to an idle node, by outcome",
            ["outcome"],
            registry=registry,
        )
        nodes = Gauge("conductor_live_nodes", "Live nodes, by role", ["role"], registry=registry)
        nodes.labels("prefill").set_function(lambda: len(cluster.prefill_nodes))
        nodes.labels("decode").set_function(lambda: len(cluster.decode_nodes))
        Gauge("conductor_indexed_blocks", "Distinct keys in the global index", registry=registry).set_function(
            lambda: len(cluster.index)
        )

    def decided(self, decision: Decision, seconds: float) -> None:
        self.routes.labels(decision.policy, "accepted" if decision.accepted else "rejected").inc()
        if not decision.accepted:
            self.rejections.labels(reason_kind(decision.rejected)).inc()
        self.decision_seconds.observe(seconds)


def reason_kind(reason: str) -> str:
    """A low-cardinality label for a rejection reason (the text carries numbers)."""
    for needle, kind in (
        ("TTFT", "ttft_slo"),
        ("TBT", "tbt_slo"),
        ("room", "decode_full"),
        ("overloaded", "shed"),
        ("no live", "no_node"),
    ):
        if needle in reason:
            return kind
    return "other"


class MemberLoads(Collector):
    """Each member's load as the conductor holds it, read from one `ClusterStatus` snapshot per
    scrape (members come and go, so the series are built at each scrape, not kept)."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["node", "role", "source"]
        families = {
            "queue": GaugeMetricFamily(
                "conductor_node_prefill_queue_seconds", "Predicted wait before a new prefill starts", labels=labels
            ),
            "queued": GaugeMetricFamily(
                "conductor_node_queued_prefill_tokens", "Prompt tokens queued or running, not computed", labels=labels
            ),
            "decodes": GaugeMetricFamily("conductor_node_running_decodes", "Sequences decoding", labels=labels),
            "kv": GaugeMetricFamily(
                "conductor_node_decode_kv_tokens", "KV tokens of the decoding sequences", labels=labels
            ),
            "budget": GaugeMetricFamily(
                "conductor_node_decode_pause_budget_seconds",
                "How long the decode batch could pause for a prefill (0: not reported)",
                labels=labels,
            ),
            "blocks": GaugeMetricFamily(
                "conductor_node_indexed_blocks", "Blocks the global index holds for the node", labels=labels
            ),
        }
        for member in self._snapshot().members:
            values = [member.info.node_id, member.info.role.value, "reported" if member.load_reported else "own"]
            load = member.load
            families["queue"].add_metric(values, member.prefill_queue_s)
            families["queued"].add_metric(values, load.queued_prefill_tokens)
            families["decodes"].add_metric(values, load.running_decodes)
            families["kv"].add_metric(values, load.decode_kv_tokens)
            families["budget"].add_metric(values, load.decode_pause_budget_s)
            families["blocks"].add_metric(values, member.indexed_blocks)
        yield from families.values()
