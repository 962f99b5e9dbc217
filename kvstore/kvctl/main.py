"""`kvctl`'s entry point (the `kvctl` console script): flags, settings, dispatch and exit codes.

Settings are read once, here: a flag wins over the environment (`KVCTL_NODE` for the node's
address, `KVSTORE_AUTH_TOKEN` for the token; `CONDUCTOR_AUTH_TOKEN` for `lookup --cluster`),
which wins over the defaults. Input given on the
command line (keys, token ids, files) is checked before the node is contacted.

Exit codes: 0 success; 1 the node refused or could not be reached, or an asked-for block is not
stored; 2 the command line is malformed. Every failure prints `kvctl: error: <message>` on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvstore.client import Client, Transport
from kvstore.errors import AuthenticationError, KVStoreError, PeerUnavailableError
from kvstore.kvctl import commands, inputs, top
from kvstore.kvctl.cluster import TOKEN_ENV as CONDUCTOR_TOKEN_ENV
from kvstore.kvctl.cluster import Conductor
from kvstore.kvctl.errors import KvctlError, UsageError
from kvstore.kvctl.render import Outcome
from kvstore.node.auth import Access
from kvstore.types import BlockKey, TierKind

DEFAULT_NODE = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
PROG = "kvctl"


@dataclass(frozen=True, slots=True)
class Settings:
    """How to reach the node and how to print; built once from flags and environment."""

    address: str  # the node's gRPC HOST:PORT
    token: str | None  # the node's shared token, sent as `authorization: Bearer`
    tls_root_certificates: bytes | None  # PEM roots to check the node's certificate; None: plaintext
    timeout_s: float  # deadline of each call (drain waits for its flush regardless)
    as_json: bool  # machine-readable output on stdout
    conductor_token: str | None = None  # for `lookup --cluster`: the conductor's token


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environment = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse's usage errors (2) and --help (0): return, do not exit
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    address = args.node or environment.get("KVCTL_NODE") or DEFAULT_NODE
    token = args.token or environment.get("KVSTORE_AUTH_TOKEN") or None
    try:
        ca = inputs.read_file_bytes(args.tls_ca, "--tls-ca") if args.tls_ca else None
        conductor_token = environment.get(CONDUCTOR_TOKEN_ENV) or None
        return run(args, Settings(address, token, ca, args.timeout, args.json, conductor_token))
    except KvctlError as error:
        return _fail(str(error), error.exit_code)
    except AuthenticationError as error:
        hint = "" if token else "; pass --token or set KVSTORE_AUTH_TOKEN"
        return _fail(f"node {address} refused the call: {error}{hint}", 1)
    except PeerUnavailableError as error:
        return _fail(f"cannot reach node {address}: {error}", 1)
    except KVStoreError as error:
        return _fail(str(error), 1)
    except KeyboardInterrupt:
        return 130


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Check the command's input, connect, run it and print its outcome."""
    command: str = args.command
    keys = inputs.parse_keys(args.keys) if command in ("inspect", "evict", "pin", "unpin") else []
    tokens = _read_tokens(args) if command == "lookup" else []
    conductor = None
    if command == "lookup" and args.cluster:
        access = Access(settings.conductor_token, settings.tls_root_certificates)
        conductor = Conductor(args.cluster, access, settings.timeout_s)
    with Client(
        settings.address,
        token=settings.token,
        tls_root_certificates=settings.tls_root_certificates,
        timeout_s=settings.timeout_s,
        transport=Transport.TCP,  # kvctl moves no payloads: never map the node's memory
    ) as client:
        if command == "top":
            return top.run(
                client,
                sys.stdout,
                interval_s=args.interval,
                iterations=args.iterations,
                as_json=settings.as_json,
                clock=time.monotonic,
                sleep=time.sleep,
            )
        outcome = _dispatch(client, command, args, keys, tokens, conductor=conductor)
    if settings.as_json:
        print(json.dumps(outcome.document, indent=2))
    else:
        print(outcome.text)
    return outcome.exit_code


def _dispatch(
    client: Client,
    command: str,
    args: argparse.Namespace,
    keys: list[BlockKey],
    tokens: list[int],
    *,
    conductor: Conductor | None,
) -> Outcome:
    if command == "status":
        return commands.status(client)
    if command == "tiers":
        return commands.tiers(client)
    if command == "lookup":
        return commands.lookup(client, args.namespace, tokens, verbose=args.verbose, conductor=conductor)
    if command == "ls":
        tier = TierKind[args.tier.upper()] if args.tier else None
        return commands.list_blocks(client, args.namespace, limit=args.limit, tier=tier)
    if command == "inspect":
        return commands.inspect(client, keys)
    if command == "evict":
        return commands.evict(client, args.namespace, keys)
    if command in ("pin", "unpin"):
        return commands.pin(client, args.namespace, keys, pinned=command == "pin")
    if command == "drain":
        return commands.drain(client, flush=not args.no_flush)
    raise UsageError(f"unknown command {command!r}")


def _read_tokens(args: argparse.Namespace) -> list[int]:
    if args.tokens is not None:
        return inputs.parse_tokens(args.tokens, "--tokens")
    if args.tokens_file is not None:
        return inputs.read_tokens_file(args.tokens_file)
    if args.tokenizer is None:
        raise UsageError("--text needs --tokenizer DIR (a Hugging Face tokenizer folder with tokenizer.json)")
    return inputs.tokenize(args.text, args.tokenizer, add_special_tokens=not args.no_special_tokens)


def _fail(message: str, exit_code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return exit_code


# -- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and administer one kvstore node.")
    _add_global_flags(parser, in_subcommand=False)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        subparser = subcommands.add_parser(name, help=help_text, description=help_text)
        _add_global_flags(subparser, in_subcommand=True)
        return subparser

    add("status", "node id, version, addresses, uptime, namespaces, block/lease counts, lookup hit ratio")
    add("tiers", "per tier: capacity, use, blocks, hits, evictions, demotions, promotions, checksum failures")

    lookup = add("lookup", "how much of a prompt's prefix the node holds, and in which tiers")
    _add_namespace_flag(lookup)
    source = lookup.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", metavar="IDS", help="token ids separated by commas or spaces")
    source.add_argument("--tokens-file", metavar="FILE", help="a file of token ids (commas or whitespace; -: stdin)")
    source.add_argument("--text", help="prompt text, tokenized with --tokenizer (needs: pip install tokenizers)")
    lookup.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder (with tokenizer.json)")
    lookup.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS when tokenizing --text")
    lookup.add_argument("-v", "--verbose", action="store_true", help="also list every block with its tier")
    lookup.add_argument(
        "--cluster",
        metavar="HOST:PORT",
        help=f"also ask this conductor which nodes hold the prefix (token from {CONDUCTOR_TOKEN_ENV})",
    )

    ls = add("ls", "list stored blocks")
    ls.add_argument("--namespace", metavar="ID", help="only this namespace (its id or a hex prefix of it)")
    ls.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N blocks")
    ls.add_argument("--tier", choices=[kind.label for kind in TierKind], help="only blocks with a copy in this tier")

    inspect = add("inspect", "every detail of the given blocks (exit code 1 if any is not stored)")
    inspect.add_argument("keys", nargs="+", metavar="KEYHEX", help="block key, 32 hex digits")

    for name, help_text in (
        ("evict", "remove blocks from every tier (blocks a reader holds are kept)"),
        ("pin", "keep blocks from being evicted"),
        ("unpin", "let pinned blocks be evicted again"),
    ):
        keyed = add(name, help_text)
        keyed.add_argument("keys", nargs="+", metavar="KEYHEX", help="block key, 32 hex digits")
        _add_namespace_flag(keyed)

    drain = add("drain", "make the node refuse new reads and writes, and flush memory-only blocks to NVMe")
    drain.add_argument("--no-flush", action="store_true", help="do not copy memory-only blocks to NVMe")

    live = add("top", "a live view of tier usage and hit, lookup and eviction rates")
    live.add_argument("--interval", type=_positive_float, default=1.0, metavar="S", help="seconds between refreshes")
    live.add_argument("--iterations", type=_positive_int, metavar="N", help="stop after N refreshes (default: Ctrl-C)")
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The connection and output flags, accepted before or after the command. Inside a
    subcommand their default is SUPPRESS, so they do not overwrite a value given before it."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--node", metavar="HOST:PORT", default=default(None), help=f"node gRPC address (env KVCTL_NODE; {DEFAULT_NODE})"
    )
    group.add_argument("--token", default=default(None), help="the node's auth token (env KVSTORE_AUTH_TOKEN)")
    group.add_argument("--tls-ca", metavar="FILE", default=default(None), help="PEM CA certificates: connect with TLS")
    group.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        default=default(DEFAULT_TIMEOUT_S),
        help=f"per-call deadline in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    group.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")


def _add_namespace_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace", metavar="ID", help="namespace id or a hex prefix of it (optional when only one is registered)"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


if __name__ == "__main__":
    sys.exit(main())
