"""The node daemon's configuration: a TOML file, then the environment, then flags (DESIGN.md 4).

`load_node_config` is called once, by `kvstore serve`; nothing below it reads the environment.
Every field has its unit in its name and a one-line reason; `deploy/config/node.example.toml`
documents each one. Sizes may be written as integers or with a unit ("4 GiB", "512MiB").

Environment: `KVSTORE_<SECTION>_<FIELD>` (for example `KVSTORE_SERVER_GRPC_PORT=6000`), plus
`KVSTORE_AUTH_TOKEN`, the token itself (so it need not be written to a file).
Flags: `--set section.field=value`, repeatable, and a few shortcuts in the CLI.

A value that does not parse, a key that does not exist, or a combination that cannot work
raises `ConfigError` naming the key and where it came from; the daemon then does not start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvstore.config import DramConfig as DramTierConfig
from kvstore.config import GiB, KiB, MiB, StoreConfig, WritePolicy
from kvstore.config import HbmConfig as HbmTierConfig
from kvstore.config import NvmeConfig as NvmeTierConfig
from kvstore.errors import ConfigError
from kvstore.layered_config import check_tls_files, load_layers, read_pem, read_token

ENV_PREFIX = "KVSTORE_"
TOKEN_ENV = "KVSTORE_AUTH_TOKEN"
CONDUCTOR_TOKEN_ENV = "KVSTORE_CONDUCTOR_TOKEN"


class LogFormat(StrEnum):
    JSON = "json"  # one JSON object per line, for log collectors
    TEXT = "text"  # for a terminal


@dataclass(frozen=True, slots=True)
class NodeSection:
    node_id: str = ""  # how the conductor and kvctl name this node; empty: the host name
    data_dir: Path = Path("kvstore-data")  # NVMe slab files and index live under <data_dir>/nvme


@dataclass(frozen=True, slots=True)
class ServerSection:
    bind_host: str = "127.0.0.1"  # loopback by default: exposing a node is a decision, not an accident
    advertise_host: str = ""  # the host peers dial for the data plane; empty: bind_host
    grpc_port: int = 50051  # control plane; 0 picks a free port (tests)
    data_port: int = 50052  # TCP data plane; 0 picks a free port
    metrics_port: int = 9464  # Prometheus /metrics; 0 picks a free port, -1 disables
    max_workers: int = 32  # gRPC handler threads (each WatchEvents stream holds one)
    max_message_bytes: int = 16 * MiB  # larger gRPC messages are refused (no payloads travel there)
    max_keys_per_call: int = 65536  # larger batches are refused with INVALID_ARGUMENT
    max_data_connections: int = 256  # concurrent data-plane connections (and local-socket ones); more refused
    # Send and receive buffer each data-plane TCP socket asks for (the kernel doubles it, capped
    # by net.core.rmem_max / wmem_max); 0: the kernel's autotuning.
    data_socket_buffer_bytes: int = 4 * MiB
    # Blocks the shared index (same-host clients' Lookups) is sized for; 0: one per 16 KiB of
    # DRAM and NVMe capacity; -1: publish none (clients ask the node).
    shared_index_blocks: int = 0


@dataclass(frozen=True, slots=True)
class AuthSection:
    token_file: Path | None = None  # file holding the shared token; or set KVSTORE_AUTH_TOKEN
    tls_cert_file: Path | None = None  # PEM certificate chain: serve gRPC over TLS
    tls_key_file: Path | None = None  # its PEM private key


_STORE = StoreConfig()  # the defaults: no tier is built by a config


@dataclass(frozen=True, slots=True)
class StoreSection:
    dram_capacity_bytes: int = 1 * GiB  # shared-memory pool, allocated and pre-faulted at start
    dram_slab_bytes: int = 16 * MiB  # carving unit; the largest block must fit in one slab
    hbm_capacity_bytes: int = 0  # GPU memory for KV blocks; 0 disables the tier
    hbm_device: str = "auto"  # torch device of the HBM tier
    nvme_capacity_bytes: int = 4 * GiB  # slab file bytes under <data_dir>/nvme; 0 disables the tier
    nvme_file_bytes: int = 1 * GiB  # one slab file's size
    nvme_slab_bytes: int = 16 * MiB  # carving unit
    nvme_use_direct_io: bool = True  # O_DIRECT where the filesystem allows it
    # The store's own settings take the store's defaults (kvstore.config.StoreConfig).
    write_policy: WritePolicy = _STORE.write_policy  # when memory blocks reach NVMe
    high_watermark_fraction: float = _STORE.high_watermark_fraction  # a tier filled past this evicts ...
    low_watermark_fraction: float = _STORE.low_watermark_fraction  # ... down to this
    reservation_ttl_s: float = _STORE.reservation_ttl_s  # an uncommitted write's slots are freed after this
    lease_ttl_s: float = _STORE.lease_ttl_s  # an unreleased read lease is dropped after this (a dead reader)
    promote_on_hit: bool = _STORE.promote_on_hit  # NVMe hits are copied up to DRAM
    eviction_policy: str = _STORE.eviction_policy  # which blocks stay: prefix-lrfu, leaf-first-lru, ...
    checksum_in_background: bool = _STORE.checksum_in_background  # hash big memory commits off the commit path
    background_checksum_min_bytes: int = _STORE.background_checksum_min_bytes  # ... from this block size
    event_ring_events: int = 65536  # WatchEvents backlog; a watcher further behind must resync


@dataclass(frozen=True, slots=True)
class ShutdownSection:
    drain_timeout_s: float = 30.0  # on SIGTERM, wait this long for leases and writes in flight
    flush_to_nvme: bool = True  # then copy memory-only blocks to NVMe, so a restart serves them


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: str = "info"  # debug, info, warning, error
    format: LogFormat = LogFormat.JSON


class ConductorRole(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"
    STORAGE = "storage"  # holds KV, runs no engine


@dataclass(frozen=True, slots=True)
class ConductorSection:
    address: str = ""  # host:port of `conductor serve`; empty: register with no conductor
    role: ConductorRole = ConductorRole.BOTH  # what this node's engine does, for placement
    profile: str = "default"  # the cost profile of its engine (the conductor's config names them)
    kv_capacity_tokens: int = 0  # KV its decode engine holds; 0: the profile's
    ttl_s: float = 10.0  # the conductor drops the node after this long without a heartbeat
    heartbeat_interval_s: float = 2.0  # how often it tells the conductor it is alive, and how busy
    token_file: Path | None = None  # the conductor's token, if it wants one (or KVSTORE_CONDUCTOR_TOKEN)
    tls_ca_file: Path | None = None  # PEM roots of the conductor's certificate, when it serves TLS


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    store: StoreSection = field(default_factory=StoreSection)
    shutdown: ShutdownSection = field(default_factory=ShutdownSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    conductor: ConductorSection = field(default_factory=ConductorSection)
    token: str | None = field(default=None, repr=False)  # resolved from token_file or KVSTORE_AUTH_TOKEN
    conductor_token: str | None = field(default=None, repr=False)  # conductor.token_file or KVSTORE_CONDUCTOR_TOKEN
    conductor_tls_root_certificates: bytes | None = field(default=None, repr=False)  # conductor.tls_ca_file

    @property
    def node_id(self) -> str:
        return self.node.node_id or socket.gethostname()

    def shared_index_blocks(self) -> int:
        """Blocks the shared index is sized for (0: none is published)."""
        blocks = self.server.shared_index_blocks
        if blocks == -1:
            return 0
        return blocks or max(1024, (self.store.dram_capacity_bytes + self.store.nvme_capacity_bytes) // (16 * KiB))

    def store_config(self) -> StoreConfig:
        """The store's own configuration, validated by its dataclasses."""
        section = self.store
        nvme = NvmeTierConfig()  # directory None: the tier is off
        if section.nvme_capacity_bytes:
            nvme = NvmeTierConfig(
                directory=self.node.data_dir / "nvme",
                capacity_bytes=section.nvme_capacity_bytes,
                file_bytes=min(section.nvme_file_bytes, section.nvme_capacity_bytes),
                slab_bytes=section.nvme_slab_bytes,
                stage_bytes=max(64 * MiB, section.nvme_slab_bytes),
                use_direct_io=section.nvme_use_direct_io,
            )
        return StoreConfig(
            dram=DramTierConfig(capacity_bytes=section.dram_capacity_bytes, slab_bytes=section.dram_slab_bytes),
            hbm=HbmTierConfig(
                capacity_bytes=section.hbm_capacity_bytes, slab_bytes=section.dram_slab_bytes, device=section.hbm_device
            ),
            nvme=nvme,
            write_policy=section.write_policy,
            high_watermark_fraction=section.high_watermark_fraction,
            low_watermark_fraction=section.low_watermark_fraction,
            reservation_ttl_s=section.reservation_ttl_s,
            lease_ttl_s=section.lease_ttl_s,
            promote_on_hit=section.promote_on_hit,
            eviction_policy=section.eviction_policy,
            checksum_in_background=section.checksum_in_background,
            background_checksum_min_bytes=section.background_checksum_min_bytes,
        )


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "server": ServerSection,
    "auth": AuthSection,
    "store": StoreSection,
    "shutdown": ShutdownSection,
    "logging": LoggingSection,
    "conductor": ConductorSection,
}


def load_node_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> NodeConfig:
    """File, then environment, then `section.field=value` overrides; validated once."""
    environ = os.environ if environ is None else environ
    built, origins = load_layers(
        _SECTIONS, path, environ, overrides, env_prefix=ENV_PREFIX, env_skip=(TOKEN_ENV, CONDUCTOR_TOKEN_ENV)
    )
    config = NodeConfig(
        **built,
        token=read_token(built["auth"].token_file, TOKEN_ENV, "auth.token_file", environ),
        conductor_token=read_token(built["conductor"].token_file, CONDUCTOR_TOKEN_ENV, "conductor.token_file", environ),
        conductor_tls_root_certificates=read_pem(built["conductor"].tls_ca_file, "conductor.tls_ca_file"),
    )
    _validate(config, origins)
    return config


def _validate(config: NodeConfig, origins: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f"{origins.get(key, 'default')}: {key}"

    conductor = config.conductor
    if conductor.address and not conductor.address.rpartition(":")[2].isdigit():
        raise ConfigError(f"{where('conductor.address')} must be host:port, got {conductor.address!r}")
    if not 1.0 <= conductor.ttl_s <= 3600.0:
        raise ConfigError(f"{where('conductor.ttl_s')} must be within [1, 3600] s, got {conductor.ttl_s}")
    if not 0 < conductor.heartbeat_interval_s <= conductor.ttl_s / 2:
        raise ConfigError(
            f"{where('conductor.heartbeat_interval_s')} must be positive and at most half of conductor.ttl_s "
            f"({conductor.ttl_s:g} s), got {conductor.heartbeat_interval_s}"
        )
    if conductor.kv_capacity_tokens < 0:
        raise ConfigError(f"{where('conductor.kv_capacity_tokens')} must not be negative")

    server = config.server
    for name in ("grpc_port", "data_port"):
        if not 0 <= getattr(server, name) <= 65535:
            raise ConfigError(f"{where('server.' + name)} must be in 0..65535, got {getattr(server, name)}")
    if not -1 <= server.metrics_port <= 65535:
        raise ConfigError(f"{where('server.metrics_port')} must be -1 (off) or in 0..65535")
    for name in ("max_workers", "max_keys_per_call", "max_data_connections"):
        if getattr(server, name) < 1:
            raise ConfigError(f"{where('server.' + name)} must be >= 1, got {getattr(server, name)}")
    if not 0 <= server.data_socket_buffer_bytes <= 1 << 30:
        raise ConfigError(
            f"{where('server.data_socket_buffer_bytes')} must be 0 (the kernel's autotuning) or at most 1 GiB, "
            f"got {server.data_socket_buffer_bytes}"
        )
    if server.shared_index_blocks < -1:
        raise ConfigError(f"{where('server.shared_index_blocks')} must be -1 (off), 0 (sized from the tiers) or more")
    if server.max_message_bytes < 64 * KiB:
        raise ConfigError(f"{where('server.max_message_bytes')} must be >= 64 KiB")
    check_tls_files(config.auth.tls_cert_file, config.auth.tls_key_file, "auth")
    if config.shutdown.drain_timeout_s < 0:
        raise ConfigError(f"{where('shutdown.drain_timeout_s')} must be >= 0")
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where('logging.level')} must be debug, info, warning or error")
    if config.store.event_ring_events < 1:
        raise ConfigError(f"{where('store.event_ring_events')} must be >= 1")
    config.store_config()  # the store's dataclasses check sizes, watermarks and TTLs
