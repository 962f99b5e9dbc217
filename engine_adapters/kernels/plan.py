"""A block copy as the CUDA kernels see it: a list of contiguous segments, one per (block,
layer, K or V half), each a run of bytes in the paged cache and the same number of bytes in
the block's payload.

A payload holds its segments back to back in the store's packing (paged.py): segment `s` of
block `i` starts `s * segment_bytes` into payload `i`, where `s = layer * kv_parts + half`.
In the cache, segment `(layer, half)` of block id `b` starts at
`layer_addrs[layer] + half * kv_stride + b * block_stride`. So every supported layout is four
numbers and an address per layer; the kernel needs no knowledge of layouts, and this module,
which does the layout arithmetic, is checked on CPU by executing a plan with plain memory
copies (`execute_on_host`) against the torch reference.

A layout qualifies when each segment is contiguous in the cache (its tensor's inner dims are
dense) and every layer has the same strides; `layout_problem` says why otherwise, and the dispatcher
(copy.py) then uses the reference, which handles any strides.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine_adapters.kernels.paged import CacheLayout, PagedKV


class UnplannableError(Exception):
    """The cache's strides do not fit the kernels' segment model; the reason says which."""


@dataclass(frozen=True, slots=True)
class SegmentModel:
    """A cache's layout as the kernels see it."""

    layer_addrs: tuple[int, ...]  # where each layer's segment (half 0, block 0) starts
    kv_parts: int  # 2 when K and V are separate segments, 1 when a block interleaves them
    kv_stride: int  # bytes from a layer's K segment to its V segment
    block_stride: int  # bytes from block id b to b + 1 in the cache
    segment_bytes: int

    @property
    def payload_bytes(self) -> int:
        """One block's payload: every layer's segments back to back."""
        return len(self.layer_addrs) * self.kv_parts * self.segment_bytes


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """Blocks `block_ids` of a cache of layout `model`, and where each one's payload starts."""

    model: SegmentModel
    block_ids: tuple[int, ...]
    payload_addrs: tuple[int, ...]

    def alignment(self) -> int:
        """The largest power of two, up to 16, dividing every address, stride and length: the
        widest access a kernel may use."""
        model = self.model
        values = [*model.layer_addrs, *self.payload_addrs, model.kv_stride, model.block_stride, model.segment_bytes]
        combined = 16
        for value in values:
            combined |= value
        return combined & -combined

    def segments(self) -> Iterator[tuple[int, int]]:
        """(cache address, payload address) of every segment, block by block."""
        model = self.model
        for block_id, payload in zip(self.block_ids, self.payload_addrs, strict=True):
            for layer, base in enumerate(model.layer_addrs):
                for half in range(model.kv_parts):
                    index = layer * model.kv_parts + half
                    yield (
                        base + half * model.kv_stride + block_id * model.block_stride,
                        payload + index * model.segment_bytes,
                    )


def segment_model(kv: PagedKV) -> SegmentModel:
    """`kv`'s layout in segments. Raises UnplannableError for strides the model cannot express."""
    item = kv.dtype.itemsize
    first = kv.tensors[0]
    strides = tuple(first.stride())
    for index, tensor in enumerate(kv.tensors):
        if tuple(tensor.stride()) != strides:
            raise UnplannableError(f"layer {index} has strides {tuple(tensor.stride())}, layer 0 {strides}")
    shape = tuple(first.shape)
    if kv.layout is CacheLayout.FLASH:  # (2, blocks, size, heads, head)
        inner, inner_strides, kv_parts, kv_stride, block_stride = shape[2:], strides[2:], 2, strides[0], strides[1]
        layer_addrs = tuple(tensor.data_ptr() for tensor in kv.tensors)
    elif kv.layout is CacheLayout.CPU:  # (blocks, heads, size, 2 * head)
        inner, inner_strides, kv_parts, kv_stride, block_stride = shape[1:], strides[1:], 1, 0, strides[0]
        layer_addrs = tuple(tensor.data_ptr() for tensor in kv.tensors)
    else:  # (layers, 2, blocks, size, heads, head)
        inner, inner_strides, kv_parts, kv_stride, block_stride = shape[3:], strides[3:], 2, strides[1], strides[2]
        layer_addrs = tuple(first.data_ptr() + layer * strides[0] * item for layer in range(kv.num_layers))
    if not _dense(inner, inner_strides):
        raise UnplannableError(
            f"{kv.layout.value} layout: a block's {inner} elements have strides {inner_strides}, not dense"
        )
    if min(kv_stride, block_stride) < 0:
        raise UnplannableError(f"{kv.layout.value} layout: negative strides {strides}")
    segment = 1
    for dim in inner:
        segment *= dim
    return SegmentModel(layer_addrs, kv_parts, kv_stride * item, block_stride * item, segment * item)


def layout_problem(kv: PagedKV) -> str | None:
    """Why the kernels cannot copy `kv`'s blocks (None when they can)."""
    try:
        segment_model(kv)
    except UnplannableError as reason:
        return str(reason)
    return None


def plan(kv: PagedKV, block_ids: Sequence[int], payload_addrs: Sequence[int]) -> CopyPlan:
    """The segments of copying blocks `block_ids` of `kv` to or from the payloads at
    `payload_addrs` (one address per block). Raises UnplannableError for strides the segment model
    cannot express; the caller has already validated ids and payload sizes (paged.py)."""
    if len(block_ids) != len(payload_addrs):
        raise ValueError(f"{len(block_ids)} block ids but {len(payload_addrs)} payload addresses")
    return CopyPlan(
        segment_model(kv), tuple(int(block) for block in block_ids), tuple(int(address) for address in payload_addrs)
    )


def contiguous_payloads(base: int, count: int, block_bytes: int) -> list[int]:
    """Payload addresses of `count` blocks laid end to end from `base`."""
    return [base + index * block_bytes for index in range(count)]


def execute_on_host(copy: CopyPlan, *, to_payload: bool) -> None:
    """Run a plan with plain memory copies: the CUDA kernel's semantics, for CPU memory. Slow
    (a Python call per segment); it exists to check plans, not to move data."""
    for cache, payload in copy.segments():
        if to_payload:
            ctypes.memmove(payload, cache, copy.model.segment_bytes)
        else:
            ctypes.memmove(cache, payload, copy.model.segment_bytes)


def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether elements of `shape` with `strides` fill one contiguous run (a dimension of size 1
    may have any stride)."""
    step = 1
    for dim, stride in zip(reversed(shape), reversed(strides), strict=True):
        if dim != 1 and stride != step:
            return False
        step *= dim
    return True
