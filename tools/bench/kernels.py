"""Benchmark the block-copy paths (issue 6): gather and scatter GB/s for 16-, 64- and
256-token blocks, against a plain copy of a contiguous buffer of the same bytes (memcpy) in
the same run.

    .venv/bin/python tools/bench/kernels.py

Where CUDA exists it measures the CUDA kernels (engine_adapters/kernels/cuda.py; built on
first use) against one cudaMemcpy of a pinned buffer, a loop of per-block cudaMemcpyAsync and
torch's index_select / index_copy_, in both directions over PCIe and device to device
(tools/bench/kernels_cuda.py), and checks the issue's targets. Elsewhere, or with --cpu, it
measures the torch reference (engine_adapters/kernels/reference.py) on CPU tensors against a
plain copy. Prints Markdown (also to --out); medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine_adapters.kernels import cuda
from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.reference import gather, scatter
from engine_adapters.profiling import median_seconds
from tools.bench import kernels_cuda


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--cache-blocks", type=int, default=512, help="blocks in the paged cache, per size")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens moved per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="measure the torch reference on CPU even where CUDA exists")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    for name in ("layers", "kv_heads", "head_size", "cache_blocks", "batch_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    lines = cuda_report(args) if cuda.available() and not args.cpu else cpu_report(args)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


def cuda_report(args: argparse.Namespace) -> list[str]:
    name = torch.cuda.get_device_name()
    head = (
        f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, float16, flash layout, "
        f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_size}, {args.batch_tokens} tokens per call, "
        f"medians of {args.repeats}"
    )
    print(head, flush=True)
    rows = kernels_cuda.measure(args.layers, args.kv_heads, args.head_size, args.batch_tokens, args.repeats)
    lines = [head, "", *kernels_cuda.report(rows)]
    print("\n".join(lines[1:]), flush=True)
    return lines


def cpu_report(args: argparse.Namespace) -> list[str]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    head = (
        f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}, float16, "
        f"{args.layers} layers x {args.kv_heads} KV heads x {args.head_size}"
    )
    lines = [
        head,
        "",
        "| layout | block tokens | blocks per call | gather GB/s | scatter GB/s | memcpy GB/s "
        "| gather / memcpy | scatter / memcpy |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    print("\n".join(lines), flush=True)
    for layout in (CacheLayout.FLASH, CacheLayout.CPU):
        for block_tokens in (16, 64, 256):
            blocks = max(1, args.batch_tokens // block_tokens)
            cache_blocks = max(args.cache_blocks * 16 // block_tokens, 2 * blocks)
            shape: tuple[int, ...]
            if layout is CacheLayout.FLASH:
                shape = (2, cache_blocks, block_tokens, args.kv_heads, args.head_size)
            else:
                shape = (cache_blocks, args.kv_heads, block_tokens, 2 * args.head_size)
            kv = PagedKV.from_tensors(layout, [torch.zeros(shape, dtype=torch.float16) for _ in range(args.layers)])
            ids = torch.randperm(cache_blocks)[:blocks]
            payloads = torch.zeros(blocks * kv.block_bytes, dtype=torch.uint8)
            plain_source = torch.zeros_like(payloads)
            num_bytes = payloads.numel()
            gather_s = median_seconds(partial(gather, kv, ids, payloads), args.repeats)
            scatter_s = median_seconds(partial(scatter, kv, ids, payloads), args.repeats)
            copy_s = median_seconds(partial(payloads.copy_, plain_source), args.repeats)
            gb = num_bytes / 1e9
            lines.append(
                f"| {layout.value} | {block_tokens} | {blocks} | {gb / gather_s:.2f} | {gb / scatter_s:.2f} | "
                f"{gb / copy_s:.2f} | {copy_s / gather_s:.2f}x | {copy_s / scatter_s:.2f}x |"
            )
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    sys.exit(main())
