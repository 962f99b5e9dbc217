"""Store configuration: frozen dataclasses, validated once when built.

The entry point (`kvstore serve`, `kvstore tour`, a test) builds a `StoreConfig`; nothing below
it reads the environment. Every field carries its unit in its name and a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvstore.errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ALIGNMENT_BYTES = 4096
"""Slot alignment in every tier: O_DIRECT needs it on NVMe, and DRAM slots feed NVMe writes."""


class WritePolicy(StrEnum):
    """When a block committed to memory reaches NVMe."""

    WRITE_BACK = "write_back"  # on eviction from memory (demotion); the default
    WRITE_THROUGH = "write_through"  # at commit, so a crash or eviction never loses it


@dataclass(frozen=True, slots=True)
class DramConfig:
    capacity_bytes: int = 1 * GiB  # the shared-memory pool; allocated and pre-faulted at start
    slab_bytes: int = 16 * MiB  # carving unit; the largest block must fit in one slab
    segment_name: str = ""  # name under /dev/shm; empty picks a unique one per store

    def __post_init__(self) -> None:
        _check_multiple("dram.slab_bytes", self.slab_bytes, ALIGNMENT_BYTES)
        _check_at_least("dram.capacity_bytes", self.capacity_bytes, self.slab_bytes)
        if "/" in self.segment_name:
            raise ConfigError(f"dram.segment_name must not contain '/', got {self.segment_name!r}")


@dataclass(frozen=True, slots=True)
class HbmConfig:
    capacity_bytes: int = 0  # 0 disables the tier; GPU memory spared for KV blocks
    slab_bytes: int = 16 * MiB  # carving unit, as for DRAM
    device: str = "auto"  # torch device: "auto" picks cuda:0 when present, else cpu

    def __post_init__(self) -> None:
        if self.capacity_bytes:
            _check_multiple("hbm.slab_bytes", self.slab_bytes, ALIGNMENT_BYTES)
            _check_at_least("hbm.capacity_bytes", self.capacity_bytes, self.slab_bytes)
        elif self.capacity_bytes < 0:
            raise ConfigError(f"hbm.capacity_bytes must be >= 0, got {self.capacity_bytes}")


@dataclass(frozen=True, slots=True)
class NvmeConfig:
    directory: Path | None = None  # where slab files and the LMDB index live; None disables
    capacity_bytes: int = 4 * GiB  # total slab file bytes, preallocated at start
    file_bytes: int = 1 * GiB  # one slab file's size; smaller files fit more filesystems
    slab_bytes: int = 16 * MiB  # carving unit
    stage_bytes: int = 64 * MiB  # aligned staging buffer for O_DIRECT; bigger batches are chunked
    index_map_bytes: int = 1 * GiB  # LMDB map size (virtual; grows the file only as used)
    use_direct_io: bool = True  # O_DIRECT when the filesystem allows it (detected at start)

    def __post_init__(self) -> None:
        if self.directory is None:
            return
        _check_multiple("nvme.slab_bytes", self.slab_bytes, ALIGNMENT_BYTES)
        _check_multiple("nvme.file_bytes", self.file_bytes, self.slab_bytes)
        _check_at_least("nvme.capacity_bytes", self.capacity_bytes, self.slab_bytes)
        _check_multiple("nvme.stage_bytes", self.stage_bytes, ALIGNMENT_BYTES)
        _check_at_least("nvme.stage_bytes", self.stage_bytes, self.slab_bytes)
        _check_at_least("nvme.index_map_bytes", self.index_map_bytes, 1 * MiB)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    dram: DramConfig = field(default_factory=DramConfig)
    hbm: HbmConfig = field(default_factory=HbmConfig)
    nvme: NvmeConfig = field(default_factory=NvmeConfig)
    write_policy: WritePolicy = WritePolicy.WRITE_BACK
    high_watermark_fraction: float = 0.95  # a commit that fills a tier past this evicts ...
    low_watermark_fraction: float = 0.85  # ... down to this, so evictions come in batches
    reservation_ttl_s: float = 30.0  # an uncommitted reservation is freed after this
    lease_ttl_s: float = 30.0  # a read lease not released is dropped after this
    promote_on_hit: bool = True  # an NVMe hit is copied up to DRAM (when the policy agrees)
    eviction_policy: str = "prefix-lrfu"  # a name in kvstore.policy.POLICIES (docs/policy.md)
    checksum_in_background: bool = True  # memory commits without a writer checksum are hashed off the commit path
    # ... when their blocks are at least this big: xxhash holds the GIL below ~100 KiB, so a
    # thread hashing small blocks would only stall the caller; those are hashed as they are copied.
    background_checksum_min_bytes: int = 128 * KiB

    def __post_init__(self) -> None:
        if not isinstance(self.write_policy, WritePolicy):
            raise ConfigError(
                f"write_policy must be one of {[p.value for p in WritePolicy]}, got {self.write_policy!r}"
            )
        if not 0.0 < self.low_watermark_fraction <= self.high_watermark_fraction <= 1.0:
            raise ConfigError(
                "need 0 < low_watermark_fraction <= high_watermark_fraction <= 1, got "
                f"{self.low_watermark_fraction} and {self.high_watermark_fraction}"
            )
        if not isinstance(self.background_checksum_min_bytes, int) or self.background_checksum_min_bytes < 0:
            raise ConfigError(
                f"background_checksum_min_bytes must be an integer >= 0, got {self.background_checksum_min_bytes!r}"
            )
        for name in ("reservation_ttl_s", "lease_ttl_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        from kvstore.policy import POLICIES  # noqa: PLC0415 - a cycle at import: policies read the table, which reads this

        if self.eviction_policy not in POLICIES:
            raise ConfigError(f"eviction_policy must be one of {sorted(POLICIES)}, got {self.eviction_policy!r}")


def _check_multiple(name: str, value: int, unit: int) -> None:
    if not isinstance(value, int) or value <= 0 or value % unit:
        raise ConfigError(f"{name} must be a positive multiple of {unit}, got {value!r}")


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
