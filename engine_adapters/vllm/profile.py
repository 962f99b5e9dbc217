"""Measure a vLLM engine's cost profile on this machine, as a `[profiles.<name>]` table for the
conductor's config file (what to time and the fits: engine_adapters/profiling.py).

    .venv/bin/python -m engine_adapters.vllm.profile --model DIR --name NAME [--out FILE]
        [--engine-arg KEY=JSON ...]

It runs the model in vLLM's offline engine (`vllm.LLM`) with the engine arguments given (as a
server would be started: `--engine-arg gpu_memory_utilization=0.9`, `--engine-arg
tensor_parallel_size=8`, ...) and times whole `generate` calls:
- a prefill of n new tokens after c cached: the prefix cache is reset, the first c tokens are
  generated once (so vLLM caches them), then the c + n tokens with one output token; the c is
  what vLLM reports as cached (whole blocks);
- a decode step of b sequences of k tokens: b prompts generated with 2 and with 2 + s output
  tokens, the step being the difference over s.
The KV bytes per token come from the engine's own config, and the KV capacity when that
config states it (`num_gpu_blocks`; else `--kv-capacity-tokens`). The DRAM tier's
load into the engine (the connector's path: the node's shared memory, then the block-copy
kernels) is `--dram-load-bytes-per-s`, not measured here; tools/bench/kernels.py measures the
kernels on the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from engine_adapters import profiling
from engine_adapters.profiling import Settings
from kvstore.errors import InvalidArgumentError

SEED = 0
DECODE_STEPS = 16  # the extra output tokens a decode step is worked out over


class VllmTimer:
    """Times a `vllm.LLM`'s generate calls on random prompts (distinct per call, so vLLM's
    prefix cache reuses only what a figure asks for)."""

    def __init__(self, llm: Any, settings: Settings, *, dram_load_bytes_per_s: float) -> None:
        from vllm import SamplingParams  # noqa: PLC0415 - vLLM is imported by whoever profiles it

        self._llm = llm
        self._repeats = settings.repeats
        self._dram_load_bytes_per_s = dram_load_bytes_per_s
        config = llm.llm_engine.vllm_config
        self._model_config = config.model_config
        self._parallel = config.parallel_config
        self._cache = config.cache_config
        self._vocab = self._model_config.get_vocab_size()
        self._rng = np.random.default_rng(SEED)
        self._params = SamplingParams
        self.cached_seen: list[tuple[int, int]] = []  # (asked, reported) cached tokens, for the caller
        longest = 2 * settings.max_tokens + DECODE_STEPS + 2
        if longest > self._model_config.max_model_len:
            raise InvalidArgumentError(
                f"max_tokens {settings.max_tokens} needs max_model_len >= {longest}, "
                f"the engine has {self._model_config.max_model_len}"
            )

    def _prompt(self, length: int) -> list[int]:
        return [int(token) for token in self._rng.integers(0, self._vocab, length)]

    def _generate(self, prompts: list[list[int]], max_tokens: int) -> list[Any]:
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        params = self._params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return list(self._llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False))

    def prefill_s(self, new: int, cached: int) -> float:
        times = []
        for _ in range(self._repeats + 1):  # the first warms up
            self._llm.reset_prefix_cache()
            prefix = self._prompt(cached)
            if cached:
                self._generate([prefix], 1)  # now in vLLM's prefix cache
            started = time.perf_counter()
            (result,) = self._generate([prefix + self._prompt(new)], 1)
            times.append(time.perf_counter() - started)
            self.cached_seen.append((cached, int(result.num_cached_tokens or 0)))
        return statistics.median(times[1:])

    def decode_step_s(self, batch: int, tokens: int) -> float:
        def seconds(max_tokens: int) -> float:
            prompts = [self._prompt(tokens) for _ in range(batch)]
            started = time.perf_counter()
            self._generate(prompts, max_tokens)
            return time.perf_counter() - started

        seconds(2)  # warm-up
        short = statistics.median(seconds(2) for _ in range(self._repeats))
        long = statistics.median(seconds(2 + DECODE_STEPS) for _ in range(self._repeats))
        return max(1e-9, (long - short) / DECODE_STEPS)

    def kv_bytes_per_token(self) -> int:
        config = self._model_config
        layers = config.get_num_layers(self._parallel)
        heads = config.get_num_kv_heads(self._parallel)
        itemsize = config.dtype.itemsize  # a torch.dtype
        return int(2 * layers * heads * config.get_head_size() * itemsize)

    def kv_capacity_tokens(self) -> int | None:
        blocks = getattr(self._cache, "num_gpu_blocks", None)
        return int(blocks) * int(self._cache.block_size) if blocks else None

    def dram_load_bytes_per_s(self) -> float:
        return self._dram_load_bytes_per_s


def engine_arguments(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=JSON` pairs (a bare word is taken as a string): vLLM's engine arguments."""
    arguments: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.isidentifier():
            raise InvalidArgumentError(f"--engine-arg must be KEY=VALUE with KEY a vLLM engine argument, got {item!r}")
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure a vLLM engine's cost profile for the conductor.")
    parser.add_argument("--model", required=True, help="the model vLLM loads (a folder or a hub name)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON", help="a vLLM engine argument")
    parser.add_argument(
        "--dram-load-bytes-per-s",
        type=float,
        default=10e9,
        help="the node's DRAM into the engine's KV cache (not measured here; default 10e9, PCIe-class)",
    )
    profiling.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = profiling.settings_from(args)
        settings.check()
        profiling.check_profile_name(args.name)
        arguments = engine_arguments(args.engine_arg)
        if not args.dram_load_bytes_per_s > 0:
            raise InvalidArgumentError(f"--dram-load-bytes-per-s must be positive, got {args.dram_load_bytes_per_s}")
    except InvalidArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from vllm import LLM  # noqa: PLC0415 - a second or more to import

    llm = LLM(model=args.model, seed=SEED, **arguments)
    timer = VllmTimer(llm, settings, dram_load_bytes_per_s=args.dram_load_bytes_per_s)
    with tqdm(total=profiling.steps(settings), desc="profiling", unit="step") as bar:

        def progress(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        profile = profiling.measure(timer, args.name, settings, progress)
    mismatched = [(asked, seen) for asked, seen in timer.cached_seen if seen < asked - 2 * llm_block_size(llm)]
    if mismatched:
        print(f"warning: vLLM reused fewer tokens than asked in {len(mismatched)} prefills", file=sys.stderr)
    command = f"python -m engine_adapters.vllm.profile --model {args.model} " + " ".join(
        f"--engine-arg {item}" for item in args.engine_arg
    )
    profiling.write(profile, args, command.strip())
    return 0


def llm_block_size(llm: Any) -> int:
    return int(llm.llm_engine.vllm_config.cache_config.block_size or 16)


if __name__ == "__main__":
    sys.exit(main())
