"""`kvstore demo` (what `make run` runs): a disaggregated cluster on one machine, end to end.

It measures the model's cost profile on this machine (engine_adapters/reference/profile.py),
so that the conductor predicts what the workers will take, then starts a conductor with it, a
prefill node and a decode node (`conductor serve` and two
`kvstore serve` daemons, separate processes on loopback, temporary data directories) and one
reference-engine worker per node (engine_adapters/reference/worker.py), builds the tiny model
if there is none, and runs a workload of multi-turn conversations behind shared system
prompts. Per request: the conductor's placement and its reasons, the tokens the prefill
engine reused from its node and computed, the KV the decode node pulled from the prefill node
(bytes, time), TTFT and decode speed. Every output is checked, token for token, against the
same model run colocated in this process; any difference makes the demo exit with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from tokenizers import Tokenizer

from conductor.config import profile_toml
from conductor.costs import Profile
from engine_adapters.demo_arguments import add_arguments
from engine_adapters.reference.engine import Engine
from engine_adapters.reference.model import LlamaModel, PagedCache
from engine_adapters.reference.profile import MIN_PROFILE_TOKENS, profile_model
from engine_adapters.reference.profile import Settings as ProfileSettings
from engine_adapters.reference.tiny import make_tiny_model
from engine_adapters.reference.worker import worker_main
from kvstore.client import Client
from kvstore.errors import InvalidArgumentError, KVStoreError
from kvstore.hashing import block_keys
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import NamespaceId

DEMO_PROFILE = "demo-model"  # the conductor's cost profile of the model, measured at start
WORKER_CACHE_BLOCKS = 512  # each engine worker's paged KV cache

SYSTEM_PROMPTS = (
    "You are a careful assistant for a storage company. Answer briefly, cite the manual, and never "
    "invent part numbers. The manual covers tiers, leases, checksums and namespaces.",
    "You are a travel planner. Ask for dates first, then budget, then suggest three options with "
    "prices; keep every answer under one hundred words and in plain language.",
)
USER_TURNS = (
    "What does a lease protect?",
    "And what happens when it expires?",
    "How is a corrupted block detected?",
    "Plan a weekend in Lisbon in May.",
    "Something cheaper, please.",
    "What about trains from Porto?",
)


@dataclass(frozen=True)
class Daemon:
    process: subprocess.Popen[str]
    ready: dict[str, Any]


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.sessions < 1 or args.block_size < 1 or args.max_new_tokens < 1:
        print(
            "kvstore demo: --requests, --sessions, --block-size and --max-new-tokens must be positive", file=sys.stderr
        )
        return 2
    if args.profile_tokens < MIN_PROFILE_TOKENS:
        print(f"kvstore demo: --profile-tokens must be at least {MIN_PROFILE_TOKENS}", file=sys.stderr)
        return 2
    stop_after = args.stop_prefill_node_after
    if stop_after is not None and not 1 <= stop_after < args.requests:
        print(f"kvstore demo: --stop-prefill-node-after must be in 1..{args.requests - 1}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as scratch:
        root = Path(scratch)
        folder = args.model or root / "model"
        if not (folder / "config.json").exists():
            print(f"building the tiny model in {folder}", flush=True)
            make_tiny_model(folder)
        try:
            return _run(args, folder, root)
        except (RuntimeError, grpc.RpcError, InvalidArgumentError) as error:
            print(f"kvstore demo: {error}", file=sys.stderr)
            return 1


def _run(args: argparse.Namespace, folder: Path, root: Path) -> int:
    with contextlib.ExitStack() as stack:
        config = root / "conductor.toml"
        config.write_text(profile_toml(_measured_profile(folder, args.block_size, args.profile_tokens)))
        print("starting a conductor, a prefill node and a decode node ...", flush=True)
        conductor = stack.enter_context(daemon("conductor.cli", conductor_settings(), config=config))
        address = conductor.ready["grpc"]
        nodes = {
            role: stack.enter_context(
                daemon("kvstore.cli", node_settings(root / role, role, address, profile=DEMO_PROFILE))
            )
            for role in ("prefill", "decode")
        }
        workers = {
            role: stack.enter_context(_worker(folder, nodes[role].ready["grpc"], args.block_size)) for role in nodes
        }
        namespace_id = NamespaceId(workers["prefill"][1])
        route = pb_grpc.ConductorStub(stack.enter_context(grpc.insecure_channel(address)))
        wait_for_members(route, 2)
        decode_client = stack.enter_context(Client(nodes["decode"].ready["grpc"]))
        model = LlamaModel.load(folder)
        colocated = Engine(model, PagedCache(model.config, WORKER_CACHE_BLOCKS, args.block_size))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        print(f"model {folder} ({model.config.num_hidden_layers} layers), {args.block_size}-token blocks\n", flush=True)
        totals = {"requests": 0, "mismatches": 0, "reused": 0, "prompt": 0, "moved": 0}
        cluster = _Cluster(args, namespace_id, route, workers, nodes, decode_client, colocated, totals)
        for number, (label, tokens) in enumerate(_workload(args, tokenizer)):
            totals["mismatches"] += not cluster.request(number, label, tokens)
            if number + 1 == args.stop_prefill_node_after:
                _crash(nodes["prefill"])
                print(
                    "       -- killed the prefill node's daemon (a crash: the conductor still counts it until its "
                    "lease lapses): what follows runs without it --",
                    flush=True,
                )
        print(
            f"\n{totals['requests']} requests: {totals['reused']} of {totals['prompt']} prompt tokens reused "
            f"({totals['reused'] / max(1, totals['prompt']):.0%}), {totals['moved'] / 1e6:.2f} MB of KV moved, "
            f"{totals['mismatches']} outputs differing from the colocated run"
        )
        return 1 if totals["mismatches"] else 0


def _crash(node: Daemon) -> None:
    """Kill a node daemon as a crash would (no drain, no Leave: the conductor learns only when
    its lease lapses), then remove the shared memory it could not."""
    node.process.kill()
    node.process.wait(30)
    segment = node.ready["segment"]
    for name in (segment, f"{segment}.index"):
        Path("/dev/shm", name).unlink(missing_ok=True)


def _measured_profile(folder: Path, block_size: int, max_tokens: int) -> Profile:
    """The conductor's cost profile of this model on this machine, so that its predictions are
    of what the workers will take (a second or two)."""
    print("profiling the model on this machine for the conductor's predictions ...", flush=True)
    settings = ProfileSettings(max_tokens, repeats=3, kv_capacity_tokens=WORKER_CACHE_BLOCKS * block_size)
    profile = profile_model(folder, DEMO_PROFILE, settings, show=True)
    print(
        f"  prefill {profile.prefill.seconds(256) * 1e3:.1f} ms for 256 tokens, "
        f"a decode step {profile.decode.step_s(1, 256) * 1e3:.1f} ms",
        flush=True,
    )
    return profile


@dataclass
class _Cluster:
    """What a request needs of the running cluster."""

    args: argparse.Namespace
    namespace_id: NamespaceId
    route: pb_grpc.ConductorStub
    workers: dict[str, Any]
    nodes: dict[str, Daemon]
    decode_client: Client
    colocated: Engine
    totals: dict[str, int]

    def request(self, number: int, label: str, tokens: list[int]) -> bool:
        """Route, prefill, move the KV, decode, compare; prints one line. False on a mismatch."""
        args = self.args
        keys = block_keys(self.namespace_id, tokens, args.block_size)
        started = time.perf_counter()
        decision = self.route.Route(
            pb.RouteRequest(
                request_id=str(number),
                namespace_id=self.namespace_id,
                keys=b"".join(keys),
                prompt_tokens=len(tokens),
                max_output_tokens=args.max_new_tokens,
                block_tokens=args.block_size,
            )
        )
        if decision.rejected:
            print(f"req {number:2d} {label}: rejected: {decision.rejected}")
            return True
        prefill = _call(self.workers["prefill"][0], {"op": "prefill", "tokens": tokens})
        ttft_s = time.perf_counter() - started
        moved_at = time.perf_counter()
        try:
            fetched = self.decode_client.fetch(self.namespace_id, keys, self.nodes["prefill"].ready["data"])
            moved_bytes, fetch_error = fetched.bytes_moved, ""
        except (KVStoreError, OSError) as error:  # the prefill node (or the decode one) is gone
            moved_bytes, fetch_error = 0, str(error)
        moved_s = time.perf_counter() - moved_at
        command = {"op": "generate", "tokens": tokens, "max_new_tokens": args.max_new_tokens}
        decode = _call(self.workers["decode"][0], command)
        expected = _colocated(self.colocated, tokens, args.max_new_tokens)
        ok = bool(decode["tokens"] == expected and decode["tokens"][0] == prefill["first_token"])
        rate = (len(decode["tokens"]) - 1) / decode["decode_s"] if decode["decode_s"] else 0.0
        why = decision.prefill
        print(
            f"req {number:2d} {label:18s} {len(tokens):4d} tok | prefill on {why.node_id} (predicted TTFT "
            f"{why.ttft_s * 1e3:.0f} ms: queue {why.queue_s * 1e3:.0f} ms, {why.local_tokens} tok held there), "
            f"decode on {decision.decode.node_id} | reused {prefill['reused_tokens']:4d} tok from the prefill "
            f"node's DRAM, computed {prefill['computed_tokens']:4d} | KV to decode: {moved_bytes / 1e3:.0f} kB "
            f"in {moved_s * 1e3:.1f} ms | TTFT {ttft_s * 1e3:.0f} ms | decode {rate:.0f} tok/s | "
            f"{'same as colocated' if ok else 'DIFFERENT from colocated'}",
            flush=True,
        )
        if fetch_error:
            print(f"       moving the KV to the decode node failed: {fetch_error}", flush=True)
        for role, reply in (("prefill", prefill), ("decode", decode)):
            if reply["node_error"]:
                print(f"       the {role} engine's node failed: {reply['node_error']}", flush=True)
        totals = self.totals
        totals["requests"] += 1
        totals["reused"] += prefill["reused_tokens"]
        totals["prompt"] += len(tokens)
        totals["moved"] += moved_bytes
        return ok


def _colocated(engine: Engine, tokens: list[int], max_new_tokens: int) -> list[int]:
    result = engine.prefill(tokens, save=False)
    generated = engine.decode([*tokens, result.first_token], result.block_table, max_new_tokens - 1)
    engine.release(result.block_table)
    return [result.first_token, *generated]


def _workload(args: argparse.Namespace, tokenizer: Tokenizer) -> Iterator[tuple[str, list[int]]]:
    """Conversations behind shared system prompts; each turn extends its own history (its
    previous prompt and a stand-in reply), so later turns reuse earlier ones' blocks."""
    rng = random.Random(args.seed)
    histories: dict[int, list[int]] = {}
    turns: dict[int, int] = {}
    for _ in range(args.requests):
        session = rng.randrange(args.sessions)
        turn = turns.get(session, 0)
        turns[session] = turn + 1
        if session not in histories:
            histories[session] = tokenizer.encode(SYSTEM_PROMPTS[session % len(SYSTEM_PROMPTS)]).ids
        user = tokenizer.encode(
            f"\nUser: {USER_TURNS[(session + turn) % len(USER_TURNS)]}\nAssistant:", add_special_tokens=False
        ).ids
        tokens = histories[session] + user
        histories[session] = tokens + tokenizer.encode(" (an answer)", add_special_tokens=False).ids
        yield f"session {session} turn {turn}", tokens


def _call(pipe: Any, command: dict[str, Any]) -> dict[str, Any]:
    pipe.send(command)
    reply: dict[str, Any] = pipe.recv()
    if "error" in reply:
        raise RuntimeError(f"engine worker failed: {reply['error']}")
    return reply


@contextlib.contextmanager
def daemon(module: str, settings: list[str], *, config: Path | None = None) -> Iterator[Daemon]:
    command = [sys.executable, "-m", module, "serve"]
    if config is not None:
        command += ["--config", str(config)]
    for item in settings:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"{module} serve exited before it was ready (code {process.wait()})")
        yield Daemon(process, json.loads(line))
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def _worker(folder: Path, node_address: str, block_size: int) -> Iterator[tuple[Any, bytes]]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    arguments = (child, str(folder), node_address, block_size, WORKER_CACHE_BLOCKS)
    process = context.Process(target=worker_main, args=arguments, daemon=True)
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("an engine worker did not start within 120 s")
        ready = parent.recv()
        yield parent, ready["namespace_id"]
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            parent.send({"op": "stop"})
        process.join(10)
        if process.is_alive():
            process.kill()


def conductor_settings() -> list[str]:
    return [
        "server.grpc_port=0",
        "server.metrics_port=-1",
        "membership.reconcile_interval_s=0.2",
        "logging.level=WARNING",
    ]


def node_settings(data_dir: Path, role: str, conductor: str, *, profile: str = "default") -> list[str]:
    return [
        f"node.data_dir={data_dir}",
        f"node.node_id={role}-node",
        "server.grpc_port=0",
        "server.data_port=0",
        "server.metrics_port=-1",
        "store.dram_capacity_bytes=64 MiB",
        "store.dram_slab_bytes=1 MiB",
        "store.nvme_capacity_bytes=0",
        f"conductor.address={conductor}",
        f"conductor.role={role}",
        f"conductor.profile={profile}",
        "conductor.ttl_s=5",
        "conductor.heartbeat_interval_s=1",
        "logging.level=warning",
        "logging.format=text",
    ]


def wait_for_members(stub: pb_grpc.ConductorStub, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(stub.ClusterStatus(pb.ClusterStatusRequest()).nodes) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the nodes did not join the conductor within {timeout_s:g} s")
        time.sleep(0.1)


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(demo_main())
