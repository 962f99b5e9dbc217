"""The CUDA kernels' copy plans (plan.py), checked on CPU: a plan executed with plain memory
copies moves exactly the bytes the torch reference moves, for every layout, dtype and the
strided caches engines allocate; a layout the segment model cannot express is named and left
to the reference (copy.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from engine_adapters.kernels import copy, cuda, reference
from engine_adapters.kernels.host import HostRegistration
from engine_adapters.kernels.paged import CacheLayout, PagedKV
from engine_adapters.kernels.plan import UnplannableError, contiguous_payloads, execute_on_host, layout_problem, plan
from kvstore.errors import InvalidArgumentError
from tests.kernel_cases import DTYPES, blocks_first_flash, heads_first_flash, make_cache

IDS = [4, 0, 6, 2, 5]


def planned_gather(kv: PagedKV, ids: list[int]) -> torch.Tensor:
    out = torch.zeros(len(ids) * kv.block_bytes, dtype=torch.uint8)
    execute_on_host(plan(kv, ids, contiguous_payloads(out.data_ptr(), len(ids), kv.block_bytes)), to_payload=True)
    return out


def reference_gather(kv: PagedKV, ids: list[int]) -> torch.Tensor:
    out = torch.zeros(len(ids) * kv.block_bytes, dtype=torch.uint8)
    reference.gather(kv, torch.tensor(ids), out)
    return out


def zeros(kv: PagedKV) -> PagedKV:
    """A cache of the same shape and strides as `kv`, all zeros."""
    return PagedKV.from_tensors(kv.layout, [torch.zeros_like(tensor) for tensor in kv.tensors])


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_planned_gather_equals_the_reference(layout: CacheLayout, dtype: torch.dtype) -> None:
    kv = make_cache(layout, dtype, seed=11)
    assert torch.equal(planned_gather(kv, [*IDS, 4]), reference_gather(kv, [*IDS, 4]))


@pytest.mark.parametrize("layout", list(CacheLayout))
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_planned_scatter_equals_the_reference(layout: CacheLayout, dtype: torch.dtype) -> None:
    source = make_cache(layout, dtype, seed=12)
    payloads = reference_gather(source, [1, 3, 5])
    by_plan, by_reference = zeros(source), zeros(source)
    execute_on_host(
        plan(by_plan, [6, 0, 2], contiguous_payloads(payloads.data_ptr(), 3, source.block_bytes)), to_payload=False
    )
    reference.scatter(by_reference, torch.tensor([6, 0, 2]), payloads)
    for mine, theirs in zip(by_plan.tensors, by_reference.tensors, strict=True):
        assert torch.equal(mine, theirs)
    assert by_plan.tensors[0].to(torch.float32).any()  # something was written


def test_blocks_first_flash_memory_is_planned_with_its_own_strides() -> None:
    kv = blocks_first_flash(torch.float16, seed=3)
    assert layout_problem(kv) is None
    copy_plan = plan(kv, IDS, [0] * len(IDS))
    assert copy_plan.model.kv_stride < copy_plan.model.block_stride  # K and V of a block are neighbours
    assert torch.equal(planned_gather(kv, IDS), reference_gather(kv, IDS))


def test_payloads_may_sit_anywhere() -> None:
    """Shared-memory slots are not contiguous: each block goes to its own address."""
    kv = make_cache(CacheLayout.FLASH, torch.bfloat16, seed=4)
    size = kv.block_bytes
    slots = torch.zeros(8 * size, dtype=torch.uint8)
    where = [5, 1, 7]
    execute_on_host(plan(kv, [2, 6, 3], [slots.data_ptr() + slot * size for slot in where]), to_payload=True)
    expected = reference_gather(kv, [2, 6, 3])
    for position, slot in enumerate(where):
        assert torch.equal(slots[slot * size : (slot + 1) * size], expected[position * size : (position + 1) * size])
    assert not slots[0:size].any() and not slots[2 * size : 5 * size].any()


def test_alignment_is_the_widest_access_every_address_allows() -> None:
    kv = make_cache(CacheLayout.STACKED, torch.float32)  # segments of 5*3*6*4 = 360 bytes
    base = torch.empty(4096, dtype=torch.uint8).data_ptr() // 16 * 16
    assert plan(kv, [0], [base]).alignment() == 8  # 360 = 8 * 45
    assert plan(kv, [0], [base + 4]).alignment() == 4
    assert plan(kv, [0], [base + 1]).alignment() == 1
    aligned = make_cache(CacheLayout.FLASH, torch.float16, dims=(2, 3, 16, 2, 8))  # 512-byte segments
    assert plan(aligned, [0, 2], [base, base + 1024]).alignment() == 16


def test_a_layout_the_segments_cannot_express_is_named() -> None:
    kv = heads_first_flash(torch.float16)
    problem = layout_problem(kv)
    assert problem is not None and "not dense" in problem
    with pytest.raises(UnplannableError, match="not dense"):
        plan(kv, [0], [0])
    mixed = PagedKV.from_tensors(
        CacheLayout.FLASH,
        [blocks_first_flash(torch.float16).tensors[0], make_cache(CacheLayout.FLASH, torch.float16).tensors[0]],
    )
    assert "layer 1 has strides" in (layout_problem(mixed) or "")


def test_the_kernels_keep_a_caches_layout_and_name_what_they_cannot_copy() -> None:
    """cuda.layout_problem (what copy.py asks on every copy) works a cache's segment model out
    once: its layer addresses are the same tensor the second time. An inexpressible layout is
    named, as plan.layout_problem names it."""
    kv = make_cache(CacheLayout.FLASH, torch.float16, dims=(3, 4, 16, 2, 8))
    assert cuda.layout_problem(kv) is None
    model, layer_addrs, _ = cuda._layout(kv)
    assert model.payload_bytes == kv.block_bytes
    assert cuda._layout(kv)[1] is layer_addrs
    assert layer_addrs.tolist() == [tensor.data_ptr() for tensor in kv.tensors]
    assert "not dense" in (cuda.layout_problem(heads_first_flash(torch.float16)) or "")


def test_without_cuda_every_copy_takes_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    kv = heads_first_flash(torch.float32, seed=5)
    out = torch.empty(2 * kv.block_bytes, dtype=torch.uint8)
    assert not copy.uses_kernels(kv, out)  # a CPU cache, whatever its strides
    if not cuda.available():
        assert "CUDA build of torch" in (cuda.build_problem() or "")
        with pytest.raises(cuda.KernelUnavailableError, match="CUDA build of torch"):
            cuda.extension()
    with caplog.at_level(logging.WARNING):
        copy.gather(kv, torch.tensor([3, 1]), out)
    assert torch.equal(out, reference_gather(kv, [3, 1]))
    back = zeros(kv)
    copy.scatter(back, torch.tensor([3, 1]), out)
    assert torch.equal(reference_gather(back, [3, 1]), out)


def test_the_kernels_refuse_a_cache_off_the_gpu_and_change_nothing() -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16, seed=13)
    before = [tensor.clone() for tensor in kv.tensors]
    payloads = torch.full((2 * kv.block_bytes,), 7, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match="KV cache is on cpu"):
        cuda.gather(kv, torch.tensor([0, 1]), payloads)
    with pytest.raises(InvalidArgumentError, match="KV cache is on cpu"):
        cuda.scatter(kv, torch.tensor([0, 1]), payloads)
    with pytest.raises(InvalidArgumentError, match="KV cache is on cpu"):
        cuda.scatter_from(kv, torch.tensor([0]), [payloads.data_ptr()])
    with pytest.raises(InvalidArgumentError, match="within"):  # ids are checked before anything else
        cuda.gather_to(kv, torch.tensor([99]), [payloads.data_ptr()])
    assert all(torch.equal(tensor, old) for tensor, old in zip(kv.tensors, before, strict=True))
    assert bool((payloads == 7).all())


def test_registering_host_memory_needs_cuda_and_contiguous_memory() -> None:
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        HostRegistration.of(torch.zeros(4, 4).t())
    if not cuda.available():
        with pytest.raises(cuda.KernelUnavailableError, match="CUDA build of torch"):
            HostRegistration.of(torch.zeros(16, dtype=torch.uint8))
