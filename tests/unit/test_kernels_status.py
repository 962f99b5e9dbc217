"""The extension's status codes (csrc/block_copy.cu) and what cuda.py says they mean, and the
staged path's chunking: checked here, without a GPU."""

from __future__ import annotations

import re

import pytest
import torch

from engine_adapters.kernels import copy, cuda, staged
from engine_adapters.kernels.paged import CacheLayout
from tests.kernel_cases import make_cache


def source_statuses() -> dict[str, int]:
    body = cuda.SOURCE.read_text().split("enum Status : int64_t {", 1)[1].split("};", 1)[0]
    return {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+),", body)}


def test_every_status_of_the_source_has_a_message() -> None:
    statuses = source_statuses()
    assert statuses.pop("kOk") == 0
    assert statuses.pop("kCudaError") == cuda.CUDA_ERROR
    assert sorted(statuses.values()) == sorted(cuda.STATUS_MESSAGES)


def test_status_messages() -> None:
    assert cuda.status_problem(0) is None
    assert cuda.status_problem(5) == "kv_parts must be 1 or 2"
    assert "unknown status 77" in (cuda.status_problem(77) or "")
    assert (cuda.status_problem(cuda.CUDA_ERROR + 700) or "").startswith("CUDA error 700")


@pytest.mark.parametrize(
    ("count", "block_bytes", "expected"),
    [
        (1, 4096, 1),
        (8, 4096, 1),
        (9, 4096, 2),  # at least CHUNKS chunks where the blocks allow
        (256, 2 << 20, 16),  # 2 MiB blocks: 32 MiB chunks
        (4, 64 << 20, 1),  # a block larger than a chunk: one block each
    ],
)
def test_chunk_blocks(count: int, block_bytes: int, expected: int) -> None:
    assert staged.chunk_blocks(count, block_bytes) == expected


def test_a_cache_on_the_cpu_is_never_staged() -> None:
    kv = make_cache(CacheLayout.FLASH, torch.float16)
    out = torch.zeros(2 * kv.block_bytes, dtype=torch.uint8)
    assert copy.route(kv, out) is copy.Route.REFERENCE
    assert "not a CUDA device" in (staged.payload_problem(kv, out) or "")
