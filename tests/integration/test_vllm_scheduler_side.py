"""The connector's scheduler side against a real node, step by step: what it asks vLLM to
load, which blocks it saves as tokens are computed, preemption, failed loads, roles.

vLLM's request and scheduler-output objects are stood in for by plain records with the
fields the connector reads (the whole path with a real vLLM is in test_vllm_connector.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engine_adapters.kernels.paged import CacheLayout
from engine_adapters.vllm.config import ConnectorConfig
from engine_adapters.vllm.load import IDLE_BUDGET_S, LoadReporter
from engine_adapters.vllm.metadata import BlockTransfer
from engine_adapters.vllm.scheduler import SchedulerSide
from engine_adapters.vllm.spec import CacheSpec
from kvstore.client import Client
from kvstore.hashing import keys_from_engine_hashes
from kvstore.types import DType, EngineLoad, NamespaceId
from tests.nodes import eventually, running_node

BLOCK = 4
SPEC = CacheSpec(("layer.0", "layer.1"), BLOCK, 1, 4, DType.FLOAT32, CacheLayout.CPU, 1)
HASHES = [f"h{index}".encode() for index in range(8)]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    with running_node(tmp_path / "node") as node, Client(node.grpc_address) as client:
        yield client


def side(
    client: Client, *, loads: bool = True, saves: bool = True, **settings: Any
) -> tuple[SchedulerSide, NamespaceId]:
    config = ConnectorConfig(node=client.address, **settings)
    namespace = SPEC.namespace(config, model="tiny", revision="", tp_rank=0, tp_size=1)
    namespace_id = client.register_namespace(namespace)
    return SchedulerSide(config, SPEC, client, namespace_id, loads=loads, saves=saves), namespace_id


def request(request_id: str, tokens: int, prompt: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=request_id,
        num_tokens=tokens,
        num_prompt_tokens=prompt or tokens,
        block_hashes=HASHES[: tokens // BLOCK],
    )


def blocks(*ids: int) -> SimpleNamespace:
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def step(
    new: list[tuple[str, int, list[int]]] = (),  # type: ignore[assignment]
    cached: list[tuple[str, int, list[int] | None]] = (),  # type: ignore[assignment]
    scheduled: dict[str, int] | None = None,
    resumed: frozenset[str] = frozenset(),
) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=rid, num_computed_tokens=done, block_ids=(ids,)) for rid, done, ids in new
        ],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[rid for rid, _, _ in cached],
            num_computed_tokens=[done for _, done, _ in cached],
            new_block_ids=[None if ids is None else (ids,) for _, _, ids in cached],
            resumed_req_ids=set(resumed),
        ),
        num_scheduled_tokens=scheduled or {},
    )


def store(client: Client, namespace_id: NamespaceId, count: int) -> None:
    keys = keys_from_engine_hashes(namespace_id, HASHES[:count])
    size = client.namespaces()[0].block_bytes
    client.put_blocks(namespace_id, keys, [np.zeros(size, dtype=np.uint8) for _ in keys])


def test_a_new_request_saves_each_whole_block_once_as_its_tokens_are_computed(client: Client) -> None:
    scheduler, namespace_id = side(client)
    keys = keys_from_engine_hashes(namespace_id, HASHES)
    r = request("r", 10)  # 2 whole blocks and 2 tokens
    assert scheduler.matched_tokens(r, 0) == 0  # the node holds nothing
    scheduler.after_alloc(r, blocks(7, 8, 9), 0)
    meta = scheduler.build(step(new=[("r", 0, [7, 8, 9])], scheduled={"r": 10}))
    assert meta.loads == [] and meta.async_loads == []
    assert meta.saves == [BlockTransfer("r", (keys[0], keys[1]), (7, 8))]
    # decode: token 11 completes nothing; token 12 completes block 2 (its hash exists by then)
    r.num_tokens = 11
    assert scheduler.build(step(cached=[("r", 10, None)], scheduled={"r": 1})).saves == []
    r.num_tokens, r.block_hashes = 12, HASHES[:3]
    meta = scheduler.build(step(cached=[("r", 11, None)], scheduled={"r": 1}))
    assert meta.saves == [BlockTransfer("r", (keys[2],), (9,), parent=keys[1])]


def test_without_decode_blocks_only_the_prompt_is_saved(client: Client) -> None:
    scheduler, _ = side(client, save_decode_blocks=False)
    r = request("r", 10)
    scheduler.matched_tokens(r, 0)
    scheduler.after_alloc(r, blocks(1, 2, 3), 0)
    assert len(scheduler.build(step(new=[("r", 0, [1, 2, 3])], scheduled={"r": 10})).saves[0].keys) == 2
    r.num_tokens, r.block_hashes = 12, HASHES[:3]
    assert scheduler.build(step(cached=[("r", 11, None)], scheduled={"r": 1})).saves == []


def test_a_hit_is_loaded_into_the_blocks_past_vllms_own_and_never_the_last_token(client: Client) -> None:
    scheduler, namespace_id = side(client)
    keys = keys_from_engine_hashes(namespace_id, HASHES)
    store(client, namespace_id, 4)  # the node holds blocks 0-3
    r = request("r", 14)  # 3 whole blocks and 2 tokens
    assert scheduler.matched_tokens(r, BLOCK) == 2 * BLOCK  # vLLM holds block 0; the node supplies 1-2
    scheduler.after_alloc(r, blocks(5, 6, 7, 8), 2 * BLOCK)
    meta = scheduler.build(step(new=[("r", 3 * BLOCK, [5, 6, 7, 8])], scheduled={"r": 2}))
    assert meta.loads == [BlockTransfer("r", (keys[1], keys[2]), (6, 7))]
    assert meta.saves == []  # everything whole is on the node already
    exact = request("exact", 16)  # 4 whole blocks, all on the node: the last one is computed
    assert scheduler.matched_tokens(exact, 0) == 3 * BLOCK


def test_loads_go_to_the_asynchronous_list_when_configured(client: Client) -> None:
    scheduler, namespace_id = side(client, load_async=True)
    store(client, namespace_id, 2)
    r = request("r", 10)
    assert scheduler.matched_tokens(r, 0) == 2 * BLOCK
    scheduler.after_alloc(r, blocks(1, 2, 3), 2 * BLOCK)
    scheduler.after_alloc(r, blocks(1, 2, 3), 0)  # vLLM's second call, once the load is done
    meta = scheduler.build(step(new=[("r", 8, [1, 2, 3])], scheduled={"r": 2}))
    assert meta.loads == [] and [transfer.block_ids for transfer in meta.async_loads] == [(1, 2)]


def test_a_resumed_request_saves_from_its_new_blocks_and_a_failed_load_is_saved_again(client: Client) -> None:
    scheduler, namespace_id = side(client)
    keys = keys_from_engine_hashes(namespace_id, HASHES)
    store(client, namespace_id, 2)
    r = request("r", 13, prompt=9)
    assert scheduler.matched_tokens(r, 0) == 2 * BLOCK
    scheduler.after_alloc(r, blocks(1, 2, 3, 4), 2 * BLOCK)
    scheduler.build(step(new=[("r", 8, [1, 2, 3, 4])], scheduled={"r": 1}))
    scheduler.load_failed({2})  # block 1 (in vLLM block 2) failed to load: vLLM recomputes it
    meta = scheduler.build(step(cached=[("r", 9, [5])], scheduled={"r": 3}))  # 12 tokens done
    assert meta.saves == [BlockTransfer("r", (keys[1], keys[2]), (2, 3), parent=keys[0])]
    # preempted, then resumed with all new blocks: only blocks not yet saved, in the new places
    r.num_tokens, r.block_hashes = 17, HASHES[:4]
    meta = scheduler.build(step(cached=[("r", 12, [9, 10, 11, 12, 13])], scheduled={"r": 4}, resumed=frozenset({"r"})))
    assert meta.saves == [BlockTransfer("r", (keys[3],), (12,), parent=keys[2])]


def test_a_producer_never_looks_up_and_a_consumer_never_saves(client: Client) -> None:
    producer, namespace_id = side(client, loads=False)
    store(client, namespace_id, 2)
    r = request("r", 10)
    assert producer.matched_tokens(r, 0) == 0
    consumer, _ = side(client, saves=False)
    assert consumer.matched_tokens(request("c", 10), 0) == 2 * BLOCK
    consumer.after_alloc(request("c", 10), blocks(1, 2, 3), 0)
    assert consumer.build(step(new=[("c", 0, [1, 2, 3])], scheduled={"c": 10})).saves == []


def test_a_node_that_fails_a_lookup_is_a_miss(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        client = Client(node.grpc_address, timeout_s=1.0)
        scheduler, namespace_id = side(client)
        store(client, namespace_id, 2)
    try:
        assert scheduler.matched_tokens(request("r", 10), 0) == 0  # the node shut down meanwhile
    finally:
        client.close()


def test_with_a_reporter_each_step_tells_the_node_the_engines_load(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node, Client(node.grpc_address) as client:
        reporter = LoadReporter(client, "vllm-test", interval_s=0.1)
        config = ConnectorConfig(node=client.address, tbt_slo_s=0.5)
        namespace_id = client.register_namespace(
            SPEC.namespace(config, model="tiny", revision="", tp_rank=0, tp_size=1)
        )
        scheduler = SchedulerSide(config, SPEC, client, namespace_id, loads=True, saves=True, reporter=reporter)
        decoding, waiting = request("d", 12, prompt=8), request("w", 10)
        decoding.num_computed_tokens, decoding.num_output_tokens = 11, 4
        waiting.num_computed_tokens, waiting.num_output_tokens = 0, 0
        for r in (decoding, waiting):
            scheduler.matched_tokens(r, 0)
        scheduler.build(step(cached=[("d", 11, None)], scheduled={"d": 1}))
        assert eventually(lambda: "vllm-test" in node.node.engine_loads.engines())
        load = node.node.engine_loads.engines()["vllm-test"]
        assert (load.queued_prefill_tokens, load.running_decodes, load.decode_kv_tokens) == (10, 1, 11)
        assert 0.0 < load.decode_pause_budget_s <= 0.5 * 4  # d's 4 tokens came within this step
        scheduler.finished(decoding)  # finished in its last step: no step follows
        scheduler.finished(waiting)
        idle = EngineLoad(decode_pause_budget_s=IDLE_BUDGET_S)
        assert eventually(lambda: node.node.engine_loads.engines()["vllm-test"] == idle)
        scheduler.close()  # stops the reporter, then closes the client
        assert reporter.failures == 0


def test_a_node_that_is_gone_makes_load_reports_fail_quietly(tmp_path: Path) -> None:
    with running_node(tmp_path / "node") as node:
        client = Client(node.grpc_address, timeout_s=0.5, max_attempts=1)
    reporter = LoadReporter(client, "vllm-test", interval_s=0.05)
    reporter.update(EngineLoad(running_decodes=1))
    assert eventually(lambda: reporter.failures >= 2)  # logged once; the scheduler never waits on it
    reporter.close()
    client.close()
