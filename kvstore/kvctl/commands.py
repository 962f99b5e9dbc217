"""The kvctl commands that ask once and answer once: status, tiers, lookup, ls, inspect, evict,
pin, unpin and drain (`top` is in `kvctl.top`).

Called by `kvctl.main` with an open `Client` and typed arguments; each returns an `Outcome`
(text, JSON document, exit code) and prints nothing itself. Errors from the node propagate as
`KVStoreError`s, malformed input as `UsageError`s.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

from kvstore.client import Client
from kvstore.hashing import block_keys
from kvstore.kvctl import render
from kvstore.kvctl.cluster import Conductor, Holder
from kvstore.kvctl.inputs import select_namespace
from kvstore.kvctl.render import JsonObject, JsonValue, Outcome
from kvstore.types import BlockKey, LookupResult, TierKind


def status(client: Client) -> Outcome:
    node = client.status()
    ratio = render.lookup_hit_ratio(node)
    looked_up = node.lookup_hit_blocks + node.lookup_miss_blocks
    hit_text = f"{100 * ratio:.1f}% of {looked_up} blocks looked up" if ratio is not None else "no lookups yet"
    fields = [
        ("node", f"{node.node_id} (version {node.version})"),
        ("grpc", client.address),
        ("data plane", node.data_address),
        ("shared memory", node.segment_name or "-"),
        ("uptime", render.format_duration(node.uptime_s)),
        ("draining", "yes: refuses new reads and writes" if node.is_draining else "no"),
        ("blocks", f"{node.num_blocks} ({node.num_unhashed} not checksummed yet)"),
        ("leases", str(node.num_leases)),
        ("reservations", str(node.num_reservations)),
        ("lookups", f"{node.lookups}, hit ratio {hit_text}"),
        ("load", render.engine_load_text(node)),
    ]
    lines = [f"{name + ':':<15}{value}" for name, value in fields]
    rows = [
        [
            render.short_hex(namespace.namespace_id),
            namespace.model_id + (f"@{namespace.model_revision}" if namespace.model_revision else ""),
            namespace.dtype.value,
            str(namespace.block_tokens),
            render.format_bytes(namespace.block_bytes),
            f"{namespace.tp_rank}/{namespace.tp_size}",
        ]
        for namespace in node.namespaces
    ]
    headers = ["NAMESPACE", "MODEL", "DTYPE", "BLOCK TOKENS", "BLOCK SIZE", "TP RANK"]
    namespaces = render.table(headers, rows, right=[False, False, False, True, True, True])
    lines += ["", namespaces if rows else "no namespace registered yet"]
    return Outcome("\n".join(lines), render.node_status_json(node, client.address))


def tiers(client: Client) -> Outcome:
    node = client.status()
    return Outcome(render.tiers_table(node.tiers), {"tiers": [render.tier_json(tier) for tier in node.tiers]})


def lookup(
    client: Client,
    selector: str | None,
    tokens: Sequence[int],
    *,
    verbose: bool,
    conductor: Conductor | None = None,
) -> Outcome:
    """Which leading blocks of a prompt the node holds, and in which tier; with `conductor`,
    also every node of the cluster holding part of it (the conductor's global index)."""
    namespace = select_namespace(client.namespaces(), selector)
    keys = block_keys(namespace.namespace_id, tokens, namespace.block_tokens)
    result = client.lookup(namespace.namespace_id, keys) if keys else LookupResult(0, ())
    per_tier = Counter(result.tiers)
    counts = [(kind, per_tier[kind]) for kind in TierKind if per_tier[kind]]
    hits, block_tokens = result.num_hits, namespace.block_tokens
    summary = f"{hits} of {len(keys)} blocks cached ({hits * block_tokens} of {len(tokens)} tokens)"
    if counts:
        summary += ": " + ", ".join(f"{count} {render.tier_name(kind)}" for kind, count in counts)
    if keys:
        summary += f"; first miss at block {hits}" if hits < len(keys) else "; no miss"
    lines = [summary]
    leftover = len(tokens) % block_tokens
    if leftover:
        lines.append(f"({_count(leftover, 'trailing token')} not in a full {block_tokens}-token block)")
    if verbose:
        lines += ["", _lookup_blocks_table(keys, result, block_tokens)]
    holders = conductor.locate(keys) if conductor is not None and keys else []
    if conductor is not None:
        lines += ["", _cluster_text(conductor.address, holders, len(keys), block_tokens)]
    document: JsonObject = {
        "namespace_id": namespace.namespace_id.hex(),
        "block_tokens": block_tokens,
        "num_tokens": len(tokens),
        "num_blocks": len(keys),
        "num_hits": hits,
        "cached_tokens": hits * block_tokens,
        "first_miss": hits if hits < len(keys) else None,
        "tiers": {kind.label: count for kind, count in counts},
        "blocks": [
            {"index": index, "key": key.hex(), "tier": result.tiers[index].label if index < hits else None}
            for index, key in enumerate(keys)
        ],
    }
    if conductor is not None:
        document = {**document, "cluster": _cluster_json(holders, block_tokens)}
    return Outcome("\n".join(lines), document)


def _cluster_json(holders: Sequence[Holder], block_tokens: int) -> list[JsonValue]:
    return [
        {
            "node_id": holder.node_id,
            "blocks": holder.blocks,
            "cached_tokens": holder.blocks * block_tokens,
            "tiers": {kind.label: count for kind, count in holder.by_tier.items() if count},
        }
        for holder in holders
    ]


def _cluster_text(address: str, holders: Sequence[Holder], num_blocks: int, block_tokens: int) -> str:
    if not holders:
        return f"cluster (conductor {address}): no node holds its first block"
    rows = [
        [
            holder.node_id,
            f"{holder.blocks} of {num_blocks}",
            str(holder.blocks * block_tokens),
            *(str(holder.by_tier[kind]) for kind in TierKind),
        ]
        for holder in holders
    ]
    headers = ["NODE", "BLOCKS", "TOKENS", *(render.tier_name(kind).upper() for kind in TierKind)]
    summary = f"cluster (conductor {address}): {_count(len(holders), 'node')} holding its leading blocks"
    return summary + "\n" + render.table(headers, rows, right=[False, True, True, True, True, True])


def _lookup_blocks_table(keys: Sequence[BlockKey], result: LookupResult, block_tokens: int) -> str:
    rows = []
    for index, key in enumerate(keys):
        if index < result.num_hits:
            where = render.tier_name(result.tiers[index])
        else:
            where = "miss" if index == result.num_hits else "- (after the first miss)"
        tokens = f"{index * block_tokens}-{(index + 1) * block_tokens - 1}"
        rows.append([str(index), tokens, key.hex(), where])
    return render.table(["BLOCK", "TOKENS", "KEY", "TIER"], rows, right=[True, True, False, False])


def list_blocks(client: Client, selector: str | None, *, limit: int | None, tier: TierKind | None) -> Outcome:
    """Stored blocks, of one namespace or all, optionally only those with a copy in `tier`."""
    namespace = select_namespace(client.namespaces(), selector) if selector is not None else None
    stream = client.list_blocks(namespace.namespace_id if namespace else None)
    matching = (block for block in stream if tier is None or tier in block.tiers)
    blocks = list(itertools.islice(matching, None if limit is None else limit + 1))
    is_truncated = limit is not None and len(blocks) > limit
    blocks = blocks[:limit]
    footer = _count(len(blocks), "block") + (f" (the first {limit}; there are more)" if is_truncated else "")
    text = f"{render.blocks_table(blocks)}\n{footer}" if blocks else footer
    document: JsonObject = {"blocks": [render.block_json(block) for block in blocks], "is_truncated": is_truncated}
    return Outcome(text, document)


def inspect(client: Client, keys: Sequence[BlockKey]) -> Outcome:
    """Everything the node knows of each key; exit code 1 when any is not stored."""
    wanted = list(dict.fromkeys(keys))
    found = {block.key: block for block in client.inspect(wanted)}
    missing = [key for key in wanted if key not in found]
    sections = [
        f"block {key.hex()}\n{render.block_details(found[key])}" if key in found else f"{key.hex()}: not stored"
        for key in wanted
    ]
    document: JsonObject = {
        "blocks": [render.block_json(found[key]) for key in wanted if key in found],
        "missing": render.keys_json(missing),
    }
    return Outcome("\n\n".join(sections), document, exit_code=1 if missing else 0)


def evict(client: Client, selector: str | None, keys: Sequence[BlockKey]) -> Outcome:
    namespace = select_namespace(client.namespaces(), selector)
    wanted = list(dict.fromkeys(keys))
    result = client.remove(namespace.namespace_id, wanted)
    absent = len(wanted) - result.num_removed - result.num_busy
    text = (
        f"removed {result.num_removed} of {len(wanted)} blocks; {result.num_busy} busy (leased by a reader, kept); "
        f"{absent} not stored in namespace {render.short_hex(namespace.namespace_id)}"
    )
    document: JsonObject = {
        "namespace_id": namespace.namespace_id.hex(),
        "num_requested": len(wanted),
        "num_removed": result.num_removed,
        "num_busy": result.num_busy,
        "num_not_stored": absent,
    }
    return Outcome(text, document)


def pin(client: Client, selector: str | None, keys: Sequence[BlockKey], *, pinned: bool) -> Outcome:
    """Pin (never evicted) or unpin blocks; the node counts every stored key it was given."""
    namespace = select_namespace(client.namespaces(), selector)
    wanted = list(dict.fromkeys(keys))
    changed = client.pin(namespace.namespace_id, wanted) if pinned else client.unpin(namespace.namespace_id, wanted)
    verb = "pinned" if pinned else "unpinned"
    text = f"{verb} {changed} of {len(wanted)} blocks"
    if changed < len(wanted):
        text += f"; {len(wanted) - changed} not stored in namespace {render.short_hex(namespace.namespace_id)}"
    document: JsonObject = {
        "namespace_id": namespace.namespace_id.hex(),
        "pinned": pinned,
        "num_requested": len(wanted),
        "num_changed": changed,
    }
    return Outcome(text, document)


def drain(client: Client, *, flush: bool) -> Outcome:
    num_flushed = client.drain(flush=flush)
    text = f"node {client.node_id} is draining: it refuses new reads and writes"
    text += f"; flushed {num_flushed} memory-only blocks to NVMe" if flush else " (not flushed: --no-flush)"
    return Outcome(text, {"node_id": client.node_id, "is_draining": True, "flushed": flush, "num_flushed": num_flushed})


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
