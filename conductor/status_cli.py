"""`conductor status`: what a running conductor knows of the cluster, from its `ClusterStatus`.

    conductor status [--address HOST:PORT] [--token-file FILE] [--tls-ca FILE] [--json]

One line for the conductor (its placement policy, the blocks its global index holds, the
requests routed and rejected), then one row per member: role, profile, the predicted wait
before a new prefill starts there, its load (prompt tokens queued, sequences decoding and their
KV, the decode pause budget) and where that load comes from (`reported` by its engines through
the node's heartbeats, or the conductor's `own` account of what it placed there), the blocks the
index holds for it and how often its event stream was rebuilt.

The token is read from --token-file, else from CONDUCTOR_AUTH_TOKEN. Exit codes: 0 success;
1 the conductor refused the call or could not be reached; 2 the command line is malformed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc

from kvstore.kvctl.render import table
from kvstore.node.auth import Access
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50070"
TOKEN_ENV = "CONDUCTOR_AUTH_TOKEN"
_ROLES = {
    pb.NODE_ROLE_PREFILL: "prefill",
    pb.NODE_ROLE_DECODE: "decode",
    pb.NODE_ROLE_BOTH: "both",
    pb.NODE_ROLE_STORAGE: "storage",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"the conductor's gRPC HOST:PORT ({DEFAULT_ADDRESS})"
    )
    parser.add_argument("--token-file", type=Path, help=f"file holding the conductor's token (or set {TOKEN_ENV})")
    parser.add_argument("--tls-ca", type=Path, help="PEM roots of the conductor's certificate, when it serves TLS")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (10)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environment = os.environ if environ is None else environ
    try:
        token = args.token_file.read_text().strip() if args.token_file else environment.get(TOKEN_ENV) or None
        roots = args.tls_ca.read_bytes() if args.tls_ca else None
    except OSError as error:
        return _fail(f"cannot read {error.filename}: {error.strerror}", 2)
    access = Access(token, roots)
    try:
        with access.channel(args.address) as channel:
            reply = pb_grpc.ConductorStub(channel).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=args.timeout, metadata=access.metadata
            )
    except grpc.RpcError as error:
        code = error.code()
        if code is grpc.StatusCode.UNAUTHENTICATED:
            hint = "" if token else f"; pass --token-file or set {TOKEN_ENV}"
            return _fail(f"the conductor at {args.address} refused the call: {error.details()}{hint}", 1)
        return _fail(f"cannot reach the conductor at {args.address}: {code.name} {error.details()}", 1)
    print(json.dumps(status_json(args.address, reply), indent=2) if args.json else status_text(args.address, reply))
    return 0


def status_text(address: str, reply: pb.ClusterStatusResponse) -> str:
    head = (
        f"conductor {address}: policy {reply.policy}, {len(reply.nodes)} members, "
        f"{reply.indexed_blocks} blocks indexed, {reply.routed} routed, {reply.rejected} rejected"
    )
    if not reply.nodes:
        return f"{head}\n\nno member registered"
    headers = [
        "NODE",
        "ROLE",
        "PROFILE",
        "PREFILL WAIT",
        "QUEUED TOKENS",
        "DECODING",
        "KV TOKENS",
        "PAUSE BUDGET",
        "LOAD",
        "BLOCKS",
        "RESYNCS",
    ]
    rows = []
    for member in reply.nodes:
        load = member.load
        budget = f"{load.decode_pause_budget_s:.2f} s" if load.decode_pause_budget_s else "-"
        rows.append(
            [
                member.node.node_id,
                _ROLES.get(member.node.role, "?"),
                member.node.profile or "default",
                f"{member.prefill_queue_s:.2f} s",
                str(load.queued_prefill_tokens),
                str(load.running_decodes),
                str(load.decode_kv_tokens),
                budget,
                "reported" if member.load_reported else "own",
                str(member.indexed_blocks),
                str(member.resyncs),
            ]
        )
    right = [False, False, False, True, True, True, True, True, False, True, True]
    return f"{head}\n\n{table(headers, rows, right=right)}"


def status_json(address: str, reply: pb.ClusterStatusResponse) -> dict[str, object]:
    return {
        "address": address,
        "policy": reply.policy,
        "indexed_blocks": reply.indexed_blocks,
        "routed": reply.routed,
        "rejected": reply.rejected,
        "nodes": [
            {
                "node_id": member.node.node_id,
                "role": _ROLES.get(member.node.role, "?"),
                "profile": member.node.profile or "default",
                "grpc_address": member.node.grpc_address,
                "data_address": member.node.data_address,
                "prefill_queue_s": member.prefill_queue_s,
                "queued_prefill_tokens": member.load.queued_prefill_tokens,
                "running_decodes": member.load.running_decodes,
                "decode_kv_tokens": member.load.decode_kv_tokens,
                "decode_pause_budget_s": member.load.decode_pause_budget_s,
                "load_reported": member.load_reported,
                "indexed_blocks": member.indexed_blocks,
                "resyncs": member.resyncs,
            }
            for member in reply.nodes
        ],
    }


def _fail(message: str, code: int) -> int:
    print(f"conductor status: error: {message}", file=sys.stderr)
    return code
