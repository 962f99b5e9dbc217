"""Block copies between a paged cache on a GPU and payloads laid end to end in pinned host
memory, staged through GPU memory.

Directly (cuda.gather into pinned memory), the kernel's threads read or write host memory
over PCIe a segment at a time. Staged, the kernel only moves blocks within the GPU, into or
out of a staging buffer, and the copy engine moves that buffer over PCIe in one contiguous
copy, as one cudaMemcpy does at the PCIe limit. A copy is cut into chunks that alternate
between two staging buffers, so that the copy engine moves chunk c while the kernel fills (a
gather) or drains (a scatter) chunk c + 1: the whole takes about its PCIe transfer plus one
chunk's copy within the GPU. Each chunk costs about 100 us of work on the host (a launch, two
events, a copy), hidden while chunks take longer than that to cross PCIe. On an H200
(docs/benchmarks.md), at 512 MiB a call, this reached 0.95x of one cudaMemcpy in both
directions where the direct kernel reached 0.94x and 0.90x; at 128 MiB and below it was
slower than the direct kernel. The dispatcher (copy.py) takes it from copy.STAGED_MIN_BYTES.

The two staging buffers (at most MAX_CHUNK_BYTES each, or one block where a block is larger)
and a copy stream are kept per GPU and reused. Calls are ordered on torch's current stream as
the direct kernel's are: a call's copies start after the stream's earlier work, and later work
on the stream sees their result. Calls from several threads take turns, since they share the
buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine_adapters.kernels import cuda
from engine_adapters.kernels.paged import PagedKV
from kvstore.errors import InvalidArgumentError

CHUNKS = 8  # a copy is cut into at least this many chunks (when it has the blocks), to overlap
MAX_CHUNK_BYTES = 32 << 20  # the largest staging buffer, unless one block is larger


def gather(kv: PagedKV, block_ids: torch.Tensor, out: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Blocks `block_ids` of every layer into payloads `0..n-1` of `out`, pinned host memory
    (see reference.gather). Waits for the copy unless `non_blocking`."""
    kv.check_blocks(block_ids, distinct=False)
    _stager(kv.device).copy(kv, block_ids, out, to_payload=True, non_blocking=non_blocking)


def scatter(kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Payloads `0..n-1` of `payloads`, pinned host memory, into blocks `block_ids` of every
    layer. Waits for the copy unless `non_blocking` (then `payloads` must stay unchanged
    until the current stream has passed it)."""
    kv.check_blocks(block_ids, distinct=True)
    _stager(kv.device).copy(kv, block_ids, payloads, to_payload=False, non_blocking=non_blocking)


def payload_problem(kv: PagedKV, payloads: torch.Tensor) -> str | None:
    """Why a copy between `kv` and `payloads` cannot be staged (None when it can)."""
    problem = cuda.payload_problem(kv, payloads)
    if problem is not None:
        return problem
    return None if payloads.device.type == "cpu" else f"payloads on {payloads.device}, not in pinned host memory"


def chunk_blocks(count: int, block_bytes: int) -> int:
    """Blocks per chunk of a staged copy of `count` blocks of `block_bytes` each."""
    return max(1, min(-(-count // CHUNKS), MAX_CHUNK_BYTES // block_bytes))


class Stager:
    """One GPU's staging buffers and copy stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._stream: torch.cuda.Stream | None = None
        self._idle: torch.cuda.Event | None = None  # the last call's copies are done, buffers free

    def copy(
        self, kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, to_payload: bool, non_blocking: bool
    ) -> None:
        count = block_ids.numel()
        kv.check_payloads(payloads, count)
        problem = payload_problem(kv, payloads)
        if problem is not None:
            raise InvalidArgumentError(f"a staged block copy cannot run: {problem}")
        if not count:
            return
        host = payloads.reshape(-1).view(torch.uint8)  # contiguous: checked above
        current = torch.cuda.current_stream(self.device)
        ids = cuda.launch_ids(kv, block_ids)
        per_chunk = chunk_blocks(count, kv.block_bytes)
        with self._lock:
            side = self._side_stream()
            buffers = self._staging(per_chunk * kv.block_bytes, side)
            for buffer in buffers:  # torch's allocator then knows every stream that used it
                buffer.record_stream(current)
            if self._idle is not None:
                current.wait_event(self._idle)
            side.wait_stream(current)
            job = _Job(kv, ids, host, buffers, per_chunk, current, side)
            if to_payload:
                job.gather()
            else:
                job.scatter()
            self._idle = _recorded(current)
        if not non_blocking:
            current.synchronize()

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return self._stream

    def _staging(self, size: int, side: torch.cuda.Stream) -> list[torch.Tensor]:
        """Two staging buffers of at least `size` bytes (grown, never shrunk). A buffer given
        up is reused by torch's allocator only after both streams are past it."""
        if not self._buffers or self._buffers[0].numel() < size:
            self._buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
            for buffer in self._buffers:
                buffer.record_stream(side)
        return self._buffers


@dataclass(frozen=True)
class _Job:
    """One staged copy: blocks `ids` (on the GPU) and their payloads end to end in `host`."""

    kv: PagedKV
    ids: torch.Tensor  # as cuda.launch_ids gives them
    host: torch.Tensor  # uint8, pinned
    buffers: list[torch.Tensor]
    per_chunk: int
    current: torch.cuda.Stream  # the kernels run here
    side: torch.cuda.Stream  # the copies over PCIe run here

    def gather(self) -> None:
        size, current, side = self.kv.block_bytes, self.current, self.side
        copied_out: list[torch.cuda.Event | None] = [None, None]  # buffer i's bytes are on the host
        for which, start, stop in _chunks(self.ids.numel(), self.per_chunk):
            buffer, previous = self.buffers[which], copied_out[which]
            if previous is not None:
                current.wait_event(previous)
            cuda.enqueue(self.kv, self.ids[start:stop], buffer.data_ptr(), to_payload=True)
            side.wait_event(_recorded(current))
            with torch.cuda.stream(side):
                self.host[start * size : stop * size].copy_(buffer[: (stop - start) * size], non_blocking=True)
            copied_out[which] = _recorded(side)
        current.wait_stream(side)

    def scatter(self) -> None:
        size, current, side = self.kv.block_bytes, self.current, self.side
        drained: list[torch.cuda.Event | None] = [None, None]  # buffer i's bytes are in the cache
        for which, start, stop in _chunks(self.ids.numel(), self.per_chunk):
            buffer, previous = self.buffers[which], drained[which]
            if previous is not None:
                side.wait_event(previous)
            with torch.cuda.stream(side):
                buffer[: (stop - start) * size].copy_(self.host[start * size : stop * size], non_blocking=True)
            current.wait_event(_recorded(side))
            cuda.enqueue(self.kv, self.ids[start:stop], buffer.data_ptr(), to_payload=False)
            drained[which] = _recorded(current)


def _chunks(count: int, per_chunk: int) -> Iterator[tuple[int, int, int]]:
    """(staging buffer, first block, end) of each chunk; the buffers alternate."""
    for chunk, start in enumerate(range(0, count, per_chunk)):
        yield chunk % 2, start, min(count, start + per_chunk)


def _recorded(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


_stagers: dict[torch.device, Stager] = {}
_stagers_lock = threading.Lock()


def _stager(device: torch.device) -> Stager:
    with _stagers_lock:
        stager = _stagers.get(device)
        if stager is None:
            stager = _stagers[device] = Stager(device)
        return stager
