"""The node's Prometheus metrics (DESIGN.md 4): requests, bytes per path, tiers, leases.

Request and transfer metrics are recorded as they happen; tier figures are read from the
store's statistics at scrape time (`StoreCollector`), so they can never drift from the truth.
The registry is passed in (no global default registry), so tests read exact values.

Owner: the node server. Thread-safe (prometheus_client's metrics are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.stats import StoreStats

_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_TRANSFER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True, slots=True)
class LookupCounts:
    """Lookup calls and the blocks they asked for, counted by the node (Stats and /metrics)."""

    lookups: int
    hit_blocks: int
    miss_blocks: int


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rpc_seconds = Histogram(
            "kvstore_rpc_seconds",
            "gRPC call latency",
            ["method", "code"],
            registry=registry,
            buckets=_LATENCY_BUCKETS_S,
        )
        self._rpc_children: dict[tuple[str, str], Histogram] = {}
        self.local_bytes = Counter(
            "kvstore_local_bytes",
            "bytes handed to same-host clients through shared memory (reserved for writes, leased for "
            "reads, copied: read without a lease through the shared index, as the clients report it)",
            ["direction"],
            registry=registry,
        )
        self.local_reserved_bytes = self.local_bytes.labels("reserved")  # bound once: called per batch
        self.local_leased_bytes = self.local_bytes.labels("leased")
        self.local_copied_bytes = self.local_bytes.labels("copied")
        self.dataplane_bytes = Counter(
            "kvstore_dataplane_bytes", "bytes moved over the TCP data plane", ["direction"], registry=registry
        )
        self.dataplane_seconds = Histogram(
            "kvstore_dataplane_transfer_seconds",
            "time of one data-plane transfer",
            ["direction"],
            registry=registry,
            buckets=_TRANSFER_BUCKETS_S,
        )
        self.dataplane_connections = Gauge(
            "kvstore_dataplane_connections", "open data-plane connections", registry=registry
        )
        self.fetch_bytes = Counter("kvstore_fetch_bytes", "bytes pulled from peers by Fetch", registry=registry)
        self.watchers = Gauge("kvstore_event_watchers", "open WatchEvents streams", registry=registry)

    # -- the data plane's TransferObserver ------------------------------------------------------

    def transferred(self, direction: str, num_bytes: int, seconds: float) -> None:
        self.dataplane_bytes.labels(direction).inc(num_bytes)
        self.dataplane_seconds.labels(direction).observe(seconds)

    def connections_changed(self, delta: int) -> None:
        self.dataplane_connections.inc(delta)

    def call_done(self, method: str, code: str, seconds: float) -> None:
        """One call's latency by method and status code: gRPC calls, and the local socket's
        calls counted with the gRPC calls they stand for."""
        child = self._rpc_children.get((method, code))
        if child is None:  # `labels` costs more than `observe`: bind each pair once
            child = self._rpc_children.setdefault((method, code), self.rpc_seconds.labels(method, code))
        child.observe(seconds)


class StoreCollector(Collector):
    """Tier usage and counters, read from the store at each scrape."""

    def __init__(
        self,
        stats: Callable[[], StoreStats],
        last_event: Callable[[], int],
        lookups: Callable[[], LookupCounts],
    ) -> None:
        self._stats = stats
        self._last_event = last_event
        self._lookups = lookups

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        gauges = {
            "capacity_bytes": GaugeMetricFamily("kvstore_tier_capacity_bytes", "tier capacity", labels=["tier"]),
            "used_bytes": GaugeMetricFamily("kvstore_tier_used_bytes", "tier bytes in use", labels=["tier"]),
            "num_blocks": GaugeMetricFamily("kvstore_tier_blocks", "blocks with a copy in the tier", labels=["tier"]),
        }
        counters = {
            "hits": CounterMetricFamily("kvstore_tier_hits", "leased blocks served from the tier", labels=["tier"]),
            "evictions": CounterMetricFamily("kvstore_tier_evictions", "blocks evicted from the tier", labels=["tier"]),
            "demotions_in": CounterMetricFamily(
                "kvstore_tier_demotions_in", "blocks copied in from a faster tier", labels=["tier"]
            ),
            "promotions_in": CounterMetricFamily(
                "kvstore_tier_promotions_in", "blocks copied in from a slower tier", labels=["tier"]
            ),
            "checksum_failures": CounterMetricFamily(
                "kvstore_tier_checksum_failures", "blocks whose bytes failed their checksum", labels=["tier"]
            ),
        }
        for tier in stats.tiers:
            for name, gauge in gauges.items():
                gauge.add_metric([tier.kind.label], getattr(tier, name))
            for name, counter in counters.items():
                counter.add_metric([tier.kind.label], getattr(tier, name))
        yield from gauges.values()
        yield from counters.values()
        yield GaugeMetricFamily("kvstore_blocks", "distinct stored blocks", value=stats.num_blocks)
        yield GaugeMetricFamily("kvstore_leases", "read leases held", value=stats.num_leases)
        yield GaugeMetricFamily("kvstore_reservations", "write reservations open", value=stats.num_reservations)
        yield GaugeMetricFamily(
            "kvstore_unhashed_blocks", "blocks waiting for their checksum", value=stats.num_unhashed
        )
        yield CounterMetricFamily("kvstore_events", "block events recorded", value=self._last_event())
        counts = self._lookups()
        yield CounterMetricFamily("kvstore_lookups", "Lookup calls", value=counts.lookups)
        blocks = CounterMetricFamily(
            "kvstore_lookup_blocks", "blocks asked for by Lookup, by result", labels=["result"]
        )
        blocks.add_metric(["hit"], counts.hit_blocks)
        blocks.add_metric(["miss"], counts.miss_blocks)
        yield blocks
