"""The conductor's configuration: layers, and every mistake named with its key and source."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from conductor.config import MembershipBackend, ProfileSection, load_conductor_config, load_profiles, profile_toml
from conductor.costs import DEFAULT_COSTS, LLAMA2_70B_8XA800, Link, PrefillModel
from kvstore.errors import ConfigError

PROFILE = """
[profiles.small]
kv_bytes_per_token = 131072
kv_capacity_tokens = 400000
prefill_fixed_s = 0.01
prefill_per_token_s = 4e-5
prefill_per_pair_s = 1.3e-9
decode_fixed_s = 0.008
decode_per_sequence_s = 5e-5
decode_per_kv_token_s = 6.5e-8
hbm_load_bytes_per_s = inf
hbm_load_latency_s = 0
dram_load_bytes_per_s = 25e9
dram_load_latency_s = 1e-4
nvme_load_bytes_per_s = 6e9
nvme_load_latency_s = 5e-4
"""


def test_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    assert load_conductor_config(None, environ={}).placement.policy == "prefix-flow"
    path = tmp_path / "conductor.toml"
    path.write_text('[placement]\npolicy = "random"\n[server]\ngrpc_port = 6000\n[slo]\nttft_s = 10\n')
    config = load_conductor_config(
        path, environ={"CONDUCTOR_SERVER_GRPC_PORT": "6001"}, overrides=["membership.backend=etcd"]
    )
    assert (config.placement.policy, config.server.grpc_port, config.slo.ttft_s) == ("random", 6001, 10.0)
    assert config.membership.backend is MembershipBackend.ETCD
    several = load_conductor_config(None, environ={"CONDUCTOR_MEMBERSHIP_ETCD_ENDPOINTS": "a:2379, b:2380,"})
    assert several.membership.endpoints == ("a:2379", "b:2380")
    assert config.slo_targets.ttft_s == 10.0


@pytest.mark.parametrize(
    ("overrides", "environ", "message"),
    [
        (["server.nope=1"], {}, "flags: unknown key server.nope"),
        (["placement.policy=best"], {}, "placement.policy 'best' is unknown"),
        (["server.grpc_port=70000"], {}, "server.grpc_port must be a port number"),
        (["membership.backend=zookeeper"], {}, "membership.backend must be one of"),
        (["slo.ttft_s=0"], {}, "slo.ttft_s and slo.tbt_s must be positive"),
        ([], {"CONDUCTOR_SLO_TBT_S": "fast"}, "environment: slo.tbt_s must be a number"),
        ([], {"CONDUCTOR_AUTH_TOKEN": "short"}, "at least 16 characters"),
        (["network.bytes_per_s=0"], {}, "network.bytes_per_s must be positive"),
        (["membership.node_ttl_s=0.5"], {}, r"membership.node_ttl_s must be within \[1, 3600\] s, got 0.5"),
        (["logging.level=loud"], {}, "logging.level must be debug, info, warning or error"),
        (["membership.etcd_endpoints=a:2379,b"], {}, "membership.etcd_endpoints must be host:port"),
        (["membership.etcd_endpoints= , "], {}, "membership.etcd_endpoints must be host:port"),
        (["logging.format=xml"], {}, "flags: logging.format must be one of"),
        (["profiles.small.kv_bytes_per_token=1"], {}, r"flags: \[profiles\] can only be given in the config file"),
        (["replication.half_life_s=0"], {}, "replication.half_life_s must be positive, got 0"),
        (["replication.max_copies_per_round=-1"], {}, "replication.busy_s and replication.max_copies_per_round must"),
    ],
)
def test_mistakes_are_named(overrides: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_conductor_config(None, environ=environ, overrides=overrides)


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.token_file: cannot read"):
        load_conductor_config(None, environ={}, overrides=[f"auth.token_file={tmp_path / 'missing'}"])


def test_tls_settings_are_checked_and_the_node_roots_read(tmp_path: Path) -> None:
    pem, other = tmp_path / "ca.crt", tmp_path / "notes.txt"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    other.write_text("not a certificate")
    config = load_conductor_config(None, environ={}, overrides=[f"auth.node_tls_ca_file={pem}"])
    assert config.node_tls_root_certificates == pem.read_bytes()
    with pytest.raises(ConfigError, match=r"auth\.node_tls_ca_file: .* holds no PEM certificate"):
        load_conductor_config(None, environ={}, overrides=[f"auth.node_tls_ca_file={other}"])
    with pytest.raises(ConfigError, match=r"auth\.tls_cert_file and auth\.tls_key_file go together"):
        load_conductor_config(None, environ={}, overrides=[f"auth.tls_cert_file={pem}"])
    with pytest.raises(ConfigError, match=r"auth\.tls_key_file: .* is not a file"):
        load_conductor_config(
            None, environ={}, overrides=[f"auth.tls_cert_file={pem}", f"auth.tls_key_file={tmp_path / 'none'}"]
        )


def test_profiles_from_the_file_join_the_built_in_ones(tmp_path: Path) -> None:
    path = tmp_path / "conductor.toml"
    path.write_text(PROFILE + PROFILE.replace("[profiles.small]", "[profiles.default]"))
    costs = load_conductor_config(path, environ={}).costs
    assert sorted(costs.profiles) == ["default", "llama2-70b-8xa800", "small"]
    small = costs.profile("small")
    assert (small.name, small.kv_bytes_per_token, small.kv_capacity_tokens) == ("small", 131072, 400000)
    assert (small.prefill.per_pair_s, small.decode.per_kv_token_s) == (1.3e-9, 6.5e-8)
    assert small.tier_loads == (Link(float("inf"), 0.0), Link(25e9, 1e-4), Link(6e9, 5e-4))
    assert costs.profile("default").name == "default"  # replaced; the built-in stays under its own name
    assert costs.profile("llama2-70b-8xa800") is LLAMA2_70B_8XA800
    assert load_conductor_config(None, environ={}).costs.profiles == DEFAULT_COSTS.profiles


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("kv_capacity_tokens = 400000\n", ""), "profiles.small: missing kv_capacity_tokens"),
        (lambda text: text + "gpus = 8\n", "profiles.small: unknown key gpus"),
        (lambda text: text.replace("= 131072", '= "big"'), "profiles.small.kv_bytes_per_token must be an integer"),
        (lambda text: text.replace("decode_fixed_s = 0.008", "decode_fixed_s = -1"), "decode_fixed_s must be a finite"),
        (lambda text: text.replace("= 25e9", "= 0"), "profiles.small.dram_load_bytes_per_s must be positive"),
        (lambda text: "profiles.small = 1\n", "profiles.small must be a table"),
    ],
)
def test_profile_mistakes_are_named_with_the_file(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "conductor.toml"
    path.write_text(edit(PROFILE))
    with pytest.raises(ConfigError, match=message) as caught:
        load_conductor_config(path, environ={})
    assert str(path) in str(caught.value)


def test_the_example_file_documents_every_field_and_loads_to_the_defaults() -> None:
    example = Path(__file__).parents[2] / "deploy" / "config" / "conductor.example.toml"
    config = load_conductor_config(example, environ={})
    assert config == load_conductor_config(None, environ={})
    text = example.read_text()
    for section in ("server", "placement", "slo", "membership", "network", "auth", "logging", "replication"):
        for name in getattr(config, section).__dataclass_fields__:
            assert f"{name} =" in text, f"{section}.{name} is not documented"
    for name in ProfileSection.__dataclass_fields__:
        assert f"# {name} =" in text, f"profiles.<name>.{name} is not documented"


def test_a_profile_written_as_toml_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "conductor.toml"
    measured = dataclasses.replace(LLAMA2_70B_8XA800, name="measured_1", prefill=PrefillModel(1 / 3, 2e-7, 0.0))
    path.write_text(profile_toml(LLAMA2_70B_8XA800) + "\n" + profile_toml(measured))
    assert load_profiles(path) == (LLAMA2_70B_8XA800, measured)
    with pytest.raises(ConfigError, match="a profile name is letters"):
        profile_toml(dataclasses.replace(measured, name="a b"))
    with pytest.raises(ConfigError, match=r"profile measured_1.prefill_fixed_s must be a finite number"):
        profile_toml(dataclasses.replace(measured, prefill=PrefillModel(math.nan, 0.0, 0.0)))
