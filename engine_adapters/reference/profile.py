"""Measure the reference engine's cost profile: what the conductor needs to predict its prefill
and decode times (`conductor.costs.Profile`), as a `[profiles.<name>]` table for the
conductor's config file.

    .venv/bin/python -m engine_adapters.reference.profile --model DIR --name NAME [--out FILE]

Measured on this machine, with the model the engine runs:
- prefill: a forward of n new tokens after c cached ones, for n up to `--max-tokens` and c in
  {0, n}, fitted to fixed + per_token * n + per_pair * (n * c + n^2 / 2)
  (`PrefillModel.fit`);
- decode: one step of a batch of b sequences of k tokens each (the engine computes them one
  after another), fitted to fixed + per_sequence * b + per_kv_token * b * k (`DecodeModel.fit`);
- the DRAM tier's load into the engine: scattering blocks from a host buffer into the paged
  cache (the copy out of the node's shared memory is another memcpy of the same bytes, counted
  by halving the bandwidth); its latency is `--dram-load-latency-s`, the Lookup and Acquire
  round trips to the node, not measured here.

Not measured (flags, with defaults): the NVMe tier's load, and the KV a decode engine holds
(`--kv-capacity-tokens`). Each figure is the median of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from conductor.config import check_profile_name, profile_toml
from conductor.costs import DecodeModel, Link, PrefillModel, Profile
from engine_adapters.kernels.reference import scatter
from engine_adapters.reference.model import LlamaModel, PagedCache
from kvstore.errors import InvalidArgumentError

BLOCK_TOKENS = 16
MIN_PROFILE_TOKENS = 4 * BLOCK_TOKENS  # the least `max_tokens`: three prefill sizes to fit
SEED = 0


@dataclass(frozen=True, slots=True)
class Settings:
    max_tokens: int = 512  # the longest prefill measured
    repeats: int = 5
    kv_capacity_tokens: int = 65_536
    dram_load_latency_s: float = 1e-3
    nvme_load_bytes_per_s: float = 2e9
    nvme_load_latency_s: float = 5e-3


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` timed runs of `run`, after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class Profiler:
    def __init__(self, model: LlamaModel, settings: Settings) -> None:
        if settings.max_tokens < MIN_PROFILE_TOKENS or settings.repeats < 1:
            raise InvalidArgumentError(
                f"need max_tokens >= {MIN_PROFILE_TOKENS} and repeats >= 1, got {settings.max_tokens}, "
                f"{settings.repeats}"
            )
        limit = model.config.max_position_embeddings
        if 2 * settings.max_tokens > limit:
            raise InvalidArgumentError(
                f"max_tokens {settings.max_tokens} with as many cached needs {2 * settings.max_tokens} positions; "
                f"the model has {limit}"
            )
        self.model = model
        self.settings = settings
        blocks = -(-2 * settings.max_tokens // BLOCK_TOKENS)
        self.cache = PagedCache(model.config, blocks, BLOCK_TOKENS)
        self.table = self.cache.allocate(blocks)
        generator = torch.Generator().manual_seed(SEED)
        self.tokens = torch.randint(0, model.config.vocab_size, (2 * settings.max_tokens,), generator=generator)

    def prefill_sizes(self) -> list[tuple[int, int]]:
        """(new, cached) pairs: doubling new-token counts, each alone and after as many cached."""
        sizes, n = [], BLOCK_TOKENS
        while n <= self.settings.max_tokens:
            sizes += [(n, 0), (n, n)]
            n *= 2
        return sizes

    def decode_sizes(self) -> list[tuple[int, int]]:
        """(batch, tokens per sequence) pairs."""
        longest = self.settings.max_tokens
        return [(batch, tokens) for batch in (1, 2, 4) for tokens in (longest // 8, longest // 2, longest)]

    def prefill_s(self, new: int, cached: int) -> float:
        if cached:
            self.model.forward(self.tokens[:cached], 0, self.table, self.cache)
        return median_seconds(
            lambda: self.model.forward(self.tokens[cached : cached + new], cached, self.table, self.cache),
            self.settings.repeats,
        )

    def decode_s(self, batch: int, tokens: int) -> float:
        """A step of `batch` sequences at position `tokens`: the engine runs them one by one."""
        self.model.forward(self.tokens[:tokens], 0, self.table, self.cache)
        step = self.tokens[tokens : tokens + 1]

        def run() -> None:
            for _ in range(batch):
                self.model.forward(step, tokens, self.table, self.cache)

        return median_seconds(run, self.settings.repeats)

    def dram_load_bytes_per_s(self) -> float:
        """Blocks scattered from a host buffer into the cache, per second, halved for the copy
        out of shared memory before it."""
        paged = self.cache.paged()
        count = len(self.table)
        payloads = torch.ones(count * paged.block_bytes, dtype=torch.uint8)
        ids = torch.tensor(self.table)
        seconds = median_seconds(lambda: scatter(paged, ids, payloads), self.settings.repeats)
        return count * paged.block_bytes / seconds / 2

    def kv_bytes_per_token(self) -> int:
        return self.cache.paged().block_bytes // BLOCK_TOKENS

    def measure(self, name: str, progress: Callable[[str], None]) -> Profile:
        prefill = []
        for new, cached in self.prefill_sizes():
            progress(f"prefill {new} after {cached}")
            prefill.append((new, cached, self.prefill_s(new, cached)))
        decode = []
        for batch, tokens in self.decode_sizes():
            progress(f"decode {batch} x {tokens}")
            decode.append((batch, batch * tokens, self.decode_s(batch, tokens)))
        progress("DRAM load")
        settings = self.settings
        return Profile(
            name=name,
            kv_bytes_per_token=self.kv_bytes_per_token(),
            prefill=PrefillModel.fit(prefill),
            decode=DecodeModel.fit(decode),
            kv_capacity_tokens=settings.kv_capacity_tokens,
            tier_loads=(
                Link(float("inf")),  # an HBM copy is the cache itself
                Link(self.dram_load_bytes_per_s(), settings.dram_load_latency_s),
                Link(settings.nvme_load_bytes_per_s, settings.nvme_load_latency_s),
            ),
        )

    def steps(self) -> int:
        return len(self.prefill_sizes()) + len(self.decode_sizes()) + 1


def profile_model(folder: Path, name: str, settings: Settings = Settings(), *, show: bool = False) -> Profile:
    """The profile of the model in `folder` on this machine (a progress bar with `show`)."""
    check_profile_name(name)
    profiler = Profiler(LlamaModel.load(folder), settings)
    with tqdm(total=profiler.steps(), desc="profiling", unit="step", disable=not show) as bar:

        def progress(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        return profiler.measure(name, progress)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the reference engine's cost profile for the conductor.")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face Llama folder the engine loads")
    parser.add_argument("--name", required=True, help="the profile's name (nodes give it as conductor.profile)")
    parser.add_argument("--out", type=Path, help="append the table to this file (default: print it)")
    defaults = Settings()
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="the longest prefill measured")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per figure (median)")
    parser.add_argument("--kv-capacity-tokens", type=int, default=defaults.kv_capacity_tokens)
    parser.add_argument("--dram-load-latency-s", type=float, default=defaults.dram_load_latency_s)
    parser.add_argument("--nvme-load-bytes-per-s", type=float, default=defaults.nvme_load_bytes_per_s)
    parser.add_argument("--nvme-load-latency-s", type=float, default=defaults.nvme_load_latency_s)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        kv_capacity_tokens=args.kv_capacity_tokens,
        dram_load_latency_s=args.dram_load_latency_s,
        nvme_load_bytes_per_s=args.nvme_load_bytes_per_s,
        nvme_load_latency_s=args.nvme_load_latency_s,
    )
    try:
        table = profile_toml(profile_model(args.model, args.name, settings, show=True))
    except InvalidArgumentError as error:  # ConfigError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = f"python -m engine_adapters.reference.profile --model {args.model}"
    header = f"# measured by `{command}` on {time.strftime('%Y-%m-%d')}\n"
    if args.out is None:
        print(header + table, end="")
    else:
        with args.out.open("a") as out:
            out.write("\n" + header + table)
        print(f"appended [profiles.{args.name}] to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
