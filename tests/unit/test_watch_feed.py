"""A node feed's handling of a WatchEvents stream: the snapshot replaces the node's part of
the index, deltas apply in sequence, and a gap (or a delta before the snapshot ended) ends
the subscription so that a fresh snapshot rebuilds it."""

from __future__ import annotations

from conductor.watch import NodeFeed
from kvstore.proto import kvstore_pb2 as pb
from kvstore.types import BlockKey, NamespaceId, TierKind

NS = b"n" * 16


class Sink:
    def __init__(self) -> None:
        self.snapshots: list[dict[BlockKey, tuple[TierKind, ...]]] = []
        self.applied: list[tuple[BlockKey, tuple[TierKind, ...]]] = []

    def replace_node(
        self, node_id: str, blocks: dict[BlockKey, tuple[TierKind, ...]], namespaces: set[NamespaceId]
    ) -> None:
        assert namespaces == {NamespaceId(NS)}
        self.snapshots.append(dict(blocks))

    def apply(self, node_id: str, key: BlockKey, namespace: NamespaceId, tiers: tuple[TierKind, ...]) -> None:
        self.applied.append((key, tiers))


def event(kind: int, sequence: int, key: int = 0, tiers: tuple[int, ...] = ()) -> pb.Event:
    return pb.Event(sequence=sequence, type=kind, namespace_id=NS, key=key.to_bytes(16, "big"), tiers=list(tiers))


def key(number: int) -> BlockKey:
    return BlockKey(number.to_bytes(16, "big"))


def test_snapshot_then_deltas_in_order_then_a_gap_ends_the_subscription() -> None:
    sink = Sink()
    feed = NodeFeed("a", "127.0.0.1:1", sink)
    stream = [
        event(pb.EVENT_SNAPSHOT, 5, 1, (pb.TIER_DRAM,)),
        event(pb.EVENT_SNAPSHOT, 5, 2, (pb.TIER_DRAM, pb.TIER_NVME)),
        event(pb.EVENT_SNAPSHOT_END, 5),
        event(pb.EVENT_STORED, 6, 3, (pb.TIER_HBM,)),
        event(pb.EVENT_REMOVED, 7, 1),
        event(pb.EVENT_STORED, 9, 4, (pb.TIER_DRAM,)),  # 8 was lost
        event(pb.EVENT_STORED, 10, 5, (pb.TIER_DRAM,)),
    ]
    reason = feed._follow(iter(stream))
    assert reason == "sequence gap: expected 8, got 9"
    assert sink.snapshots == [{key(1): (TierKind.DRAM,), key(2): (TierKind.DRAM, TierKind.NVME)}]
    assert sink.applied == [(key(3), (TierKind.HBM,)), (key(1), ())]  # nothing after the gap
    assert feed.synced.is_set()


def test_a_delta_before_the_snapshot_ended_is_refused() -> None:
    sink = Sink()
    feed = NodeFeed("a", "127.0.0.1:1", sink)
    reason = feed._follow(iter([event(pb.EVENT_SNAPSHOT, 1, 1, (pb.TIER_DRAM,)), event(pb.EVENT_STORED, 2, 2)]))
    assert "before the snapshot ended" in reason
    assert sink.snapshots == [] and sink.applied == [] and not feed.synced.is_set()


def test_an_empty_node_and_a_stream_that_ends() -> None:
    sink = Sink.__new__(Sink)
    sink.snapshots, sink.applied = [], []
    feed = NodeFeed("a", "127.0.0.1:1", _AnyNamespace(sink))
    assert feed._follow(iter([event(pb.EVENT_SNAPSHOT_END, 0)])) == "stream ended by the node"
    assert sink.snapshots == [{}]


class _AnyNamespace:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def replace_node(
        self, node_id: str, blocks: dict[BlockKey, tuple[TierKind, ...]], namespaces: set[NamespaceId]
    ) -> None:
        self._sink.snapshots.append(dict(blocks))

    def apply(self, node_id: str, key: BlockKey, namespace: NamespaceId, tiers: tuple[TierKind, ...]) -> None:
        self._sink.applied.append((key, tiers))
