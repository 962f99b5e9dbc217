"""The connector's worker side: moves blocks between vLLM's paged KV cache and the node.

- `register` describes vLLM's cache from its tensors (the layout, shapes and dtype must be
  the ones the scheduler side derived from the config; otherwise the connector refuses to
  start) and keeps it as a `PagedKV`.
- `load`, before the forward pass: each run of blocks is copied out of the node (shared
  memory on the same host, checked against its checksums with `verify`; the data plane
  otherwise, always checked) into a reused staging buffer, then scattered into its vLLM
  blocks. With the cache on a GPU and the node on this host, the node's shared memory is
  registered with CUDA and the kernels read the leased slots in place, with no staging copy.
  A block that is missing, corrupt or unreachable ends its run; the vLLM blocks of the rest
  are reported (`take_failed`), and vLLM recomputes them; the block that ended a
  verified run is removed from the node, and the scheduler side saves the recomputed ones.
- `load_async`: the same on a loader thread of its own, while the batch computes (the
  request's blocks are its own, and vLLM schedules it only once `finished_loads` names it;
  its failed blocks are reported first).
- `save`, after the forward pass: the blocks are gathered into a staging buffer before
  returning (vLLM may reuse its blocks from then on), and written to the node on a thread of
  their own while the next step computes. At most `max_pending_saves` steps' saves are in
  flight; then a step waits for the oldest. A save that fails is skipped: the cache is best
  effort and vLLM's output never depends on it.

Nothing is pickled: blocks travel as bytes, through the kernels' gather and scatter (the CUDA
kernels when the cache is on a GPU, with pinned staging buffers they read and write directly;
engine_adapters/kernels/copy.py).

Owner: vLLM's worker thread; the saver thread only touches its own buffers and the client.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine_adapters.kernels import cuda
from engine_adapters.kernels.copy import gather, scatter
from engine_adapters.kernels.host import HostRegistration
from engine_adapters.kernels.paged import TORCH_DTYPES, PagedKV
from engine_adapters.kernels.plan import layout_problem
from engine_adapters.vllm.config import ConnectorConfig
from engine_adapters.vllm.metadata import BlockTransfer
from engine_adapters.vllm.node import NODE_ERRORS, NodeErrorLog
from engine_adapters.vllm.spec import CacheSpec
from kvstore.client import Client
from kvstore.errors import ConfigError, KVStoreError
from kvstore.types import BlockKey, Namespace, NamespaceId

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    """What this worker moved since it started (tests and operators read it)."""

    loaded_blocks: int = 0
    failed_blocks: int = 0  # asked to load, not loaded: vLLM recomputed them
    saved_blocks: int = 0  # written to the node (blocks it already held are not counted)
    save_failures: int = 0  # runs of blocks whose save failed


class WorkerSide:
    def __init__(
        self, config: ConnectorConfig, spec: CacheSpec, client: Client, namespace: Namespace, namespace_id: NamespaceId
    ) -> None:
        self._config = config
        self._spec = spec
        self._client = client
        self._namespace_id = namespace_id
        self._block_bytes = namespace.block_bytes
        self._kv: PagedKV | None = None
        self._registration: HostRegistration | None = None  # the node's segment, for the GPU
        self._staging, self._async_staging = _Staging(), _Staging()  # one per thread that loads
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-load")
        self._loading: dict[str, Future[None]] = {}
        self._lock = threading.Lock()  # the failed blocks and the counters, shared with the loader
        self._free_buffers: list[torch.Tensor] = []
        self._pending: deque[tuple[Future[int], torch.Tensor]] = deque()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvstore-save")
        self._failed: set[int] = set()
        self._load_errors = NodeErrorLog(log, "loading blocks")
        self._save_errors = NodeErrorLog(log, "saving blocks")
        self.stats = WorkerStats()

    def register(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        names = self._spec.layer_names
        if set(kv_caches) != set(names):
            raise ConfigError(
                f"kvstore connector: vLLM registered KV caches for layers {sorted(kv_caches)}; "
                f"its config names {sorted(names)}"
            )
        kv = PagedKV.from_tensors(self._spec.layout, [kv_caches[name] for name in names])
        got = (kv.block_size, kv.num_kv_heads, kv.head_size, TORCH_DTYPES[kv.dtype])
        want = (self._spec.block_size, self._spec.num_kv_heads, self._spec.head_size, self._spec.dtype)
        if got != want:
            raise ConfigError(
                f"kvstore connector: vLLM's KV cache has (block size, kv heads, head size, dtype) {got}; "
                f"its config says {want}"
            )
        if kv.block_bytes != self._block_bytes:
            raise ConfigError(
                f"kvstore connector: a block is {kv.block_bytes} bytes here, {self._block_bytes} in the namespace"
            )
        self._kv = kv
        self._registration = _register_segment(kv, self._client)

    def load(self, loads: Sequence[BlockTransfer]) -> None:
        for transfer in loads:
            self._load_one(transfer, self._staging)

    def load_async(self, loads: Sequence[BlockTransfer]) -> None:
        for transfer in loads:
            self._loading[transfer.request_id] = self._loader.submit(self._load_one, transfer, self._async_staging)

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous load has ended (loaded, or failed and reported)."""
        done = {request_id for request_id, future in self._loading.items() if future.done()}
        for request_id in done:
            self._loading.pop(request_id).result()  # re-raises what is not a node failure: a bug
        return done

    def save(self, saves: Sequence[BlockTransfer]) -> None:
        if not saves:
            return
        kv = self._require_kv()
        count = sum(len(transfer.keys) for transfer in saves)
        buffer = self._save_buffer(count * self._block_bytes)
        ids = torch.tensor([block for transfer in saves for block in transfer.block_ids], dtype=torch.int64)
        gather(kv, ids, buffer[: count * self._block_bytes])
        self._pending.append((self._saver.submit(self._put, list(saves), buffer), buffer))

    def take_failed(self) -> set[int]:
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def wait_for_saves(self) -> None:
        while self._pending:
            self._finish_oldest()

    def close(self) -> None:
        self.wait_for_saves()
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
        if self._registration is not None:
            self._registration.close()
        self._client.close()

    # -- loads ---------------------------------------------------------------------------------

    def _load_one(self, transfer: BlockTransfer, staging: _Staging) -> None:
        count = len(transfer.keys)
        answered = True
        try:
            if self._registration is not None:
                loaded, answered = self._load_in_place(transfer)
            else:
                loaded = self._load_staged(transfer, staging)
        except NODE_ERRORS as error:
            self._load_errors.record(error)
            loaded, answered = 0, False
        with self._lock:
            self.stats.loaded_blocks += loaded
            if loaded < count:
                self.stats.failed_blocks += count - loaded
                self._failed.update(transfer.block_ids[loaded:])
        if loaded < count and answered and self._config.verify:
            self._drop_suspect(transfer.keys[loaded])
        if loaded < count:
            log.info(
                "kvstore connector: request %s loaded %d of %d blocks; vLLM recomputes the rest",
                transfer.request_id,
                loaded,
                count,
            )

    def _load_staged(self, transfer: BlockTransfer, staging: _Staging) -> int:
        """Copy the run out of the node into `staging`, then scatter it into vLLM's blocks."""
        kv = self._require_kv()
        count, size = len(transfer.keys), self._block_bytes
        buffer = staging.get(count * size, pinned=kv.device.type == "cuda")
        flat = buffer.numpy()
        views = [flat[index * size : (index + 1) * size] for index in range(count)]
        loaded = self._client.get_into(self._namespace_id, transfer.keys, views, verify=self._config.verify)
        if loaded:
            ids = torch.tensor(transfer.block_ids[:loaded], dtype=torch.int64)
            with _not_a_node_error():
                scatter(kv, ids, buffer[: loaded * size])
        return loaded

    def _load_in_place(self, transfer: BlockTransfer) -> tuple[int, bool]:
        """The GPU reads the run straight out of the node's registered shared memory, under a
        lease. Returns (blocks loaded, whether the node's answer ended the run): a lease that
        lapsed before the copy ended makes the whole run a miss, and no block a suspect."""
        kv = self._require_kv()
        with self._client.lease_in_place(self._namespace_id, transfer.keys, verify=self._config.verify) as leased:
            if not len(leased):
                return 0, True
            ids = torch.tensor(transfer.block_ids[: len(leased)], dtype=torch.int64)
            with _not_a_node_error():
                cuda.scatter_from(kv, ids, leased.addresses)  # returns once the copy is done
            if leased.expired():
                log.warning("kvstore connector: a lease lapsed while the GPU copied %d blocks", len(leased))
                return 0, False
            return len(leased), True

    def _drop_suspect(self, key: BlockKey) -> None:
        """The block that ended a verified run failed its checksum, or left the node meanwhile:
        remove it, so the blocks vLLM recomputes can be saved in its place (a leased block is
        kept; an absent one costs nothing)."""
        try:
            self._client.remove(self._namespace_id, [key])
        except NODE_ERRORS as error:
            self._load_errors.record(error)

    # -- saves ---------------------------------------------------------------------------------

    def _save_buffer(self, nbytes: int) -> torch.Tensor:
        while len(self._pending) >= self._config.max_pending_saves:
            self._finish_oldest()
        for index, buffer in enumerate(self._free_buffers):
            if buffer.numel() >= nbytes:
                return self._free_buffers.pop(index)
        if self._free_buffers:  # all too small: this one replaces one of them
            self._free_buffers.pop(0)
        pinned = self._require_kv().device.type == "cuda"  # the kernels write pinned memory directly
        return torch.empty(_capacity(nbytes), dtype=torch.uint8, pin_memory=pinned)

    def _finish_oldest(self) -> None:
        future, buffer = self._pending.popleft()
        saved = future.result()  # _put catches the node's errors itself
        with self._lock:
            self.stats.saved_blocks += saved
        self._free_buffers.append(buffer)

    def _put(self, saves: list[BlockTransfer], buffer: torch.Tensor) -> int:
        """Runs on the saver thread. Returns the blocks written."""
        flat, size, offset, written = buffer.numpy(), self._block_bytes, 0, 0
        for transfer in saves:
            count = len(transfer.keys)
            views = [flat[offset + index * size : offset + (index + 1) * size] for index in range(count)]
            offset += count * size
            try:
                result = self._client.put_blocks(self._namespace_id, transfer.keys, views, parent=transfer.parent)
                written += result.num_written
            except NODE_ERRORS as error:
                with self._lock:
                    self.stats.save_failures += 1
                self._save_errors.record(error)
        return written

    def _require_kv(self) -> PagedKV:
        if self._kv is None:
            raise RuntimeError("kvstore connector: vLLM moved KV before registering its KV caches")
        return self._kv


class _Staging:
    """One thread's load buffer, grown when a run needs more and reused after; pinned when the
    cache is on a GPU, so the kernels read it directly."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        if self._buffer.numel() < nbytes:
            self._buffer = torch.empty(_capacity(nbytes), dtype=torch.uint8, pin_memory=pinned)
        return self._buffer


@contextlib.contextmanager
def _not_a_node_error() -> Iterator[None]:
    """A copy into vLLM's cache that fails is a bug, not the node's failure: it must not be
    taken for a miss (the loads catch the node's errors, KVStoreError among them)."""
    try:
        yield
    except KVStoreError as error:
        raise RuntimeError(f"kvstore connector: copying blocks into vLLM's KV cache failed: {error}") from error


def _register_segment(kv: PagedKV, client: Client) -> HostRegistration | None:
    """Register the node's shared memory with the GPU holding `kv`, so loads read it in place;
    None (loads go through a pinned staging buffer) off the node's host, for a cache the
    kernels cannot reach, or when registering fails."""
    segment = client.shared_memory
    if kv.device.type != "cuda" or segment is None or layout_problem(kv) is not None:
        return None
    if cuda.build_problem() is not None:  # the kernels are built here, at start, not at the first load
        return None
    try:
        return HostRegistration.of(segment)
    except KVStoreError as error:
        log.warning("kvstore connector: loads use a staging buffer: %s", error)
        return None


def _capacity(nbytes: int) -> int:
    """Buffers grow in powers of two, so a few sizes serve every step (fresh memory is slow)."""
    return 1 << max(nbytes - 1, 1).bit_length()
