"""The connector's scheduler side: how many leading tokens of a request the node can supply,
and, each step, which blocks the worker side loads and saves.

- `matched_tokens` looks up the request's block keys past vLLM's own prefix-cache hit
  (vLLM's chained block hashes, mapped into the namespace) and answers the node's leading run,
  whole blocks only, and never the prompt's last token (its logits are needed). It changes
  nothing in the node; a node that fails or is slow is a miss, so vLLM computes the tokens.
- `after_alloc` records the load of those blocks into the vLLM blocks just allocated (with
  `load_async`, vLLM calls it again once they are loaded, with nothing more to load).
- `build` hands over the loads, and the whole blocks that this step's forward pass completes
  and the node does not hold yet (prompt blocks, and generated ones with
  `save_decode_blocks`), with the vLLM block each sits in. With a load reporter it also works
  out the engine's load from the requests it holds, which the reporter sends to the node
  (load.py).

Owner: vLLM's scheduler thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine_adapters.vllm.config import ConnectorConfig
from engine_adapters.vllm.load import LoadReporter, LoadTracker
from engine_adapters.vllm.metadata import BlockTransfer, KVStoreConnectorMetadata
from engine_adapters.vllm.node import NODE_ERRORS, NodeErrorLog
from engine_adapters.vllm.spec import CacheSpec
from kvstore.client import Client
from kvstore.hashing import keys_from_engine_hashes
from kvstore.types import BlockKey, NamespaceId

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request: Any  # vLLM's Request: its block hashes grow as tokens are generated
    keys: list[BlockKey]
    block_ids: list[int]
    stored: int  # leading blocks the node holds or that are being saved to it
    matched: tuple[int, int] = (0, 0)  # (vLLM's own leading blocks, the node's blocks after them)
    new_match: bool = False  # matched since the last allocation


class SchedulerSide:
    def __init__(
        self,
        config: ConnectorConfig,
        spec: CacheSpec,
        client: Client,
        namespace_id: NamespaceId,
        *,
        loads: bool,
        saves: bool,
        reporter: LoadReporter | None = None,
    ) -> None:
        self._config = config
        self._spec = spec
        self._client = client
        self._namespace_id = namespace_id
        self._loads_enabled = loads
        self._saves_enabled = saves
        self._requests: dict[str, _Request] = {}
        self._loads: list[BlockTransfer] = []
        self._errors = NodeErrorLog(log, "lookup")
        self._reporter = reporter
        self._tracker = LoadTracker(config.tbt_slo_s)

    def matched_tokens(self, request: Any, local_tokens: int) -> int:
        """Tokens past `local_tokens` (vLLM's block-aligned own hit) the node can load."""
        size = self._spec.block_size
        state = self._track(request)
        local = local_tokens // size
        state.matched, state.new_match = (local, 0), True
        usable = min((request.num_tokens - 1) // size, len(state.keys))  # the last token is computed
        if not self._loads_enabled or usable <= local:
            return 0
        try:
            hits = self._client.lookup(self._namespace_id, state.keys[local:usable]).num_hits
        except NODE_ERRORS as error:
            self._errors.record(error)
            return 0
        state.matched = (local, hits)
        return hits * size

    @property
    def loads_async(self) -> bool:
        """Whether its loads run beside the batch (vLLM makes the request wait for them)."""
        return self._config.load_async

    def after_alloc(self, request: Any, blocks: Any, external_tokens: int) -> None:
        state = self._track(request)
        state.block_ids = list(blocks.get_block_ids()[0])
        local, hits = state.matched
        if state.new_match:  # not on vLLM's second call, once an asynchronous load is done
            state.stored = local + hits  # blocks vLLM already had were saved when it computed them
            state.new_match = False
        count = external_tokens // self._spec.block_size
        if count:
            span = slice(local, local + count)
            self._loads.append(BlockTransfer(request.request_id, tuple(state.keys[span]), tuple(state.block_ids[span])))

    def build(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            computed[new.req_id] = new.num_computed_tokens
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            computed[request_id] = cached.num_computed_tokens[index]
            state = self._requests.get(request_id)
            new_ids = cached.new_block_ids[index]
            if state is None:
                continue
            if request_id in cached.resumed_req_ids:  # back from preemption: all of its blocks anew
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
        meta = KVStoreConnectorMetadata()
        if self.loads_async:
            meta.async_loads = self._loads
        else:
            meta.loads = self._loads
        self._loads = []
        if self._saves_enabled:
            for request_id, scheduled in scheduler_output.num_scheduled_tokens.items():
                state = self._requests.get(request_id)
                if state is not None and request_id in computed:
                    save = self._save_of(state, computed[request_id] + scheduled)
                    if save is not None:
                        meta.saves.append(save)
        if self._reporter is not None:
            self._reporter.update(self._tracker.step(state.request for state in self._requests.values()))
        return meta

    def load_failed(self, block_ids: set[int]) -> None:
        """vLLM recomputes these blocks (they failed to load): save them again once computed."""
        for state in self._requests.values():
            for index, block in enumerate(state.block_ids[: state.stored]):
                if block in block_ids:
                    state.stored = index
                    break

    def finished(self, request: Any) -> None:
        self._requests.pop(request.request_id, None)
        if self._reporter is not None:  # no step may follow soon: an idle engine reports itself idle
            self._reporter.update(self._tracker.load(state.request for state in self._requests.values()))

    def close(self) -> None:
        if self._reporter is not None:
            self._reporter.close()
        self._client.close()

    def _save_of(self, state: _Request, done_tokens: int) -> BlockTransfer | None:
        """The whole blocks completed once `done_tokens` have KV that the node lacks."""
        request = state.request
        if not self._config.save_decode_blocks:
            done_tokens = min(done_tokens, request.num_prompt_tokens)
        self._extend_keys(state)
        whole = min(done_tokens // self._spec.block_size, len(state.keys), len(state.block_ids))
        if whole <= state.stored:
            return None
        first = state.stored
        state.stored = whole
        return BlockTransfer(
            request.request_id,
            tuple(state.keys[first:whole]),
            tuple(state.block_ids[first:whole]),
            parent=state.keys[first - 1] if first else None,
        )

    def _track(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None or state.request is not request:
            state = _Request(request, [], [], 0)
            self._requests[request.request_id] = state
        self._extend_keys(state)
        return state

    def _extend_keys(self, state: _Request) -> None:
        """Keys for the blocks vLLM has hashed since the last call (only those are read)."""
        if len(state.request.block_hashes) // self._spec.hashes_per_block > len(state.keys):
            new = self._spec.block_hashes(state.request.block_hashes, first=len(state.keys))
            state.keys.extend(keys_from_engine_hashes(self._namespace_id, new))
