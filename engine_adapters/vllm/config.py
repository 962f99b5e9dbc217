"""The connector's settings: vLLM's `kv_connector_extra_config`, checked once at start.

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "engine_adapters.vllm.connector",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"node": "127.0.0.1:50051"}}'

| field | default | meaning |
|---|---|---|
| `node` | required | the kvstore node's gRPC address (`host:port`) |
| `token_file` | none | file holding the node's shared token (or set `KVSTORE_AUTH_TOKEN`) |
| `tls_ca_file` | none | PEM roots of the node's certificate, when the node serves gRPC over TLS |
| `timeout_s` | 2.0 | deadline of every call to the node; past it, vLLM computes the tokens itself |
| `verify` | true | check every loaded block against its checksum, shared memory included |
| `model_id` | vLLM's model | names the model across instances (set it where one model loads from different paths) |
| `namespace_salt` | "" | keeps tenants apart: instances with different salts never share blocks |
| `save_decode_blocks` | true | also store blocks of generated tokens (the next turn of a chat reuses them) |
| `load_async` | false | load while the batch computes (the request waits for its blocks) instead of before the step |
| `max_pending_saves` | 2 | steps whose saves may be in flight before a step waits for the oldest |
| `report_load` | true | report the engine's queue and batch to the node, for the conductor (load.py) |
| `engine_id` | `vllm-<host>-<pid>` | the id its load reports carry (1-128 printable characters) |
| `load_report_interval_s` | 1.0 | how often it reports; keep it well under the node's `conductor.ttl_s` |
| `tbt_slo_s` | 0 (none) | the batch's TBT SLO; with it the reports say how long the batch could pause |

A missing `node`, a field not in this table, a value of the wrong type and a token or
certificate file that cannot be read are refused with an error naming the field, before vLLM starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.layered_config import read_pem, read_token
from kvstore.node.engine_loads import MAX_ENGINE_ID, check_engine_id

TOKEN_ENV = "KVSTORE_AUTH_TOKEN"
KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")


def transfer_config(extra: Mapping[str, Any], role: str = "kv_both") -> dict[str, Any]:
    """vLLM's `--kv-transfer-config` for this connector with `extra` as its settings: a dict
    for `KVTransferConfig(**...)`, or for `json.dumps` on a server's command line."""
    if role not in KV_ROLES:
        raise ConfigError(f"kvstore connector: kv_role must be one of {KV_ROLES}, got {role!r}")
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "engine_adapters.vllm.connector",
        "kv_role": role,
        "kv_connector_extra_config": dict(extra),
    }


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    node: str
    token: str | None = None
    tls_root_certificates: bytes | None = None
    timeout_s: float = 2.0
    verify: bool = True
    model_id: str | None = None
    namespace_salt: str = ""
    save_decode_blocks: bool = True
    load_async: bool = False
    max_pending_saves: int = 2
    report_load: bool = True
    engine_id: str = ""  # "" until parsed: from_extra_config picks vllm-<host>-<pid>
    load_report_interval_s: float = 1.0
    tbt_slo_s: float = 0.0

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        """Parse vLLM's `kv_connector_extra_config`; ConfigError names what is wrong."""
        extra = dict(extra or {})
        environ = os.environ if environ is None else environ
        unknown = sorted(set(extra) - _FIELDS)
        if unknown:
            raise ConfigError(
                f"kvstore connector: unknown field(s) {unknown} in kv_connector_extra_config; known: {sorted(_FIELDS)}"
            )
        node = extra.get("node")
        if not isinstance(node, str) or ":" not in node:
            raise ConfigError(
                f"kvstore connector: kv_connector_extra_config.node must be the node's address as 'host:port', "
                f"got {node!r}"
            )
        token_file = _typed(extra, "token_file", str, None)
        token = read_token(Path(token_file) if token_file else None, TOKEN_ENV, "token_file", environ)
        tls_ca_file = _typed(extra, "tls_ca_file", str, None)
        roots = read_pem(Path(tls_ca_file) if tls_ca_file else None, "tls_ca_file")
        timeout_s = float(_typed(extra, "timeout_s", (int, float), 2.0))
        if not 0 < timeout_s <= 600:
            raise ConfigError(f"kvstore connector: timeout_s must be in (0, 600] seconds, got {timeout_s}")
        pending = _typed(extra, "max_pending_saves", int, 2)
        if pending < 1:
            raise ConfigError(f"kvstore connector: max_pending_saves must be at least 1, got {pending}")
        model_id = _typed(extra, "model_id", str, None)
        if model_id == "":
            raise ConfigError("kvstore connector: model_id must not be empty")
        engine_id = _typed(extra, "engine_id", str, None)
        if engine_id is None:
            engine_id = f"vllm-{socket.gethostname()}-{os.getpid()}"[:MAX_ENGINE_ID]
        try:
            check_engine_id(engine_id)
        except InvalidArgumentError as error:
            raise ConfigError(f"kvstore connector: {error}") from None
        interval_s = float(_typed(extra, "load_report_interval_s", (int, float), 1.0))
        if not 0 < interval_s <= 60:
            raise ConfigError(f"kvstore connector: load_report_interval_s must be in (0, 60] seconds, got {interval_s}")
        tbt_slo_s = float(_typed(extra, "tbt_slo_s", (int, float), 0.0))
        if not 0 <= tbt_slo_s <= 60:
            raise ConfigError(f"kvstore connector: tbt_slo_s must be in [0, 60] seconds (0: none), got {tbt_slo_s}")
        return cls(
            node=node,
            token=token,
            tls_root_certificates=roots,
            timeout_s=timeout_s,
            verify=_typed(extra, "verify", bool, True),
            model_id=model_id,
            namespace_salt=_typed(extra, "namespace_salt", str, ""),
            save_decode_blocks=_typed(extra, "save_decode_blocks", bool, True),
            load_async=_typed(extra, "load_async", bool, False),
            max_pending_saves=pending,
            report_load=_typed(extra, "report_load", bool, True),
            engine_id=engine_id,
            load_report_interval_s=interval_s,
            tbt_slo_s=tbt_slo_s,
        )


_FIELDS = frozenset(
    {
        "node",
        "token_file",
        "tls_ca_file",
        "timeout_s",
        "verify",
        "model_id",
        "namespace_salt",
        "save_decode_blocks",
        "load_async",
        "max_pending_saves",
        "report_load",
        "engine_id",
        "load_report_interval_s",
        "tbt_slo_s",
    }
)


def _typed(extra: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = extra.get(name, default)
    if value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python; a flag given as 1, or a count given as true, is a mistake.
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join(item.__name__ for item in kinds)
        raise ConfigError(f"kvstore connector: {name} must be {names}, got {value!r}")
    return value
