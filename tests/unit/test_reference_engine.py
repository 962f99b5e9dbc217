"""The reference engine: paged attention equals the dense model, prefill then decode equals a
full recompute, a cached prefix (also one moved between caches by the kernels' reference)
saves exactly its tokens, and bad model folders are refused with their reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_adapters.kernels.reference import gather, scatter
from engine_adapters.reference.config import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from engine_adapters.reference.engine import Engine
from engine_adapters.reference.model import LlamaModel, PagedCache
from engine_adapters.reference.tiny import make_tiny_model
from kvstore.errors import InvalidArgumentError

BLOCK = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def model(folder: Path) -> LlamaModel:
    return LlamaModel.load(folder)


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed))


def test_paged_prefill_in_scattered_blocks_equals_the_dense_model(model: LlamaModel) -> None:
    tokens = prompt(13)
    cache = PagedCache(model.config, num_blocks=10, block_size=BLOCK)
    logits = model.forward(tokens, 0, [7, 2, 9, 0], cache)
    assert torch.allclose(logits, model.dense_logits(tokens), atol=ATOL)


def test_prefill_then_decode_equals_a_full_recompute(model: LlamaModel) -> None:
    tokens = prompt(10, seed=1)
    cache = PagedCache(model.config, num_blocks=8, block_size=BLOCK)
    table = cache.allocate(4)
    last = model.forward(tokens, 0, table, cache)[-1]
    sequence = tokens.tolist()
    for _ in range(5):  # greedy decode, one token a call
        sequence.append(int(last.argmax()))
        last = model.forward(torch.tensor(sequence[-1:]), len(sequence) - 1, table, cache)[-1]
        dense = model.dense_logits(torch.tensor(sequence))[-1]
        assert torch.allclose(last, dense, atol=ATOL)


def test_a_cached_prefix_saves_exactly_its_tokens(model: LlamaModel) -> None:
    first, shared = prompt(12, seed=2), 8  # two whole blocks shared
    second = torch.cat((first[:shared], prompt(7, seed=3)))
    cache = PagedCache(model.config, num_blocks=12, block_size=BLOCK)
    first_table = cache.allocate(3)
    model.forward(first, 0, first_table, cache)
    second_table = first_table[:2] + cache.allocate(3)  # reuses the first two blocks
    computed = second[shared:]
    logits = model.forward(computed, shared, second_table, cache)
    assert computed.numel() == second.numel() - shared
    assert torch.allclose(logits, model.dense_logits(second)[shared:], atol=ATOL)


def test_blocks_moved_by_the_kernels_serve_another_cache(model: LlamaModel) -> None:
    tokens = prompt(11, seed=4)
    prefill = PagedCache(model.config, num_blocks=6, block_size=BLOCK)
    model.forward(tokens[:8], 0, [3, 5], prefill)  # the prefill node computes two blocks
    kv = prefill.paged()
    payloads = torch.empty(2 * kv.block_bytes, dtype=torch.uint8)
    gather(kv, torch.tensor([3, 5]), payloads)  # into store slots
    decode = PagedCache(model.config, num_blocks=6, block_size=BLOCK)
    scatter(decode.paged(), torch.tensor([1, 4]), payloads)  # and out, on the decode node
    logits = model.forward(tokens[8:], 8, [1, 4, 0], decode)
    assert torch.allclose(logits, model.dense_logits(tokens)[8:], atol=ATOL)


def test_the_tiny_model_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    one = make_tiny_model(tmp_path / "one", seed=5)
    two = make_tiny_model(tmp_path / "two", seed=5)
    other = make_tiny_model(tmp_path / "other", seed=6)
    assert (one / WEIGHTS_FILE).read_bytes() == (two / WEIGHTS_FILE).read_bytes()
    assert (one / WEIGHTS_FILE).read_bytes() != (other / WEIGHTS_FILE).read_bytes()


def test_bad_model_folders_are_refused_with_their_reason(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        LlamaModel.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError, match=r"has no config\.json"):
        LlamaModel.load(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="is not JSON"):
        LlamaModel.load(broken)
    settings = json.loads((folder / CONFIG_FILE).read_text())
    for change, message in (
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"architectures": ["GPT2LMHeadModel"]}, "not a LlamaForCausalLM"),
        ({"vocab_size": "many"}, "'vocab_size' must be of type int"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling .* is not implemented"),
        ({"attention_bias": True}, "attention_bias True is not implemented"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented"),
    ):
        bad = tmp_path / f"bad-{len(message)}"
        bad.mkdir()
        (bad / CONFIG_FILE).write_text(json.dumps({k: v for k, v in {**settings, **change}.items() if v is not None}))
        with pytest.raises(InvalidArgumentError, match=message):
            LlamaModel.load(bad)
    wrong = make_tiny_model(tmp_path / "wrong", overrides={"intermediate_size": 96})
    (wrong / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text())  # the config no longer fits the weights
    with pytest.raises(InvalidArgumentError, match="the config wants"):
        LlamaModel.load(wrong)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text())
    with pytest.raises(InvalidArgumentError, match=r"has no model\.safetensors \(nor model\.safetensors\.index"):
        LlamaModel.load(no_weights)


def test_sharded_weights_load_as_one(folder: Path, model: LlamaModel, tmp_path: Path) -> None:
    weights = load_file(str(folder / WEIGHTS_FILE))
    names = sorted(weights)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / CONFIG_FILE).write_text((folder / CONFIG_FILE).read_text())
    weight_map = {}
    for number, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{number + 1:05d}-of-00002.safetensors"
        save_file({name: weights[name] for name in part}, str(sharded / shard))
        weight_map |= dict.fromkeys(part, shard)
    (sharded / WEIGHTS_INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = LlamaModel.load(sharded)
    assert all(torch.equal(loaded.w[name], model.w[name]) for name in model.w)
    for index, message in (
        ({"weight_map": {}}, "non-empty 'weight_map'"),
        ({"weight_map": {names[0]: "../elsewhere.safetensors"}}, "must be a file name in the folder"),
        (
            {"weight_map": {names[0]: "model-00009-of-00009.safetensors"}},
            "shard model-00009-of-00009.safetensors is missing",
        ),
    ):
        (sharded / WEIGHTS_INDEX_FILE).write_text(json.dumps(index))
        with pytest.raises(InvalidArgumentError, match=message):
            LlamaModel.load(sharded)
    (sharded / WEIGHTS_INDEX_FILE).write_text("{not json")
    with pytest.raises(InvalidArgumentError, match=r"index\.json is not JSON"):
        LlamaModel.load(sharded)
    # a tensor in two shards: which one is meant is not knowable
    save_file({names[0]: weights[names[0]]}, str(sharded / "extra.safetensors"))
    weight_map["extra-name"] = "extra.safetensors"
    (sharded / WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InvalidArgumentError, match=f"tensor '{names[0]}' is also in another shard"):
        LlamaModel.load(sharded)


def test_a_forward_past_its_blocks_is_refused(model: LlamaModel) -> None:
    cache = PagedCache(model.config, num_blocks=2, block_size=BLOCK)
    with pytest.raises(InvalidArgumentError, match="9 positions need 3 blocks"):
        model.forward(prompt(9), 0, [0, 1], cache)
    with pytest.raises(InvalidArgumentError, match="2 free blocks, 3 asked"):
        cache.allocate(3)


def test_the_tiny_tokenizer_round_trips_any_text_within_the_vocabulary(folder: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer  # noqa: PLC0415 - only this test needs it

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Hello, wörld! 你好\n\tend"
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1 and len(ids) == 1 + len(text.encode("utf-8"))  # <s>, then a token per byte
    assert max(ids) < json.loads((folder / CONFIG_FILE).read_text())["vocab_size"]
    assert tokenizer.decode(ids) == text
    again = make_tiny_model(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_bad_tokens_are_refused_before_anything_changes(model: LlamaModel) -> None:
    cache = PagedCache(model.config, num_blocks=4, block_size=BLOCK)
    before = cache.tensor.clone()
    for tokens, message in (
        (torch.tensor([], dtype=torch.int64), "non-empty"),
        (torch.tensor([5, 512]), r"within \[0, 512\), got 5\.\.512"),
        (torch.tensor([-1, 3]), "within"),
        (torch.tensor([1.5]), "integers"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            model.forward(tokens, 0, [0], cache)
    assert torch.equal(cache.tensor, before)
    engine = Engine(model, cache)
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        engine.prefill([])
    assert cache.num_free == 4  # no block was taken
