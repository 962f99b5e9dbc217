"""Measure the reference engine's cost profile on this machine, as a `[profiles.<name>]` table
for the conductor's config file (what to time and the fits: engine_adapters/profiling.py).

    .venv/bin/python -m engine_adapters.reference.profile --model DIR --name NAME [--out FILE]

The reference engine computes the sequences of a decode batch one after another, so a step of
b sequences is b single-token forwards. The DRAM tier's load into the engine is scattering
blocks from a host buffer into the paged cache, halved for the copy out of the node's shared
memory before it (another memcpy of the same bytes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from conductor.costs import Profile
from engine_adapters import profiling
from engine_adapters.kernels.reference import scatter
from engine_adapters.profiling import MIN_PROFILE_TOKENS, Settings, median_seconds
from engine_adapters.reference.model import LlamaModel, PagedCache
from kvstore.errors import InvalidArgumentError

__all__ = ["MIN_PROFILE_TOKENS", "ReferenceTimer", "Settings", "main", "profile_model"]

BLOCK_TOKENS = 16
SEED = 0


class ReferenceTimer:
    """Times a `LlamaModel`'s forwards on a paged cache of room for 2 x `max_tokens`."""

    def __init__(self, model: LlamaModel, settings: Settings) -> None:
        settings.check()
        limit = model.config.max_position_embeddings
        if 2 * settings.max_tokens > limit:
            raise InvalidArgumentError(
                f"max_tokens {settings.max_tokens} with as many cached needs {2 * settings.max_tokens} positions; "
                f"the model has {limit}"
            )
        self.model = model
        self.repeats = settings.repeats
        blocks = -(-2 * settings.max_tokens // BLOCK_TOKENS)
        self.cache = PagedCache(model.config, blocks, BLOCK_TOKENS)
        self.table = self.cache.allocate(blocks)
        generator = torch.Generator().manual_seed(SEED)
        self.tokens = torch.randint(0, model.config.vocab_size, (2 * settings.max_tokens,), generator=generator)

    def prefill_s(self, new: int, cached: int) -> float:
        if cached:
            self.model.forward(self.tokens[:cached], 0, self.table, self.cache)
        return median_seconds(
            lambda: self.model.forward(self.tokens[cached : cached + new], cached, self.table, self.cache),
            self.repeats,
        )

    def decode_step_s(self, batch: int, tokens: int) -> float:
        self.model.forward(self.tokens[:tokens], 0, self.table, self.cache)
        step = self.tokens[tokens : tokens + 1]

        def run() -> None:
            for _ in range(batch):
                self.model.forward(step, tokens, self.table, self.cache)

        return median_seconds(run, self.repeats)

    def kv_bytes_per_token(self) -> int:
        return self.cache.paged().block_bytes // BLOCK_TOKENS

    def kv_capacity_tokens(self) -> int | None:
        return None  # set by whoever sizes the engine's cache

    def dram_load_bytes_per_s(self) -> float:
        paged = self.cache.paged()
        count = len(self.table)
        payloads = torch.ones(count * paged.block_bytes, dtype=torch.uint8)
        ids = torch.tensor(self.table)
        seconds = median_seconds(lambda: scatter(paged, ids, payloads), self.repeats)
        return count * paged.block_bytes / seconds / 2


def profile_model(folder: Path, name: str, settings: Settings | None = None, *, show: bool = False) -> Profile:
    """The profile of the model in `folder` on this machine (a progress bar with `show`)."""
    settings = settings or Settings()
    profiling.check_profile_name(name)
    settings.check()
    timer = ReferenceTimer(LlamaModel.load(folder), settings)
    with tqdm(total=profiling.steps(settings), desc="profiling", unit="step", disable=not show) as bar:

        def progress(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        return profiling.measure(timer, name, settings, progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the reference engine's cost profile for the conductor.")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face Llama folder the engine loads")
    profiling.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        profile = profile_model(args.model, args.name, profiling.settings_from(args), show=True)
    except InvalidArgumentError as error:  # ConfigError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    profiling.write(profile, args, f"python -m engine_adapters.reference.profile --model {args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
