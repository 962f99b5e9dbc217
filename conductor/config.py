"""The conductor's configuration: a TOML file, then the environment (`CONDUCTOR_<SECTION>_<FIELD>`),
then `--set section.field=value` flags, validated once (kvstore/layered_config.py, as the
node's). `deploy/config/conductor.example.toml` documents every field with its unit.

Tokens: `CONDUCTOR_AUTH_TOKEN` (or `auth.token_file`) is what callers of the conductor must
present; `CONDUCTOR_NODE_TOKEN` (or `auth.node_token_file`) is what the conductor presents to
the nodes it watches (their `kvstore serve` token).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from conductor.cluster import Slo
from conductor.costs import DEFAULT_COSTS, CostModel, Link
from conductor.membership import MIN_TTL_S
from conductor.placement import PLACEMENTS
from kvstore.errors import ConfigError
from kvstore.layered_config import load_layers, read_token

ENV_PREFIX = "CONDUCTOR_"
TOKEN_ENV = "CONDUCTOR_AUTH_TOKEN"
NODE_TOKEN_ENV = "CONDUCTOR_NODE_TOKEN"


class MembershipBackend(StrEnum):
    MEMORY = "memory"  # one conductor, one host: state lives in the process
    ETCD = "etcd"  # several hosts, or a conductor that may restart: leases in etcd


@dataclass(frozen=True, slots=True)
class ServerSection:
    bind_host: str = "127.0.0.1"  # loopback by default: exposing the conductor is a decision
    grpc_port: int = 50070  # 0 picks a free port (tests)
    metrics_port: int = 9470  # Prometheus /metrics; 0 picks a free port, -1 disables
    max_workers: int = 32  # gRPC handler threads (each WatchDecisions stream holds one)


@dataclass(frozen=True, slots=True)
class PlacementSection:
    policy: str = "prefix-flow"  # see docs/conductor.md; "kv-centric" is Mooncake's Algorithm 1
    seed: int = 0  # for the policies that draw at random


@dataclass(frozen=True, slots=True)
class SloSection:
    ttft_s: float = 30.0  # time to first token a request must meet (policies reject earlier)
    tbt_s: float = 0.1  # time between tokens


@dataclass(frozen=True, slots=True)
class MembershipSection:
    backend: MembershipBackend = MembershipBackend.MEMORY
    etcd_endpoint: str = "127.0.0.1:2379"  # host:port of etcd's client URL (backend = etcd)
    etcd_prefix: str = "/kvstore/conductor"  # keys live under <prefix>/nodes/
    etcd_timeout_s: float = 5.0  # per etcd request
    reconcile_interval_s: float = 1.0  # how often the live members are compared with the cluster


@dataclass(frozen=True, slots=True)
class NetworkSection:
    bytes_per_s: float = DEFAULT_COSTS.network.bytes_per_s  # node to node (Fetch and prefill-to-decode)
    latency_s: float = DEFAULT_COSTS.network.latency_s  # per transfer


@dataclass(frozen=True, slots=True)
class AuthSection:
    token_file: Path | None = None  # the token callers must present (or CONDUCTOR_AUTH_TOKEN)
    node_token_file: Path | None = None  # the token of the nodes' gRPC (or CONDUCTOR_NODE_TOKEN)


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: str = "INFO"


_SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "placement": PlacementSection,
    "slo": SloSection,
    "membership": MembershipSection,
    "network": NetworkSection,
    "auth": AuthSection,
    "logging": LoggingSection,
}


@dataclass(frozen=True, slots=True)
class ConductorConfig:
    server: ServerSection
    placement: PlacementSection
    slo: SloSection
    membership: MembershipSection
    network: NetworkSection
    auth: AuthSection
    logging: LoggingSection
    token: str | None = None
    node_token: str | None = None

    @property
    def costs(self) -> CostModel:
        return CostModel(DEFAULT_COSTS.profiles, Link(self.network.bytes_per_s, self.network.latency_s))

    @property
    def slo_targets(self) -> Slo:
        return Slo(self.slo.ttft_s, self.slo.tbt_s)


def load_conductor_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Sequence[str] = ()
) -> ConductorConfig:
    """File, then environment, then `section.field=value` overrides; validated once."""
    environ = os.environ if environ is None else environ
    built, _ = load_layers(
        _SECTIONS, path, environ, overrides, env_prefix=ENV_PREFIX, env_skip=(TOKEN_ENV, NODE_TOKEN_ENV)
    )
    auth: AuthSection = built["auth"]
    config = ConductorConfig(
        **built,
        token=read_token(auth.token_file, TOKEN_ENV, "auth.token_file", environ),
        node_token=read_token(auth.node_token_file, NODE_TOKEN_ENV, "auth.node_token_file", environ),
    )
    _validate(config)
    return config


def _validate(config: ConductorConfig) -> None:
    server, membership = config.server, config.membership
    for name, port in (("server.grpc_port", server.grpc_port), ("server.metrics_port", server.metrics_port)):
        if not -1 <= port <= 65535 or (name == "server.grpc_port" and port < 0):
            raise ConfigError(f"{name} must be a port number, got {port}")
    if server.max_workers < 2:
        raise ConfigError(f"server.max_workers must be at least 2, got {server.max_workers}")
    if config.placement.policy not in PLACEMENTS:
        raise ConfigError(f"placement.policy {config.placement.policy!r} is unknown; known: {sorted(PLACEMENTS)}")
    if not config.slo.ttft_s > 0 or not config.slo.tbt_s > 0:
        raise ConfigError(f"slo.ttft_s and slo.tbt_s must be positive, got {config.slo.ttft_s}, {config.slo.tbt_s}")
    if not membership.reconcile_interval_s > 0 or membership.reconcile_interval_s > MIN_TTL_S * 10:
        raise ConfigError(
            f"membership.reconcile_interval_s must be within (0, {MIN_TTL_S * 10:g}] s, "
            f"got {membership.reconcile_interval_s}"
        )
    if not membership.etcd_timeout_s > 0:
        raise ConfigError(f"membership.etcd_timeout_s must be positive, got {membership.etcd_timeout_s}")
    if not config.network.bytes_per_s > 0 or config.network.latency_s < 0:
        raise ConfigError("network.bytes_per_s must be positive and network.latency_s not negative")
