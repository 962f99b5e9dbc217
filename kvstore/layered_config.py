"""Configuration in layers: a TOML file, then the environment, then flags, into frozen
dataclasses, one per [section]; every value coerced to its field's type, every mistake a
`ConfigError` naming the key and where it came from. The node's (kvstore/node/config.py) and
the conductor's (conductor/config.py) configurations are both loaded by `load_layers`.

Environment variables are `<PREFIX><SECTION>_<FIELD>`; flags `section.field=value`. Sizes
(fields whose name ends in `_bytes`) may be written with a unit ("4 GiB").
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from kvstore.config import GiB, KiB, MiB
from kvstore.errors import ConfigError


def load_layers(
    sections: Mapping[str, type],
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Sequence[str],
    *,
    env_prefix: str,
    env_skip: Collection[str] = (),
    file_only: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each section's dataclass built from its defaults, then the file, the environment and
    the flags; and, per `section.field` set, the layer that set it last. Tables named in
    `file_only` are the caller's to read from the file (`read_toml`); they are skipped here,
    and refused from the environment or the flags."""
    layers: list[tuple[str, dict[str, dict[str, object]]]] = []
    if path is not None:
        from_file = read_toml(path)
        layers.append((str(path), {name: table for name, table in from_file.items() if name not in file_only}))
    layers.append(("environment", _from_environ(environ, sections, env_prefix, env_skip)))
    layers.append(("flags", _from_overrides(overrides)))
    values: dict[str, dict[str, object]] = {name: {} for name in sections}
    origins: dict[str, str] = {}
    for origin, layer in layers:
        for section, given in layer.items():
            if section in file_only:
                raise ConfigError(f"{origin}: [{section}] can only be given in the config file")
            if section not in sections:
                raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(sections)})")
            known = {f.name for f in dataclasses.fields(sections[section])}
            hints = get_type_hints(sections[section])
            for name, raw in given.items():
                if name not in known:
                    raise ConfigError(f"{origin}: unknown key {section}.{name} (known: {', '.join(known)})")
                values[section][name] = coerce(raw, hints[name], f"{origin}: {section}.{name}")
                origins[f"{section}.{name}"] = origin
    return {section: cls(**values[section]) for section, cls in sections.items()}, origins


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


def read_toml(path: Path) -> dict[str, dict[str, object]]:
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


def _from_environ(
    environ: Mapping[str, str], sections: Collection[str], prefix: str, skip: Collection[str]
) -> dict[str, dict[str, object]]:
    values: dict[str, dict[str, object]] = {}
    for name, value in environ.items():
        if not name.startswith(prefix) or name in skip:
            continue
        rest = name[len(prefix) :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            continue  # <PREFIX>_* variables of other tools are not ours to reject
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


def coerce(raw: object, hint: Any, where: str) -> object:
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


MIN_TOKEN_CHARS = 16


def read_token(path: Path | None, env: str, key: str, environ: Mapping[str, str]) -> str | None:
    """A shared secret from the file at `path` (config key `key`) or the variable `env`, not both;
    None when neither is set. Shorter than MIN_TOKEN_CHARS is refused."""
    token = environ.get(env)
    if path is not None:
        if token is not None:
            raise ConfigError(f"{key} and {env} are both set; choose one")
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{key}: cannot read {path}: {error.strerror}") from None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the token of {key} / {env} must have at least {MIN_TOKEN_CHARS} characters")
    return token


def check_tls_files(cert_file: Path | None, key_file: Path | None, prefix: str) -> None:
    """A server's TLS certificate and key: both or neither, and both files."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError(f"{prefix}.tls_cert_file and {prefix}.tls_key_file go together: set both or neither")
    for name, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{prefix}.{name}: {path} is not a file")


def read_pem(path: Path | None, key: str) -> bytes | None:
    """PEM certificates a client trusts (config key `key`); None when unset."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{key}: {path} holds no PEM certificate")
    return data
