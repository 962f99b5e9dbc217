"""Counters per tier and the snapshot `Store.stats()` returns (later exported as metrics)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvstore.tiers.base import Tier
from kvstore.types import TierKind


@dataclass(slots=True)
class TierCounters:
    """Monotonic counters of one tier. Owner: the tier manager, under its lock."""

    hits: int = 0  # leased blocks served from this tier
    evictions: int = 0  # blocks taken out of this tier by the policy
    demotions_in: int = 0  # blocks copied into this tier from a faster one
    promotions_in: int = 0  # blocks copied into this tier from a slower one
    checksum_failures: int = 0  # blocks whose bytes in this tier failed their checksum


@dataclass(frozen=True, slots=True)
class TierStats:
    kind: TierKind
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    hits: int
    evictions: int
    demotions_in: int
    promotions_in: int
    checksum_failures: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    num_blocks: int  # distinct stored blocks (a block in two tiers counts once)
    num_reservations: int
    num_leases: int
    num_unhashed: int  # committed to memory, checksum still being computed in the background

    @classmethod
    def build(
        cls,
        tiers: Mapping[TierKind, Tier],
        counters: Mapping[TierKind, TierCounters],
        *,
        resident: Mapping[TierKind, int],
        num_blocks: int,
        num_reservations: int,
        num_leases: int,
        num_unhashed: int,
    ) -> StoreStats:
        rows = []
        for kind, tier in tiers.items():
            usage, count = tier.usage(), counters[kind]
            rows.append(
                TierStats(
                    kind,
                    usage.capacity_bytes,
                    usage.used_bytes,
                    resident[kind],
                    count.hits,
                    count.evictions,
                    count.demotions_in,
                    count.promotions_in,
                    count.checksum_failures,
                )
            )
        return cls(tuple(rows), num_blocks, num_reservations, num_leases, num_unhashed)

    def tier(self, kind: TierKind) -> TierStats:
        for row in self.tiers:
            if row.kind is kind:
                return row
        raise KeyError(kind)
