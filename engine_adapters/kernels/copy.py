"""Gather and scatter, on the fastest path that can do them: the CUDA kernels (cuda.py) when
the cache is on a GPU they can reach the payloads from, else the torch reference
(reference.py). Both validate first and copy the same bytes; engines call these.

The reference is used, and says why once per reason in the log, for a cache on the CPU,
payloads in pageable host memory (pin or register them: host.py), cache strides the kernels'
segment model does not cover (plan.py), or kernels that could not be built here (no nvcc, say).
"""

from __future__ import annotations

import logging

import torch

from engine_adapters.kernels import cuda, reference
from engine_adapters.kernels.paged import PagedKV
from engine_adapters.kernels.plan import layout_problem

log = logging.getLogger(__name__)
_said: set[str] = set()


def gather(kv: PagedKV, block_ids: torch.Tensor, out: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Block `block_ids[i]` of every layer into payload `i` of `out` (the store's packing)."""
    if uses_kernels(kv, out):
        cuda.gather(kv, block_ids, out, non_blocking=non_blocking)
    else:
        reference.gather(kv, block_ids, out)


def scatter(kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Payload `i` of `payloads` into block `block_ids[i]` of every layer."""
    if uses_kernels(kv, payloads):
        cuda.scatter(kv, block_ids, payloads, non_blocking=non_blocking)
    else:
        reference.scatter(kv, block_ids, payloads)


def uses_kernels(kv: PagedKV, payloads: torch.Tensor) -> bool:
    """Whether a copy between `kv` and `payloads` runs on the CUDA kernels."""
    if kv.device.type != "cuda":
        return False
    reason = cuda.payload_problem(kv, payloads) or layout_problem(kv) or cuda.build_problem()
    if reason is None:
        return True
    if reason not in _said:
        _said.add(reason)
        log.warning("block copies use the torch reference, not the CUDA kernels: %s", reason)
    return False
