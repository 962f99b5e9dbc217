"""The CUDA block-copy kernels (csrc/block_copy.cu): built on first use where CUDA exists,
with `torch.utils.cpp_extension`, and cached across processes.

The build goes to `$KVSTORE_KERNEL_CACHE` (default `$XDG_CACHE_HOME/kvstore/kernels`, else
`~/.cache/kvstore/kernels`), in a folder named after the source's digest and the torch and
CUDA versions, so a changed source or toolchain builds afresh and an unchanged one loads in
well under a second. Nothing is compiled where torch has no CUDA: `available()` is false and
the dispatcher (copy.py) uses the torch reference.

`gather` and `scatter` here take what reference.py takes, validate it the same way (paged.py)
before launching anything, and copy every block and layer in one launch on torch's current
stream. A payload is on the cache's GPU, or in pinned or registered host memory (host.py),
which the kernel reads or writes over PCIe. With a host payload the call waits for the copy
unless `non_blocking`; with a device payload it is stream-ordered, as torch's copies are.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from engine_adapters.kernels import registered
from engine_adapters.kernels.paged import PagedKV
from engine_adapters.kernels.plan import CopyPlan, UnplannableError, contiguous_payloads, plan
from kvstore.errors import InvalidArgumentError, KVStoreError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "block_copy.cu"
EXTENSION_NAME = "kvstore_block_copy"


class KernelUnavailableError(KVStoreError):
    """The CUDA kernels cannot run here (no CUDA build of torch, no GPU, or the build failed)."""


def available() -> bool:
    """Whether this process can build and launch the kernels."""
    return torch.version.cuda is not None and torch.cuda.is_available()


def cache_dir() -> Path:
    configured = os.environ.get("KVSTORE_KERNEL_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore" / "kernels"


def build_dir() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"{EXTENSION_NAME}-{digest}-torch{torch.__version__}-cuda{torch.version.cuda}"


def extension() -> ModuleType:
    """The built extension (compiled on the first call in a fresh cache: tens of seconds).
    Raises KernelUnavailableError, every time, once a build has failed in this process."""
    built = _build()
    if isinstance(built, str):
        raise KernelUnavailableError(built)
    return built


def build_problem() -> str | None:
    """Why the kernels cannot be used in this process (None once they are built)."""
    built = _build()
    return built if isinstance(built, str) else None


@functools.cache
def _build() -> ModuleType | str:
    """The extension, or why there is none; tried once per process."""
    if not available():
        return (
            f"the CUDA block-copy kernels need a CUDA build of torch and a GPU "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})"
        )
    from torch.utils import cpp_extension  # noqa: PLC0415 - ~150 ms to import, needed only where CUDA is

    where = build_dir()
    log.info("loading the CUDA block-copy kernels from %s (the first build there takes about a minute)", where)
    try:  # torch's build holds a lock file in `where`: concurrent processes build once
        where.mkdir(parents=True, exist_ok=True)
        module: ModuleType = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            build_directory=str(where),
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=False,
        )
    except (OSError, RuntimeError) as error:
        return f"building the CUDA block-copy kernels in {where} failed: {error}"
    return module


def gather(kv: PagedKV, block_ids: torch.Tensor, out: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Blocks `block_ids` of every layer into payloads `0..n-1` of `out` (see reference.gather)."""
    kv.check_blocks(block_ids, distinct=False)
    _launch(kv, block_ids, out, to_payload=True, non_blocking=non_blocking)


def scatter(kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, non_blocking: bool = False) -> None:
    """Payloads `0..n-1` of `payloads` into blocks `block_ids` of every layer."""
    kv.check_blocks(block_ids, distinct=True)
    _launch(kv, block_ids, payloads, to_payload=False, non_blocking=non_blocking)


def gather_to(kv: PagedKV, block_ids: torch.Tensor, addresses: Sequence[int], *, non_blocking: bool = False) -> None:
    """Blocks `block_ids` into the payloads at host `addresses` (one per block, each a whole
    block inside memory this process registered: host.HostRegistration of the node's
    shared-memory pool, say)."""
    kv.check_blocks(block_ids, distinct=False)
    _launch_at(kv, block_ids, addresses, to_payload=True, non_blocking=non_blocking)


def scatter_from(kv: PagedKV, block_ids: torch.Tensor, addresses: Sequence[int], *, non_blocking: bool = False) -> None:
    """The payloads at host `addresses` (each a whole block inside memory this process
    registered) into blocks `block_ids`."""
    kv.check_blocks(block_ids, distinct=True)
    _launch_at(kv, block_ids, addresses, to_payload=False, non_blocking=non_blocking)


def payload_problem(kv: PagedKV, payloads: torch.Tensor) -> str | None:
    """Why the kernels cannot reach `payloads` for `kv` (None when they can)."""
    if kv.device.type != "cuda":
        return f"the KV cache is on {kv.device}, not a CUDA device"
    if payloads.device.type == "cuda":
        return None if payloads.device == kv.device else f"payloads on {payloads.device}, the cache on {kv.device}"
    if payloads.device.type != "cpu":
        return f"payloads on {payloads.device}"
    return None if payloads.is_pinned() else "payloads in pageable host memory (pin or register them)"


def _launch(
    kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, to_payload: bool, non_blocking: bool
) -> None:
    kv.check_payloads(payloads, block_ids.numel())
    problem = payload_problem(kv, payloads)
    if problem is not None:
        raise InvalidArgumentError(f"the CUDA block-copy kernels cannot run: {problem}")
    if not block_ids.numel():
        return
    base = payloads.data_ptr()
    if payloads.device.type == "cpu":
        base = extension().device_address(base)
        if not base:
            raise InvalidArgumentError("the CUDA block-copy kernels cannot run: CUDA sees the payloads as not pinned")
    addresses = contiguous_payloads(base, block_ids.numel(), kv.block_bytes)
    _run(kv, block_ids, addresses, to_payload=to_payload, wait=payloads.device.type == "cpu" and not non_blocking)


def _launch_at(
    kv: PagedKV, block_ids: torch.Tensor, addresses: Sequence[int], *, to_payload: bool, non_blocking: bool
) -> None:
    if kv.device.type != "cuda":
        raise InvalidArgumentError(f"the CUDA block-copy kernels cannot run: the KV cache is on {kv.device}")
    if len(addresses) != block_ids.numel():
        raise InvalidArgumentError(f"{block_ids.numel()} block ids but {len(addresses)} payload addresses")
    if not addresses:
        return
    module = extension()
    device_addresses: list[int] = []
    for address in addresses:
        problem = registered.span_problem(int(address), kv.block_bytes)
        device_address = 0 if problem is not None else module.device_address(int(address))
        if not device_address:
            raise InvalidArgumentError(
                f"payload {len(device_addresses)} is not in pinned or registered memory: "
                f"{problem or 'CUDA does not see it as registered'}"
            )
        device_addresses.append(device_address)
    _run(kv, block_ids, device_addresses, to_payload=to_payload, wait=not non_blocking)


def _run(kv: PagedKV, block_ids: torch.Tensor, addresses: Sequence[int], *, to_payload: bool, wait: bool) -> None:
    prepare(kv, block_ids.tolist(), addresses).run(to_payload=to_payload)
    if wait:
        torch.cuda.current_stream(kv.device).synchronize()


@dataclass(frozen=True)
class Launch:
    """A copy plan with its index tensors on the GPU: what one kernel launch needs. Callers
    go through gather/scatter (which validate first); the benchmark launches a prepared one
    repeatedly to time the kernel apart from the call's work on the host."""

    plan: CopyPlan
    layer_addrs: torch.Tensor
    block_ids: torch.Tensor
    payload_addrs: torch.Tensor

    def run(self, *, to_payload: bool) -> None:
        """Launch on torch's current stream (payloads <- cache when `to_payload`)."""
        model = self.plan.model
        problem = extension().copy_blocks(
            self.layer_addrs,
            self.block_ids,
            self.payload_addrs,
            model.kv_parts,
            model.kv_stride,
            model.block_stride,
            model.segment_bytes,
            self.plan.alignment(),
            to_payload,
        )
        if problem:
            raise InvalidArgumentError(f"the CUDA block-copy kernels refused the copy: {problem}")


def prepare(kv: PagedKV, block_ids: Sequence[int], device_addresses: Sequence[int]) -> Launch:
    """The launch copying blocks `block_ids` of `kv` to or from the payloads at
    `device_addresses` (addresses the GPU uses; ids and payloads already validated)."""
    try:
        copy = plan(kv, block_ids, device_addresses)
    except UnplannableError as reason:
        raise InvalidArgumentError(f"the CUDA block-copy kernels cannot copy this cache: {reason}") from None
    # The three index arrays travel in one asynchronous copy from pinned memory (torch's
    # caching host allocator keeps the staging block until the copy is done): three tensors
    # built on the device would each be a synchronous copy, the host waiting for the stream.
    layers, blocks = len(copy.model.layer_addrs), len(copy.block_ids)
    staged = np.empty(layers + 2 * blocks, dtype=np.int64)
    staged[:layers] = copy.model.layer_addrs
    staged[layers : layers + blocks] = copy.block_ids
    staged[layers + blocks :] = copy.payload_addrs
    packed = torch.from_numpy(staged).pin_memory().to(kv.device, non_blocking=True)
    return Launch(copy, packed[:layers], packed[layers : layers + blocks], packed[layers + blocks :])
