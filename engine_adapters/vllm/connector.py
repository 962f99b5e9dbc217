"""`KVStoreConnector`: vLLM's v1 KV connector backed by a kvstore node.

    python -m vllm.entrypoints.openai.api_server --model MODEL --kv-transfer-config \\
      '{"kv_connector": "KVStoreConnector", "kv_connector_module_path": "engine_adapters.vllm.connector",
        "kv_role": "kv_both", "kv_connector_extra_config": {"node": "127.0.0.1:50051"}}'

vLLM makes one instance per role: the scheduler's (`SchedulerSide`: lookups and the plan of
each step) and each worker's (`WorkerSide`: the copies). `kv_role` picks what flows: a
`kv_producer` saves and never loads, a `kv_consumer` loads and never saves, `kv_both` does
both. Loads are synchronous by default: the blocks are in vLLM's cache before the forward pass
that reads them; with `load_async` a request waits for its blocks while the batch runs. Saves
overlap the next step. The cache is best effort: any failure of the node is
a miss, and vLLM computes the tokens itself (the connector sets vLLM's
`kv_load_failure_policy` to "recompute" for that: a block that fails to load is recomputed).

Keys are vLLM's own block hashes (`request.block_hashes`, which chain the prefix and the
request's extra keys: LoRA, multimodal inputs, cache salt) mapped into the namespace of the
model, revision, dtype, layout, block size and tensor-parallel rank (`spec.py`). vLLM must
hash the same way in every instance: its default sha256 does; its xxhash variants do only
with a shared PYTHONHASHSEED, and the connector refuses to start otherwise.

With tensor parallelism, each rank stores its own shard under its own namespace; the
scheduler looks up rank 0's, and a rank that lacks a block reports it failed, so vLLM
recomputes it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
from vllm.platforms import current_platform
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from engine_adapters.vllm.config import ConnectorConfig
from engine_adapters.vllm.load import LoadReporter
from engine_adapters.vllm.metadata import KVStoreConnectorMetadata
from engine_adapters.vllm.node import connect
from engine_adapters.vllm.scheduler import SchedulerSide
from engine_adapters.vllm.spec import CacheSpec
from engine_adapters.vllm.worker import WorkerSide, WorkerStats
from kvstore.errors import ConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_REPRODUCIBLE_HASHES = ("sha256", "sha256_cbor")


class KVStoreConnector(KVConnectorBase_V1):  # type: ignore[misc]
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        config = ConnectorConfig.from_extra_config(transfer.kv_connector_extra_config)
        _check_hashing(vllm_config)
        _recompute_failed_loads(transfer)
        spec = CacheSpec.from_vllm(vllm_config, kv_cache_config, on_cpu=_on_cpu())
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        namespace = spec.namespace(
            config,
            model=str(vllm_config.model_config.model),
            revision=str(vllm_config.model_config.revision or ""),
            tp_rank=_tp_rank() if role is KVConnectorRole.WORKER else 0,
            tp_size=tp_size,
        )
        client = connect(config)
        try:
            namespace_id = client.register_namespace(namespace)
        except BaseException:
            client.close()
            raise
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role is KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                config,
                spec,
                client,
                namespace_id,
                loads=bool(transfer.is_kv_consumer),
                saves=bool(transfer.is_kv_producer),
                reporter=LoadReporter(client, config.engine_id, config.load_report_interval_s)
                if config.report_load
                else None,
            )
        else:
            self._worker = WorkerSide(config, spec, client, namespace, namespace_id)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a save that never happens is a later miss, not a lost hand-off

    @property
    def worker_stats(self) -> WorkerStats:
        return self._worker_side().stats

    def wait_for_saves(self) -> None:
        """Block until every save handed to the node so far has finished (or failed)."""
        self._worker_side().wait_for_saves()

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._metadata()
        self._worker_side().load(meta.loads)
        self._worker_side().load_async(meta.async_loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return  # a stored block holds every layer: saved whole in wait_for_save

    def wait_for_save(self) -> None:
        self._worker_side().save(self._metadata().saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._worker_side().finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().take_failed()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        scheduler = self._scheduler_side()
        tokens = scheduler.matched_tokens(request, num_computed_tokens)
        return tokens, bool(tokens) and scheduler.loads_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler_side().after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler_side().build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self._scheduler_side().load_failed(set(connector_output.invalid_block_ids))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler_side().finished(request)
        return False, None  # saves never hold vLLM's blocks: they are gathered before the step ends

    # -- helpers -------------------------------------------------------------------------------

    def _metadata(self) -> KVStoreConnectorMetadata:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVStoreConnectorMetadata):
            raise TypeError(f"kvstore connector: got {type(meta).__name__} metadata")
        return meta

    def _worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("kvstore connector: a worker-side call on the scheduler's connector")
        return self._worker

    def _scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("kvstore connector: a scheduler-side call on a worker's connector")
        return self._scheduler


def _check_hashing(vllm_config: VllmConfig) -> None:
    algorithm = str(vllm_config.cache_config.prefix_caching_hash_algo)
    if algorithm not in _REPRODUCIBLE_HASHES and os.environ.get("PYTHONHASHSEED") is None:
        raise ConfigError(
            f"kvstore connector: vLLM's block hashes ({algorithm}) differ between processes unless "
            "PYTHONHASHSEED is set; set it to the same value in every instance, or use "
            "--prefix-caching-hash-algo sha256"
        )


def _recompute_failed_loads(transfer: Any) -> None:
    """A block the node cannot supply is a miss: vLLM computes it. vLLM's default policy
    ("fail") would fail the request instead, so the connector sets "recompute"."""
    if transfer.kv_load_failure_policy != "recompute":
        log.info("kvstore connector: kv_load_failure_policy %r -> 'recompute'", transfer.kv_load_failure_policy)
        transfer.kv_load_failure_policy = "recompute"


def _on_cpu() -> bool:
    return bool(current_platform.is_cpu())


def _tp_rank() -> int:
    return int(get_tensor_model_parallel_rank())
