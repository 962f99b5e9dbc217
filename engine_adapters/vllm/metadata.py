"""What the scheduler side tells the worker side each step: which blocks to load into vLLM's
cache before the forward pass (or, for requests that wait for them, beside it), and which to
save to the node after it.

Plain frozen dataclasses of strings, ints and key bytes; vLLM passes the object in-process or
pickles it to its workers itself. No KV ever travels in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvstore.types import BlockKey


@dataclass(frozen=True, slots=True)
class BlockTransfer:
    """One request's run of blocks: `keys[i]` is stored in (or goes to) vLLM block `block_ids[i]`."""

    request_id: str
    keys: tuple[BlockKey, ...]
    block_ids: tuple[int, ...]
    parent: BlockKey | None = None  # the key before keys[0], for a save (the chain it continues)

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.block_ids):
            raise ValueError(f"{len(self.keys)} keys for {len(self.block_ids)} blocks in request {self.request_id}")


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[BlockTransfer] = field(default_factory=list)  # before this step's forward pass
    async_loads: list[BlockTransfer] = field(default_factory=list)  # of requests waiting for them
    saves: list[BlockTransfer] = field(default_factory=list)
