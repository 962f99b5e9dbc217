"""The conductor's configuration: layers, and every mistake named with its key and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.config import MembershipBackend, load_conductor_config
from kvstore.errors import ConfigError


def test_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    assert load_conductor_config(None, environ={}).placement.policy == "prefix-flow"
    path = tmp_path / "conductor.toml"
    path.write_text('[placement]\npolicy = "random"\n[server]\ngrpc_port = 6000\n[slo]\nttft_s = 10\n')
    config = load_conductor_config(
        path, environ={"CONDUCTOR_SERVER_GRPC_PORT": "6001"}, overrides=["membership.backend=etcd"]
    )
    assert (config.placement.policy, config.server.grpc_port, config.slo.ttft_s) == ("random", 6001, 10.0)
    assert config.membership.backend is MembershipBackend.ETCD
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
    ],
)
def test_mistakes_are_named(overrides: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_conductor_config(None, environ=environ, overrides=overrides)


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"auth\.token_file: cannot read"):
        load_conductor_config(None, environ={}, overrides=[f"auth.token_file={tmp_path / 'missing'}"])


def test_the_example_file_documents_every_field_and_loads_to_the_defaults() -> None:
    example = Path(__file__).parents[2] / "deploy" / "config" / "conductor.example.toml"
    config = load_conductor_config(example, environ={})
    assert config == load_conductor_config(None, environ={})
    text = example.read_text()
    for section in ("server", "placement", "slo", "membership", "network", "auth", "logging"):
        for name in getattr(config, section).__dataclass_fields__:
            assert f"{name} =" in text, f"{section}.{name} is not documented"
