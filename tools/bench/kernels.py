"""Benchmark the block-copy paths (issue 6): gather and scatter GB/s for 16-, 64- and
256-token blocks, against a plain copy of a contiguous buffer of the same bytes (memcpy) in
the same run.

    .venv/bin/python tools/bench/kernels.py

On this machine (no CUDA) it measures the torch reference (engine_adapters/kernels/reference.py)
on CPU tensors. The CUDA kernels and their references (one cudaMemcpy of a pinned buffer, a
loop of per-block cudaMemcpyAsync, index_select / index_copy_) are measured where CUDA exists,
once the kernels are built. Prints a Markdown table; medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.reference import gather, scatter


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up."""
    action()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--cache-blocks", type=int, default=512, help="blocks in the paged cache, per size")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens moved per call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}, float16, "
        f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_size}"
    )
    print(
        "| layout | block tokens | blocks per call | gather GB/s | scatter GB/s | memcpy GB/s "
        "| gather / memcpy | scatter / memcpy |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for layout in (CacheLayout.FLASH, CacheLayout.CPU):
        for block_tokens in (16, 64, 256):
            blocks = max(1, args.batch_tokens // block_tokens)
            cache_blocks = max(args.cache_blocks * 16 // block_tokens, 2 * blocks)
            if layout is CacheLayout.FLASH:
                shape = (2, cache_blocks, block_tokens, args.kv_heads, args.head_size)
            else:
                shape = (cache_blocks, args.kv_heads, block_tokens, 2 * args.head_size)
            kv = PagedKV.from_tensors(layout, [torch.zeros(shape, dtype=torch.float16) for _ in range(args.layers)])
            ids = torch.randperm(cache_blocks)[:blocks]
            payloads = torch.zeros(blocks * kv.block_bytes, dtype=torch.uint8)
            plain_source = torch.zeros_like(payloads)
            num_bytes = payloads.numel()
            gather_s = timed(partial(gather, kv, ids, payloads), args.repeats)
            scatter_s = timed(partial(scatter, kv, ids, payloads), args.repeats)
            copy_s = timed(partial(payloads.copy_, plain_source), args.repeats)
            gb = num_bytes / 1e9
            print(
                f"| {layout.value} | {block_tokens} | {blocks} | {gb / gather_s:.2f} | {gb / scatter_s:.2f} | "
                f"{gb / copy_s:.2f} | {copy_s / gather_s:.2f}x | {copy_s / scatter_s:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
