"""The conductor's configuration: a TOML file, then the environment (`CONDUCTOR_<SECTION>_<FIELD>`),
then `--set section.field=value` flags, validated once (kvstore/layered_config.py, as the
node's). `deploy/config/conductor.example.toml` documents every field with its unit.

Cost profiles: the built-in ones (conductor/costs.py; "default" is LLaMA2-70B on 8xA800), plus
any `[profiles.<name>]` tables in the file (file only), each giving every number of a
`costs.Profile`; a file profile named like a built-in one replaces it.

Tokens: `CONDUCTOR_AUTH_TOKEN` (or `auth.token_file`) is what callers of the conductor must
present; `CONDUCTOR_NODE_TOKEN` (or `auth.node_token_file`) is what the conductor presents to
the nodes it watches (their `kvstore serve` token).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import get_type_hints

from conductor.cluster import Slo
from conductor.costs import DEFAULT_COSTS, CostModel, DecodeModel, Link, PrefillModel, Profile
from conductor.membership import MAX_TTL_S, MIN_TTL_S
from conductor.placement import PLACEMENTS
from conductor.replication import HotPrefixSettings
from kvstore.errors import ConfigError
from kvstore.layered_config import check_tls_files, coerce, load_layers, read_pem, read_token, read_toml
from kvstore.node.config import LogFormat

ENV_PREFIX = "CONDUCTOR_"
TOKEN_ENV = "CONDUCTOR_AUTH_TOKEN"
NODE_TOKEN_ENV = "CONDUCTOR_NODE_TOKEN"
PROFILES = "profiles"


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
    etcd_endpoints: str = "127.0.0.1:2379"  # host:port of etcd's client URL; several comma-separated, tried in turn
    etcd_prefix: str = "/kvstore/conductor"  # keys live under <prefix>/nodes/
    etcd_timeout_s: float = 5.0  # per etcd request
    reconcile_interval_s: float = 1.0  # how often the live members are compared with the cluster
    node_ttl_s: float = 10.0  # a node's lease when its Register names none (ttl_s 0)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.etcd_endpoints.split(",") if item.strip())


@dataclass(frozen=True, slots=True)
class NetworkSection:
    bytes_per_s: float = DEFAULT_COSTS.network.bytes_per_s  # node to node (Fetch and prefill-to-decode)
    latency_s: float = DEFAULT_COSTS.network.latency_s  # per transfer


@dataclass(frozen=True, slots=True)
class AuthSection:
    token_file: Path | None = None  # the token callers must present (or CONDUCTOR_AUTH_TOKEN)
    node_token_file: Path | None = None  # the token of the nodes' gRPC (or CONDUCTOR_NODE_TOKEN)
    tls_cert_file: Path | None = None  # PEM certificate chain: serve gRPC over TLS
    tls_key_file: Path | None = None  # its PEM private key
    node_tls_ca_file: Path | None = None  # PEM roots of the nodes' certificates, when they serve TLS


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: str = "INFO"  # debug, info, warning, error (debug: every decision with its breakdown)
    format: LogFormat = LogFormat.JSON  # json: one object per line, for log collectors; text: a terminal


@dataclass(frozen=True, slots=True)
class ProfileSection:
    """One `[profiles.<name>]` table: every number of a `costs.Profile`, none defaulted (a
    profile is a measurement of one model on one kind of server; half of another's would be
    wrong without saying so)."""

    kv_bytes_per_token: int  # KV of one token, all layers
    kv_capacity_tokens: int  # KV a decode engine holds beside the weights
    prefill_fixed_s: float  # prefill seconds = fixed + per_token * n + per_pair * (n * cached + n^2 / 2)
    prefill_per_token_s: float
    prefill_per_pair_s: float
    decode_fixed_s: float  # decode step seconds = fixed + per_sequence * batch + per_kv_token * KV read
    decode_per_sequence_s: float
    decode_per_kv_token_s: float
    hbm_load_bytes_per_s: float  # the node's tiers into the engine's KV cache (inf: free)
    hbm_load_latency_s: float
    dram_load_bytes_per_s: float
    dram_load_latency_s: float
    nvme_load_bytes_per_s: float
    nvme_load_latency_s: float

    def profile(self, name: str) -> Profile:
        return Profile(
            name=name,
            kv_bytes_per_token=self.kv_bytes_per_token,
            prefill=PrefillModel(self.prefill_fixed_s, self.prefill_per_token_s, self.prefill_per_pair_s),
            decode=DecodeModel(self.decode_fixed_s, self.decode_per_sequence_s, self.decode_per_kv_token_s),
            kv_capacity_tokens=self.kv_capacity_tokens,
            tier_loads=(
                Link(self.hbm_load_bytes_per_s, self.hbm_load_latency_s),
                Link(self.dram_load_bytes_per_s, self.dram_load_latency_s),
                Link(self.nvme_load_bytes_per_s, self.nvme_load_latency_s),
            ),
        )

    @classmethod
    def of(cls, profile: Profile) -> ProfileSection:
        hbm, dram, nvme = profile.tier_loads
        return cls(
            kv_bytes_per_token=profile.kv_bytes_per_token,
            kv_capacity_tokens=profile.kv_capacity_tokens,
            prefill_fixed_s=profile.prefill.fixed_s,
            prefill_per_token_s=profile.prefill.per_token_s,
            prefill_per_pair_s=profile.prefill.per_pair_s,
            decode_fixed_s=profile.decode.fixed_s,
            decode_per_sequence_s=profile.decode.per_sequence_s,
            decode_per_kv_token_s=profile.decode.per_kv_token_s,
            hbm_load_bytes_per_s=hbm.bytes_per_s,
            hbm_load_latency_s=hbm.latency_s,
            dram_load_bytes_per_s=dram.bytes_per_s,
            dram_load_latency_s=dram.latency_s,
            nvme_load_bytes_per_s=nvme.bytes_per_s,
            nvme_load_latency_s=nvme.latency_s,
        )


def profile_toml(profile: Profile) -> str:
    """`profile` as the `[profiles.<name>]` table `load_profiles` reads (a measured profile
    written for a conductor's config file)."""
    check_profile_name(profile.name)
    section = ProfileSection.of(profile)
    _check_profile(section, f"profile {profile.name}")
    lines = [f"[{PROFILES}.{profile.name}]"]
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        lines.append(f"{field.name} = {value if isinstance(value, int) else _toml_float(value)}")
    return "\n".join(lines) + "\n"


def check_profile_name(name: str) -> None:
    """A profile's name is a bare TOML key."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"a profile name is letters, digits, '-' and '_', got {name!r}")


def _toml_float(value: float) -> str:
    """A number `_check_profile` passed: finite, or a free link's inf."""
    return "inf" if math.isinf(value) else repr(float(value))  # repr: the shortest text that reads back the same


_SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "placement": PlacementSection,
    "slo": SloSection,
    "membership": MembershipSection,
    "network": NetworkSection,
    "auth": AuthSection,
    "logging": LoggingSection,
    "replication": HotPrefixSettings,
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
    replication: HotPrefixSettings
    profiles: tuple[Profile, ...] = ()  # from the file's [profiles.<name>] tables
    token: str | None = None
    node_token: str | None = None
    node_tls_root_certificates: bytes | None = None

    @property
    def costs(self) -> CostModel:
        profiles = {**DEFAULT_COSTS.profiles, **{profile.name: profile for profile in self.profiles}}
        return CostModel(profiles, Link(self.network.bytes_per_s, self.network.latency_s))

    @property
    def slo_targets(self) -> Slo:
        return Slo(self.slo.ttft_s, self.slo.tbt_s)


def load_conductor_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Sequence[str] = ()
) -> ConductorConfig:
    """File, then environment, then `section.field=value` overrides; validated once."""
    environ = os.environ if environ is None else environ
    built, _ = load_layers(
        _SECTIONS,
        path,
        environ,
        overrides,
        env_prefix=ENV_PREFIX,
        env_skip=(TOKEN_ENV, NODE_TOKEN_ENV),
        file_only=(PROFILES,),
    )
    auth: AuthSection = built["auth"]
    config = ConductorConfig(
        **built,
        profiles=load_profiles(path) if path is not None else (),
        token=read_token(auth.token_file, TOKEN_ENV, "auth.token_file", environ),
        node_token=read_token(auth.node_token_file, NODE_TOKEN_ENV, "auth.node_token_file", environ),
        node_tls_root_certificates=read_pem(auth.node_tls_ca_file, "auth.node_tls_ca_file"),
    )
    _validate(config)
    return config


def load_profiles(path: Path) -> tuple[Profile, ...]:
    """The `[profiles.<name>]` tables of the file at `path`, each complete and plausible."""
    tables = read_toml(path).get(PROFILES, {})
    fields = [f.name for f in dataclasses.fields(ProfileSection)]
    hints = get_type_hints(ProfileSection)
    profiles = []
    for name, table in tables.items():
        where = f"{path}: {PROFILES}.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table ([{PROFILES}.{name}])")
        unknown = sorted(table.keys() - set(fields))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]} (known: {', '.join(fields)})")
        missing = [field for field in fields if field not in table]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)} (a profile gives every number)")
        values = {field: coerce(table[field], hints[field], f"{where}.{field}") for field in fields}
        section = ProfileSection(**values)  # type: ignore[arg-type]
        _check_profile(section, where)
        profiles.append(section.profile(name))
    return tuple(profiles)


def _check_profile(section: ProfileSection, where: str) -> None:
    """Sizes and bandwidths positive (a bandwidth may be inf: free); times finite, not negative."""
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if field.name.startswith("kv_") or field.name.endswith("_bytes_per_s"):
            if not value > 0:
                raise ConfigError(f"{where}.{field.name} must be positive, got {value}")
        elif not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{where}.{field.name} must be a finite number of seconds, not negative, got {value}")


def _validate(config: ConductorConfig) -> None:
    server, membership = config.server, config.membership
    for name, port in (("server.grpc_port", server.grpc_port), ("server.metrics_port", server.metrics_port)):
        if not -1 <= port <= 65535 or (name == "server.grpc_port" and port < 0):
            raise ConfigError(f"{name} must be a port number, got {port}")
    check_tls_files(config.auth.tls_cert_file, config.auth.tls_key_file, "auth")
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
    if not MIN_TTL_S <= membership.node_ttl_s <= MAX_TTL_S:
        raise ConfigError(
            f"membership.node_ttl_s must be within [{MIN_TTL_S:g}, {MAX_TTL_S:g}] s, got {membership.node_ttl_s}"
        )
    endpoints = membership.endpoints
    if not endpoints or not all(endpoint.rpartition(":")[2].isdigit() for endpoint in endpoints):
        raise ConfigError(
            f"membership.etcd_endpoints must be host:port[,host:port...], got {membership.etcd_endpoints!r}"
        )
    if not membership.etcd_timeout_s > 0:
        raise ConfigError(f"membership.etcd_timeout_s must be positive, got {membership.etcd_timeout_s}")
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"logging.level must be debug, info, warning or error, got {config.logging.level!r}")
    if not config.network.bytes_per_s > 0 or config.network.latency_s < 0:
        raise ConfigError("network.bytes_per_s must be positive and network.latency_s not negative")
    replication = config.replication
    for name in ("half_life_s", "min_rate_per_s", "cooldown_s", "max_tracked"):
        if not getattr(replication, name) > 0:
            raise ConfigError(f"replication.{name} must be positive, got {getattr(replication, name)}")
    if not replication.busy_s >= 0 or replication.max_copies_per_round < 0:
        raise ConfigError(
            "replication.busy_s and replication.max_copies_per_round must not be negative, got "
            f"{replication.busy_s} and {replication.max_copies_per_round}"
        )
