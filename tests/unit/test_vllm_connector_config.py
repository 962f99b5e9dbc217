"""The vLLM connector's settings and the namespace it derives from vLLM's cache config
(real vLLM config objects; no engine, no node)."""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

from engine_adapters.kernels.paged import CacheLayout
from engine_adapters.vllm.config import ConnectorConfig, transfer_config
from engine_adapters.vllm.node import NODE_ERRORS
from engine_adapters.vllm.spec import CacheSpec
from engine_adapters.vllm.worker import _not_a_node_error
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.types import DType, KVPacking, Namespace

TOKEN = "a-token-of-enough-length"


def parse(extra: dict[str, object], environ: dict[str, str] | None = None) -> ConnectorConfig:
    return ConnectorConfig.from_extra_config(extra, environ or {})


def test_only_the_node_is_required_and_the_defaults_are_safe() -> None:
    config = parse({"node": "127.0.0.1:50051"})
    engine_id = f"vllm-{socket.gethostname()}-{os.getpid()}"
    assert config == ConnectorConfig(node="127.0.0.1:50051", engine_id=engine_id)
    assert config.verify and config.save_decode_blocks and config.token is None
    assert config.report_load and config.tbt_slo_s == 0.0  # reports its load, with no pause budget


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "kv_connector_extra_config.node must be the node's address as 'host:port', got None"),
        ({"node": "localhost"}, "got 'localhost'"),
        ({"node": "h:1", "verfiy": True}, "unknown field(s) ['verfiy']"),
        ({"node": "h:1", "verify": "yes"}, "verify must be bool, got 'yes'"),
        ({"node": "h:1", "timeout_s": True}, "timeout_s must be int or float, got True"),
        ({"node": "h:1", "timeout_s": 0}, "timeout_s must be in (0, 600] seconds, got 0.0"),
        ({"node": "h:1", "max_pending_saves": 0}, "max_pending_saves must be at least 1, got 0"),
        ({"node": "h:1", "max_pending_saves": 1.5}, "max_pending_saves must be int, got 1.5"),
        ({"node": "h:1", "model_id": ""}, "model_id must not be empty"),
        ({"node": "h:1", "token_file": "/nonexistent/token"}, "token_file: cannot read /nonexistent/token"),
        ({"node": "h:1", "tls_ca_file": "/nonexistent/ca.crt"}, "tls_ca_file: cannot read /nonexistent/ca.crt"),
        ({"node": "h:1", "engine_id": ""}, "engine_id must be 1-128 printable characters, got ''"),
        ({"node": "h:1", "engine_id": "x" * 129}, "engine_id must be 1-128 printable characters"),
        ({"node": "h:1", "report_load": 1}, "report_load must be bool, got 1"),
        ({"node": "h:1", "load_report_interval_s": 0}, "load_report_interval_s must be in (0, 60] seconds, got 0.0"),
        ({"node": "h:1", "tbt_slo_s": -0.1}, "tbt_slo_s must be in [0, 60] seconds (0: none), got -0.1"),
        ({"node": "h:1", "tbt_slo_s": "fast"}, "tbt_slo_s must be int or float, got 'fast'"),
    ],
)
def test_a_wrong_setting_is_refused_naming_it(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(extra)
    assert message in str(raised.value)


def test_the_token_comes_from_a_file_or_the_environment_not_both(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert parse({"node": "h:1", "token_file": str(tmp_path / "token")}).token == TOKEN
    assert parse({"node": "h:1"}, {"KVSTORE_AUTH_TOKEN": TOKEN}).token == TOKEN
    with pytest.raises(ConfigError, match="both set"):
        parse({"node": "h:1", "token_file": str(tmp_path / "token")}, {"KVSTORE_AUTH_TOKEN": TOKEN})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        parse({"node": "h:1"}, {"KVSTORE_AUTH_TOKEN": "short"})


def test_the_transfer_config_names_the_connector_and_checks_the_role() -> None:
    config = transfer_config({"node": "h:1"}, "kv_producer")
    assert config["kv_role"] == "kv_producer"
    module = importlib.import_module(config["kv_connector_module_path"])  # what vLLM loads
    assert getattr(module, config["kv_connector"]).__name__ == "KVStoreConnector"
    assert ConnectorConfig.from_extra_config(config["kv_connector_extra_config"], {}).node == "h:1"
    with pytest.raises(ConfigError, match="kv_role must be one of"):
        transfer_config({"node": "h:1"}, "kv_prefill")


def kv_config(*specs: object, layers: int = 2, hash_block_size: int | None = None) -> KVCacheConfig:
    groups = [
        KVCacheGroupSpec([f"model.layers.{index}.attn" for index in range(layers)], spec)  # type: ignore[arg-type]
        for spec in specs
    ]
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=groups, hash_block_size=hash_block_size)


def attention(block_size: int = 32, dtype: torch.dtype = torch.float16) -> FullAttentionSpec:
    return FullAttentionSpec(block_size, num_kv_heads=2, head_size=64, dtype=dtype)


VLLM = SimpleNamespace(cache_config=SimpleNamespace(hash_block_size=None))


def test_the_cache_spec_and_namespace_follow_the_config_and_the_backend() -> None:
    cpu = CacheSpec.from_vllm(VLLM, kv_config(attention()), on_cpu=True)
    assert (cpu.block_size, cpu.num_kv_heads, cpu.head_size, cpu.dtype) == (32, 2, 64, DType.FLOAT16)
    assert cpu.layer_names == ("model.layers.0.attn", "model.layers.1.attn")
    config = ConnectorConfig(node="h:1")
    namespace = cpu.namespace(config, model="org/model", revision="r1", tp_rank=1, tp_size=2)
    assert namespace.layout.packing is KVPacking.INTERLEAVED
    assert namespace.block_shape == (2, 2, 32, 128)
    assert (namespace.model_id, namespace.model_revision, namespace.tp_rank) == ("org/model", "r1", 1)
    flash = CacheSpec.from_vllm(VLLM, kv_config(attention()), on_cpu=False)
    assert flash.layout is CacheLayout.FLASH
    assert flash.namespace(config, model="org/model", revision="r1", tp_rank=1, tp_size=2).block_shape == (
        2,
        2,
        32,
        2,
        64,
    )

    # what keeps blocks apart: the model id, the salt, the rank, the dtype
    def named(config: ConnectorConfig, spec: CacheSpec = cpu, rank: int = 0) -> Namespace:
        return spec.namespace(config, model="m", revision="", tp_rank=rank, tp_size=2)

    half = CacheSpec.from_vllm(VLLM, kv_config(attention(dtype=torch.bfloat16)), on_cpu=True)
    renamed = named(ConnectorConfig(node="h:1", model_id="shared"))
    variants = [
        named(config),
        renamed,
        named(ConnectorConfig(node="h:1", namespace_salt="t")),
        named(config, rank=1),
        named(config, half),
    ]
    assert len({item.namespace_id for item in variants}) == 5
    assert renamed.model_id == "shared"


def test_finer_hashes_pick_the_last_hash_inside_each_block() -> None:
    spec = CacheSpec.from_vllm(VLLM, kv_config(attention(block_size=64), hash_block_size=16), on_cpu=True)
    assert spec.hashes_per_block == 4
    hashes = [bytes([index]) for index in range(10)]
    assert spec.block_hashes(hashes) == [bytes([3]), bytes([7])]
    assert spec.block_hashes(hashes, first=1) == [bytes([7])]
    with pytest.raises(ConfigError, match="does not divide"):
        CacheSpec.from_vllm(VLLM, kv_config(attention(block_size=64), hash_block_size=24), on_cpu=True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (kv_config(attention(), attention()), "has 2 KV cache groups"),
        (
            kv_config(SlidingWindowSpec(32, num_kv_heads=2, head_size=64, dtype=torch.float16, sliding_window=128)),
            "sliding-window attention is not supported",
        ),
        (kv_config(attention(dtype=torch.float64)), "dtype torch.float64 is not one the store keeps"),
    ],
)
def test_a_cache_the_connector_cannot_store_is_refused_at_start(config: KVCacheConfig, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        CacheSpec.from_vllm(VLLM, config, on_cpu=True)
    assert message in str(raised.value)


def test_a_failed_copy_into_vllms_cache_is_a_bug_not_a_node_miss() -> None:
    """The worker's loads treat the node's errors (KVStoreError among them) as misses; an error
    of the copy into vLLM's own cache must not be mistaken for one."""
    failed = "copying blocks into vLLM's KV cache failed: bad ids"
    with pytest.raises(RuntimeError, match=failed) as raised, _not_a_node_error():
        raise InvalidArgumentError("bad ids")
    assert not isinstance(raised.value, NODE_ERRORS)
    with pytest.raises(KeyError), _not_a_node_error():
        raise KeyError("not a store error: passes through")
