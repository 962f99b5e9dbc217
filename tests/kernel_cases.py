"""Paged KV caches for the block-copy tests: every layout, odd sizes, random values from a
seed, on any device; and the strided variants engines really allocate."""

from __future__ import annotations

import torch

from engine_adapters.kernels.paged import CacheLayout, PagedKV

LAYERS, BLOCKS, SIZE, HEADS, HEAD = 3, 7, 5, 3, 6  # odd sizes on purpose
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def random_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        values = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    else:
        values = torch.randn(shape, generator=generator).to(dtype)
    return values.to(device)


def make_cache(
    layout: CacheLayout,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    device: str = "cpu",
    dims: tuple[int, int, int, int, int] = (LAYERS, BLOCKS, SIZE, HEADS, HEAD),
) -> PagedKV:
    layers, blocks, size, heads, head = dims
    if layout is CacheLayout.FLASH:
        tensors = [random_like((2, blocks, size, heads, head), dtype, seed + i, device) for i in range(layers)]
    elif layout is CacheLayout.CPU:
        tensors = [random_like((blocks, heads, size, 2 * head), dtype, seed + i, device) for i in range(layers)]
    else:
        tensors = [random_like((layers, 2, blocks, size, heads, head), dtype, seed, device)]
    return PagedKV.from_tensors(layout, tensors)


def blocks_first_flash(dtype: torch.dtype, seed: int = 0, *, device: str = "cpu") -> PagedKV:
    """The flash layout over memory ordered (blocks, 2, size, heads, head), as vLLM allocates it
    for some attention backends (its KV cache stride order): K and V of a block are neighbours,
    and every block is still a dense run."""
    tensors = [
        random_like((BLOCKS, 2, SIZE, HEADS, HEAD), dtype, seed + i, device).permute(1, 0, 2, 3, 4)
        for i in range(LAYERS)
    ]
    return PagedKV.from_tensors(CacheLayout.FLASH, tensors)


def heads_first_flash(dtype: torch.dtype, seed: int = 0, *, device: str = "cpu") -> PagedKV:
    """The flash layout over memory ordered (2, blocks, heads, size, head) (an "HND" layout): a
    block's (size, heads, head) elements are not one dense run."""
    tensors = [
        random_like((2, BLOCKS, HEADS, SIZE, HEAD), dtype, seed + i, device).permute(0, 1, 3, 2, 4)
        for i in range(LAYERS)
    ]
    return PagedKV.from_tensors(CacheLayout.FLASH, tensors)
