"""The store benchmark's index figures: lookup latency, key hashing rate, index memory per
block. See tools/bench/store.py."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import xxhash
from tqdm import tqdm

from kvstore.config import DramConfig, KiB, StoreConfig
from kvstore.hashing import block_keys
from kvstore.policy import make_policy
from kvstore.store import Store
from kvstore.table import BlockTable
from kvstore.types import BlockKey, NamespaceId, Slot, TierKind
from tools.bench import harness
from tools.bench.harness import Comparison, Figure, Target, Trial, Unit
from tools.bench.store_common import (
    HASH_BLOCK_TOKENS,
    HASH_TOKENS,
    INDEX_GROUP,
    LOOKUP_KEYS,
    SLAB_BYTES,
    Batch,
    BlockPool,
    Settings,
    namespace_for,
)

POLICY = StoreConfig().eviction_policy  # the store's default, whose state every block pays for
INSERT_BATCH = 32  # blocks per commit while the index is built (a put of 32 blocks)

# -- 2. lookup, 3. key hashing, 4. index memory --------------------------------------------------


def lookup_comparison(store: Store, batch: Batch, settings: Settings, rng: np.random.Generator) -> Comparison:
    """`Store.lookup` of the first 128 keys of a stored 256-block chain (all hits)."""
    namespace_id = store.register_namespace(batch.namespace)
    tokens = rng.integers(0, 128_000, 2 * LOOKUP_KEYS * HASH_BLOCK_TOKENS, dtype=np.uint32)
    keys = block_keys(namespace_id, tokens, HASH_BLOCK_TOKENS)
    store.put_blocks(namespace_id, keys, [batch.sources[0]] * len(keys))
    query = keys[:LOOKUP_KEYS]
    if store.lookup(namespace_id, query).num_hits != LOOKUP_KEYS:
        raise RuntimeError("the lookup chain is not stored: the figure would be wrong")
    index = {key: row for row, key in enumerate(keys)}

    def look_up(_: int) -> None:
        store.lookup(namespace_id, query)

    def dict_gets(_: int) -> None:
        get = index.get
        for key in query:
            get(key)

    return Comparison(
        group=INDEX_GROUP,
        name=f"Store.lookup, {LOOKUP_KEYS}-key chain",
        unit=Unit.US,
        subject=Trial(look_up),
        references={f"{LOOKUP_KEYS} dict.get calls": Trial(dict_gets)},
        iterations=settings.lookup_calls,
        target=Target.value_at_most(30.0),
    )


def hashing_comparisons(settings: Settings, rng: np.random.Generator) -> list[Comparison]:
    """`block_keys` for 32k tokens, from numpy and from a list, against the bare digest chain."""
    namespace_id = namespace_for(64 * KiB).namespace_id
    tokens = rng.integers(0, 128_000, HASH_TOKENS, dtype=np.uint32)
    reference = {"bare xxh3_128 chain over the token bytes": digest_chain_trial(namespace_id, tokens.tobytes())}
    return [
        Comparison(
            group=INDEX_GROUP,
            name=f"block_keys, {HASH_TOKENS // 1024}k tokens / {HASH_BLOCK_TOKENS} from {label}",
            unit=Unit.MS,
            subject=block_keys_trial(namespace_id, source),
            references=reference,
            iterations=settings.hash_calls,
            target=Target.value_at_most(1.0),
        )
        for label, source in (("numpy uint32", tokens), ("a list", tokens.tolist()))
    ]


def block_keys_trial(namespace_id: NamespaceId, tokens: npt.NDArray[np.uint32] | list[int]) -> Trial:
    def run(_: int) -> None:
        block_keys(namespace_id, tokens, HASH_BLOCK_TOKENS)

    return Trial(run)


def digest_chain_trial(namespace_id: NamespaceId, raw: bytes) -> Trial:
    """What `block_keys` cannot go below in Python: one slice, concatenation and digest per block."""
    stride = 4 * HASH_BLOCK_TOKENS

    def run(_: int) -> None:
        digest, previous, keys = xxhash.xxh3_128_digest, bytes(namespace_id), []
        for start in range(0, len(raw), stride):
            previous = digest(previous + raw[start : start + stride])
            keys.append(previous)

    return Trial(run)


def with_key_rate(figure: Figure) -> Figure:
    keys_per_call = HASH_TOKENS // HASH_BLOCK_TOKENS
    rate = keys_per_call / (figure.value / 1e3)
    return replace(figure, note=f"{keys_per_call} keys per call: {rate / 1e6:.2f} M keys/s")


@dataclass(slots=True)
class BlockObject:
    """The reference index: what one Python object per block would hold (the table's columns)."""

    parent: BlockKey | None
    namespace: int
    size_bytes: int
    checksum: int
    slots: list[int | None]
    children: list[int]
    counted: int = 0
    leases: int = 0
    pinned: bool = False
    stamp: int = 0


def index_figure(entries: int, rng: np.random.Generator) -> Figure:
    """Bytes per block of the real index (keys included) against one object per block."""
    raw = rng.bytes(16 * entries)  # the inputs exist before tracing starts; the key objects do not
    checksums = rng.integers(0, 2**63, entries, dtype=np.uint64).tolist()

    def build_table() -> object:
        table, policy = BlockTable(initial_rows=entries), make_policy(POLICY)
        policy.attach(table)
        policy.resize(table.capacity)
        parent: BlockKey | None = None
        committed: list[int] = []
        for i in range(entries):
            key = BlockKey(raw[16 * i : 16 * i + 16])
            row = table.add(key, parent, 0, checksums[i])
            table.set_resident(row, TierKind.DRAM, Slot(i * 64 * KiB))
            committed.append(row)
            if len(committed) == INSERT_BATCH:  # the copies enter the policy as the manager commits them
                policy.on_insert(committed, TierKind.DRAM)
                committed = []
            parent = key
        policy.on_insert(committed, TierKind.DRAM)
        return table, policy

    def build_objects() -> object:
        index: dict[BlockKey, BlockObject] = {}
        parent: BlockKey | None = None
        for i in range(entries):
            key = BlockKey(raw[16 * i : 16 * i + 16])
            index[key] = BlockObject(parent, 0, 64 * KiB, checksums[i], [None, i * 64 * KiB, None], [0, 0, 0], stamp=i)
            parent = key
        return index

    value, reference = traced_bytes_per_entry(build_table, entries), traced_bytes_per_entry(build_objects, entries)
    target = Target.value_at_most(200.0)
    return Figure(
        group=INDEX_GROUP,
        name=f"index memory per block (BlockTable + {POLICY} state)",
        unit=Unit.BYTES_PER_BLOCK,
        value=value,
        reference="one slotted object per block in a dict",
        reference_value=reference,
        ratio=value / reference,
        target=target.describe(Unit.BYTES_PER_BLOCK),
        status=target.status(value, value / reference),
        note=f"{entries:,} chained entries, keys included; measured once (deterministic)",
        samples=[value],
    )


def traced_bytes_per_entry(build: Callable[[], object], entries: int) -> float:
    """Python and numpy bytes still allocated after `build()` returns, per entry."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del built
    return (after - before) / entries


def bench_index(pool: BlockPool, settings: Settings, rng: np.random.Generator, progress: tqdm) -> list[Figure]:
    lookup_config = StoreConfig(dram=DramConfig(capacity_bytes=2 * SLAB_BYTES, slab_bytes=SLAB_BYTES))
    with Store(lookup_config) as store:
        lookup = lookup_comparison(store, pool.batch(64 * KiB), settings, rng)
        figures = harness.run_comparisons([lookup], settings.repeats, progress)
    hashing = harness.run_comparisons(hashing_comparisons(settings, rng), settings.repeats, progress)
    progress.set_description(f"index memory, {settings.index_entries:,} entries")
    memory = index_figure(settings.index_entries, rng)
    harness.report([memory], progress)
    return [*figures, *map(with_key_rate, hashing), memory]
