"""The store benchmark's data-path figures: put and get of batches in every tier, against a
memcpy (DRAM, HBM) or raw O_DIRECT I/O (NVMe) of the same bytes. See tools/bench/store.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from kvstore.config import DramConfig, HbmConfig, MiB, NvmeConfig, StoreConfig
from kvstore.store import Store
from kvstore.tiers.hbm import HbmTier
from kvstore.tiers.nvme import NvmeTier
from kvstore.types import BlockKey, NamespaceId, TierKind
from tools.bench import harness
from tools.bench.harness import Comparison, Figure, Trial, Unit
from tools.bench.store_common import (
    BATCH_BLOCKS,
    DATA_GROUP,
    DATA_NOTES,
    DATA_TARGETS,
    MEMORY_TIER_BYTES,
    NVME_TIER_BYTES,
    SLAB_BYTES,
    Batch,
    BlockPool,
    Settings,
    format_size,
    fresh_keys,
    iterations_for,
)

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
    if device.type == "cpu":
        yield data_comparison(
            kind,
            "get into one buffer",
            batch,
            buffer_get_trial(store, namespace_id, keys, batch),
            {"memcpy, one np.copyto of the batch": Trial(lambda _: np.copyto(batch.dest_buffer, batch.source_buffer))},
            settings,
            note="an engine's staging buffer: checked once, one copy per run of adjacent slots",
        )
    store.remove(namespace_id, keys)


def buffer_get_trial(store: Store, namespace_id: NamespaceId, keys: list[BlockKey], batch: Batch) -> Trial:
    typed = batch.dest_buffer.view(np.float16).reshape((len(keys), *batch.namespace.block_shape))

    def run(_: int) -> None:
        count = store.get_into_buffer(namespace_id, keys, typed)
        if count != len(keys):
            raise RuntimeError(f"get found {count} of {len(keys)} blocks: the figure would be wrong")

    return Trial(run)


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
