"""Small factories for tests: namespaces, payloads and stores built from real parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.clock import ManualClock
from kvstore.config import DramConfig, HbmConfig, KiB, MiB, NvmeConfig, StoreConfig, WritePolicy
from kvstore.hashing import block_keys
from kvstore.store import Store
from kvstore.types import BlockKey, DType, KVLayout, Namespace, NamespaceId

BLOCK_TOKENS = 4


def namespace(model_id: str = "tiny", num_layers: int = 2) -> Namespace:
    """8 KiB blocks: 2 layers x K,V x 4 tokens x 4 heads x 64 dims x float16."""
    return Namespace(model_id, DType.FLOAT16, KVLayout(num_layers, 4, 64), BLOCK_TOKENS)


def payloads(ns: Namespace, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, ns.block_bytes, dtype=np.uint8) for _ in range(count)]


def chain(namespace_id: NamespaceId, num_blocks: int, seed: int = 0) -> list[BlockKey]:
    tokens = np.random.default_rng(seed).integers(0, 50000, num_blocks * BLOCK_TOKENS, dtype=np.uint32)
    return block_keys(namespace_id, tokens, BLOCK_TOKENS)


def config(
    nvme_dir: Path | None = None,
    *,
    dram_blocks: int = 64,
    nvme_blocks: int = 256,
    hbm_blocks: int = 0,
    write_policy: WritePolicy = WritePolicy.WRITE_BACK,
    high: float = 1.0,
    low: float = 1.0,
    promote_on_hit: bool = True,
    checksum_in_background: bool = False,
    background_min_bytes: int = 0,
) -> StoreConfig:
    """Tiers sized in 8 KiB blocks; slabs of 64 KiB (8 blocks). Watermarks off by default;
    checksums computed at commit by default, so eviction order does not depend on a thread."""
    slab = 64 * KiB
    return StoreConfig(
        dram=DramConfig(capacity_bytes=dram_blocks * 8 * KiB, slab_bytes=slab),
        hbm=HbmConfig(capacity_bytes=hbm_blocks * 8 * KiB, slab_bytes=slab, device="cpu"),
        nvme=NvmeConfig(
            directory=nvme_dir,
            capacity_bytes=nvme_blocks * 8 * KiB,
            file_bytes=nvme_blocks * 8 * KiB,
            slab_bytes=slab,
            stage_bytes=1 * MiB,
        ),
        write_policy=write_policy,
        high_watermark_fraction=high,
        low_watermark_fraction=low,
        reservation_ttl_s=10.0,
        lease_ttl_s=10.0,
        promote_on_hit=promote_on_hit,
        checksum_in_background=checksum_in_background,
        background_checksum_min_bytes=background_min_bytes,
    )


def store(cfg: StoreConfig, clock: ManualClock | None = None) -> Store:
    return Store(cfg, clock=clock or ManualClock())
