"""Cost models: how long a prefill, a decode step and a KV transfer take (DESIGN.md 5).

Placement compares predicted times, so every number here comes from a profile: prefill time
as a polynomial of the tokens computed and the tokens reused, fitted to measurements
(`PrefillModel.fit`), a decode step as a linear function of the batch and the KV it reads, and
each link as bandwidth plus latency. A profile describes one model on one kind of GPU server;
nodes name theirs when they register.

`LLAMA2_70B_8XA800` is the profile of the setting Mooncake's FAST'25 paper evaluates
(a LLaMA2-70B-sized model on servers of eight A800 GPUs); its numbers are derived, not measured
here, and each one says how (docs/conductor.md collects them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvstore.errors import ConfigError
from kvstore.types import TierKind


@dataclass(frozen=True, slots=True)
class PrefillModel:
    """seconds = fixed + per_token * n + per_pair * (n * cached + n * n / 2), for n tokens
    computed after `cached` reused ones: the linear layers cost per token, attention per pair of
    (computed token, token it attends to)."""

    fixed_s: float
    per_token_s: float
    per_pair_s: float

    def seconds(self, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        pairs = new_tokens * cached_tokens + new_tokens * new_tokens / 2
        return self.fixed_s + self.per_token_s * new_tokens + self.per_pair_s * pairs

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> PrefillModel:
        """Least-squares fit to measured (new tokens, cached tokens, seconds); coefficients are
        clipped at zero (a negative cost is a fitting artefact, never a speed-up)."""
        for n, c, seconds in samples:
            if n <= 0 or c < 0 or not math.isfinite(seconds) or seconds <= 0:
                raise ConfigError(f"bad prefill measurement (new={n}, cached={c}, seconds={seconds})")
        rows = [(1.0, float(n), n * c + n * n / 2) for n, c, _ in samples]
        return cls(*_fit_non_negative("a prefill model", rows, [seconds for *_, seconds in samples]))


@dataclass(frozen=True, slots=True)
class DecodeModel:
    """One decode step (a token for every sequence in the batch):
    seconds = fixed + per_sequence * batch + per_kv_token * KV tokens read."""

    fixed_s: float
    per_sequence_s: float
    per_kv_token_s: float

    def step_s(self, sequences: int, kv_tokens: int) -> float:
        if sequences <= 0:
            return 0.0
        return self.fixed_s + self.per_sequence_s * sequences + self.per_kv_token_s * kv_tokens

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, float]]) -> DecodeModel:
        """Least-squares fit to measured (sequences in the batch, KV tokens read, seconds of the
        step); coefficients clipped at zero as for the prefill."""
        for sequences, kv_tokens, seconds in samples:
            if sequences <= 0 or kv_tokens < 0 or not math.isfinite(seconds) or seconds <= 0:
                raise ConfigError(
                    f"bad decode measurement (sequences={sequences}, kv_tokens={kv_tokens}, seconds={seconds})"
                )
        rows = [(1.0, float(sequences), float(kv_tokens)) for sequences, kv_tokens, _ in samples]
        return cls(*_fit_non_negative("a decode model", rows, [seconds for *_, seconds in samples]))


def _fit_non_negative(what: str, rows: Sequence[tuple[float, ...]], seconds: Sequence[float]) -> list[float]:
    """Least-squares coefficients of `rows` (three columns) against `seconds`, each clipped at zero."""
    if len(rows) < 3:
        raise ConfigError(f"fitting {what} needs at least 3 measurements, got {len(rows)}")
    coefficients, *_ = np.linalg.lstsq(np.array(rows), np.array(seconds), rcond=None)
    return [max(0.0, float(value)) for value in coefficients]


@dataclass(frozen=True, slots=True)
class Link:
    """Moving bytes: latency once, then bandwidth."""

    bytes_per_s: float
    latency_s: float = 0.0

    def seconds(self, num_bytes: int) -> float:
        return 0.0 if num_bytes <= 0 else self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class Profile:
    """One model on one kind of server."""

    name: str
    kv_bytes_per_token: int
    prefill: PrefillModel
    decode: DecodeModel
    kv_capacity_tokens: int  # KV a decode engine of this kind holds beside the weights
    tier_loads: tuple[Link, Link, Link]  # HBM, DRAM, NVMe into the engine's KV cache

    def load_s(self, by_tier: tuple[int, int, int], block_tokens: int) -> float:
        """Bringing a node's own cached blocks (counted by fastest tier) into its engine."""
        return sum(
            self.tier_loads[tier].seconds(count * block_tokens * self.kv_bytes_per_token)
            for tier, count in zip(TierKind, by_tier, strict=True)
            if count
        )


@dataclass(frozen=True, slots=True)
class CostModel:
    """The profiles of a cluster and the network between its nodes."""

    profiles: Mapping[str, Profile]
    network: Link  # node to node (Fetch, and prefill to decode)

    def profile(self, name: str) -> Profile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ConfigError(f"unknown cost profile {name!r}; known: {sorted(self.profiles)}") from None

    def transfer_s(self, profile: Profile, tokens: int) -> float:
        return self.network.seconds(tokens * profile.kv_bytes_per_token)


GB = 1e9

# LLaMA2-70B (80 layers, d_model 8192, 8 KV heads of 128, bf16) on a server of 8 A800-80GB
# GPUs, as in Mooncake's FAST'25 evaluation. Derivations (docs/conductor.md):
# - linear layers: 2 * 69e9 FLOP per token; 8 x 312 TFLOP/s at 40% utilisation = 1.0 PFLOP/s
#   -> 1.38e-4 s per token;
# - attention: 4 * 80 * 8192 = 2.62 MFLOP per (query, key) pair at the same rate -> 2.62e-9 s;
# - decode: the weights (138 GB) read once per step from 8 x 2.0 TB/s HBM at 60% -> 14.4 ms,
#   plus 327,680 bytes of KV per token read (2 * 80 * 8 * 128 * 2) -> 3.4e-8 s per KV token;
# - KV capacity: 8 x 80 GB less the weights and 10% headroom = 480 GB -> 1.46M tokens;
# - tier loads per server: HBM free; DRAM over 8 PCIe 4.0 x16 links at ~12.5 GB/s each
#   -> 100 GB/s; NVMe ~8 GB/s (a few drives).
LLAMA2_70B_8XA800 = Profile(
    name="llama2-70b-8xa800",
    kv_bytes_per_token=327_680,
    prefill=PrefillModel(fixed_s=0.02, per_token_s=1.38e-4, per_pair_s=2.62e-9),
    decode=DecodeModel(fixed_s=0.0144, per_sequence_s=1e-4, per_kv_token_s=3.4e-8),
    kv_capacity_tokens=1_460_000,
    tier_loads=(Link(math.inf), Link(100 * GB, 1e-4), Link(8 * GB, 5e-4)),
)

# A 200 Gb/s NIC per server (Mooncake's deployment has several RDMA NICs; one is the
# conservative case), 0.5 ms per transfer for setup and the first bytes.
DEFAULT_NETWORK = Link(25 * GB, 5e-4)

DEFAULT_COSTS = CostModel({"default": LLAMA2_70B_8XA800, LLAMA2_70B_8XA800.name: LLAMA2_70B_8XA800}, DEFAULT_NETWORK)
