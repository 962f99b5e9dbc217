"""Gather and scatter, on the fastest path that can do them, chosen per call (`route`):

- `KERNELS` (cuda.py) for a cache on a GPU and payloads on that GPU or in pinned host memory,
  which the kernel reads or writes over PCIe itself;
- `STAGED` (staged.py) instead for pinned payloads of STAGED_MIN_BYTES or more: the kernels
  copy within the GPU and the copy engine crosses PCIe in large chunks. On an H200 this was
  faster at 512 MiB a call (0.95x of one cudaMemcpy both ways, against 0.94x and 0.90x
  directly) and slower at 128 MiB and 32 MiB, where its work on the host per chunk (about
  100 us) is no longer hidden behind the chunks' transfers (docs/benchmarks.md);
- `REFERENCE` (reference.py), torch's own ops, for a cache on the CPU, payloads in pageable
  host memory (pin or register them: host.py) or not contiguous, cache strides the kernels'
  segment model does not cover (plan.py), or kernels that could not be built here (no nvcc,
  say). It says why in the log, once per reason.

All validate first and copy the same bytes; engines call these.
"""

from __future__ import annotations

import logging
from enum import StrEnum

import torch

from engine_adapters.kernels import cuda, reference, staged
from engine_adapters.kernels.paged import PagedKV

log = logging.getLogger(__name__)
_said: set[str] = set()

STAGED_MIN_BYTES = 256 << 20  # pinned payloads from this size on are staged


class Route(StrEnum):
    STAGED = "staged"
    KERNELS = "kernels"
    REFERENCE = "reference"


def gather(kv: PagedKV, block_ids: torch.Tensor, out: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Block `block_ids[i]` of every layer into payload `i` of `out` (the store's packing)."""
    path = route(kv, out)
    if path is Route.STAGED:
        staged.gather(kv, block_ids, out, non_blocking=non_blocking)
    elif path is Route.KERNELS:
        cuda.gather(kv, block_ids, out, non_blocking=non_blocking)
    else:
        reference.gather(kv, block_ids, out)


def scatter(kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Payload `i` of `payloads` into block `block_ids[i]` of every layer."""
    path = route(kv, payloads)
    if path is Route.STAGED:
        staged.scatter(kv, block_ids, payloads, non_blocking=non_blocking)
    elif path is Route.KERNELS:
        cuda.scatter(kv, block_ids, payloads, non_blocking=non_blocking)
    else:
        reference.scatter(kv, block_ids, payloads)


def route(kv: PagedKV, payloads: torch.Tensor) -> Route:
    """The path a copy between `kv` and `payloads` takes."""
    if kv.device.type != "cuda":
        return Route.REFERENCE
    reason = cuda.payload_problem(kv, payloads) or cuda.layout_problem(kv) or cuda.build_problem()
    if reason is not None:
        if reason not in _said:
            _said.add(reason)
            log.warning("block copies use the torch reference, not the CUDA kernels: %s", reason)
        return Route.REFERENCE
    if payloads.device.type == "cpu" and payloads.numel() * payloads.element_size() >= STAGED_MIN_BYTES:
        return Route.STAGED
    return Route.KERNELS


def uses_kernels(kv: PagedKV, payloads: torch.Tensor) -> bool:
    """Whether a copy between `kv` and `payloads` runs on the CUDA kernels (staged or not)."""
    return route(kv, payloads) is not Route.REFERENCE
