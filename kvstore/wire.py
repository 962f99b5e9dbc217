"""Conversions between the proto messages and the domain types, for the servicer and the SDK.

Ids are built here from wire bytes (and only here on the gRPC path), after their lengths are
checked: a malformed key or namespace id is an `InvalidArgumentError` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.errors import InvalidArgumentError
from kvstore.events import BlockEvent, EventKind
from kvstore.proto import kvstore_pb2 as pb
from kvstore.stats import StoreStats, TierStats
from kvstore.types import (
    KEY_BYTES,
    BlockInfo,
    BlockKey,
    DType,
    EngineLoad,
    KVLayout,
    KVPacking,
    Namespace,
    NamespaceId,
    TierKind,
)

_TIERS = tuple(TierKind)
_TIER_TO_PROTO = {tier: pb.Tier.ValueType(tier.value + 1) for tier in TierKind}

_EVENT_TO_PROTO = {
    EventKind.SNAPSHOT: pb.EVENT_SNAPSHOT,
    EventKind.SNAPSHOT_END: pb.EVENT_SNAPSHOT_END,
    EventKind.STORED: pb.EVENT_STORED,
    EventKind.REMOVED: pb.EVENT_REMOVED,
    EventKind.TIER_CHANGED: pb.EVENT_TIER_CHANGED,
}
_EVENT_FROM_PROTO = {value: kind for kind, value in _EVENT_TO_PROTO.items()}


# -- keys and ids ----------------------------------------------------------------------------


def pack_keys(keys: Sequence[BlockKey]) -> bytes:
    return b"".join(keys)


def namespace_id_from(raw: bytes, *, field: str = "namespace_id") -> NamespaceId:
    if len(raw) != KEY_BYTES:
        raise InvalidArgumentError(f"{field} must be {KEY_BYTES} bytes, got {len(raw)}")
    return NamespaceId(raw)


def parent_from(raw: bytes) -> BlockKey | None:
    if not raw:
        return None
    if len(raw) != KEY_BYTES:
        raise InvalidArgumentError(f"parent must be empty or {KEY_BYTES} bytes, got {len(raw)}")
    return BlockKey(raw)


# -- tiers -----------------------------------------------------------------------------------


def tier_to_proto(tier: TierKind) -> pb.Tier.ValueType:
    return _TIER_TO_PROTO[tier]


def tier_from_proto(value: int) -> TierKind:
    if not 1 <= value <= len(_TIERS):
        raise InvalidArgumentError(f"unknown tier {value}")
    return _TIERS[value - 1]


def tiers_to_proto(tiers: Sequence[TierKind]) -> list[pb.Tier.ValueType]:
    return [_TIER_TO_PROTO[tier] for tier in tiers]


def tiers_from_proto(values: Sequence[int]) -> tuple[TierKind, ...]:
    if values and not 1 <= min(values) <= max(values) <= len(_TIERS):
        raise InvalidArgumentError(f"unknown tier in {sorted(set(values))}")
    return tuple(map(_TIERS.__getitem__, [value - 1 for value in values]))


# -- namespaces ------------------------------------------------------------------------------


def namespace_to_proto(namespace: Namespace) -> pb.Namespace:
    layout = namespace.layout
    return pb.Namespace(
        model_id=namespace.model_id,
        model_revision=namespace.model_revision,
        dtype=namespace.dtype.value,
        layout=pb.KVLayout(
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_size=layout.head_size,
            packing=layout.packing.value,
        ),
        block_tokens=namespace.block_tokens,
        tp_rank=namespace.tp_rank,
        tp_size=namespace.tp_size,
        tenant_salt=namespace.tenant_salt,
    )


def namespace_from_proto(message: pb.Namespace) -> Namespace:
    """A validated Namespace; InvalidArgumentError names the first bad field."""
    if not message.HasField("layout"):
        raise InvalidArgumentError("namespace.layout is required")
    try:
        dtype = DType(message.dtype)
    except ValueError:
        raise InvalidArgumentError(
            f"namespace.dtype {message.dtype!r} is not one of {[d.value for d in DType]}"
        ) from None
    try:
        packing = KVPacking(message.layout.packing or KVPacking.SEPARATE.value)
    except ValueError:
        raise InvalidArgumentError(
            f"namespace.layout.packing {message.layout.packing!r} is not one of {[p.value for p in KVPacking]}"
        ) from None
    layout = KVLayout(message.layout.num_layers, message.layout.num_kv_heads, message.layout.head_size, packing)
    return Namespace(
        model_id=message.model_id,
        dtype=dtype,
        layout=layout,
        block_tokens=message.block_tokens,
        model_revision=message.model_revision,
        tp_rank=message.tp_rank,
        tp_size=message.tp_size or 1,
        tenant_salt=message.tenant_salt,
    )


# -- stats, blocks, events -------------------------------------------------------------------


def stats_to_proto(stats: StoreStats) -> list[pb.TierStats]:
    return [
        pb.TierStats(
            tier=tier_to_proto(tier.kind),
            capacity_bytes=tier.capacity_bytes,
            used_bytes=tier.used_bytes,
            num_blocks=tier.num_blocks,
            hits=tier.hits,
            evictions=tier.evictions,
            demotions_in=tier.demotions_in,
            promotions_in=tier.promotions_in,
            checksum_failures=tier.checksum_failures,
        )
        for tier in stats.tiers
    ]


def tier_stats_from_proto(message: pb.TierStats) -> TierStats:
    return TierStats(
        tier_from_proto(message.tier),
        message.capacity_bytes,
        message.used_bytes,
        message.num_blocks,
        message.hits,
        message.evictions,
        message.demotions_in,
        message.promotions_in,
        message.checksum_failures,
    )


def load_to_proto(load: EngineLoad) -> pb.NodeLoad:
    return pb.NodeLoad(
        queued_prefill_tokens=load.queued_prefill_tokens,
        running_decodes=load.running_decodes,
        decode_kv_tokens=load.decode_kv_tokens,
        decode_pause_budget_s=load.decode_pause_budget_s,
    )


def load_from_proto(message: pb.NodeLoad) -> EngineLoad:
    """Not checked here: `EngineLoad.check` names what is out of range."""
    return EngineLoad(
        message.queued_prefill_tokens, message.running_decodes, message.decode_kv_tokens, message.decode_pause_budget_s
    )


def block_info_to_proto(info: BlockInfo) -> pb.BlockInfo:
    return pb.BlockInfo(
        key=info.key,
        namespace_id=info.namespace_id,
        parent=info.parent or b"",
        tiers=tiers_to_proto(info.tiers),
        size_bytes=info.size_bytes,
        checksum=info.checksum,
        leases=info.num_leases,
        pinned=info.is_pinned,
    )


def block_info_from_proto(message: pb.BlockInfo) -> BlockInfo:
    return BlockInfo(
        BlockKey(message.key),
        NamespaceId(message.namespace_id),
        BlockKey(message.parent) if message.parent else None,
        tiers_from_proto(message.tiers),
        message.size_bytes,
        message.checksum,
        message.leases,
        message.pinned,
    )


def event_to_proto(event: BlockEvent) -> pb.Event:
    return pb.Event(
        sequence=event.sequence,
        type=_EVENT_TO_PROTO[event.kind],
        namespace_id=event.namespace_id,
        key=event.key,
        parent=event.parent or b"",
        tiers=tiers_to_proto(event.tiers),
    )


def event_from_proto(message: pb.Event) -> BlockEvent:
    kind = _EVENT_FROM_PROTO.get(message.type)
    if kind is None:
        raise InvalidArgumentError(f"unknown event type {message.type}")
    return BlockEvent(
        message.sequence,
        kind,
        NamespaceId(message.namespace_id),
        BlockKey(message.key),
        BlockKey(message.parent) if message.parent else None,
        tiers_from_proto(message.tiers),
    )
