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

A call's work on the host is kept small, because the GPU waits for it: a cache's segment model
and its layer addresses on the GPU are worked out once per PagedKV (whose tensors are never
reallocated in place), payloads laid end to end travel as a base and a stride rather than an
address each, and the block ids go to the GPU in one asynchronous copy from reused pinned
memory (`_Uploads`), or, from the CPU, inside the launch itself as its parameter
(`copy_blocks_inline`: a call is then the launch and nothing else on the GPU's side). The
extension answers with status codes, which STATUS_MESSAGES explains.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from engine_adapters.kernels import registered
from engine_adapters.kernels.paged import PagedKV
from engine_adapters.kernels.plan import SegmentModel, UnplannableError, segment_model
from kvstore.errors import InvalidArgumentError, KVStoreError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "block_copy.cu"
EXTENSION_NAME = "kvstore_block_copy"

# The extension's status codes (csrc/block_copy.cu, enum Status): 0 is success.
STATUS_MESSAGES = {
    1: "an index tensor is not on the GPU of the cache's layer addresses",
    2: "an index tensor is not int64",
    3: "an index tensor is not a contiguous 1-D tensor",
    4: "payload_addrs is neither empty nor one address per block id",
    5: "kv_parts must be 1 or 2",
    6: "vector_bytes must be 1, 2, 4, 8 or 16",
    7: "segment_bytes is not a positive multiple of the access width",
    8: "a block's segment count (layers x kv parts) is out of range",
    9: "segment_pairs must be a contiguous (n, 2) int64 CPU tensor of (cache, payload) addresses",
    10: "inline block ids must be a CPU tensor",
    11: "a block id is negative or does not fit in 32 bits",
}
CUDA_ERROR = 1000  # a status of CUDA_ERROR + e: CUDA returned cudaError_t e


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


def status_problem(status: int) -> str | None:
    """What an extension status code means (None for success)."""
    if status == 0:
        return None
    if status >= CUDA_ERROR:
        code = status - CUDA_ERROR
        try:
            name = str(torch.cuda.CudaError(code))
        except (AttributeError, RuntimeError, ValueError, TypeError):  # no CUDA runtime, or a code it does not name
            name = "unknown"
        return f"CUDA error {code}: {name}"
    return STATUS_MESSAGES.get(status, f"unknown status {status} from the block-copy extension")


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
    if not payloads.is_contiguous():
        return "payloads are not contiguous"
    if payloads.device.type == "cuda":
        return None if payloads.device == kv.device else f"payloads on {payloads.device}, the cache on {kv.device}"
    if payloads.device.type != "cpu":
        return f"payloads on {payloads.device}"
    return None if payloads.is_pinned() else "payloads in pageable host memory (pin or register them)"


def layout_problem(kv: PagedKV) -> str | None:
    """Why the kernels cannot copy `kv`'s blocks (None when they can). For a cache they can
    copy, the answer is kept with its layout (`_layout`), so a copy's dispatch does not work
    the segment model out again."""
    try:
        _layout(kv)
    except InvalidArgumentError as reason:
        return str(reason)
    return None


def payload_base(kv: PagedKV, payloads: torch.Tensor, count: int) -> int:
    """The address the GPU uses for the first of `count` payloads laid end to end in
    `payloads` (checked: size, dtype and where they are). Raises InvalidArgumentError."""
    kv.check_payloads(payloads, count)
    problem = payload_problem(kv, payloads)
    if problem is not None:
        raise InvalidArgumentError(f"the CUDA block-copy kernels cannot run: {problem}")
    base = payloads.data_ptr()
    if payloads.device.type == "cpu" and count:
        base = extension().device_address(base)
        if not base:
            raise InvalidArgumentError("the CUDA block-copy kernels cannot run: CUDA sees the payloads as not pinned")
    return base


def device_block_ids(kv: PagedKV, block_ids: torch.Tensor) -> torch.Tensor:
    """`block_ids` (validated) as int64 on the cache's GPU: in place if they are there already,
    else in one asynchronous copy from reused pinned memory."""
    if block_ids.device == kv.device:
        return block_ids.to(torch.int64).contiguous()
    if block_ids.device.type != "cpu":
        return block_ids.to(kv.device, torch.int64).contiguous()
    return _uploads(kv.device).upload(block_ids.numpy().astype(np.int64, copy=False))


def launch_ids(kv: PagedKV, block_ids: torch.Tensor) -> torch.Tensor:
    """`block_ids` (validated) as a launch takes them: int64 and contiguous, on the CPU (the
    launch itself carries them) or on the cache's GPU (already there: no copy)."""
    if block_ids.device.type == "cpu":
        return block_ids.to(torch.int64).contiguous()
    return device_block_ids(kv, block_ids)


def enqueue(kv: PagedKV, ids: torch.Tensor, base: int, *, to_payload: bool) -> None:
    """Launch the copy of blocks `ids` (validated; as `launch_ids` gives them) to or from the
    payloads laid end to end from device address `base`, on torch's current stream."""
    model, layer_addrs, alignment = _layout(kv)
    alignment = _combine(alignment, base)
    if ids.device.type != "cpu":
        Launch(model, layer_addrs, ids, _no_addresses(kv.device), base, alignment).run(to_payload=to_payload)
        return
    status = extension().copy_blocks_inline(
        layer_addrs,
        ids,
        base,
        model.payload_bytes,
        model.kv_parts,
        model.kv_stride,
        model.block_stride,
        model.segment_bytes,
        alignment,
        to_payload,
    )
    problem = status_problem(status)
    if problem is not None:
        raise InvalidArgumentError(f"the CUDA block-copy kernels refused the copy: {problem}")


def _launch(
    kv: PagedKV, block_ids: torch.Tensor, payloads: torch.Tensor, *, to_payload: bool, non_blocking: bool
) -> None:
    count = block_ids.numel()
    base = payload_base(kv, payloads, count)
    if not count:
        return
    enqueue(kv, launch_ids(kv, block_ids), base, to_payload=to_payload)
    if payloads.device.type == "cpu" and not non_blocking:
        torch.cuda.current_stream(kv.device).synchronize()


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
    prepare(kv, block_ids, device_addresses).run(to_payload=to_payload)
    if not non_blocking:
        torch.cuda.current_stream(kv.device).synchronize()


@dataclass(frozen=True)
class Launch:
    """What one kernel launch needs: a cache's segment model and layer addresses, the block
    ids, and where the payloads are (an address each on the GPU, or, when `payload_addrs` is
    empty, end to end from `payload_base`). Callers go through gather/scatter, which validate
    first; the benchmark launches a prepared one repeatedly to time the kernel alone."""

    model: SegmentModel
    layer_addrs: torch.Tensor
    block_ids: torch.Tensor
    payload_addrs: torch.Tensor
    payload_base: int
    alignment: int  # the widest access every address, stride and length allows

    def run(self, *, to_payload: bool) -> None:
        """Launch on torch's current stream (payloads <- cache when `to_payload`)."""
        model = self.model
        status = extension().copy_blocks(
            self.layer_addrs,
            self.block_ids,
            self.payload_addrs,
            self.payload_base,
            model.payload_bytes,
            model.kv_parts,
            model.kv_stride,
            model.block_stride,
            model.segment_bytes,
            self.alignment,
            to_payload,
        )
        problem = status_problem(status)
        if problem is not None:
            raise InvalidArgumentError(f"the CUDA block-copy kernels refused the copy: {problem}")


def prepare(kv: PagedKV, block_ids: torch.Tensor | Sequence[int], device_addresses: Sequence[int]) -> Launch:
    """The launch copying blocks `block_ids` of `kv` to or from the payloads at
    `device_addresses` (addresses the GPU uses; ids and payloads already validated)."""
    ids = block_ids if isinstance(block_ids, torch.Tensor) else torch.tensor(list(block_ids), dtype=torch.int64)
    if ids.numel() != len(device_addresses):
        raise InvalidArgumentError(f"{ids.numel()} block ids but {len(device_addresses)} payload addresses")
    model, layer_addrs, alignment = _layout(kv)
    addresses = np.asarray(device_addresses, dtype=np.int64)
    if addresses.size:
        alignment = _combine(alignment, int(np.bitwise_or.reduce(addresses)))
    uploaded = _uploads(kv.device).upload(addresses) if addresses.size else _no_addresses(kv.device)
    return Launch(model, layer_addrs, device_block_ids(kv, ids), uploaded, 0, alignment)


def prepare_contiguous(kv: PagedKV, block_ids: torch.Tensor, base: int) -> Launch:
    """The launch copying blocks `block_ids` to or from payloads laid end to end from device
    address `base` (ids and payloads already validated)."""
    model, layer_addrs, alignment = _layout(kv)
    return Launch(
        model, layer_addrs, device_block_ids(kv, block_ids), _no_addresses(kv.device), base, _combine(alignment, base)
    )


def _combine(alignment: int, value: int) -> int:
    """The largest power of two dividing both `alignment` (a power of two) and `value`."""
    combined = alignment | value
    return combined & -combined


_layouts: dict[int, tuple[weakref.ref[PagedKV], SegmentModel, torch.Tensor, int]] = {}
_layouts_lock = threading.Lock()


def _layout(kv: PagedKV) -> tuple[SegmentModel, torch.Tensor, int]:
    """`kv`'s segment model, its layer addresses on its GPU, and the widest access they allow:
    worked out on a cache's first copy, then kept as long as the PagedKV lives."""
    key = id(kv)
    entry = _layouts.get(key)
    if entry is not None and entry[0]() is kv:
        return entry[1], entry[2], entry[3]
    try:
        model = segment_model(kv)
    except UnplannableError as reason:
        raise InvalidArgumentError(f"the CUDA block-copy kernels cannot copy this cache: {reason}") from None
    alignment = 16
    for value in (*model.layer_addrs, model.kv_stride, model.block_stride, model.segment_bytes):
        alignment = _combine(alignment, value)
    layer_addrs = torch.tensor(model.layer_addrs, dtype=torch.int64).to(kv.device)
    with _layouts_lock:
        _layouts[key] = (weakref.ref(kv, lambda _: _forget(key)), model, layer_addrs, alignment)
    return model, layer_addrs, alignment


def _forget(key: int) -> None:
    with _layouts_lock:
        _layouts.pop(key, None)


@functools.cache
def _no_addresses(device: torch.device) -> torch.Tensor:
    """The empty address array that tells the kernel its payloads lie end to end."""
    return torch.empty(0, dtype=torch.int64, device=device)


class _Uploads:
    """Pinned host memory for the index arrays launches send to one GPU, reused: SLOTS slots
    taken in turn, each rewritten only once the copy out of it has finished (its event), so a
    launch costs one asynchronous copy and no allocation of pinned memory."""

    SLOTS = 16

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._host: list[np.ndarray | None] = [None] * self.SLOTS
        self._pinned: list[torch.Tensor | None] = [None] * self.SLOTS
        self._copied: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self._next = 0

    def upload(self, values: np.ndarray) -> torch.Tensor:
        """`values` (int64) on the GPU, copied on the current stream."""
        count = int(values.size)
        on_device = torch.empty(count, dtype=torch.int64, device=self.device)
        if not count:
            return on_device
        with self._lock:
            slot = self._next
            self._next = (slot + 1) % self.SLOTS
            copied = self._copied[slot]
            if copied is not None:
                copied.synchronize()
            host, pinned = self._host[slot], self._pinned[slot]
            if host is None or pinned is None or host.size < count:
                pinned = torch.empty(max(1024, 1 << (count - 1).bit_length()), dtype=torch.int64, pin_memory=True)
                host = pinned.numpy()
                self._host[slot], self._pinned[slot] = host, pinned
            host[:count] = values
            on_device.copy_(pinned[:count], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self.device))
            self._copied[slot] = event
        return on_device


_uploaders: dict[torch.device, _Uploads] = {}


def _uploads(device: torch.device) -> _Uploads:
    uploads = _uploaders.get(device)
    if uploads is None:
        uploads = _uploaders.setdefault(device, _Uploads(device))
    return uploads
