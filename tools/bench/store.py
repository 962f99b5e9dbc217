"""The store benchmark (issue 2): the in-process data path, lookup, key hashing and index memory.

    .venv/bin/python tools/bench/store.py [--repeats N] [--quick] [--out-json PATH] [--no-doc] [--nvme-dir DIR]

What is measured, and against what (every reference is measured in the same run, interleaved
with the figure it calibrates, because the machine is shared and its speed drifts):

1. `Store.put_blocks` and `Store.get_into` of batches of 32 blocks (64 KiB, 512 KiB, 2 MiB) in
   each tier. Sources and destinations are preallocated, page-aligned and pre-faulted (a fresh
   page costs 2-3 us per 4 KiB here, which would swamp the copy). Every put writes fresh keys
   and the blocks are removed again outside the timed region, so the store really writes and
   the slots are reused. DRAM and HBM are compared with `np.copyto` of the same bytes
   ("memcpy"; on a CUDA device, torch copies to or from it). NVMe puts go to the NVMe tier and
   are compared with an O_DIRECT `pwritev` of the same bytes into a preallocated file followed
   by `fdatasync` (the store's durability contract). The ratio to the write without `fdatasync`
   is reported too; that write is flushed outside the clock, or the next trial's `fdatasync`
   would pay for it. NVMe gets are cold reads: the
   store runs with `promote_on_hit=False`, so no DRAM copy serves them, and O_DIRECT bypasses the
   page cache; they are compared with an O_DIRECT `preadv` of the same bytes into the same
   (anonymous-mmap) buffers.
2. `Store.lookup` of a 128-key chain that is stored, against 128 `dict.get` calls on the keys.
3. `block_keys` for 32k tokens in 16-token blocks, from a numpy array and from a list, against
   the bare chained xxh3_128 loop over the same token bytes.
4. Index memory per block: tracemalloc over `BlockTable` rows (key objects included) plus the
   LeafFirstLRU policy's per-row state, against one slotted Python object per block in a dict.
   Memory is deterministic, so it is measured once.

Each figure is the median over the repeats; its ratio is the median over the repeats of
(figure / reference) measured back to back. Results go to a JSON file and to a section of
docs/benchmarks.md between `<!-- bench:store:begin -->` and `<!-- bench:store:end -->`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import shlex
import shutil
import sys
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import xxhash
from tqdm import tqdm

if not __package__:  # run as a script (the documented way): make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.config import DramConfig, HbmConfig, KiB, MiB, NvmeConfig, StoreConfig
from kvstore.hashing import block_keys
from kvstore.policy import LeafFirstLRU
from kvstore.store import Store
from kvstore.table import BlockTable
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.nvme import NvmeTier
from kvstore.types import BlockKey, DType, KVLayout, Namespace, NamespaceId, Slot, TierKind
from tools.bench import harness
from tools.bench.harness import Comparison, Figure, Target, Trial, Unit

REPO = Path(__file__).resolve().parents[2]
DOC_PATH = REPO / "docs" / "benchmarks.md"
JSON_PATH = REPO / "docs" / "bench-store.json"
SEED = 2
BEGIN_MARKER, END_MARKER = "<!-- bench:store:begin -->", "<!-- bench:store:end -->"
DOC_HEADER = "# Benchmarks\n\nEach section is written by the tool it names; rerun the tool to refresh it.\n"

BATCH_BLOCKS = 32
BLOCK_SIZES = (64 * KiB, 512 * KiB, 2 * MiB)
QUICK_BLOCK_SIZES = (64 * KiB, 2 * MiB)
MEMORY_TIER_BYTES = 256 * MiB
NVME_TIER_BYTES = 256 * MiB
SLAB_BYTES = 16 * MiB
LOOKUP_KEYS = 128
HASH_TOKENS = 32 * 1024
HASH_BLOCK_TOKENS = 16
DATA_GROUP = "Data path: batches of 32 blocks, in process"
INDEX_GROUP = "Index: lookup, key hashing, memory"


@dataclass(frozen=True, slots=True)
class Settings:
    """How much work each figure does; `--quick` shrinks it for development."""

    repeats: int  # every figure is the median of this many repeats
    runs: int  # ... in the median one of this many whole runs
    block_sizes: tuple[int, ...]
    volume_bytes: int  # bytes each data-path trial moves per repeat (whole batches, at least one)
    lookup_calls: int  # timed calls per repeat
    hash_calls: int  # timed calls per repeat
    index_entries: int  # rows in the index-memory measurement


DATA_TARGETS = {
    (TierKind.DRAM, "put", 2 * MiB): Target.ratio_at_least(0.8),
    (TierKind.DRAM, "get", 2 * MiB): Target.ratio_at_least(0.8),
    (TierKind.DRAM, "get", 64 * KiB): Target.ratio_at_least(0.5),
    (TierKind.NVME, "put", 2 * MiB): Target.ratio_at_least(0.7),
    (TierKind.NVME, "get", 2 * MiB): Target.ratio_at_least(0.7),
}
"""The issue's goals for (tier, operation, block size), as ratios to the first reference."""
DATA_NOTES = {
    (TierKind.DRAM, "get", 64 * KiB): "Mooncake Store in one process: 0.30x (quoted from the issue, not measured)"
}


# -- buffers, namespaces, keys -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """32 source payloads and 32 destinations of one block size, views of preallocated pools."""

    namespace: Namespace
    sources: list[npt.NDArray[np.uint8]]
    dests: list[npt.NDArray[np.uint8]]

    def typed(self, blocks: list[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.float16]]:
        """As an engine hands them over: arrays of the namespace's dtype and block shape."""
        return [block.view(np.float16).reshape(self.namespace.block_shape) for block in blocks]


class BlockPool:
    """Source and destination memory for the largest batch, reused by every block size."""

    def __init__(self, max_block_bytes: int, rng: np.random.Generator) -> None:
        self.source = harness.aligned_bytes(BATCH_BLOCKS * max_block_bytes)
        self.source[:] = rng.integers(0, 256, self.source.size, dtype=np.uint8)
        self.dest = harness.aligned_bytes(BATCH_BLOCKS * max_block_bytes)

    def batch(self, block_bytes: int) -> Batch:
        def split(pool: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.uint8]]:
            return [pool[i * block_bytes : (i + 1) * block_bytes] for i in range(BATCH_BLOCKS)]

        return Batch(namespace_for(block_bytes), split(self.source), split(self.dest))


def namespace_for(block_bytes: int) -> Namespace:
    """float16, 8 KV heads of 128, 16 tokens: 64 KiB per layer, so 1, 8 or 32 layers."""
    per_layer = 2 * HASH_BLOCK_TOKENS * 8 * 128 * DType.FLOAT16.itemsize
    if block_bytes % per_layer:
        raise ValueError(f"block size {block_bytes} is not a multiple of {per_layer}")
    layout = KVLayout(num_layers=block_bytes // per_layer, num_kv_heads=8, head_size=128)
    return Namespace("bench-store", DType.FLOAT16, layout, block_tokens=HASH_BLOCK_TOKENS)


def fresh_keys(rng: np.random.Generator, count: int) -> list[BlockKey]:
    raw = rng.bytes(16 * count)
    return [BlockKey(raw[i : i + 16]) for i in range(0, len(raw), 16)]


def iterations_for(settings: Settings, kind: TierKind, block_bytes: int) -> int:
    """Batches per repeat: the settings' volume, and at least 3 on NVMe, whose speed swings most."""
    return max(3 if kind is TierKind.NVME else 1, settings.volume_bytes // (BATCH_BLOCKS * block_bytes))


# -- 1. data path: put and get through the Store API ---------------------------------------------


def data_comparison(
    kind: TierKind,
    operation: str,
    batch: Batch,
    subject: Trial,
    references: dict[str, Trial],
    settings: Settings,
    *,
    qualifier: str = "",
    note: str = "",
) -> Comparison:
    size = batch.namespace.block_bytes
    return Comparison(
        group=DATA_GROUP,
        name=f"{kind.label.upper()} {operation} {format_size(size)}{qualifier}",
        unit=Unit.GBPS,
        subject=subject,
        references=references,
        iterations=iterations_for(settings, kind, size),
        bytes_per_call=BATCH_BLOCKS * size,
        target=DATA_TARGETS.get((kind, operation, size)),
        note=note or DATA_NOTES.get((kind, operation, size), ""),
    )


def put_trial(store: Store, namespace_id: NamespaceId, batch: Batch, tier: TierKind, rng: np.random.Generator) -> Trial:
    """Put fresh keys each call (drawn before the clock starts) and remove them after it stops."""
    payloads = batch.typed(batch.sources)
    sync = device_sync(store, tier)
    keys: list[BlockKey] = []

    def before(_: int) -> None:
        nonlocal keys
        keys = fresh_keys(rng, BATCH_BLOCKS)

    def run(_: int) -> None:
        written = store.put_blocks(namespace_id, keys, payloads, tier=tier).num_written
        sync()
        if written != BATCH_BLOCKS:
            raise RuntimeError(f"put wrote {written} of {BATCH_BLOCKS} blocks: the figure would be wrong")

    def after(_: int) -> None:
        store.remove(namespace_id, keys)

    return Trial(run, before, after)


def get_trial(store: Store, namespace_id: NamespaceId, keys: list[BlockKey], batch: Batch, tier: TierKind) -> Trial:
    dests = batch.typed(batch.dests)
    sync = device_sync(store, tier)

    def run(_: int) -> None:
        count = store.get_into(namespace_id, keys, dests)
        sync()
        if count != len(keys):
            raise RuntimeError(f"get found {count} of {len(keys)} blocks: the figure would be wrong")

    return Trial(run)


def store_for_get(
    store: Store, namespace_id: NamespaceId, batch: Batch, tier: TierKind, rng: np.random.Generator
) -> list[BlockKey]:
    """Put one batch into `tier` for the gets, then check that a get returns the same bytes."""
    keys = fresh_keys(rng, BATCH_BLOCKS)
    store.put_blocks(namespace_id, keys, batch.typed(batch.sources), tier=tier)
    for dest in batch.dests:
        dest.fill(0)
    store.get_into(namespace_id, keys, batch.dests)
    if not all(np.array_equal(s, d) for s, d in zip(batch.sources, batch.dests, strict=True)):
        raise RuntimeError("get_into returned other bytes than put_blocks stored")
    check_tiers(store, namespace_id, keys, tier)
    return keys


def check_tiers(store: Store, namespace_id: NamespaceId, keys: list[BlockKey], tier: TierKind) -> None:
    """Every block's fastest copy is in `tier`: nothing was promoted, demoted or evicted."""
    found = store.lookup(namespace_id, keys)
    if found.num_hits != len(keys) or set(found.tiers) != {tier}:
        raise RuntimeError(f"expected {len(keys)} blocks in {tier.label}, lookup says {found}")


def tier_device(store: Store, tier: TierKind) -> torch.device:
    hbm = store.tiers[tier]
    return hbm.device if isinstance(hbm, HbmTier) else torch.device("cpu")


def device_sync(store: Store, tier: TierKind) -> Callable[[], None]:
    """Copies to and from a GPU may return before they finish; the clock must wait for them."""
    device = tier_device(store, tier)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def copy_reference(batch: Batch, device: torch.device, *, to_device: bool) -> dict[str, Trial]:
    """memcpy of the same bytes: `np.copyto` on the host, a torch copy to or from a CUDA device."""
    if device.type == "cpu":
        pairs = list(zip(batch.sources, batch.dests, strict=True))

        def copy_host(_: int) -> None:
            for source, dest in pairs:
                np.copyto(dest, source)

        return {"memcpy (np.copyto)": Trial(copy_host)}
    size = batch.namespace.block_bytes
    scratch = torch.empty(BATCH_BLOCKS * size, dtype=torch.uint8, device=device)
    slots = [scratch[i * size : (i + 1) * size] for i in range(BATCH_BLOCKS)]
    hosts = [torch.from_numpy(block) for block in (batch.sources if to_device else batch.dests)]

    transfers = list(zip(hosts, slots, strict=True)) if to_device else list(zip(slots, hosts, strict=True))

    def copy_device(_: int) -> None:
        for source, dest in transfers:
            dest.copy_(source)
        torch.cuda.synchronize(device)

    return {f"torch copy {'to' if to_device else 'from'} {device}": Trial(copy_device)}


def memory_tier_comparisons(
    store: Store, kind: TierKind, batch: Batch, settings: Settings, rng: np.random.Generator
) -> Iterator[Comparison]:
    """Put and get of one block size in the DRAM or HBM tier, each against a memcpy."""
    namespace_id = store.register_namespace(batch.namespace)
    device = tier_device(store, kind)
    note = ""
    if kind is TierKind.HBM and device.type == "cpu":
        note = f"torch copy_ on cpu may use {torch.get_num_threads()} threads; np.copyto uses one"
    put = put_trial(store, namespace_id, batch, kind, rng)
    references = copy_reference(batch, device, to_device=True)
    yield data_comparison(kind, "put", batch, put, references, settings, note=note)
    keys = store_for_get(store, namespace_id, batch, kind, rng)
    get = get_trial(store, namespace_id, keys, batch, kind)
    references = copy_reference(batch, device, to_device=False)
    yield data_comparison(kind, "get", batch, get, references, settings, note=note)
    store.remove(namespace_id, keys)


def memory_tier_config(kind: TierKind) -> StoreConfig:
    """Room for a resident batch plus a batch being put, far below the eviction watermark."""
    if kind is TierKind.DRAM:
        return StoreConfig(dram=DramConfig(capacity_bytes=MEMORY_TIER_BYTES, slab_bytes=SLAB_BYTES))
    return StoreConfig(  # the DRAM tier is always there; one slab keeps it small
        dram=DramConfig(capacity_bytes=SLAB_BYTES, slab_bytes=SLAB_BYTES),
        hbm=HbmConfig(capacity_bytes=MEMORY_TIER_BYTES, slab_bytes=SLAB_BYTES),
    )


# -- 1. data path: NVMe against raw O_DIRECT I/O -------------------------------------------------


def nvme_config(directory: Path) -> StoreConfig:
    """NVMe reads must come from NVMe: no promotion to DRAM, which holds one slab only."""
    return StoreConfig(
        dram=DramConfig(capacity_bytes=SLAB_BYTES, slab_bytes=SLAB_BYTES),
        nvme=NvmeConfig(
            directory=directory,
            capacity_bytes=NVME_TIER_BYTES,
            file_bytes=NVME_TIER_BYTES,
            slab_bytes=SLAB_BYTES,
            index_map_bytes=64 * MiB,
        ),
        promote_on_hit=False,
    )


@contextlib.contextmanager
def reference_file(path: Path, size_bytes: int, direct: bool) -> Iterator[int]:
    """A preallocated file opened as the store opens its slab files (O_DIRECT when it does)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o600)
    try:
        os.posix_fallocate(fd, 0, size_bytes)
        yield fd
    finally:
        os.close(fd)


def raw_write_trial(fd: int, blocks: list[npt.NDArray[np.uint8]], *, sync: bool) -> Trial:
    """One sequential `pwritev` of the batch at offset 0, then `fdatasync` when `sync`."""
    views, total = [block.data for block in blocks], sum(block.nbytes for block in blocks)

    def run(_: int) -> None:
        if os.pwritev(fd, views, 0) != total:
            raise RuntimeError("short write in the reference")
        if sync:
            os.fdatasync(fd)

    # Unsynced data left in the device's cache would be flushed by the next trial's fdatasync
    # and billed to it; flush it outside the clock.
    return Trial(run, after=None if sync else lambda _: os.fdatasync(fd))


def raw_read_trial(fd: int, blocks: list[npt.NDArray[np.uint8]]) -> Trial:
    """One sequential `preadv` of the batch at offset 0 into the (page-aligned) destinations."""
    views, total = [block.data for block in blocks], sum(block.nbytes for block in blocks)

    def run(_: int) -> None:
        if os.preadv(fd, views, 0) != total:
            raise RuntimeError("short read in the reference")

    return Trial(run)


def nvme_comparisons(
    store: Store, fd: int, mode: str, batch: Batch, settings: Settings, rng: np.random.Generator
) -> Iterator[Comparison]:
    """Put (durable) and cold get of one block size in the NVMe tier, against raw file I/O."""
    namespace_id = store.register_namespace(batch.namespace)
    writes = {
        f"{mode} write + fdatasync": raw_write_trial(fd, batch.sources, sync=True),
        f"{mode} write, no fdatasync": raw_write_trial(fd, batch.sources, sync=False),
    }
    put = put_trial(store, namespace_id, batch, TierKind.NVME, rng)
    yield data_comparison(TierKind.NVME, "put", batch, put, writes, settings)
    keys = store_for_get(store, namespace_id, batch, TierKind.NVME, rng)
    reads = {f"{mode} read": raw_read_trial(fd, batch.dests)}
    get = get_trial(store, namespace_id, keys, batch, TierKind.NVME)
    yield data_comparison(TierKind.NVME, "get", batch, get, reads, settings, qualifier=", cold")
    check_tiers(store, namespace_id, keys, TierKind.NVME)  # still cold: nothing was promoted
    store.remove(namespace_id, keys)


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
        table, policy = BlockTable(initial_rows=entries), LeafFirstLRU()
        policy.resize(table.capacity)
        parent: BlockKey | None = None
        for i in range(entries):
            key = BlockKey(raw[16 * i : 16 * i + 16])
            row = table.add(key, parent, 0, checksums[i])
            table.set_resident(row, TierKind.DRAM, Slot(i * 64 * KiB))
            parent = key
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
        name="index memory per block (BlockTable + LeafFirstLRU state)",
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


# -- running ---------------------------------------------------------------------------------------


def bench_memory_tier(
    kind: TierKind, pool: BlockPool, settings: Settings, rng: np.random.Generator, progress: tqdm
) -> tuple[list[Figure], torch.device]:
    figures: list[Figure] = []
    with Store(memory_tier_config(kind)) as store:
        for size in settings.block_sizes:
            comparisons = memory_tier_comparisons(store, kind, pool.batch(size), settings, rng)
            figures += harness.run_comparisons(comparisons, settings.repeats, progress)
        return figures, tier_device(store, kind)


def bench_nvme(
    parent: Path, pool: BlockPool, settings: Settings, rng: np.random.Generator, progress: tqdm
) -> tuple[list[Figure], dict[str, str]]:
    """The NVMe figures, in a temporary directory under `parent` that is removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-", dir=parent))
    try:
        figures: list[Figure] = []
        with Store(nvme_config(workdir / "tier")) as store:
            tier = store.tiers[TierKind.NVME]
            if not isinstance(tier, NvmeTier):
                raise RuntimeError("the store has no NVMe tier")
            mode = "O_DIRECT" if tier.direct_io else "buffered"
            reference_bytes = BATCH_BLOCKS * max(settings.block_sizes)
            with reference_file(workdir / "reference.bin", reference_bytes, tier.direct_io) as fd:
                for size in settings.block_sizes:
                    comparisons = nvme_comparisons(store, fd, mode, pool.batch(size), settings, rng)
                    figures += harness.run_comparisons(comparisons, settings.repeats, progress)
        direct = "yes (NvmeTier.direct_io)" if tier.direct_io else "NO: the filesystem refused it, buffered I/O"
        context = {
            "NVMe directory": f"a temporary directory under {parent}, removed afterwards",
            "NVMe filesystem": harness.filesystem_of(workdir),
            "O_DIRECT": direct,
        }
        return figures, context
    finally:
        shutil.rmtree(workdir)


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


def run_all(settings: Settings, nvme_parent: Path) -> tuple[list[Figure], dict[str, str]]:
    rng = np.random.default_rng(SEED)
    num_steps = 6 * len(settings.block_sizes) + 4
    with tqdm(total=num_steps, file=sys.stderr, unit="figure", dynamic_ncols=True, disable=None) as progress:
        progress.set_description("preparing buffers")
        pool = BlockPool(max(settings.block_sizes), rng)
        # NVMe first, in a fresh process as a node daemon starts: once the memory-tier stores have
        # populated and freed 512 MiB, the NVMe tier's staging buffer gets physically scattered
        # pages, and O_DIRECT requests from it carry ~1 MiB (254 segments of 4 KiB on virtio-blk)
        # instead of 4 MiB. That made its writes 3-4x slower here while the reference, writing
        # from the pool allocated at start, was unaffected: an artefact of the order, not the store.
        nvme, nvme_context = bench_nvme(nvme_parent, pool, settings, rng, progress)
        dram, _ = bench_memory_tier(TierKind.DRAM, pool, settings, rng, progress)
        hbm, device = bench_memory_tier(TierKind.HBM, pool, settings, rng, progress)
        index = bench_index(pool, settings, rng, progress)
    context = {
        **harness.machine_info(),
        "numpy, torch": f"{np.__version__}, {torch.__version__}",
        "HBM tier device": str(device),
        **nvme_context,
    }
    return [*dram, *hbm, *nvme, *index], context


# -- report ----------------------------------------------------------------------------------------


def format_size(size_bytes: int) -> str:
    return f"{size_bytes // MiB} MiB" if size_bytes >= MiB else f"{size_bytes // KiB} KiB"


def median_run(runs: list[tuple[list[Figure], dict[str, str]]]) -> tuple[list[Figure], dict[str, str]]:
    """Per measurement, the run whose ratio to the first reference is the median of the runs
    (whole runs differ more than repeats within one: the machine's speed drifts over minutes);
    every row of that measurement comes from that run, and notes the runs' range."""
    if len(runs) == 1:
        return runs[0]
    first_rows: dict[str, list[Figure]] = {}
    for figures, _ in runs:
        seen: set[str] = set()
        for figure in figures:
            if figure.name not in seen:
                seen.add(figure.name)
                first_rows.setdefault(figure.name, []).append(figure)
    merged: list[Figure] = []
    for name, firsts in first_rows.items():
        median_index = sorted(range(len(firsts)), key=lambda i: firsts[i].ratio)[len(firsts) // 2]
        ratios = sorted(figure.ratio for figure in firsts)
        spread = f"ratio over {len(runs)} runs: {ratios[0]:.2f}-{ratios[-1]:.2f}x"
        for figure in runs[median_index][0]:
            if figure.name == name:
                note = spread if figure is firsts[median_index] else ""
                merged.append(replace(figure, note="; ".join(n for n in (figure.note, note) if n)))
    return merged, runs[-1][1]


def render_markdown(figures: list[Figure], context: dict[str, str], settings: Settings, command: str) -> str:
    lines = [
        "## Store (issue 2)",
        "",
        f"Written by `{command}` on {context['date']}.",
        "",
        *(f"- {name}: {value}" for name, value in context.items() if name != "date"),
        "",
        f"Every figure is the median of {settings.repeats} repeats in the median one of {settings.runs} runs "
        "(the note gives the runs' range). Ratio = figure / reference: the median over "
        "the repeats of the two measured back to back (higher is better for GB/s, lower for times and bytes). "
        "Sources and destinations are preallocated, page-aligned and pre-faulted; every put writes fresh keys.",
        "",
        harness.target_summary(figures),
        *harness.markdown_tables(figures),
    ]
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the store's data path, lookup, key hashing and index.")
    parser.add_argument(
        "--repeats", type=int, help="repeats per figure; each figure is their median (default 5, 3 with --quick)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="whole runs; each row reports the median run (default 3, 1 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, sizes, calls and index entries, for development; implies --no-doc",
    )
    parser.add_argument(
        "--out-json",
        type=Path,
        default=JSON_PATH,
        help=f"where to write the results (default {JSON_PATH.relative_to(REPO)})",
    )
    parser.add_argument(
        "--no-doc", action="store_true", help=f"do not rewrite the section in {DOC_PATH.relative_to(REPO)}"
    )
    parser.add_argument(
        "--nvme-dir",
        type=Path,
        default=REPO.parent,
        help="where the temporary NVMe directory goes (default: the repository's parent)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        args.runs = 1
    if not args.nvme_dir.is_dir():
        parser.error(f"--nvme-dir {args.nvme_dir} is not a directory")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            args.repeats or 3,
            args.runs,
            QUICK_BLOCK_SIZES,
            16 * MiB,
            lookup_calls=300,
            hash_calls=10,
            index_entries=100_000,
        )
    return Settings(
        args.repeats or 5, args.runs, BLOCK_SIZES, 64 * MiB, lookup_calls=2000, hash_calls=40, index_entries=1_000_000
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    settings = settings_from(args)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *arguments])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = []
    for run in range(args.runs):
        print(f"run {run + 1} of {args.runs}", file=sys.stderr)
        runs.append(run_all(settings, args.nvme_dir))
    figures, context = median_run(runs)
    context = {"date": date, **context}
    section = render_markdown(figures, context, settings, command)
    print(section)
    payload = {"command": command, "settings": asdict(settings), "context": context}
    harness.write_json(args.out_json, {**payload, "figures": [asdict(figure) for figure in figures]})
    if not (args.no_doc or args.quick):
        harness.write_doc_section(DOC_PATH, section, BEGIN_MARKER, END_MARKER, DOC_HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
