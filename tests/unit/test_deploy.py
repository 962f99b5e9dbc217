"""The deployment files: they parse, the commands they run exist, and every setting they give
the daemons (TOML in config maps, environment variables) is one the daemons accept."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

import yaml

from conductor.config import load_conductor_config
from kvstore.node.config import load_node_config

DEPLOY = Path(__file__).parents[2] / "deploy"
SCRIPTS = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


def plausible_env(container: dict) -> dict[str, str]:
    """The container's variables, with a stand-in value for those taken from the cluster."""
    env = {}
    for item in container.get("env", []):
        value = item.get("value")
        if value is None:
            value = "a-token-of-sufficient-length" if "TOKEN" in item["name"] else "10.0.0.7"
        env[item["name"]] = value
    return env


def test_systemd_units_run_the_installed_commands() -> None:
    for unit, command in (("kvstore-node.service", "kvstore"), ("kvstore-conductor.service", "conductor")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read(DEPLOY / "systemd" / unit)
        exec_start = parser["Service"]["ExecStart"].split()
        assert Path(exec_start[0]).name == command and command in SCRIPTS
        assert exec_start[1] == "serve" and parser["Service"]["KillSignal"] == "SIGTERM"


def test_the_node_manifest_configures_a_valid_node(tmp_path: Path) -> None:
    config_map, daemon_set = manifests("kvstore-node.yaml")
    toml = tmp_path / "node.toml"
    toml.write_text(config_map["data"]["node.toml"])
    container = daemon_set["spec"]["template"]["spec"]["containers"][0]
    config = load_node_config(toml, environ=plausible_env(container))
    assert config.server.bind_host == "0.0.0.0"
    assert config.conductor.address == "kvstore-conductor:50070"
    assert config.node.data_dir == Path("/var/lib/kvstore")
    assert config.token is not None and config.conductor_token is not None
    ports = {port["containerPort"] for port in container["ports"]}
    assert {config.server.grpc_port, config.server.data_port, config.server.metrics_port} == ports


def test_the_conductor_manifest_configures_a_valid_conductor(tmp_path: Path) -> None:
    config_map, deployment, service = manifests("kvstore-conductor.yaml")
    toml = tmp_path / "conductor.toml"
    toml.write_text(config_map["data"]["conductor.toml"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["conductor"] and "conductor" in SCRIPTS
    config = load_conductor_config(toml, environ=plausible_env(container))
    assert config.membership.backend.value == "etcd"
    assert config.token is not None and config.node_token is not None
    ports = {port["containerPort"] for port in container["ports"]}
    assert {config.server.grpc_port, config.server.metrics_port} == ports
    assert {port["targetPort"] for port in service["spec"]["ports"]} == ports


def test_the_container_image_runs_the_node_by_default() -> None:
    text = (DEPLOY / "container" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kvstore"]' in text and "kvstore" in SCRIPTS
    assert '"serve", "--config", "/etc/kvstore/node.toml"' in text
