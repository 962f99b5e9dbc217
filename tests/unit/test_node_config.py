"""`load_node_config`: file, then environment, then flags; every bad value named with its source."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import GiB, KiB, MiB, StoreConfig, WritePolicy
from kvstore.errors import ConfigError
from kvstore.node.config import LogFormat, load_node_config

EXAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "node.example.toml"


def test_defaults_are_safe():
    config = load_node_config(None, environ={})
    assert config.server.bind_host == "127.0.0.1"
    assert config.store.dram_capacity_bytes == 1 * GiB
    assert config.store.nvme_capacity_bytes == 4 * GiB
    assert config.store_config().nvme.directory == Path("kvstore-data/nvme")
    assert config.token is None


def test_the_store_settings_default_to_the_stores_own():
    node = load_node_config(None, environ={}).store_config()
    store = StoreConfig()
    assert node.eviction_policy == store.eviction_policy == "prefix-lrfu"
    for name in (
        "write_policy",
        "high_watermark_fraction",
        "low_watermark_fraction",
        "reservation_ttl_s",
        "lease_ttl_s",
        "promote_on_hit",
        "checksum_in_background",
        "background_checksum_min_bytes",
    ):
        assert getattr(node, name) == getattr(store, name), name


def test_the_example_file_states_the_defaults():
    assert load_node_config(EXAMPLE, environ={}) == load_node_config(None, environ={})


def test_a_negative_background_checksum_size_is_refused_by_the_store():
    with pytest.raises(ConfigError, match="background_checksum_min_bytes must be an integer >= 0, got -1"):
        StoreConfig(background_checksum_min_bytes=-1)


def test_the_checksum_thread_is_configurable():
    overrides = ["store.checksum_in_background=false", "store.background_checksum_min_bytes=1MiB"]
    store = load_node_config(None, environ={}, overrides=overrides).store_config()
    assert store.checksum_in_background is False
    assert store.background_checksum_min_bytes == 1024 * KiB


def test_the_example_file_loads_and_documents_every_field():
    config = load_node_config(EXAMPLE, environ={})
    text = EXAMPLE.read_text()
    for section in ("node", "server", "auth", "store", "shutdown", "logging", "conductor"):
        for name in getattr(config, section).__dataclass_fields__:
            assert f"{name} =" in text or f"# {name} =" in text, f"{section}.{name} is not documented"


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[server]\ngrpc_port = 7000\ndata_port = 7001\n[store]\ndram_capacity_bytes = "2 GiB"\n')
    environ = {"KVSTORE_SERVER_DATA_PORT": "7101", "KVSTORE_STORE_WRITE_POLICY": "write_through", "OTHER": "x"}
    config = load_node_config(path, environ=environ, overrides=["server.data_port=7201", "logging.format=text"])
    assert config.server.grpc_port == 7000  # file
    assert config.server.data_port == 7201  # flag beats environment beats file
    assert config.store.write_policy is WritePolicy.WRITE_THROUGH  # environment
    assert config.store.dram_capacity_bytes == 2 * GiB
    assert config.logging.format is LogFormat.TEXT


def test_token_from_a_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("a-very-long-token-value\n")
    assert load_node_config(None, environ={}, overrides=[f"auth.token_file={token_file}"]).token == (
        "a-very-long-token-value"
    )
    assert load_node_config(None, environ={"KVSTORE_AUTH_TOKEN": "x" * 20}).token == "x" * 20
    with pytest.raises(ConfigError, match="both set"):
        load_node_config(None, environ={"KVSTORE_AUTH_TOKEN": "x" * 20}, overrides=[f"auth.token_file={token_file}"])
    with pytest.raises(ConfigError, match="at least 16"):
        load_node_config(None, environ={"KVSTORE_AUTH_TOKEN": "short"})


@pytest.mark.parametrize(
    ("overrides", "environ", "message"),
    [
        (["server.grpc_port=70000"], {}, "flags: server.grpc_port must be in 0..65535"),
        (["server.grpc_prot=1"], {}, "unknown key server.grpc_prot"),
        (["bogus.key=1"], {}, "unknown section [bogus]"),
        (["store.dram_capacity_bytes=lots"], {}, "flags: store.dram_capacity_bytes must be a size"),
        ([], {"KVSTORE_STORE_LEASE_TTL_S": "soon"}, "environment: store.lease_ttl_s must be a number"),
        (["store.write_policy=sometimes"], {}, "must be one of ['write_back', 'write_through']"),
        (["store.promote_on_hit=maybe"], {}, "must be true or false"),
        (["store.eviction_policy=mru"], {}, "eviction_policy must be one of ["),
        (["store.background_checksum_min_bytes=-1"], {}, "store.background_checksum_min_bytes must be"),
        (["auth.tls_cert_file=/nonexistent.pem"], {}, "set both or neither"),
        (["conductor.tls_ca_file=/nonexistent.pem"], {}, "conductor.tls_ca_file: cannot read /nonexistent.pem"),
        (["store.low_watermark_fraction=0.99"], {}, "low_watermark_fraction"),
        (["store.dram_slab_bytes=1000"], {}, "dram.slab_bytes must be a positive multiple of 4096"),
        (["noequals"], {}, "section.field=value"),
        (["server.shared_index_blocks=-2"], {}, "server.shared_index_blocks must be -1 (off), 0"),
        (["server.data_socket_buffer_bytes=2GiB"], {}, "server.data_socket_buffer_bytes must be 0 (the kernel's"),
    ],
)
def test_bad_values_name_the_key_and_the_source(overrides, environ, message):
    with pytest.raises(ConfigError) as caught:
        load_node_config(None, environ=environ, overrides=overrides)
    assert message in str(caught.value)


def test_bad_toml_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(path, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_config(tmp_path / "missing.toml", environ={})


def test_store_config_follows_the_sections(tmp_path):
    config = load_node_config(
        None,
        environ={},
        overrides=[f"node.data_dir={tmp_path}", "store.nvme_capacity_bytes=0", "store.dram_capacity_bytes=64MiB"],
    )
    store = config.store_config()
    assert store.nvme.directory is None
    assert store.dram.capacity_bytes == 64 * MiB


def test_the_shared_index_is_sized_from_the_tiers_unless_given():
    def blocks(*overrides: str) -> int:
        return load_node_config(None, environ={}, overrides=list(overrides)).shared_index_blocks()

    default = blocks("store.dram_capacity_bytes=1GiB", "store.nvme_capacity_bytes=3GiB")
    assert default == 4 * 1024 * 1024 // 16  # one per 16 KiB
    assert blocks("server.shared_index_blocks=5000") == 5000
    assert blocks("server.shared_index_blocks=-1") == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["conductor.address=conductor-host"], "conductor.address must be host:port"),
        (["conductor.ttl_s=0.5"], "conductor.ttl_s must be within"),
        (["conductor.ttl_s=4", "conductor.heartbeat_interval_s=3"], "at most half of conductor.ttl_s"),
        (["conductor.role=leader"], "conductor.role must be one of"),
    ],
)
def test_conductor_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_node_config(None, environ={}, overrides=overrides)
    config = load_node_config(
        None, environ={}, overrides=["conductor.address=10.0.0.1:50070", "conductor.role=prefill"]
    )
    assert (config.conductor.address, config.conductor.role.value) == ("10.0.0.1:50070", "prefill")
