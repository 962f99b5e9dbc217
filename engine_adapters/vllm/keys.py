"""The kvstore keys vLLM's blocks of a prompt get, computed outside vLLM: for a router or
proxy that asks the conductor where a prompt's prefix is (`Route` takes keys) or tells a node
to fetch a prompt's blocks from another node, before vLLM has seen the request.

They equal the connector's: vLLM's own chained block hashes (its `hash_block_tokens`, the
same hash algorithm) mapped into the namespace. Only for requests without extra keys (no
LoRA, multimodal inputs or cache salt), whose hashes depend on the token ids alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core import kv_cache_utils

from kvstore.hashing import keys_from_engine_hashes
from kvstore.types import BlockKey, NamespaceId


def prompt_keys(
    namespace_id: NamespaceId, token_ids: Sequence[int], block_size: int, *, hash_algo: str = "sha256"
) -> list[BlockKey]:
    """Keys of the prompt's whole blocks, as the connector of a vLLM instance with this
    block size and `--prefix-caching-hash-algo` maps them."""
    hash_fn = get_hash_fn_by_name(hash_algo)
    kv_cache_utils.init_none_hash(hash_fn)
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = kv_cache_utils.hash_block_tokens(hash_fn, parent, token_ids[start : start + block_size], None)
        hashes.append(parent)
    return keys_from_engine_hashes(namespace_id, hashes)
