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

import dataclasses
import os
import re
import socket
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from kvstore.config import DramConfig as DramTierConfig
from kvstore.config import GiB, KiB, MiB, StoreConfig, WritePolicy
from kvstore.config import HbmConfig as HbmTierConfig
from kvstore.config import NvmeConfig as NvmeTierConfig
from kvstore.errors import ConfigError

ENV_PREFIX = "KVSTORE_"
TOKEN_ENV = "KVSTORE_AUTH_TOKEN"


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
    # Blocks the shared index (same-host clients' Lookups) is sized for; 0: one per 16 KiB of
    # DRAM and NVMe capacity; -1: publish none (clients ask the node).
    shared_index_blocks: int = 0


@dataclass(frozen=True, slots=True)
class AuthSection:
    token_file: Path | None = None  # file holding the shared token; or set KVSTORE_AUTH_TOKEN
    tls_cert_file: Path | None = None  # PEM certificate chain: serve gRPC over TLS
    tls_key_file: Path | None = None  # its PEM private key


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
    write_policy: WritePolicy = WritePolicy.WRITE_BACK  # when memory blocks reach NVMe
    high_watermark_fraction: float = 0.95  # a tier filled past this evicts ...
    low_watermark_fraction: float = 0.85  # ... down to this
    reservation_ttl_s: float = 30.0  # an uncommitted write's slots are freed after this (a dead writer)
    lease_ttl_s: float = 30.0  # an unreleased read lease is dropped after this (a dead reader)
    promote_on_hit: bool = True  # NVMe hits are copied up to DRAM
    eviction_policy: str = "leaf-first-lru"  # which blocks stay: leaf-first-lru, prefix-lrfu, ... (docs/policy.md)
    event_ring_events: int = 65536  # WatchEvents backlog; a watcher further behind must resync


@dataclass(frozen=True, slots=True)
class ShutdownSection:
    drain_timeout_s: float = 30.0  # on SIGTERM, wait this long for leases and writes in flight
    flush_to_nvme: bool = True  # then copy memory-only blocks to NVMe, so a restart serves them


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: str = "info"  # debug, info, warning, error
    format: LogFormat = LogFormat.JSON


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node: NodeSection = field(default_factory=NodeSection)
    server: ServerSection = field(default_factory=ServerSection)
    auth: AuthSection = field(default_factory=AuthSection)
    store: StoreSection = field(default_factory=StoreSection)
    shutdown: ShutdownSection = field(default_factory=ShutdownSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    token: str | None = field(default=None, repr=False)  # resolved from token_file or KVSTORE_AUTH_TOKEN

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
        )


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "server": ServerSection,
    "auth": AuthSection,
    "store": StoreSection,
    "shutdown": ShutdownSection,
    "logging": LoggingSection,
}


def load_node_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> NodeConfig:
    """File, then environment, then `section.field=value` overrides; validated once."""
    layers: list[tuple[str, dict[str, dict[str, object]]]] = []
    if path is not None:
        layers.append((str(path), _read_toml(path)))
    environ = os.environ if environ is None else environ
    layers.append(("environment", _from_environ(environ)))
    layers.append(("flags", _from_overrides(overrides)))
    sections: dict[str, dict[str, object]] = {name: {} for name in _SECTIONS}
    origins: dict[str, str] = {}
    for origin, layer in layers:
        for section, values in layer.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(_SECTIONS)})")
            known = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
            hints = get_type_hints(_SECTIONS[section])
            for name, raw in values.items():
                if name not in known:
                    raise ConfigError(f"{origin}: unknown key {section}.{name} (known: {', '.join(known)})")
                sections[section][name] = _coerce(raw, hints[name], f"{origin}: {section}.{name}")
                origins[f"{section}.{name}"] = origin
    built = {}
    for section, cls in _SECTIONS.items():
        built[section] = cls(**sections[section])
    config = NodeConfig(**built, token=_resolve_token(built["auth"], environ))
    _validate(config, origins)
    return config


def parse_size_bytes(value: object, where: str) -> int:
    """An int, or a string like "4 GiB" / "512MiB" / "64 KiB" / "1048576"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*", value)
        if match:
            unit = {"B": 1, None: 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": 1024 * GiB}[match.group(2)]
            return int(match.group(1)) * unit
    raise ConfigError(f"{where} must be a size in bytes (an integer or e.g. '4 GiB'), got {value!r}")


# -- internals -------------------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, dict[str, object]]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
    return data


def _from_environ(environ: Mapping[str, str]) -> dict[str, dict[str, object]]:
    values: dict[str, dict[str, object]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == TOKEN_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # KVSTORE_* variables of other tools are not ours to reject
        values.setdefault(section, {})[rest[len(section) + 1 :]] = value
    return values


def _from_overrides(overrides: Sequence[str]) -> dict[str, dict[str, object]]:
    values: dict[str, dict[str, object]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"flags: --set wants section.field=value, got {item!r}")
        values.setdefault(section, {})[name] = value.strip()
    return values


def _coerce(raw: object, hint: Any, where: str) -> object:
    """Turn a TOML value or an environment/flag string into the field's type."""
    if isinstance(hint, types.UnionType):  # Path | None
        if raw in ("", None):
            return None
        (hint,) = [arg for arg in hint.__args__ if arg is not type(None)]
    if where.endswith("_bytes"):
        return parse_size_bytes(raw, where)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"-?\d+", raw.strip()):
            return int(raw)
        raise ConfigError(f"{where} must be an integer, got {raw!r}")
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(str(raw))
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {raw!r}") from None
    if hint is Path:
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{where} must be a path, got {raw!r}")
        return Path(raw).expanduser()
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        try:
            return hint(str(raw))
        except ValueError:
            raise ConfigError(f"{where} must be one of {[v.value for v in hint]}, got {raw!r}") from None
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where} must be a string, got {raw!r}")
        return raw
    raise ConfigError(f"{where}: unsupported type {hint}")  # a field type this loader does not know


def _resolve_token(auth: AuthSection, environ: Mapping[str, str]) -> str | None:
    token = environ.get(TOKEN_ENV)
    if auth.token_file is not None:
        if token is not None:
            raise ConfigError(f"auth.token_file and {TOKEN_ENV} are both set; choose one")
        try:
            token = auth.token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"auth.token_file {auth.token_file}: {error.strerror}") from None
    if token is not None and len(token) < 16:
        raise ConfigError("the auth token must be at least 16 characters")
    return token


def _validate(config: NodeConfig, origins: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f"{origins.get(key, 'default')}: {key}"

    server = config.server
    for name in ("grpc_port", "data_port"):
        if not 0 <= getattr(server, name) <= 65535:
            raise ConfigError(f"{where('server.' + name)} must be in 0..65535, got {getattr(server, name)}")
    if not -1 <= server.metrics_port <= 65535:
        raise ConfigError(f"{where('server.metrics_port')} must be -1 (off) or in 0..65535")
    for name in ("max_workers", "max_keys_per_call", "max_data_connections"):
        if getattr(server, name) < 1:
            raise ConfigError(f"{where('server.' + name)} must be >= 1, got {getattr(server, name)}")
    if server.shared_index_blocks < -1:
        raise ConfigError(f"{where('server.shared_index_blocks')} must be -1 (off), 0 (sized from the tiers) or more")
    if server.max_message_bytes < 64 * KiB:
        raise ConfigError(f"{where('server.max_message_bytes')} must be >= 64 KiB")
    auth = config.auth
    if (auth.tls_cert_file is None) != (auth.tls_key_file is None):
        raise ConfigError("auth.tls_cert_file and auth.tls_key_file go together: set both or neither")
    for name in ("tls_cert_file", "tls_key_file"):
        path = getattr(auth, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{where('auth.' + name)}: {path} is not a file")
    if config.shutdown.drain_timeout_s < 0:
        raise ConfigError(f"{where('shutdown.drain_timeout_s')} must be >= 0")
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where('logging.level')} must be debug, info, warning or error")
    if config.store.event_ring_events < 1:
        raise ConfigError(f"{where('store.event_ring_events')} must be >= 1")
    config.store_config()  # the store's dataclasses check sizes, watermarks and TTLs
