"""An engine worker: the reference model, its paged KV cache, and (optionally) a kvstore node
it loads prefixes from and saves blocks to.

- `prefill(tokens)`: looks the prompt's whole blocks up on the node, loads the leading run it
  holds (verified against its checksums; a block that fails or is missing ends the run, and
  the rest is computed), computes the remaining tokens chunk by chunk, and after each chunk
  saves the blocks it completed to the node, so a decode engine elsewhere can load them.
  With a `saver` (a second client of the same node), the saves run on a thread of their own
  while the next chunk computes; `prefill` returns once every save has finished. At least the
  last prompt token is always computed (its logits give the first token).
- `decode(...)`: greedy generation, one token a step, in the same cache.

A node that fails (gone, draining, refusing) never fails a request: a load that fails is a
miss, so the engine computes the prefix itself; a save that fails is skipped. The result
names what failed (`node_error`), for the caller to report.

Blocks travel as the store's SEPARATE packing, through the block-copy kernels' reference
(`gather` into a payload buffer, `scatter` out of one).

Owner: one thread (an engine worker process).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from engine_adapters.kernels.copy import gather, scatter
from engine_adapters.kernels.paged import TORCH_DTYPES
from engine_adapters.reference.model import LlamaModel, PagedCache, check_tokens
from kvstore.client import Client
from kvstore.errors import KVStoreError
from kvstore.hashing import block_keys
from kvstore.types import BlockKey, KVLayout, KVPacking, Namespace, NamespaceId


@dataclass(frozen=True, slots=True)
class PrefillResult:
    first_token: int
    block_table: list[int]  # the sequence's blocks in this engine's cache; `release` frees them
    reused_tokens: int  # loaded from the node, not computed
    computed_tokens: int
    loaded_blocks: int
    saved_blocks: int
    node_error: str = ""  # the node failed a load or a save (the request was served regardless)


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        cache: PagedCache,
        *,
        client: Client | None = None,
        model_id: str = "tiny-llama",
        chunk_blocks: int = 4,
        saver: Client | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.client = client
        self.chunk_blocks = max(1, chunk_blocks)
        config = model.config
        self.namespace = Namespace(
            model_id=model_id,
            dtype=TORCH_DTYPES[cache.tensor.dtype],
            layout=KVLayout(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, KVPacking.SEPARATE),
            block_tokens=cache.block_size,
        )
        self.namespace_id: NamespaceId | None = client.register_namespace(self.namespace) if client else None
        self._saver = saver
        self._saves: ThreadPoolExecutor | None = None
        if saver is not None:
            saver.register_namespace(self.namespace)
            self._saves = ThreadPoolExecutor(1, thread_name_prefix="kv-save")

    def close(self) -> None:
        if self._saves is not None:
            self._saves.shutdown(wait=True)

    def keys(self, tokens: list[int]) -> list[BlockKey]:
        assert self.namespace_id is not None
        return block_keys(self.namespace_id, np.asarray(tokens, dtype=np.uint32), self.cache.block_size)

    def prefill(self, tokens: list[int], *, save: bool = True) -> PrefillResult:
        check_tokens(torch.tensor(tokens, dtype=torch.int64), self.model.config.vocab_size)  # before any block is taken
        size = self.cache.block_size
        table = self.cache.allocate(math.ceil(len(tokens) / size))
        keys = self.keys(tokens) if self.client is not None else []
        errors: list[str] = []
        loaded = 0
        if keys:
            try:
                loaded = self._load(keys[: (len(tokens) - 1) // size], table)
            except KVStoreError as error:  # recompute instead
                errors.append(f"loading from the node failed ({type(error).__name__}: {error}); computed instead")
        position, saved = loaded * size, 0
        logits = torch.empty(0)
        pending: list[Future[int]] = []
        while position < len(tokens):
            end = min(len(tokens), (position // size + self.chunk_blocks) * size)
            logits = self.model.forward(torch.tensor(tokens[position:end]), position, table, self.cache)
            if save and keys and not errors:
                first, last = max(position // size, loaded), min(end // size, len(keys))  # completed in this chunk
                if last > first:
                    payloads = self._gather(table, first, last)  # now: later chunks write other blocks
                    if self._saves is not None and self._saver is not None:
                        pending.append(self._saves.submit(self._put, self._saver, keys, first, payloads))
                    else:
                        try:
                            saved += self._put(self.client, keys, first, payloads)
                        except KVStoreError as error:  # the blocks stay unsaved; the request goes on
                            errors.append(f"saving to the node failed ({type(error).__name__}: {error})")
            position = end
        for future in pending:
            try:
                saved += future.result()
            except KVStoreError as error:
                errors.append(f"saving to the node failed ({type(error).__name__}: {error})")
        reused = loaded * size
        first_token = int(logits[-1].argmax())
        return PrefillResult(first_token, table, reused, len(tokens) - reused, loaded, saved, "; ".join(errors))

    def decode(
        self, tokens: list[int], table: list[int], max_new_tokens: int, *, eos_token: int | None = None
    ) -> list[int]:
        """Greedy tokens after `tokens` (whose KV is in `table`, but for the last one, which
        is fed first), growing `table` as the sequence needs blocks."""
        sequence, generated = list(tokens), []
        for _ in range(max_new_tokens):
            position = len(sequence) - 1
            if position // self.cache.block_size >= len(table):
                table.extend(self.cache.allocate(1))
            logits = self.model.forward(torch.tensor(sequence[-1:]), position, table, self.cache)
            token = int(logits[-1].argmax())
            generated.append(token)
            sequence.append(token)
            if token == eos_token:
                break
        return generated

    def release(self, table: list[int]) -> None:
        self.cache.free(table)

    def _load(self, keys: list[BlockKey], table: list[int]) -> int:
        """Load the leading run of `keys` the node holds into the first blocks of `table`."""
        assert self.client is not None and self.namespace_id is not None
        held = self.client.lookup(self.namespace_id, keys).num_hits
        if not held:
            return 0
        block_bytes = self.namespace.block_bytes
        buffer = torch.empty(held * block_bytes, dtype=torch.uint8)
        dests = [buffer[i * block_bytes : (i + 1) * block_bytes].numpy() for i in range(held)]
        got = self.client.get_into(self.namespace_id, keys[:held], dests, verify=True)
        if got:
            scatter(self.cache.paged(), torch.tensor(table[:got]), buffer[: got * block_bytes])
        return got

    def _gather(self, table: list[int], first: int, last: int) -> list[np.ndarray]:
        """Blocks `first..last-1` of the sequence as payloads (copies, out of the cache)."""
        block_bytes = self.namespace.block_bytes
        buffer = torch.empty((last - first) * block_bytes, dtype=torch.uint8)
        gather(self.cache.paged(), torch.tensor(table[first:last]), buffer)
        return [buffer[i * block_bytes : (i + 1) * block_bytes].numpy() for i in range(last - first)]

    def _put(self, client: Client | None, keys: list[BlockKey], first: int, payloads: list[np.ndarray]) -> int:
        assert client is not None and self.namespace_id is not None
        parent = keys[first - 1] if first else None
        result = client.put_blocks(self.namespace_id, keys[first : first + len(payloads)], payloads, parent=parent)
        return result.num_written
