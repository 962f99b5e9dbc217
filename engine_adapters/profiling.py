"""Measuring an engine's cost profile for the conductor (`conductor.costs.Profile`): which
prefills and decode steps to time, and the fits. The engines time themselves (`EngineTimer`:
engine_adapters/reference/profile.py, engine_adapters/vllm/profile.py).

- prefill: n new tokens after c cached ones, n doubling from 16 to `max_tokens`, c in {0, n},
  fitted to fixed + per_token * n + per_pair * (n * c + n^2 / 2) (`PrefillModel.fit`);
- decode: a step of a batch of b sequences of k tokens each, b in {1, 2, 4}, fitted to
  fixed + per_sequence * b + per_kv_token * b * k (`DecodeModel.fit`).

Each figure is the median of `repeats` runs after a warm-up, taken by the timer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from conductor.config import check_profile_name, profile_toml

__all__ = ["check_profile_name"]
from conductor.costs import DecodeModel, Link, PrefillModel, Profile
from kvstore.errors import InvalidArgumentError

MIN_PROFILE_TOKENS = 64  # the least `max_tokens`: three prefill sizes to fit
SMALLEST_PREFILL = 16


@dataclass(frozen=True, slots=True)
class Settings:
    max_tokens: int = 512  # the longest prefill measured
    repeats: int = 5
    kv_capacity_tokens: int = 65_536  # engines that know theirs say so instead
    dram_load_latency_s: float = 1e-3  # the Lookup and Acquire round trips to the node
    nvme_load_bytes_per_s: float = 2e9
    nvme_load_latency_s: float = 5e-3

    def check(self) -> None:
        if self.max_tokens < MIN_PROFILE_TOKENS or self.repeats < 1:
            raise InvalidArgumentError(
                f"need max_tokens >= {MIN_PROFILE_TOKENS} and repeats >= 1, got {self.max_tokens}, {self.repeats}"
            )


class EngineTimer(Protocol):
    def prefill_s(self, new: int, cached: int) -> float:
        """Median seconds of a prefill of `new` tokens after `cached` reused ones."""
        ...

    def decode_step_s(self, batch: int, tokens: int) -> float:
        """Median seconds of one decode step of `batch` sequences of `tokens` tokens each."""
        ...

    def kv_bytes_per_token(self) -> int: ...

    def kv_capacity_tokens(self) -> int | None:
        """The KV the engine holds, when it knows; None: `Settings.kv_capacity_tokens`."""
        ...

    def dram_load_bytes_per_s(self) -> float: ...


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` timed runs of `run`, after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def prefill_sizes(max_tokens: int) -> list[tuple[int, int]]:
    """(new, cached) pairs: doubling new-token counts, each alone and after as many cached."""
    sizes, n = [], SMALLEST_PREFILL
    while n <= max_tokens:
        sizes += [(n, 0), (n, n)]
        n *= 2
    return sizes


def decode_sizes(max_tokens: int) -> list[tuple[int, int]]:
    """(batch, tokens per sequence) pairs."""
    return [(batch, tokens) for batch in (1, 2, 4) for tokens in (max_tokens // 8, max_tokens // 2, max_tokens)]


def steps(settings: Settings) -> int:
    """How many figures `measure` takes (for a progress bar)."""
    return len(prefill_sizes(settings.max_tokens)) + len(decode_sizes(settings.max_tokens)) + 1


def measure(timer: EngineTimer, name: str, settings: Settings, progress: Callable[[str], None]) -> Profile:
    """Time every size, fit the models, and assemble the profile (HBM loads are free: an HBM
    copy is the engine's cache itself)."""
    check_profile_name(name)
    settings.check()
    prefill = []
    for new, cached in prefill_sizes(settings.max_tokens):
        progress(f"prefill {new} after {cached}")
        prefill.append((new, cached, timer.prefill_s(new, cached)))
    decode = []
    for batch, tokens in decode_sizes(settings.max_tokens):
        progress(f"decode {batch} x {tokens}")
        decode.append((batch, batch * tokens, timer.decode_step_s(batch, tokens)))
    progress("DRAM load")
    return Profile(
        name=name,
        kv_bytes_per_token=timer.kv_bytes_per_token(),
        prefill=PrefillModel.fit(prefill),
        decode=DecodeModel.fit(decode),
        kv_capacity_tokens=timer.kv_capacity_tokens() or settings.kv_capacity_tokens,
        tier_loads=(
            Link(float("inf")),
            Link(timer.dram_load_bytes_per_s(), settings.dram_load_latency_s),
            Link(settings.nvme_load_bytes_per_s, settings.nvme_load_latency_s),
        ),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every engine's profiler takes (beside how it finds its engine)."""
    defaults = Settings()
    parser.add_argument("--name", required=True, help="the profile's name (nodes give it as conductor.profile)")
    parser.add_argument("--out", type=Path, help="append the table to this file (default: print it)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="the longest prefill measured")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per figure (median)")
    parser.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=defaults.kv_capacity_tokens,
        help="KV a decode engine holds, where the engine cannot say",
    )
    parser.add_argument("--dram-load-latency-s", type=float, default=defaults.dram_load_latency_s)
    parser.add_argument("--nvme-load-bytes-per-s", type=float, default=defaults.nvme_load_bytes_per_s)
    parser.add_argument("--nvme-load-latency-s", type=float, default=defaults.nvme_load_latency_s)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        kv_capacity_tokens=args.kv_capacity_tokens,
        dram_load_latency_s=args.dram_load_latency_s,
        nvme_load_bytes_per_s=args.nvme_load_bytes_per_s,
        nvme_load_latency_s=args.nvme_load_latency_s,
    )


def write(profile: Profile, args: argparse.Namespace, command: str) -> None:
    """Print the `[profiles.<name>]` table, or append it to `--out`, with how it was measured."""
    table = f"# measured by `{command}` on {time.strftime('%Y-%m-%d')}\n" + profile_toml(profile)
    if args.out is None:
        print(table, end="")
        return
    with args.out.open("a") as out:
        out.write("\n" + table)
    print(f"appended [profiles.{profile.name}] to {args.out}")
