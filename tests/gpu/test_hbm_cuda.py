"""HBM tier on a real GPU (kvstore/tiers/hbm.py): same bytes and checksums as the CPU slab."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import xxhash

from kvstore.config import HbmConfig, KiB, MiB
from kvstore.tiers.hbm import HbmTier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)"),
]

SIZES = [5000, 70000, 4096, 1]


def make_tier(device: str) -> HbmTier:
    return HbmTier(HbmConfig(capacity_bytes=4 * MiB, slab_bytes=256 * KiB, device=device))


def payload(seed: int, size_bytes: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size_bytes, dtype=np.uint8)


@pytest.fixture
def tiers() -> Iterator[tuple[HbmTier, HbmTier]]:
    cuda, cpu = make_tier("cuda:0"), make_tier("cpu")
    yield cuda, cpu
    cuda.close()
    cpu.close()


@pytest.mark.parametrize("size", SIZES)
def test_cuda_round_trip_matches_the_cpu_tier_bit_for_bit(tiers: tuple[HbmTier, HbmTier], size: int) -> None:
    cuda, cpu = tiers
    assert cuda.device == torch.device("cuda:0")
    data = [payload(seed, size) for seed in range(4)]
    sources = [data[0], data[1].tobytes(), bytearray(data[2].tobytes()), memoryview(data[3].tobytes())]
    cuda_slots = cuda.allocate(size, 4)
    cpu_slots = cpu.allocate(size, 4)
    assert cuda_slots == cpu_slots
    cuda_sums = cuda.write(cuda_slots, size, sources)
    cpu_sums = cpu.write(cpu_slots, size, sources)
    assert cuda_sums == cpu_sums == [xxhash.xxh3_64_intdigest(d.tobytes()) for d in data]
    cuda_dests = [np.full(size, 0xFF, np.uint8) for _ in range(4)]
    cpu_dests = [np.full(size, 0xFF, np.uint8) for _ in range(4)]
    assert cuda.read_into(cuda_slots, size, cuda_dests, cuda_sums) == [True] * 4
    assert cpu.read_into(cpu_slots, size, cpu_dests, cpu_sums) == [True] * 4
    assert [d.tobytes() for d in cuda_dests] == [d.tobytes() for d in cpu_dests] == [d.tobytes() for d in data]
    # The slot lives on the GPU and holds exactly the payload.
    slot_tensor = cuda.tensor(cuda_slots[0], size)
    assert slot_tensor.device.type == "cuda"
    assert slot_tensor.cpu().numpy().tobytes() == data[0].tobytes()
    assert cuda.host_view(cuda_slots[0], size) is None


def test_cuda_wrong_checksum_zeroes_the_destination(tiers: tuple[HbmTier, HbmTier]) -> None:
    cuda, _ = tiers
    size = 70000
    slots = cuda.allocate(size, 2)
    data = [payload(1, size), payload(2, size)]
    sums = cuda.write(slots, size, data)
    dests = [np.full(size, 0xFF, np.uint8), np.full(size, 0xFF, np.uint8)]
    assert cuda.read_into(slots, size, dests, [sums[0], sums[1] ^ 1]) == [True, False]
    assert dests[0].tobytes() == data[0].tobytes()
    assert not dests[1].any()
