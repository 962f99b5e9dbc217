"""The torch reference of the block-copy kernels: for every layout, a gather lays each block
out as the store's packing says (checked against slicing written out by hand), a scatter puts
it back and touches nothing else, and bad input is refused before anything is copied."""

from __future__ import annotations

import pytest
import torch

from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.reference import gather, scatter
from kvstore.errors import InvalidArgumentError, LayoutMismatchError
from tests.kernel_cases import BLOCKS, DTYPES, HEAD, HEADS, LAYERS, SIZE, make_cache


def by_hand(kv: PagedKV, block: int) -> torch.Tensor:
    """One block's payload, element by element as the packing defines it."""
    out = torch.empty(kv.block_shape, dtype=kv.dtype)
    for layer in range(LAYERS):
        for token in range(SIZE):
            for head in range(HEADS):
                if kv.layout is CacheLayout.CPU:
                    out[layer, head, token] = kv.tensors[layer][block, head, token]
                    continue
                for kind in range(2):
                    if kv.layout is CacheLayout.FLASH:
                        out[layer, kind, token, head] = kv.tensors[layer][kind, block, token, head]
                    else:
                        out[layer, kind, token, head] = kv.tensors[0][layer, kind, block, token, head]
    return out


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_lays_blocks_out_as_the_packing_says(layout: CacheLayout, dtype: torch.dtype) -> None:
    kv = make_cache(layout, dtype)
    ids = torch.tensor([4, 0, 6, 4])  # a block twice is fine for a gather
    out = torch.empty(len(ids) * kv.block_bytes, dtype=torch.uint8)  # store slots are bytes
    gather(kv, ids, out)
    typed = out.view(kv.dtype).view(len(ids), *kv.block_shape)
    for position, block in enumerate(ids.tolist()):
        assert torch.equal(typed[position], by_hand(kv, block))


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_puts_blocks_back_and_touches_nothing_else(layout: CacheLayout, dtype: torch.dtype) -> None:
    source = make_cache(layout, dtype, seed=1)
    payloads = torch.empty(3 * source.block_bytes, dtype=torch.uint8)
    gather(source, torch.tensor([1, 5, 2]), payloads)
    target = PagedKV.from_tensors(layout, [torch.zeros_like(t) for t in source.tensors])
    scatter(target, torch.tensor([6, 0, 3]), payloads)
    for block, origin in ((6, 1), (0, 5), (3, 2)):
        assert torch.equal(by_hand(target, block), by_hand(source, origin))
    for block in (1, 2, 4, 5):
        assert not by_hand(target, block).to(torch.float32).any()


def test_flash_and_stacked_caches_of_the_same_values_give_the_same_payloads() -> None:
    flash = make_cache(CacheLayout.FLASH, torch.float16, seed=3)
    stacked = PagedKV.from_tensors(CacheLayout.STACKED, [torch.stack(flash.tensors)])
    ids = torch.tensor([2, 3])
    one, two = (torch.empty(2 * flash.block_bytes, dtype=torch.uint8) for _ in range(2))
    gather(flash, ids, one)
    gather(stacked, ids, two)
    assert torch.equal(one, two)


def test_typed_payloads_and_empty_batches() -> None:
    kv = make_cache(CacheLayout.CPU, torch.float32)
    typed = torch.empty(2, *kv.block_shape)
    gather(kv, torch.tensor([3, 1], dtype=torch.int32), typed)
    assert torch.equal(typed[1], by_hand(kv, 1))
    gather(kv, torch.tensor([], dtype=torch.int64), torch.empty(0, dtype=torch.uint8))


def test_unsupported_or_inconsistent_caches_are_refused() -> None:
    layer = torch.zeros(2, BLOCKS, SIZE, HEADS, HEAD)
    with pytest.raises(InvalidArgumentError, match="unsupported KV cache layout 'ragged'"):
        PagedKV.from_tensors("ragged", [layer])
    with pytest.raises(LayoutMismatchError, match="layer 1 is"):
        PagedKV.from_tensors(CacheLayout.FLASH, [layer, layer.half()])
    with pytest.raises(LayoutMismatchError, match="flash layout wants tensors of shape"):
        PagedKV.from_tensors(CacheLayout.FLASH, [torch.zeros(3, BLOCKS, SIZE, HEADS, HEAD)])
    with pytest.raises(LayoutMismatchError, match="2 \\* head_size"):
        PagedKV.from_tensors(CacheLayout.CPU, [torch.zeros(BLOCKS, HEADS, SIZE, 7)])
    with pytest.raises(LayoutMismatchError, match="not one the store keeps"):
        PagedKV.from_tensors(CacheLayout.CPU, [torch.zeros(BLOCKS, HEADS, SIZE, 8, dtype=torch.float64)])
    with pytest.raises(InvalidArgumentError, match="stacked layout is one tensor"):
        PagedKV.from_tensors(CacheLayout.STACKED, [torch.zeros(1, 2, 1, 1, 1, 1)] * 2)


@pytest.mark.parametrize(
    ("ids", "payload_bytes", "message"),
    [
        (torch.tensor([0, BLOCKS]), None, "within \\[0, 7\\)"),
        (torch.tensor([-1]), None, "within"),
        (torch.tensor([2, 2]), None, "distinct"),
        (torch.tensor([[1]]), None, "1-D"),
        (torch.tensor([1.0]), None, "int32/int64"),
        (torch.tensor([1, 2]), 1, "bytes"),
    ],
)
def test_bad_scatters_change_nothing(ids: torch.Tensor, payload_bytes: int | None, message: str) -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float32, seed=4)
    before = [t.clone() for t in kv.tensors]
    count = ids.numel()
    size = count * kv.block_bytes if payload_bytes is None else payload_bytes
    payloads = torch.ones(size, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match=message):
        scatter(kv, ids, payloads)
    assert all(torch.equal(a, b) for a, b in zip(kv.tensors, before, strict=True))


def test_payloads_of_another_dtype_are_refused() -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16)
    with pytest.raises(LayoutMismatchError, match=r"the cache wants torch\.float16"):
        gather(kv, torch.tensor([0]), torch.empty(1, *kv.block_shape, dtype=torch.float32))
