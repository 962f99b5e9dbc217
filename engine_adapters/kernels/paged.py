"""An engine's paged KV cache, described from its tensors (shapes and strides are read, never
assumed), and the block payload it maps to in the store.

Layouts:

- `FLASH`: vLLM's CUDA flash-attention layout, one tensor per layer of shape
  `(2, num_blocks, block_size, num_kv_heads, head_size)`; its blocks are stored as the store's
  SEPARATE packing: per layer K then V, `(layers, 2, block_size, kv_heads, head_size)`.
- `CPU`: vLLM's CPU layout, one tensor per layer of shape
  `(num_blocks, num_kv_heads, block_size, 2 * head_size)`; stored as INTERLEAVED:
  `(layers, kv_heads, block_size, 2 * head_size)`.
- `STACKED`: one tensor for all layers, `(num_layers, 2, num_blocks, block_size, num_kv_heads,
  head_size)` (the reference engine's); stored as SEPARATE.

Every check happens here, before anything is copied: a layout the kernels do not support, a
layer whose shape, dtype or device differs from the others, a block id out of range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from kvstore.errors import InvalidArgumentError, LayoutMismatchError
from kvstore.types import DType, KVPacking

TORCH_DTYPES: dict[torch.dtype, DType] = {
    torch.float32: DType.FLOAT32,
    torch.float16: DType.FLOAT16,
    torch.bfloat16: DType.BFLOAT16,
    torch.float8_e4m3fn: DType.FLOAT8_E4M3,
    torch.float8_e5m2: DType.FLOAT8_E5M2,
    torch.int8: DType.INT8,
}


class CacheLayout(StrEnum):
    FLASH = "flash"
    CPU = "cpu"
    STACKED = "stacked"

    @property
    def packing(self) -> KVPacking:
        return KVPacking.INTERLEAVED if self is CacheLayout.CPU else KVPacking.SEPARATE


@dataclass(frozen=True)
class PagedKV:
    """The layers of one engine's cache (one tensor each, or one stacked tensor)."""

    layout: CacheLayout
    tensors: tuple[torch.Tensor, ...]
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int

    @classmethod
    def from_tensors(cls, layout: CacheLayout | str, tensors: Sequence[torch.Tensor]) -> PagedKV:
        try:
            layout = CacheLayout(layout)
        except ValueError:
            raise InvalidArgumentError(
                f"unsupported KV cache layout {layout!r}; supported: {[item.value for item in CacheLayout]}"
            ) from None
        tensors = tuple(tensors)
        if not tensors:
            raise InvalidArgumentError("a paged KV cache needs at least one tensor")
        first = tensors[0]
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgumentError(f"layer {index} is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.shape != first.shape or tensor.dtype != first.dtype or tensor.device != first.device:
                raise LayoutMismatchError(
                    f"layer {index} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                    f"layer 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
                )
        if first.dtype not in TORCH_DTYPES:
            raise LayoutMismatchError(f"KV cache dtype {first.dtype} is not one the store keeps")
        shape = tuple(first.shape)
        if layout is CacheLayout.FLASH:
            _expect(shape, 5, layout, "(2, num_blocks, block_size, num_kv_heads, head_size)", first_dim=2)
            _, blocks, size, heads, head = shape
            layers = len(tensors)
        elif layout is CacheLayout.CPU:
            _expect(shape, 4, layout, "(num_blocks, num_kv_heads, block_size, 2 * head_size)")
            blocks, heads, size, twice = shape
            if twice % 2:
                raise LayoutMismatchError(f"cpu layout: the last dimension ({twice}) must be 2 * head_size")
            head, layers = twice // 2, len(tensors)
        else:
            if len(tensors) != 1:
                raise InvalidArgumentError(f"the stacked layout is one tensor, got {len(tensors)}")
            _expect(shape, 6, layout, "(num_layers, 2, num_blocks, block_size, num_kv_heads, head_size)", second_dim=2)
            layers, _, blocks, size, heads, head = shape
        if min(layers, blocks, size, heads, head) < 1:
            raise LayoutMismatchError(f"{layout.value} layout: an empty dimension in {shape}")
        return cls(layout, tensors, layers, blocks, size, heads, head)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def store_dtype(self) -> DType:
        return TORCH_DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block's payload, as the store's packing shapes it."""
        if self.layout is CacheLayout.CPU:
            return (self.num_layers, self.num_kv_heads, self.block_size, 2 * self.head_size)
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_size)

    @property
    def block_bytes(self) -> int:
        count = 1
        for dim in self.block_shape:
            count *= dim
        return count * self.dtype.itemsize

    def check_blocks(self, block_ids: torch.Tensor, *, distinct: bool) -> None:
        """Block ids must be a 1-D integer tensor of ids in range (distinct, for a scatter)."""
        if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
            raise InvalidArgumentError(
                f"block ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} {tuple(block_ids.shape)}"
            )
        if block_ids.numel():
            low, high = int(block_ids.min()), int(block_ids.max())
            if low < 0 or high >= self.num_blocks:
                raise InvalidArgumentError(f"block ids must be within [0, {self.num_blocks}), got {low}..{high}")
        if distinct and torch.unique(block_ids).numel() != block_ids.numel():
            raise InvalidArgumentError("a scatter's block ids must be distinct (two payloads for one block)")

    def check_payloads(self, payloads: torch.Tensor, count: int) -> torch.Tensor:
        """`payloads` as a typed `(count, *block_shape)` view: a contiguous uint8 tensor of
        `count * block_bytes` bytes, or one already of the cache's dtype and that shape."""
        shape = (count, *self.block_shape)
        if payloads.dtype == torch.uint8:
            if not payloads.is_contiguous() or payloads.numel() != count * self.block_bytes:
                raise InvalidArgumentError(
                    f"payload buffer: {payloads.numel()} bytes (contiguous: {payloads.is_contiguous()}) "
                    f"for {count} blocks of {self.block_bytes} bytes"
                )
            return payloads.view(-1).view(self.dtype).view(shape)
        if payloads.dtype != self.dtype or tuple(payloads.shape) != shape:
            raise LayoutMismatchError(
                f"payloads are {payloads.dtype} {tuple(payloads.shape)}; the cache wants {self.dtype} {shape}"
            )
        return payloads


def _expect(
    shape: tuple[int, ...], dims: int, layout: CacheLayout, form: str, *, first_dim: int = 0, second_dim: int = 0
) -> None:
    if len(shape) != dims or (first_dim and shape[0] != first_dim) or (second_dim and shape[1] != second_dim):
        raise LayoutMismatchError(f"{layout.value} layout wants tensors of shape {form}, got {shape}")
