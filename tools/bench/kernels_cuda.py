"""The CUDA half of tools/bench/kernels.py: the block-copy kernels on a GPU against the
issue's references, each measured in the same run on the same bytes.

For each block size (16, 64 and 256 tokens) and direction:

- device -> pinned host (gather) and pinned host -> device (scatter): the kernel against
  (a) one cudaMemcpy of a contiguous buffer of the same bytes (the PCIe limit),
  (b) one cudaMemcpyAsync per block and layer half, as vLLM's swap_blocks moves blocks (the
      loop runs in C++, so Python's overhead does not count against it), and
  (c) torch's index_select / index_copy_ (the reference path);
- device -> device: the kernel against one contiguous device copy, and (c).

"kernel" times the whole call of the direct kernel (`cuda.gather` / `cuda.scatter`:
validation, then the launch); "launch alone" makes the same launch without the validation
(`cuda.enqueue`, block ids from the CPU carried in the launch), so the difference is the
call's work on the host while the GPU waits. "host us" is that call's time on the host alone,
each call made with the GPU idle, and its share of the call's time.

Over PCIe, "staged" times the other path for pinned payloads (engine_adapters/kernels/staged.py;
copy.py takes it for copies of 256 MiB and more): the kernels copy within the GPU into two
staging buffers in turn and the copy engine moves the chunks over PCIe. Each staged
result is checked bit for bit against the torch reference before it is timed. Times are
CUDA-event medians of `repeats` calls after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine_adapters.kernels import cuda, reference, staged
from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.plan import contiguous_payloads, plan

TARGET_VS_MEMCPY = 0.85  # at 16-token blocks, against (a)
TARGET_VS_PER_BLOCK = 5.0  # at 16-token blocks, against (b)


@dataclass(frozen=True)
class Row:
    direction: str
    block_tokens: int
    blocks: int
    num_bytes: int
    kernel_s: float  # the whole call
    alone_s: float  # the call's launch alone, without its validation
    contiguous_s: float  # (a), or the contiguous device copy
    per_block_s: float | None  # (b); None device to device
    torch_s: float  # (c)
    staged_s: float | None = None  # through GPU staging buffers (staged.py); None device to device
    host_s: float | None = None  # the whole call's time on the host, the GPU idle

    def gbps(self, seconds: float) -> float:
        return self.num_bytes / seconds / 1e9


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls on the current stream, after a warm-up."""
    action()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        action()
        end.record()
        end.synchronize()
        samples.append(float(start.elapsed_time(end)) / 1e3)
    return float(statistics.median(samples))


def host_time(action: Callable[[], object], repeats: int) -> float:
    """Median seconds the host spends in `action`, each call made with the GPU idle."""
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return float(statistics.median(samples))


def measure(layers: int, kv_heads: int, head_size: int, batch_tokens: int, repeats: int) -> list[Row]:
    rows = []
    for block_tokens in (16, 64, 256):
        shape = Shape(layers, kv_heads, head_size, block_tokens, max(1, batch_tokens // block_tokens))
        rows += measure_block_size(shape, repeats)
        torch.cuda.empty_cache()
    return rows


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_size: int
    block_tokens: int
    blocks: int  # per call


def measure_block_size(shape: Shape, repeats: int) -> list[Row]:
    module = cuda.extension()
    device = torch.device("cuda", torch.cuda.current_device())
    cache_blocks = 2 * shape.blocks
    dims = (2, cache_blocks, shape.block_tokens, shape.kv_heads, shape.head_size)
    kv = PagedKV.from_tensors(CacheLayout.FLASH, [torch.randn(dims, device=device).half() for _ in range(shape.layers)])
    ids = torch.randperm(cache_blocks)[: shape.blocks]
    num_bytes = shape.blocks * kv.block_bytes
    pinned = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
    contiguous = torch.zeros(num_bytes, dtype=torch.uint8, device=device)
    spare = torch.zeros_like(contiguous)
    pinned_at = module.device_address(pinned.data_ptr())
    host_plan = plan(kv, ids.tolist(), contiguous_payloads(pinned_at, shape.blocks, kv.block_bytes))
    launch_ids = cuda.launch_ids(kv, ids)
    pairs = torch.tensor(list(host_plan.segments()), dtype=torch.int64)
    index = device.index if device.index is not None else 0
    check_staged(kv, ids)

    def per_block(to_payload: bool) -> None:
        status = module.copy_blocks_memcpy(pairs, host_plan.model.segment_bytes, index, to_payload)
        problem = cuda.status_problem(status)
        if problem:
            raise RuntimeError(f"the per-block cudaMemcpyAsync reference failed: {problem}")

    def row(
        direction: str,
        kernel: Callable[[], object],
        alone: Callable[[], object],
        plain: Callable[[], object],
        loop: Callable[[], object] | None,
        ops: Callable[[], object],
        through_staging: Callable[[], object] | None = None,
    ) -> Row:
        per_block_s = None if loop is None else timed(loop, repeats)
        staged_s = None if through_staging is None else timed(through_staging, repeats)
        return Row(
            direction,
            shape.block_tokens,
            shape.blocks,
            num_bytes,
            timed(kernel, repeats),
            timed(alone, repeats),
            timed(plain, repeats),
            per_block_s,
            timed(ops, repeats),
            staged_s,
            host_time(kernel, repeats),
        )

    return [
        row(
            "device -> pinned host (gather)",
            lambda: cuda.gather(kv, ids, pinned, non_blocking=True),
            lambda: cuda.enqueue(kv, launch_ids, pinned_at, to_payload=True),
            lambda: pinned.copy_(contiguous, non_blocking=True),
            lambda: per_block(True),
            lambda: reference.gather(kv, ids, pinned),
            lambda: staged.gather(kv, ids, pinned, non_blocking=True),
        ),
        row(
            "pinned host -> device (scatter)",
            lambda: cuda.scatter(kv, ids, pinned, non_blocking=True),
            lambda: cuda.enqueue(kv, launch_ids, pinned_at, to_payload=False),
            lambda: contiguous.copy_(pinned, non_blocking=True),
            lambda: per_block(False),
            lambda: reference.scatter(kv, ids, pinned),
            lambda: staged.scatter(kv, ids, pinned, non_blocking=True),
        ),
        row(
            "device -> device (gather)",
            lambda: cuda.gather(kv, ids, on_device),
            lambda: cuda.enqueue(kv, launch_ids, on_device.data_ptr(), to_payload=True),
            lambda: spare.copy_(contiguous),
            None,
            lambda: reference.gather(kv, ids, on_device),
        ),
        row(
            "device -> device (scatter)",
            lambda: cuda.scatter(kv, ids, on_device),
            lambda: cuda.enqueue(kv, launch_ids, on_device.data_ptr(), to_payload=False),
            lambda: spare.copy_(contiguous),
            None,
            lambda: reference.scatter(kv, ids, on_device),
        ),
    ]


def check_staged(kv: PagedKV, block_ids: torch.Tensor) -> None:
    """Raise unless a staged gather, and a staged scatter into a fresh cache, copy exactly the
    bytes the torch reference copies."""
    count = block_ids.numel()
    expected = torch.empty(count * kv.block_bytes, dtype=torch.uint8)
    reference.gather(kv, block_ids, expected)
    pinned = torch.zeros(count * kv.block_bytes, dtype=torch.uint8, pin_memory=True)
    staged.gather(kv, block_ids, pinned)
    if not torch.equal(pinned, expected):
        raise AssertionError("the staged gather differs from the torch reference")
    fresh = PagedKV.from_tensors(kv.layout, [torch.zeros_like(tensor) for tensor in kv.tensors])
    staged.scatter(fresh, block_ids, pinned)
    scattered = torch.empty_like(expected)
    reference.gather(fresh, block_ids, scattered)
    if not torch.equal(scattered, expected):
        raise AssertionError("the staged scatter differs from the torch reference")


def report(rows: list[Row]) -> list[str]:
    lines = [
        "| direction | block tokens | blocks | kernel GB/s | launch alone GB/s | contiguous copy GB/s "
        "| per-block cudaMemcpyAsync GB/s | torch index ops GB/s | kernel / contiguous | launch alone / contiguous "
        "| kernel / per-block | kernel / torch | host us (share) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        per_block = "" if row.per_block_s is None else f"{row.gbps(row.per_block_s):.1f}"
        per_block_ratio = "" if row.per_block_s is None else f"{row.per_block_s / row.kernel_s:.2f}x"
        host = "" if row.host_s is None else f"{row.host_s * 1e6:.0f} ({row.host_s / row.kernel_s:.0%})"
        lines.append(
            f"| {row.direction} | {row.block_tokens} | {row.blocks} | {row.gbps(row.kernel_s):.1f} | "
            f"{row.gbps(row.alone_s):.1f} | {row.gbps(row.contiguous_s):.1f} | {per_block} | "
            f"{row.gbps(row.torch_s):.1f} | {row.contiguous_s / row.kernel_s:.2f}x | "
            f"{row.contiguous_s / row.alone_s:.2f}x | {per_block_ratio} | {row.torch_s / row.kernel_s:.2f}x | "
            f"{host} |"
        )
    staged = [row for row in rows if row.staged_s is not None and row.per_block_s is not None]
    if staged:
        lines += [
            "",
            "Staged through two GPU buffers (engine_adapters/kernels/staged.py, which copy.py takes for pinned "
            "payloads of 256 MiB and more: the kernels copy within the GPU, the copy engine moves chunks over PCIe):",
            "",
            "| direction | block tokens | staged GB/s | staged / contiguous | staged / per-block |",
            "|---|--:|--:|--:|--:|",
        ]
        for row in staged:
            assert row.staged_s is not None and row.per_block_s is not None
            lines.append(
                f"| {row.direction} | {row.block_tokens} | {row.gbps(row.staged_s):.1f} | "
                f"{row.contiguous_s / row.staged_s:.2f}x | {row.per_block_s / row.staged_s:.2f}x |"
            )
    lines += ["", "Targets (16-token blocks, over PCIe):"]
    for row in rows:
        if row.block_tokens != 16 or row.per_block_s is None:
            continue
        lines.append(target_line(row.direction, row.contiguous_s / row.kernel_s, row.per_block_s / row.kernel_s))
        if row.staged_s is not None:
            staged_line = target_line(
                f"{row.direction}, staged", row.contiguous_s / row.staged_s, row.per_block_s / row.staged_s
            )
            lines.append(staged_line)
    return lines


def target_line(label: str, vs_memcpy: float, vs_loop: float) -> str:
    return (
        f"- {label}: {vs_memcpy:.2f}x one cudaMemcpy [>= {TARGET_VS_MEMCPY}x: "
        f"{'PASS' if vs_memcpy >= TARGET_VS_MEMCPY else 'FAIL'}], {vs_loop:.2f}x per-block cudaMemcpyAsync "
        f"[>= {TARGET_VS_PER_BLOCK:g}x: {'PASS' if vs_loop >= TARGET_VS_PER_BLOCK else 'FAIL'}]"
    )
