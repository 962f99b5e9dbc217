"""An experiment of the kernel benchmark (tools/bench/kernels_cuda.py): block copies between a
paged cache on the GPU and pinned host memory, staged through GPU memory, against the kernels
reading and writing host memory directly over PCIe.

Staged, the kernels only move blocks within the GPU (over a terabyte a second on an H200) and
the copy engine moves the bytes over PCIe in large contiguous chunks, which is what one
cudaMemcpy of a contiguous buffer does at the PCIe limit. Two staging buffers on the GPU let
the two overlap: while the copy engine moves chunk c, the kernel fills (gather) or drains
(scatter) chunk c + 1. The whole copy then takes about as long as its PCIe transfer plus one
chunk's device copy.

Not yet used by engines: the benchmark measures it and checks its result bit for bit against
the torch reference first (`check`), so that the first run on a GPU says whether it pays.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine_adapters.kernels import cuda, reference
from engine_adapters.kernels.paged import PagedKV

CHUNKS = 8  # a copy is cut into this many chunks, so that PCIe and the device copies overlap


class StagedCopy:
    """Two staging buffers on `kv`'s GPU, each of `chunk_blocks` blocks, and a stream for
    the copy engine."""

    def __init__(self, kv: PagedKV, blocks: int) -> None:
        self.kv = kv
        self.chunk_blocks = max(1, -(-blocks // CHUNKS))
        size = self.chunk_blocks * kv.block_bytes
        self.staging = [torch.empty(size, dtype=torch.uint8, device=kv.device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(kv.device)  # type: ignore[no-untyped-call]

    def gather(self, block_ids: torch.Tensor, pinned: torch.Tensor) -> None:
        """Blocks `block_ids` into `pinned` (contiguous payloads), stream-ordered after the
        current stream's work; the current stream waits for the last chunk."""
        current, side, block = torch.cuda.current_stream(self.kv.device), self.copy_stream, self.kv.block_bytes
        side.wait_stream(current)
        copied_out: list[torch.cuda.Event | None] = [None, None]  # buffer i's bytes are on the host
        for which, start, stop in self._chunks(block_ids.numel()):
            buffer = self.staging[which][: (stop - start) * block]
            previous = copied_out[which]
            if previous is not None:
                current.wait_event(previous)
            cuda.gather(self.kv, block_ids[start:stop], buffer, non_blocking=True)
            side.wait_event(_recorded(current))
            with torch.cuda.stream(side):
                pinned[start * block : stop * block].copy_(buffer, non_blocking=True)
            copied_out[which] = _recorded(side)
        current.wait_stream(side)

    def scatter(self, block_ids: torch.Tensor, pinned: torch.Tensor) -> None:
        """The payloads in `pinned` into blocks `block_ids`, stream-ordered likewise."""
        current, side, block = torch.cuda.current_stream(self.kv.device), self.copy_stream, self.kv.block_bytes
        side.wait_stream(current)
        drained: list[torch.cuda.Event | None] = [None, None]  # buffer i's bytes are in the cache
        for which, start, stop in self._chunks(block_ids.numel()):
            buffer = self.staging[which][: (stop - start) * block]
            previous = drained[which]
            if previous is not None:
                side.wait_event(previous)
            with torch.cuda.stream(side):
                buffer.copy_(pinned[start * block : stop * block], non_blocking=True)
            current.wait_event(_recorded(side))
            cuda.scatter(self.kv, block_ids[start:stop], buffer, non_blocking=True)
            drained[which] = _recorded(current)

    def _chunks(self, count: int) -> Iterator[tuple[int, int, int]]:
        """(staging buffer, first block, end) of each chunk of a copy of `count` blocks; the
        buffers alternate."""
        for chunk, start in enumerate(range(0, count, self.chunk_blocks)):
            yield chunk % 2, start, min(count, start + self.chunk_blocks)


def check(kv: PagedKV, block_ids: torch.Tensor) -> None:
    """Raise unless a staged gather, and a staged scatter into a fresh cache, copy exactly the
    bytes the torch reference copies."""
    count = block_ids.numel()
    expected = torch.empty(count * kv.block_bytes, dtype=torch.uint8)
    reference.gather(kv, block_ids, expected)
    pinned = torch.zeros(count * kv.block_bytes, dtype=torch.uint8, pin_memory=True)
    StagedCopy(kv, count).gather(block_ids, pinned)
    torch.cuda.synchronize(kv.device)
    if not torch.equal(pinned, expected):
        raise AssertionError("the staged gather differs from the torch reference")
    fresh = PagedKV.from_tensors(kv.layout, [torch.zeros_like(tensor) for tensor in kv.tensors])
    StagedCopy(fresh, count).scatter(block_ids, pinned)
    torch.cuda.synchronize(kv.device)
    scattered = torch.empty_like(expected)
    reference.gather(fresh, block_ids, scattered)
    if not torch.equal(scattered, expected):
        raise AssertionError("the staged scatter differs from the torch reference")


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event
