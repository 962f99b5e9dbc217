"""What kvctl reads from the operator: block keys in hex, token ids (inline, from a file, or a
text run through a Hugging Face tokenizer) and the `--namespace` selector.

Called by `kvctl.commands` before any call to the node. Everything here is pure except reading
the named files; malformed input raises `UsageError` (exit code 2).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

from kvstore.errors import UnknownNamespaceError
from kvstore.kvctl.errors import KvctlError, UsageError
from kvstore.types import KEY_BYTES, BlockKey, Namespace

_MAX_TOKEN = 2**32 - 1
_TOKEN_SEPARATORS = re.compile(r"[\s,]+")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_keys(texts: Sequence[str]) -> list[BlockKey]:
    """Block keys from their hex spellings (32 hex digits each, any case)."""
    return [parse_key(text) for text in texts]


def parse_key(text: str) -> BlockKey:
    if len(text) != 2 * KEY_BYTES or not _HEX_DIGITS.issuperset(text):
        raise UsageError(
            f"{text!r} is not a block key: a key is {2 * KEY_BYTES} hex digits ({KEY_BYTES} bytes), "
            f"as `kvctl ls` prints with --json"
        )
    return BlockKey(bytes.fromhex(text))


def parse_tokens(text: str, source: str) -> list[int]:
    """Token ids separated by commas and/or whitespace; `source` names where they came from."""
    tokens = []
    for position, item in enumerate(part for part in _TOKEN_SEPARATORS.split(text) if part):
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"{source}: token {position} is {item!r}, not an integer") from None
        if not 0 <= value <= _MAX_TOKEN:
            raise UsageError(f"{source}: token {position} is {value}, outside [0, 2**32)")
        tokens.append(value)
    return tokens


def read_tokens_file(path: str) -> list[int]:
    """Token ids from a file (`-`: standard input), separated by commas and/or whitespace."""
    if path == "-":
        return parse_tokens(sys.stdin.read(), "standard input")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read --tokens-file {path}: {error}") from None
    return parse_tokens(text, path)


def read_file_bytes(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {flag} {path}: {error}") from None


class _Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class _Tokenizer(Protocol):
    def encode(self, sequence: str, add_special_tokens: bool = True) -> _Encoding: ...


def tokenize(text: str, tokenizer_path: str, *, add_special_tokens: bool) -> list[int]:
    """`text` as token ids, through the tokenizer.json of a Hugging Face tokenizer folder (or
    that file itself). The `tokenizers` package is optional: kvctl needs it only here."""
    try:
        module = importlib.import_module("tokenizers")
    except ImportError:
        raise KvctlError(
            "--text needs the Hugging Face `tokenizers` package, which is not installed: pip install tokenizers"
        ) from None
    path = Path(tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"--tokenizer {tokenizer_path}: no tokenizer.json there (a Hugging Face tokenizer folder)")
    try:
        tokenizer = cast(_Tokenizer, module.Tokenizer.from_file(str(path)))
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    except Exception as error:  # the Rust extension raises plain Exception for a malformed file
        raise KvctlError(f"tokenizer {path} failed: {error}") from error


def select_namespace(namespaces: Sequence[Namespace], selector: str | None) -> Namespace:
    """The registered namespace whose id (hex) starts with `selector`; with no selector, the only
    one registered. Raises UsageError when the selector is missing or ambiguous, and
    UnknownNamespaceError (a store error, exit code 1) when nothing matches."""
    if selector is None:
        if len(namespaces) == 1:
            return namespaces[0]
        if not namespaces:
            raise UnknownNamespaceError("no namespace is registered on this node")
        raise UsageError(f"{len(namespaces)} namespaces are registered: pick one with --namespace ({_ids(namespaces)})")
    wanted = selector.lower()
    if not wanted or not _HEX_DIGITS.issuperset(wanted) or len(wanted) > 2 * KEY_BYTES:
        raise UsageError(f"--namespace {selector!r}: expected a namespace id or a prefix of it, in hex")
    matches = [namespace for namespace in namespaces if namespace.namespace_id.hex().startswith(wanted)]
    if len(matches) > 1:
        raise UsageError(f"--namespace {selector} matches {len(matches)} namespaces: {_ids(matches)}")
    if not matches:
        known = _ids(namespaces) or "none"
        raise UnknownNamespaceError(f"no registered namespace id starts with {wanted} (registered: {known})")
    return matches[0]


def _ids(namespaces: Sequence[Namespace]) -> str:
    return ", ".join(f"{namespace.namespace_id.hex()} ({namespace.model_id})" for namespace in namespaces)
