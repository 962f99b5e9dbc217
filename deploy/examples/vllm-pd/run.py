"""Disaggregated prefill and decode with two vLLM OpenAI servers, their kvstore nodes and the
conductor, on one machine; then it sends requests through them.

    .venv/bin/python deploy/examples/vllm-pd/run.py [--model DIR] [--sessions 3] [--turns 2]

Started, all on loopback, each its own process: `conductor serve`; a prefill node and a decode
node (`kvstore serve`, each registered with the conductor in its role); a prefill vLLM server
(`kv_role: kv_producer`, saving to the prefill node) and a decode vLLM server
(`kv_role: kv_consumer`, loading from the decode node). Per request this script, as a proxy
would: computes the prompt's block keys (`engine_adapters.vllm.keys`), asks the conductor
where to run it (`Route`), has the prefill server compute the first token, has the decode
node fetch the blocks from the prefill node (`Fetch`, over the data plane), and has the decode
server generate. It checks every answer against the prefill server generating the same prompt
by itself, and exits 1 on any difference; then it prints what the conductor holds of the two
nodes (`conductor status`), whose loads the vLLM servers' connectors report. Without `--model`
a tiny model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from conductor.status_cli import status_text
from engine_adapters.demo import conductor_settings, daemon, node_settings, wait_for_members
from engine_adapters.reference.tiny import VLLM_CPU, make_tiny_model
from engine_adapters.vllm.config import transfer_config
from engine_adapters.vllm.keys import prompt_keys
from kvstore.client import Client
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[3]
BLOCK = 32


@contextlib.contextmanager
def vllm_server(model: Path, port: int, role: str, node: str, log: Path) -> Iterator[str]:
    transfer = transfer_config({"node": node}, role)
    command = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model), "--port", str(port), "--host", "127.0.0.1"),
        *("--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager"),
        *("--kv-cache-memory-bytes", str(128 << 20), "--enable-prompt-tokens-details"),
        *("--kv-transfer-config", json.dumps(transfer)),
        # the conductor's serve order (`priority` in its Route reply) becomes the request's priority
        *("--scheduling-policy", "priority"),
    ]
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the {role} vLLM server exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {role} vLLM server did not start within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def complete(url: str, model: Path, tokens: list[int], max_tokens: int, priority: int = 0) -> dict[str, Any]:
    body = {"model": str(model), "prompt": tokens, "max_tokens": max_tokens, "temperature": 0.0, "priority": priority}
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def workload(args: argparse.Namespace) -> Iterator[tuple[str, int, int, list[int]]]:
    """A shared system prompt; sessions whose later turns carry their history."""
    generator = random.Random(args.seed)
    system = [generator.randrange(3, 500) for _ in range(3 * BLOCK)]
    histories = {session: list(system) for session in range(args.sessions)}
    for turn in range(args.turns):
        for session in range(args.sessions):
            histories[session] += [generator.randrange(3, 500) for _ in range(generator.randrange(20, 60))]
            yield f"session {session} turn {turn}", session, turn, histories[session]


def reported_status(route: pb_grpc.ConductorStub, timeout_s: float = 5.0) -> pb.ClusterStatusResponse:
    """The conductor's `ClusterStatus` once every member's load is its engines' report (a node's
    heartbeat carries it within a second of the connector's first report), or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = route.ClusterStatus(pb.ClusterStatusRequest())
        if all(member.load_reported for member in reply.nodes) or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Llama model folder vLLM loads (default: build a tiny one)")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ports", default="8100,8200", help="the prefill and decode servers' HTTP ports")
    args = parser.parse_args()
    try:
        prefill_port, decode_port = (int(port) for port in args.ports.split(","))
    except ValueError:
        parser.error(f"--ports must be two port numbers, prefill,decode; got {args.ports!r}")
    if min(args.sessions, args.turns, args.max_tokens) < 1:
        parser.error("--sessions, --turns and --max-tokens must be positive")
    with tempfile.TemporaryDirectory(prefix="vllm-pd-") as folder, contextlib.ExitStack() as stack:
        root = Path(folder)
        model = args.model or make_tiny_model(root / "model", overrides=VLLM_CPU)
        print("starting the conductor, a prefill and a decode node ...", flush=True)
        conductor = stack.enter_context(daemon("conductor.cli", conductor_settings()))
        route = pb_grpc.ConductorStub(stack.enter_context(grpc.insecure_channel(conductor.ready["grpc"])))
        nodes = {
            role: stack.enter_context(daemon("kvstore.cli", node_settings(root / role, role, conductor.ready["grpc"])))
            for role in ("prefill", "decode")
        }
        wait_for_members(route, 2)
        print("starting the prefill and decode vLLM servers (logs in the temporary folder) ...", flush=True)
        servers = {
            "prefill-node": stack.enter_context(
                vllm_server(model, prefill_port, "kv_producer", nodes["prefill"].ready["grpc"], root / "prefill.log")
            ),
            "decode-node": stack.enter_context(
                vllm_server(model, decode_port, "kv_consumer", nodes["decode"].ready["grpc"], root / "decode.log")
            ),
        }
        clients = {f"{role}-node": stack.enter_context(Client(nodes[role].ready["grpc"])) for role in nodes}
        (namespace,) = clients["prefill-node"].namespaces()  # registered by the prefill server's connector
        data = {f"{role}-node": nodes[role].ready["data"] for role in nodes}
        differences = 0
        for number, (label, _, _, tokens) in enumerate(workload(args)):
            keys = prompt_keys(namespace.namespace_id, tokens, BLOCK)
            decision = route.Route(
                pb.RouteRequest(
                    request_id=str(number),
                    namespace_id=namespace.namespace_id,
                    keys=b"".join(keys),
                    prompt_tokens=len(tokens),
                    max_output_tokens=args.max_tokens,
                    block_tokens=BLOCK,
                )
            )
            if decision.rejected:
                print(f"req {number} {label}: rejected by the conductor: {decision.rejected}", flush=True)
                continue
            started = time.perf_counter()
            first = complete(servers[decision.prefill.node_id], model, tokens, 1, decision.priority)
            ttft = time.perf_counter() - started
            moved_at = time.perf_counter()
            fetched = clients[decision.decode.node_id].fetch(
                namespace.namespace_id, keys, data[decision.prefill.node_id]
            )
            moved = time.perf_counter() - moved_at
            answer = complete(servers[decision.decode.node_id], model, tokens, args.max_tokens)
            reference = complete(servers[decision.prefill.node_id], model, tokens, args.max_tokens)
            same = answer["choices"][0]["text"] == reference["choices"][0]["text"]
            differences += not same
            reused = (first["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            loaded = (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            print(
                f"req {number} {label:17s} {len(tokens):4d} tok | prefill on {decision.prefill.node_id} (predicted "
                f"TTFT {decision.prefill.ttft_s * 1e3:.0f} ms, {decision.prefill.local_tokens} tok held there), "
                f"decode on {decision.decode.node_id} | prefill reused {reused} tok, TTFT {ttft * 1e3:.0f} ms | "
                f"KV to decode {fetched.bytes_moved / 1e3:.0f} kB in {moved * 1e3:.1f} ms | decode loaded "
                f"{loaded} tok | {'same as colocated' if same else 'DIFFERENT from colocated'}",
                flush=True,
            )
        print(f"{differences} answers differ from the colocated run", flush=True)
        # What the conductor holds of the two nodes: their loads come from the vLLM servers'
        # connectors (`reported`), through the nodes' heartbeats.
        print(status_text(conductor.ready["grpc"], reported_status(route)), flush=True)
        return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
