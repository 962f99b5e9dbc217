"""What a vLLM instance's KV cache looks like, read from its config, and the kvstore namespace
its blocks go in.

The scheduler side has no cache tensors, so both sides derive the same `CacheSpec` from
vLLM's `VllmConfig` and `KVCacheConfig`; the worker side then checks the tensors it is given
against it. One block in the store is one vLLM block with every layer's K and V, packed as the
kernels pack it for the layout (INTERLEAVED for vLLM's CPU backend, SEPARATE for the CUDA
flash-attention layout). The namespace holds the model, its revision, dtype, layout, block
size and tensor-parallel rank, so instances of the same model share blocks and different
models, dtypes, layouts or shards never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_adapters.kernels.paged import TORCH_DTYPES, CacheLayout
from engine_adapters.vllm.config import ConnectorConfig
from kvstore.errors import ConfigError
from kvstore.types import DType, KVLayout, Namespace


@dataclass(frozen=True, slots=True)
class CacheSpec:
    layer_names: tuple[str, ...]  # the order layers are packed in a block's payload
    block_size: int  # tokens per vLLM block, and per stored block
    num_kv_heads: int
    head_size: int
    dtype: DType
    layout: CacheLayout
    hashes_per_block: int  # vLLM hashes every `block_size / hashes_per_block` tokens

    @classmethod
    def from_vllm(cls, vllm_config: Any, kv_cache_config: Any, *, on_cpu: bool) -> CacheSpec:
        groups = list(kv_cache_config.kv_cache_groups)
        if len(groups) != 1:
            raise ConfigError(
                f"kvstore connector: the model has {len(groups)} KV cache groups; the connector supports "
                "models with one (full attention in every layer)"
            )
        spec = groups[0].kv_cache_spec
        for field in ("block_size", "num_kv_heads", "head_size", "dtype"):
            if not hasattr(spec, field):
                raise ConfigError(f"kvstore connector: KV cache spec {type(spec).__name__} is not attention KV")
        if getattr(spec, "sliding_window", None):
            raise ConfigError("kvstore connector: sliding-window attention is not supported")
        if getattr(spec, "head_size_v", None) not in (None, spec.head_size):
            raise ConfigError("kvstore connector: K and V of different head sizes are not supported")
        if getattr(getattr(spec, "kv_quant_mode", None), "value", 0):
            raise ConfigError("kvstore connector: quantized KV caches (their scales) are not supported")
        if spec.dtype not in TORCH_DTYPES:
            raise ConfigError(f"kvstore connector: KV cache dtype {spec.dtype} is not one the store keeps")
        block_size = int(spec.block_size)
        hash_size = int(
            getattr(kv_cache_config, "hash_block_size", None)
            or getattr(vllm_config.cache_config, "hash_block_size", None)
            or block_size
        )
        if block_size % hash_size:
            raise ConfigError(
                f"kvstore connector: vLLM hashes every {hash_size} tokens, which does not divide its "
                f"{block_size}-token blocks"
            )
        return cls(
            layer_names=tuple(groups[0].layer_names),
            block_size=block_size,
            num_kv_heads=int(spec.num_kv_heads),
            head_size=int(spec.head_size),
            dtype=TORCH_DTYPES[spec.dtype],
            layout=CacheLayout.CPU if on_cpu else CacheLayout.FLASH,
            hashes_per_block=block_size // hash_size,
        )

    def namespace(self, config: ConnectorConfig, *, model: str, revision: str, tp_rank: int, tp_size: int) -> Namespace:
        return Namespace(
            model_id=config.model_id or model,
            model_revision=revision,
            dtype=self.dtype,
            layout=KVLayout(len(self.layer_names), self.num_kv_heads, self.head_size, self.layout.packing),
            block_tokens=self.block_size,
            tp_rank=tp_rank,
            tp_size=tp_size,
            tenant_salt=config.namespace_salt,
        )

    def block_hashes(self, hashes: list[bytes], first: int = 0) -> list[bytes]:
        """The hash of each whole block from block `first` on, from vLLM's per-hash-block list
        (each hash chains its whole prefix, so a block's is the last one inside it)."""
        step = self.hashes_per_block
        return hashes[(first + 1) * step - 1 :: step]
