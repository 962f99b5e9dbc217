"""How kvctl shows things: aligned text tables, sizes, usage bars, and the JSON shape of every
domain value it prints (`--json`). Called by `kvctl.commands` and `kvctl.top`; pure.

JSON documents use full hex for keys and ids, bytes as integers, tier names in lower case, so
scripts never parse the text form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeAlias

from kvstore.client import NodeStatus
from kvstore.stats import TierStats
from kvstore.types import BlockInfo, BlockKey, Namespace, TierKind

JsonValue: TypeAlias = "str | int | float | bool | Sequence[JsonValue] | Mapping[str, JsonValue] | None"
JsonObject: TypeAlias = Mapping[str, JsonValue]

PREFIX_HEX_DIGITS = 12  # key and id prefixes in tables: unique among millions of blocks
_TIER_NAMES = {TierKind.HBM: "HBM", TierKind.DRAM: "DRAM", TierKind.NVME: "NVMe"}
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one command prints: `text` for people, `document` for `--json`, and its exit code."""

    text: str
    document: JsonObject = field(default_factory=dict)
    exit_code: int = 0


# -- text ------------------------------------------------------------------------------------


def tier_name(kind: TierKind) -> str:
    return _TIER_NAMES[kind]


def short_hex(value: bytes | None) -> str:
    return value.hex()[:PREFIX_HEX_DIGITS] if value else "-"


def format_bytes(count: int) -> str:
    size, unit = float(count), 0
    while abs(size) >= 1024 and unit < len(_BYTE_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{count} B" if unit == 0 else f"{size:.1f} {_BYTE_UNITS[unit]}"


def format_duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def usage_bar(fraction: float, width: int = 30) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; `right[i]` right-aligns column i (numbers)."""
    aligned_right = list(right) if right is not None else [False] * len(headers)
    widths = [max([len(header), *(len(row[index]) for row in rows)]) for index, header in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if is_right else cell.ljust(width)
            for cell, width, is_right in zip(cells, widths, aligned_right, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def tiers_table(tiers: Sequence[TierStats]) -> str:
    rows = [
        [
            tier_name(tier.kind),
            format_bytes(tier.capacity_bytes),
            format_bytes(tier.used_bytes),
            f"{percent(tier.used_bytes, tier.capacity_bytes):.1f}%",
            str(tier.num_blocks),
            str(tier.hits),
            str(tier.evictions),
            str(tier.demotions_in),
            str(tier.promotions_in),
            str(tier.checksum_failures),
        ]
        for tier in tiers
    ]
    headers = [
        "TIER",
        "CAPACITY",
        "USED",
        "FULL",
        "BLOCKS",
        "HITS",
        "EVICTIONS",
        "DEMOTED IN",
        "PROMOTED IN",
        "BAD SUMS",
    ]
    return table(headers, rows, right=[False, *[True] * 9])


def blocks_table(blocks: Sequence[BlockInfo]) -> str:
    rows = [
        [
            short_hex(block.key),
            short_hex(block.parent),
            short_hex(block.namespace_id),
            ",".join(tier.label for tier in block.tiers),
            format_bytes(block.size_bytes),
            str(block.num_leases),
            "yes" if block.is_pinned else "no",
        ]
        for block in blocks
    ]
    headers = ["KEY", "PARENT", "NAMESPACE", "TIERS", "SIZE", "LEASES", "PINNED"]
    return table(headers, rows, right=[False, False, False, False, True, True, False])


def block_details(block: BlockInfo) -> str:
    checksum = f"{block.checksum:016x}" if block.checksum else "not computed yet"
    fields = [
        ("key", block.key.hex()),
        ("namespace", block.namespace_id.hex()),
        ("parent", block.parent.hex() if block.parent else "- (first block of its chain)"),
        ("tiers", ", ".join(tier_name(tier) for tier in block.tiers)),
        ("size", f"{block.size_bytes} B"),
        ("checksum", checksum),
        ("leases", str(block.num_leases)),
        ("pinned", "yes" if block.is_pinned else "no"),
    ]
    return "\n".join(f"  {name + ':':<11}{value}" for name, value in fields)


def lookup_hit_ratio(status: NodeStatus) -> float | None:
    looked_up = status.lookup_hit_blocks + status.lookup_miss_blocks
    return status.lookup_hit_blocks / looked_up if looked_up else None


# -- JSON ------------------------------------------------------------------------------------


def namespace_json(namespace: Namespace) -> JsonObject:
    layout = namespace.layout
    return {
        "id": namespace.namespace_id.hex(),
        "model_id": namespace.model_id,
        "model_revision": namespace.model_revision,
        "dtype": namespace.dtype.value,
        "layout": {
            "num_layers": layout.num_layers,
            "num_kv_heads": layout.num_kv_heads,
            "head_size": layout.head_size,
            "packing": layout.packing.value,
        },
        "block_tokens": namespace.block_tokens,
        "block_bytes": namespace.block_bytes,
        "tp_rank": namespace.tp_rank,
        "tp_size": namespace.tp_size,
    }


def tier_json(tier: TierStats) -> JsonObject:
    return {
        "tier": tier.kind.label,
        "capacity_bytes": tier.capacity_bytes,
        "used_bytes": tier.used_bytes,
        "num_blocks": tier.num_blocks,
        "hits": tier.hits,
        "evictions": tier.evictions,
        "demotions_in": tier.demotions_in,
        "promotions_in": tier.promotions_in,
        "checksum_failures": tier.checksum_failures,
    }


def block_json(block: BlockInfo) -> JsonObject:
    return {
        "key": block.key.hex(),
        "namespace_id": block.namespace_id.hex(),
        "parent": block.parent.hex() if block.parent else None,
        "tiers": [tier.label for tier in block.tiers],
        "size_bytes": block.size_bytes,
        "checksum": f"{block.checksum:016x}" if block.checksum else None,
        "num_leases": block.num_leases,
        "is_pinned": block.is_pinned,
    }


def keys_json(keys: Sequence[BlockKey]) -> list[str]:
    return [key.hex() for key in keys]


def node_status_json(node: NodeStatus, grpc_address: str) -> JsonObject:
    return {
        "node_id": node.node_id,
        "version": node.version,
        "grpc_address": grpc_address,
        "data_address": node.data_address,
        "segment_name": node.segment_name,
        "uptime_s": node.uptime_s,
        "is_draining": node.is_draining,
        "namespaces": [namespace_json(namespace) for namespace in node.namespaces],
        "num_blocks": node.num_blocks,
        "num_leases": node.num_leases,
        "num_reservations": node.num_reservations,
        "num_unhashed": node.num_unhashed,
        "lookups": node.lookups,
        "lookup_hit_blocks": node.lookup_hit_blocks,
        "lookup_miss_blocks": node.lookup_miss_blocks,
        "lookup_hit_ratio": lookup_hit_ratio(node),
        "reporting_engines": node.reporting_engines,
        "load": asdict(node.load) if node.load is not None else None,
        "tiers": [tier_json(tier) for tier in node.tiers],
    }


def engine_load_text(node: NodeStatus) -> str:
    """What the node's heartbeats tell the conductor of its engines' load."""
    load = node.load
    if load is None:
        return "no engine reports its load (the conductor keeps its own account of its placements)"
    budget = f"{load.decode_pause_budget_s:g} s" if load.decode_pause_budget_s else "none"
    engines = "1 engine" if node.reporting_engines == 1 else f"{node.reporting_engines} engines"
    return (
        f"{engines}: {load.queued_prefill_tokens} prompt tokens queued, {load.running_decodes} decoding "
        f"({load.decode_kv_tokens} KV tokens), decode pause budget {budget}"
    )
