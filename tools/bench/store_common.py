"""What the store benchmark's parts share: sizes, settings, targets, buffers, namespaces, keys."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvstore.config import KiB, MiB
from kvstore.types import BlockKey, DType, KVLayout, Namespace, TierKind
from tools.bench import harness
from tools.bench.harness import Target

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
    (TierKind.DRAM, "get into one buffer", 64 * KiB): Target.ratio_at_least(0.5),
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
    source_buffer: npt.NDArray[np.uint8]  # the sources back to back: one contiguous view
    dest_buffer: npt.NDArray[np.uint8]  # the destinations back to back

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

        total = BATCH_BLOCKS * block_bytes
        return Batch(
            namespace_for(block_bytes),
            split(self.source),
            split(self.dest),
            self.source[:total],
            self.dest[:total],
        )


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


def format_size(size_bytes: int) -> str:
    return f"{size_bytes // MiB} MiB" if size_bytes >= MiB else f"{size_bytes // KiB} KiB"
