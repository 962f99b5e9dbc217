"""The CUDA block-copy kernels (engine_adapters/kernels/cuda.py) against the torch reference,
bit for bit, on a real GPU: every layout and dtype, odd sizes that force every access width,
payloads in device memory, pinned host memory and registered host memory (as a node's shared
memory is), blocks in any order, more blocks than one grid dimension holds; and bad input
refused before anything is copied."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engine_adapters.kernels import copy, cuda, reference, staged
from engine_adapters.kernels.host import HostRegistration
from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.plan import contiguous_payloads, plan
from kvstore.errors import InvalidArgumentError
from kvstore.tiers.dram import SharedSegment
from tests.kernel_cases import DTYPES, blocks_first_flash, heads_first_flash, make_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda.available(), reason="needs CUDA (a CUDA build of torch and a GPU)"),
]

DEVICE = "cuda:0"
IDS = [4, 0, 6, 2, 5, 4]  # a block twice: fine for a gather
SCATTER_IDS = [6, 0, 2, 5]
# (layers, blocks, block size, kv heads, head size): odd everything, then aligned
SHAPES = [(3, 7, 5, 3, 6), (2, 9, 16, 8, 128), (1, 5, 1, 1, 1)]


def on_cpu(kv: PagedKV) -> PagedKV:
    return PagedKV.from_tensors(kv.layout, [tensor.cpu() for tensor in kv.tensors])


def reference_gather(kv: PagedKV, ids: list[int]) -> torch.Tensor:
    out = torch.empty(len(ids) * kv.block_bytes, dtype=torch.uint8)
    reference.gather(on_cpu(kv), torch.tensor(ids), out)
    return out


def zeros(kv: PagedKV) -> PagedKV:
    return PagedKV.from_tensors(kv.layout, [torch.zeros_like(tensor) for tensor in kv.tensors])


def payload_buffer(kv: PagedKV, count: int, where: str) -> torch.Tensor:
    if where == "device":
        return torch.zeros(count * kv.block_bytes, dtype=torch.uint8, device=DEVICE)
    return torch.zeros(count * kv.block_bytes, dtype=torch.uint8, pin_memory=True)


@pytest.fixture(autouse=True)
def built() -> Iterator[None]:
    cuda.extension()  # the first test pays the build, not a timeout of its own
    yield
    torch.cuda.synchronize()


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("where", ["device", "pinned", "pinned-staged"])
def test_gather_equals_the_reference(
    layout: CacheLayout, dtype: torch.dtype, dims: tuple[int, int, int, int, int], where: str
) -> None:
    """On device payloads the kernel; on pinned ones the kernel and the staged path."""
    kv = make_cache(layout, dtype, seed=21, device=DEVICE, dims=dims)
    ids = [i % dims[1] for i in IDS]
    out = payload_buffer(kv, len(ids), "pinned" if where == "pinned-staged" else where)
    assert copy.route(kv, out) is copy.Route.KERNELS
    (staged if where == "pinned-staged" else copy).gather(kv, torch.tensor(ids), out)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), reference_gather(kv, ids))


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("where", ["device", "pinned", "pinned-staged"])
def test_scatter_equals_the_reference(
    layout: CacheLayout, dtype: torch.dtype, dims: tuple[int, int, int, int, int], where: str
) -> None:
    source = make_cache(layout, dtype, seed=22, device=DEVICE, dims=dims)
    ids = sorted({i % dims[1] for i in SCATTER_IDS})
    payloads = payload_buffer(source, len(ids), where)
    payloads.copy_(reference_gather(source, list(reversed(ids))))
    target = zeros(source)
    expected = on_cpu(zeros(source))
    (staged if where == "pinned-staged" else copy).scatter(target, torch.tensor(ids), payloads)
    reference.scatter(expected, torch.tensor(ids), payloads.cpu())
    torch.cuda.synchronize()
    for mine, theirs in zip(target.tensors, expected.tensors, strict=True):
        assert torch.equal(mine.cpu(), theirs)


def test_every_access_width_is_exercised() -> None:
    """Segment sizes of 1, 2, 4, 8 and 16 bytes' alignment all copy correctly."""
    for head, dtype, width in (
        (1, torch.int8, 1),
        (1, torch.float16, 2),
        (1, torch.float32, 4),
        (2, torch.float32, 8),
        (4, torch.float32, 16),
    ):
        kv = make_cache(CacheLayout.STACKED, dtype, seed=head, device=DEVICE, dims=(2, 4, 1, 1, head))
        out = payload_buffer(kv, 3, "device")
        assert plan(kv, [0, 1, 2], contiguous_payloads(out.data_ptr(), 3, kv.block_bytes)).alignment() == width
        launch = cuda.prepare_contiguous(kv, torch.tensor([3, 1, 2]), out.data_ptr())
        assert launch.alignment == width
        launch.run(to_payload=True)  # the block ids in GPU memory
        assert torch.equal(out.cpu(), reference_gather(kv, [3, 1, 2]))
        out.zero_()
        copy.gather(kv, torch.tensor([3, 1, 2]), out)  # the block ids inside the launch
        assert torch.equal(out.cpu(), reference_gather(kv, [3, 1, 2]))


def test_blocks_first_strides_use_the_kernels_heads_first_the_reference() -> None:
    kv = blocks_first_flash(torch.bfloat16, seed=5, device=DEVICE)
    out = payload_buffer(kv, len(IDS), "pinned")
    assert copy.uses_kernels(kv, out)
    copy.gather(kv, torch.tensor(IDS), out)
    assert torch.equal(out, reference_gather(kv, IDS))
    strided = heads_first_flash(torch.bfloat16, seed=6, device=DEVICE)
    assert not copy.uses_kernels(strided, out)
    copy.gather(strided, torch.tensor(IDS), out)
    assert torch.equal(out, reference_gather(strided, IDS))


def test_more_blocks_than_one_grid_dimension() -> None:
    """70,000 blocks: the launch that takes its ids from GPU memory strides over the grid's
    65,535 rows; the one that carries them (1,000 a launch) launches 70 times."""
    count = 70_000
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=7, device=DEVICE, dims=(2, count, 1, 1, 8))
    ids = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    out = payload_buffer(kv, count, "device")
    expected = reference_gather(kv, ids.tolist())
    for where in ("cpu", DEVICE):
        out.zero_()
        copy.gather(kv, ids.to(where), out)
        assert torch.equal(out.cpu(), expected)
        back = zeros(kv)
        copy.scatter(back, ids.to(where), out)
        for mine, theirs in zip(back.tensors, kv.tensors, strict=True):
            assert torch.equal(mine, theirs)


def test_registered_shared_memory_slots_in_any_order() -> None:
    """A node's shared-memory pool (a MAP_SHARED mapping of /dev/shm), registered: blocks go
    straight to and from slots at any offset."""
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=8, device=DEVICE, dims=(2, 9, 16, 8, 128))
    size = kv.block_bytes
    segment = SharedSegment.create(f"kvstore-gpu-test-{os.getpid()}", 10 * size)
    try:
        pool = segment.array
        with HostRegistration.of(pool):
            slots = [7, 2, 9]
            base = pool.ctypes.data
            cuda.gather_to(kv, torch.tensor([1, 8, 3]), [base + slot * size for slot in slots])
            expected = reference_gather(kv, [1, 8, 3]).numpy()
            for position, slot in enumerate(slots):
                stored = pool[slot * size : (slot + 1) * size]
                assert np.array_equal(stored, expected[position * size : (position + 1) * size])
            target = zeros(kv)
            cuda.scatter_from(target, torch.tensor([0, 4, 6]), [base + slot * size for slot in slots])
            assert torch.equal(reference_gather(target, [0, 4, 6]), torch.from_numpy(expected))
    finally:
        segment.close()


def test_unregistered_host_memory_is_refused() -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16, device=DEVICE)
    pool = np.zeros(2 * kv.block_bytes, dtype=np.uint8)
    with pytest.raises(InvalidArgumentError, match="pinned or registered"):
        cuda.gather_to(kv, torch.tensor([0]), [pool.ctypes.data])
    assert not pool.any()


def test_a_payload_running_past_its_registration_is_refused() -> None:
    """CUDA says only that an address is registered; the kernels also check that the whole
    block fits inside the registration, and refuse before copying anything."""
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=11, device=DEVICE)
    size = kv.block_bytes
    pool = np.full(2 * size + size // 2, 5, dtype=np.uint8)
    before = [tensor.clone() for tensor in kv.tensors]
    with HostRegistration.of(pool):
        base = pool.ctypes.data
        with pytest.raises(InvalidArgumentError, match=r"payload 1 .* past the end"):
            cuda.gather_to(kv, torch.tensor([0, 1]), [base, base + 2 * size])
        with pytest.raises(InvalidArgumentError, match=r"payload 1 .* past the end"):
            cuda.scatter_from(kv, torch.tensor([0, 1]), [base, base + 2 * size])
        assert bool((pool == 5).all())
        cuda.gather_to(kv, torch.tensor([2]), [base + size + size // 2])  # ends exactly at the end
    assert bool((pool[: size + size // 2] == 5).all())
    assert np.array_equal(pool[size + size // 2 :], reference_gather(kv, [2]).numpy())
    assert all(torch.equal(tensor, old) for tensor, old in zip(kv.tensors, before, strict=True))


def test_the_extension_answers_with_status_codes_instead_of_throwing() -> None:
    """Its own guards answer with a code that cuda.py explains: on the H200 machine this was
    tested on, a C++ exception thrown out of the extension, and a message formatted in it,
    crashed the process."""
    index = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    status = cuda.extension().copy_blocks(index, index, index, 0, 0, 3, 0, 0, 16, 16, True)
    assert "kv_parts must be 1 or 2" in (cuda.status_problem(status) or "")
    status = cuda.extension().copy_blocks(index.cpu(), index, index, 0, 0, 2, 0, 0, 16, 16, True)
    assert "not on the GPU" in (cuda.status_problem(status) or "")
    status = cuda.extension().copy_blocks_memcpy(index, 16, 0, True)  # on the GPU: refused
    assert "segment_pairs" in (cuda.status_problem(status) or "")
    status = cuda.extension().copy_blocks_inline(index, index, 0, 16, 2, 0, 0, 16, 16, True)
    assert "must be a CPU tensor" in (cuda.status_problem(status) or "")
    status = cuda.extension().copy_blocks_inline(index, torch.tensor([1 << 31]), 0, 16, 2, 0, 0, 16, 16, True)
    assert "32 bits" in (cuda.status_problem(status) or "")
    assert cuda.extension().device_address(np.zeros(64, dtype=np.uint8).ctypes.data) == 0  # pageable


def test_staged_copies_cut_into_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small staging buffers: a copy runs through them many times, alternating, with a short
    last chunk; the result is still the reference's, and so is a scatter on another stream
    right after (the buffers are not reused before the first call's copies are done). Copies
    from copy.STAGED_MIN_BYTES on take this path."""
    monkeypatch.setattr(staged, "MAX_CHUNK_BYTES", 1)  # one block per chunk
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=12, device=DEVICE, dims=(3, 40, 16, 2, 64))
    ids = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:23]
    out = payload_buffer(kv, 23, "pinned")
    target = zeros(kv)  # before the gather, on the default stream: the scatter's stream waits for both
    assert copy.route(kv, out) is copy.Route.KERNELS
    monkeypatch.setattr(copy, "STAGED_MIN_BYTES", out.numel())  # copies this large are staged
    assert copy.route(kv, out) is copy.Route.STAGED
    copy.gather(kv, ids, out, non_blocking=True)
    with torch.cuda.stream(torch.cuda.Stream()):
        staged.scatter(target, ids, out)
    torch.cuda.synchronize()
    assert torch.equal(out, reference_gather(kv, ids.tolist()))
    assert torch.equal(reference_gather(target, ids.tolist()), out)
    monkeypatch.setattr(staged, "MAX_CHUNK_BYTES", 64 << 20)
    assert staged.chunk_blocks(23, kv.block_bytes) == 3  # 23 blocks in 8 chunks


def test_typed_payloads_and_block_ids_on_the_gpu() -> None:
    """Payloads may come typed, (count, *block_shape) of the cache's dtype, and block ids may
    already be on the GPU (no upload): both paths copy the same bytes."""
    kv = make_cache(CacheLayout.CPU, torch.bfloat16, seed=13, device=DEVICE, dims=(2, 8, 16, 2, 32))
    ids = [5, 1, 6]
    for where in ("pinned", "device"):
        typed = torch.zeros((3, *kv.block_shape), dtype=kv.dtype, pin_memory=where == "pinned")
        typed = typed.to(DEVICE) if where == "device" else typed
        copy.gather(kv, torch.tensor(ids, device=DEVICE), typed)
        torch.cuda.synchronize()
        assert torch.equal(typed.cpu().reshape(-1).view(torch.uint8), reference_gather(kv, ids))


def test_payloads_that_are_not_contiguous_go_to_the_reference() -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=14, device=DEVICE)
    wide = torch.zeros((2, *kv.block_shape[:-1], 2 * kv.block_shape[-1]), dtype=kv.dtype, device=DEVICE)
    strided = wide[..., : kv.block_shape[-1]]  # the right shape, every other run of elements
    assert cuda.payload_problem(kv, strided) == "payloads are not contiguous"
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        cuda.gather(kv, torch.tensor([0, 1]), strided)
    assert not copy.uses_kernels(kv, strided)
    copy.gather(kv, torch.tensor([0, 1]), strided)
    assert torch.equal(strided.contiguous().cpu().reshape(-1).view(torch.uint8), reference_gather(kv, [0, 1]))


@pytest.mark.parametrize(
    ("ids", "count", "match"),
    [
        ([0, 7], 2, "within"),
        ([1, 1], 2, "distinct"),
        ([0, 1], 1, "bytes"),
    ],
)
def test_bad_input_is_refused_before_anything_is_copied(ids: list[int], count: int, match: str) -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=9, device=DEVICE)
    before = [tensor.clone() for tensor in kv.tensors]
    payloads = payload_buffer(kv, count, "device").fill_(3)
    with pytest.raises(InvalidArgumentError, match=match):
        cuda.scatter(kv, torch.tensor(ids), payloads)
    for tensor, old in zip(kv.tensors, before, strict=True):
        assert torch.equal(tensor, old)


def test_pageable_payloads_are_refused_by_the_kernels_and_served_by_the_reference() -> None:
    kv = make_cache(CacheLayout.CPU, torch.float16, seed=10, device=DEVICE)
    out = torch.zeros(2 * kv.block_bytes, dtype=torch.uint8)  # not pinned
    with pytest.raises(InvalidArgumentError, match="pageable"):
        cuda.gather(kv, torch.tensor([0, 1]), out)
    assert not out.any()
    assert not copy.uses_kernels(kv, out)
    copy.gather(kv, torch.tensor([0, 1]), out)
    assert torch.equal(out, reference_gather(kv, [0, 1]))
