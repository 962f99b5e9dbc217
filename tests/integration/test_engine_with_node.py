"""The reference engine with a real node daemon: a prefill engine saves blocks, a second
engine (its own cache: a decode engine, or a later request) loads them and computes only the
rest; outputs equal the model without any cache; a missing block makes it recompute."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine_adapters.reference.engine import Engine
from engine_adapters.reference.model import LlamaModel, PagedCache
from engine_adapters.reference.tiny import make_tiny_model
from kvstore.client import Client
from kvstore.node.server import NodeServer
from kvstore.types import TierKind
from tests.nodes import running_node

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    return LlamaModel.load(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeServer]:
    with running_node(tmp_path / "node", dram_kib=4096, nvme_kib=0, store__dram_slab_bytes="256 KiB") as server:
        yield server


def engine(model: LlamaModel, client: Client) -> Engine:
    return Engine(model, PagedCache(model.config, num_blocks=64, block_size=BLOCK), client=client, chunk_blocks=2)


def greedy(model: LlamaModel, tokens: list[int], count: int) -> list[int]:
    sequence = list(tokens)
    for _ in range(count):
        sequence.append(int(model.dense_logits(torch.tensor(sequence))[-1].argmax()))
    return sequence[len(tokens) :]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_second_engine_loads_the_prefix_and_computes_only_the_rest(model: LlamaModel, node: NodeServer) -> None:
    tokens = prompt(22, seed=1)  # 5 whole blocks and 2 tokens
    with Client(node.grpc_address) as client:
        prefill = engine(model, client)
        first = prefill.prefill(tokens)
        assert (first.reused_tokens, first.computed_tokens, first.saved_blocks) == (0, 22, 5)
        decode = engine(model, client)  # another cache: nothing of the prompt in it
        second = decode.prefill(tokens)
        assert (second.loaded_blocks, second.reused_tokens, second.computed_tokens) == (5, 20, 2)
        assert second.first_token == first.first_token
        output = [second.first_token, *decode.decode([*tokens, second.first_token], second.block_table, 5)]
        assert output == greedy(model, tokens, 6)


def test_saves_on_their_own_thread_give_the_same_blocks(model: LlamaModel, node: NodeServer) -> None:
    tokens = prompt(37, seed=6)  # 9 whole blocks: saved over 5 chunks of 2 blocks
    with Client(node.grpc_address) as client, Client(node.grpc_address) as saver:
        overlapped = Engine(model, PagedCache(model.config, 64, BLOCK), client=client, chunk_blocks=2, saver=saver)
        try:
            first = overlapped.prefill(tokens)
        finally:
            overlapped.close()
        assert (first.saved_blocks, first.node_error) == (9, "")
        second = engine(model, client).prefill(tokens)
        assert (second.loaded_blocks, second.computed_tokens) == (9, 1)
        assert second.first_token == first.first_token == greedy(model, tokens, 1)[0]


def test_a_prompt_of_whole_blocks_still_computes_its_last_token(model: LlamaModel, node: NodeServer) -> None:
    tokens = prompt(16, seed=2)
    with Client(node.grpc_address) as client:
        engine(model, client).prefill(tokens)
        again = engine(model, client).prefill(tokens)
        assert (again.loaded_blocks, again.computed_tokens) == (3, 4)  # block 4 holds the last token
        assert again.first_token == greedy(model, tokens, 1)[0]


def test_a_missing_block_makes_the_engine_recompute_and_agree(model: LlamaModel, node: NodeServer) -> None:
    tokens = prompt(21, seed=3)
    with Client(node.grpc_address) as client:
        saver = engine(model, client)
        saver.prefill(tokens)
        assert saver.namespace_id is not None
        client.remove(saver.namespace_id, saver.keys(tokens)[2:3])  # the third block is gone
        loader = engine(model, client)
        result = loader.prefill(tokens)
        assert (result.loaded_blocks, result.computed_tokens) == (2, 13)
        assert result.first_token == greedy(model, tokens, 1)[0]
        assert result.saved_blocks == 1  # it saves the block it had to recompute (the rest are there)


def test_a_corrupted_block_makes_the_engine_recompute_and_agree(model: LlamaModel, node: NodeServer) -> None:
    tokens = prompt(21, seed=4)
    with Client(node.grpc_address) as client:
        saver = engine(model, client)
        saver.prefill(tokens)
        key = saver.keys(tokens)[1]
        table = node.store.manager._table  # fault injection: where the block lives in the pool
        slot = table.slot_of(table.ids[key], TierKind.DRAM)
        assert slot is not None
        view = node.store.tiers[TierKind.DRAM].host_view(slot, saver.namespace.block_bytes)
        assert view is not None
        view[100] ^= 0xFF  # a bit flip in the node's memory, after the checksum was taken
        loader = engine(model, client)
        result = loader.prefill(tokens)
        assert result.loaded_blocks == 1  # the run ends at the block that fails its checksum
        assert result.computed_tokens == 21 - 4
        assert result.first_token == greedy(model, tokens, 1)[0]


def test_a_node_that_is_gone_makes_the_engine_compute_everything(model: LlamaModel, tmp_path: Path) -> None:
    tokens = prompt(21, seed=5)
    with running_node(tmp_path / "lost", dram_kib=4096, nvme_kib=0, store__dram_slab_bytes="256 KiB") as node:
        client = Client(node.grpc_address, timeout_s=2.0)
        saver = engine(model, client)
        saver.prefill(tokens)
        loader = engine(model, client)
    try:
        result = loader.prefill(tokens)  # the node shut down meanwhile
        assert (result.loaded_blocks, result.computed_tokens, result.saved_blocks) == (0, 21, 0)
        assert result.node_error.startswith("loading from the node failed")
        assert result.first_token == greedy(model, tokens, 1)[0]
    finally:
        client.close()
