"""Block keys, namespace ids and extra-key encoding (kvstore/hashing.py, kvstore/types.py).

The expected keys are derived twice: by `reference_block_keys` below, written from DESIGN.md
section 2 with nothing but xxhash and struct, and as hex literals pasted in once, so a change to
the encoding fails here even if the reference and the library were changed together.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import xxhash

from kvstore.errors import InvalidArgumentError
from kvstore.hashing import block_keys, encode_extra_keys, key_from_engine_hash, keys_from_engine_hashes
from kvstore.types import BlockKey, DType, KVLayout, KVPacking, Namespace, NamespaceId

TOKENS = list(range(10))  # two full blocks of 4 tokens and a partial third one
BLOCK_TOKENS = 4
EXTRA_ITEMS: list[str | int | bytes] = ["lora-a", 7, b"\x01"]

CANONICAL_HEX = (
    "01"
    "0a000000" + b"tiny-llama".hex() + "02000000" + b"r1".hex() + "08000000" + b"bfloat16".hex()
    + "08000000" + b"separate".hex()
    + "02000000" "04000000" "10000000" "04000000" "00000000" "01000000"
    + "00000000"
)  # fmt: skip
NAMESPACE_ID_HEX = "2d5ff854b9dc8c47984a75f32efc8dd6"
KEYS_HEX = ["3937deb06e6580a3a941a0265d2e703c", "d95654d9506984aa41bf7afe03cbfc41"]
EXTRA_HEX = "73060000006c6f72612d6169080000000700000000000000620100000001"
KEYS_WITH_EXTRA_HEX = ["6f771331d24c5357c11dae65880d3afe", "84638d723e584b4e809e60769d6daf3c"]
ENGINE_KEY_HEX = "b09106d90e3c5157137a7007b695e350"


def make_namespace(**overrides: Any) -> Namespace:
    fields: dict[str, Any] = {
        "model_id": "tiny-llama",
        "dtype": DType.BFLOAT16,
        "layout": KVLayout(2, 4, 16),
        "block_tokens": BLOCK_TOKENS,
        "model_revision": "r1",
        "tp_rank": 0,
        "tp_size": 1,
        "tenant_salt": "",
    }
    fields.update(overrides)
    return Namespace(**fields)


# -- an independent reference, from DESIGN.md section 2 ------------------------------------------


def reference_canonical_bytes(namespace: Namespace) -> bytes:
    def text(value: str) -> bytes:
        raw = value.encode("utf-8")
        return struct.pack("<I", len(raw)) + raw

    layout = namespace.layout
    return (
        b"\x01"
        + text(namespace.model_id)
        + text(namespace.model_revision)
        + text(str(namespace.dtype.value))
        + text(str(layout.packing.value))
        + struct.pack(
            "<6I",
            layout.num_layers,
            layout.num_kv_heads,
            layout.head_size,
            namespace.block_tokens,
            namespace.tp_rank,
            namespace.tp_size,
        )
        + text(namespace.tenant_salt)
    )


def reference_extra(items: list[str | int | bytes]) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, str):
            out += b"s" + struct.pack("<I", len(item.encode())) + item.encode()
        elif isinstance(item, int):
            out += b"i" + struct.pack("<I", 8) + struct.pack("<q", item)
        else:
            out += b"b" + struct.pack("<I", len(item)) + item
    return out


def reference_block_keys(
    namespace_id: bytes, tokens: list[int], block_tokens: int, extras: list[bytes] | None = None
) -> list[str]:
    """key_i = xxh3_128(key_{i-1} || LE uint32 tokens_i || extra_i), key_{-1} = namespace_id."""
    previous, keys = namespace_id, []
    for index in range(len(tokens) // block_tokens):
        block = tokens[index * block_tokens : (index + 1) * block_tokens]
        extra = extras[index] if extras is not None else b""
        previous = xxhash.xxh3_128_digest(previous + struct.pack(f"<{block_tokens}I", *block) + extra)
        keys.append(previous.hex())
    return keys


def hexes(keys: list[BlockKey]) -> list[str]:
    return [key.hex() for key in keys]


# -- known answers ---------------------------------------------------------------------------------


def test_canonical_bytes_and_namespace_id_match_the_reference_and_the_literals() -> None:
    namespace = make_namespace()
    assert namespace.canonical_bytes() == reference_canonical_bytes(namespace)
    assert namespace.canonical_bytes().hex() == CANONICAL_HEX
    assert xxhash.xxh3_128_digest(reference_canonical_bytes(namespace)).hex() == NAMESPACE_ID_HEX
    assert namespace.namespace_id.hex() == NAMESPACE_ID_HEX


def test_block_keys_match_the_reference_and_the_literals() -> None:
    namespace_id = make_namespace().namespace_id
    assert reference_block_keys(namespace_id, TOKENS, BLOCK_TOKENS) == KEYS_HEX
    keys = block_keys(namespace_id, TOKENS, BLOCK_TOKENS)
    assert hexes(keys) == KEYS_HEX  # two keys: the partial third block has none
    assert all(isinstance(key, bytes) and len(key) == 16 for key in keys)


def test_block_keys_with_extra_keys_match_the_reference_and_the_literals() -> None:
    namespace_id = make_namespace().namespace_id
    extra = encode_extra_keys(EXTRA_ITEMS)
    assert extra == reference_extra(EXTRA_ITEMS)
    assert extra.hex() == EXTRA_HEX
    assert reference_block_keys(namespace_id, TOKENS, BLOCK_TOKENS, [extra, extra]) == KEYS_WITH_EXTRA_HEX
    assert hexes(block_keys(namespace_id, TOKENS, BLOCK_TOKENS, extra_keys=[extra, extra])) == KEYS_WITH_EXTRA_HEX


def test_empty_extra_keys_equal_no_extra_keys() -> None:
    namespace_id = make_namespace().namespace_id
    assert encode_extra_keys([]) == b""
    assert hexes(block_keys(namespace_id, TOKENS, BLOCK_TOKENS, extra_keys=[b"", b""])) == KEYS_HEX


def test_key_from_engine_hash_matches_the_reference_and_the_literal() -> None:
    namespace_id = make_namespace().namespace_id
    assert xxhash.xxh3_128_digest(namespace_id + b"\x00" * 8).hex() == ENGINE_KEY_HEX
    assert key_from_engine_hash(namespace_id, b"\x00" * 8).hex() == ENGINE_KEY_HEX
    assert hexes(keys_from_engine_hashes(namespace_id, [b"\x00" * 8, b"\x01"])) == [
        ENGINE_KEY_HEX,
        xxhash.xxh3_128_digest(namespace_id + b"\x01").hex(),
    ]


def test_another_process_with_another_hash_seed_computes_the_same_keys() -> None:
    script = (
        "from kvstore.hashing import block_keys, encode_extra_keys, key_from_engine_hash\n"
        "from kvstore.types import DType, KVLayout, Namespace\n"
        "ns = Namespace('tiny-llama', DType.BFLOAT16, KVLayout(2, 4, 16), 4, 'r1', 0, 1, '')\n"
        "extra = encode_extra_keys(['lora-a', 7, b'\\x01'])\n"
        "print(ns.namespace_id.hex())\n"
        "print(' '.join(k.hex() for k in block_keys(ns.namespace_id, list(range(10)), 4)))\n"
        "print(' '.join(k.hex() for k in block_keys(ns.namespace_id, list(range(10)), 4, extra_keys=[extra] * 2)))\n"
        "print(key_from_engine_hash(ns.namespace_id, bytes(8)).hex())\n"
    )
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [
        NAMESPACE_ID_HEX,
        " ".join(KEYS_HEX),
        " ".join(KEYS_WITH_EXTRA_HEX),
        ENGINE_KEY_HEX,
    ]


# -- what a key depends on ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", range(8))
def test_changing_one_token_changes_its_block_key_and_every_later_one(position: int) -> None:
    namespace_id = make_namespace().namespace_id
    tokens = list(range(12))  # three full blocks
    original = block_keys(namespace_id, tokens, BLOCK_TOKENS)
    tokens[position] += 1000
    changed = block_keys(namespace_id, tokens, BLOCK_TOKENS)
    block = position // BLOCK_TOKENS
    assert changed[:block] == original[:block]
    assert all(new != old for new, old in zip(changed[block:], original[block:], strict=True))
    assert len(set(changed) | set(original)) == 3 + (3 - block)


def test_changing_a_token_of_the_partial_block_changes_nothing() -> None:
    namespace_id = make_namespace().namespace_id
    tokens = list(TOKENS)
    tokens[9] = 99
    assert hexes(block_keys(namespace_id, tokens, BLOCK_TOKENS)) == KEYS_HEX


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("item", [0, 1, 2])
def test_changing_one_extra_key_changes_its_block_key_and_every_later_one(block: int, item: int) -> None:
    namespace_id = make_namespace().namespace_id
    tokens = list(range(12))
    items: list[list[str | int | bytes]] = [list(EXTRA_ITEMS) for _ in range(3)]
    original = block_keys(namespace_id, tokens, BLOCK_TOKENS, extra_keys=[encode_extra_keys(i) for i in items])
    items[block][item] = {0: "lora-b", 1: 8, 2: b"\x02"}[item]
    changed = block_keys(namespace_id, tokens, BLOCK_TOKENS, extra_keys=[encode_extra_keys(i) for i in items])
    assert changed[:block] == original[:block]
    assert all(new != old for new, old in zip(changed[block:], original[block:], strict=True))


def test_extra_keys_of_different_types_or_splits_encode_differently() -> None:
    encodings = [
        encode_extra_keys(["7"]),
        encode_extra_keys([7]),
        encode_extra_keys([b"7"]),
        encode_extra_keys(["ab", "c"]),
        encode_extra_keys(["a", "bc"]),
        encode_extra_keys(["abc"]),
    ]
    assert len(set(encodings)) == len(encodings)


# The variations start from tp_rank 1 of 2 so that tp_rank and tp_size can each change alone.
VARIED_BASE = make_namespace(tp_rank=1, tp_size=2)
NAMESPACE_VARIATIONS: dict[str, Namespace] = {
    "model_id": dataclasses.replace(VARIED_BASE, model_id="tiny-llamb"),
    "dtype": dataclasses.replace(VARIED_BASE, dtype=DType.FLOAT16),
    "block_tokens": dataclasses.replace(VARIED_BASE, block_tokens=5),
    "model_revision": dataclasses.replace(VARIED_BASE, model_revision="r2"),
    "tp_rank": dataclasses.replace(VARIED_BASE, tp_rank=0),
    "tp_size": dataclasses.replace(VARIED_BASE, tp_size=3),
    "tenant_salt": dataclasses.replace(VARIED_BASE, tenant_salt="tenant-a"),
    "layout.num_layers": dataclasses.replace(VARIED_BASE, layout=dataclasses.replace(VARIED_BASE.layout, num_layers=3)),
    "layout.num_kv_heads": dataclasses.replace(
        VARIED_BASE, layout=dataclasses.replace(VARIED_BASE.layout, num_kv_heads=8)
    ),
    "layout.head_size": dataclasses.replace(VARIED_BASE, layout=dataclasses.replace(VARIED_BASE.layout, head_size=32)),
    "layout.packing": dataclasses.replace(
        VARIED_BASE, layout=dataclasses.replace(VARIED_BASE.layout, packing=KVPacking.INTERLEAVED)
    ),
}


def test_the_variations_cover_every_namespace_and_layout_field() -> None:
    namespace_fields = {f.name for f in dataclasses.fields(Namespace) if f.init} - {"layout"}
    layout_fields = {f"layout.{f.name}" for f in dataclasses.fields(KVLayout)}
    assert set(NAMESPACE_VARIATIONS) == namespace_fields | layout_fields


@pytest.mark.parametrize("field", sorted(NAMESPACE_VARIATIONS))
def test_changing_one_namespace_field_changes_the_id_and_every_key(field: str) -> None:
    varied = NAMESPACE_VARIATIONS[field]
    assert varied != VARIED_BASE
    assert varied.canonical_bytes() == reference_canonical_bytes(varied)
    assert varied.namespace_id != VARIED_BASE.namespace_id
    # block_tokens is held at 4 for the chain so that only the namespace id differs.
    original = block_keys(VARIED_BASE.namespace_id, TOKENS, BLOCK_TOKENS)
    changed = block_keys(varied.namespace_id, TOKENS, BLOCK_TOKENS)
    assert all(new != old for new, old in zip(changed, original, strict=True))
    assert key_from_engine_hash(varied.namespace_id, b"e") != key_from_engine_hash(VARIED_BASE.namespace_id, b"e")


def test_every_namespace_variation_has_its_own_id() -> None:
    ids = {namespace.namespace_id for namespace in NAMESPACE_VARIATIONS.values()} | {VARIED_BASE.namespace_id}
    assert len(ids) == len(NAMESPACE_VARIATIONS) + 1


# -- chaining and input forms --------------------------------------------------------------------------


def test_parent_continues_a_chain() -> None:
    namespace_id = make_namespace().namespace_id
    tokens = list(range(100, 114))  # three full blocks and two tokens over
    whole = block_keys(namespace_id, tokens, BLOCK_TOKENS)
    head = block_keys(namespace_id, tokens[:8], BLOCK_TOKENS)
    tail = block_keys(namespace_id, tokens[8:], BLOCK_TOKENS, parent=head[-1])
    assert head + tail == whole
    assert len(whole) == 3
    assert block_keys(namespace_id, tokens[8:], BLOCK_TOKENS) != tail  # without the parent it is a new chain


def test_parent_continues_a_chain_with_extra_keys() -> None:
    namespace_id = make_namespace().namespace_id
    extras = [encode_extra_keys(["a"]), encode_extra_keys(["b"]), encode_extra_keys([3])]
    whole = block_keys(namespace_id, list(range(12)), BLOCK_TOKENS, extra_keys=extras)
    head = block_keys(namespace_id, list(range(8)), BLOCK_TOKENS, extra_keys=extras[:2])
    tail = block_keys(namespace_id, list(range(8, 12)), BLOCK_TOKENS, parent=head[-1], extra_keys=extras[2:])
    assert head + tail == whole


@pytest.mark.parametrize(
    "tokens",
    [
        np.arange(10, dtype=np.int64),
        np.arange(10, dtype=np.uint32),
        np.arange(10, dtype=">u4"),
        np.arange(10, dtype=np.int32),
        np.arange(10, dtype=np.uint64),
        tuple(range(10)),
    ],
    ids=["int64", "uint32", "big-endian-uint32", "int32", "uint64", "tuple"],
)
def test_arrays_and_sequences_give_the_keys_of_the_list(tokens: Any) -> None:
    assert hexes(block_keys(make_namespace().namespace_id, tokens, BLOCK_TOKENS)) == KEYS_HEX


def test_the_largest_token_id_is_accepted_from_a_list_and_an_array() -> None:
    namespace_id = make_namespace().namespace_id
    tokens = [2**32 - 1, 0, 1, 2**31]
    expected = reference_block_keys(namespace_id, tokens, BLOCK_TOKENS)
    assert hexes(block_keys(namespace_id, tokens, BLOCK_TOKENS)) == expected
    assert hexes(block_keys(namespace_id, np.array(tokens, dtype=np.int64), BLOCK_TOKENS)) == expected


def test_fewer_tokens_than_a_block_give_no_keys() -> None:
    namespace_id = make_namespace().namespace_id
    assert block_keys(namespace_id, [1, 2, 3], BLOCK_TOKENS) == []
    assert block_keys(namespace_id, np.array([], dtype=np.int64), BLOCK_TOKENS) == []


# -- bad input ---------------------------------------------------------------------------------------------

NSID = NamespaceId(bytes.fromhex(NAMESPACE_ID_HEX))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: block_keys(NSID, [0, 1, -1, 3], 4), r"tokens must be ints in \[0, 2\*\*32\)"),
        (lambda: block_keys(NSID, [0, 1, 2**32, 3], 4), r"tokens must be ints in \[0, 2\*\*32\)"),
        (lambda: block_keys(NSID, [0, 1, 2.5, 3], 4), r"tokens must be ints"),
        (lambda: block_keys(NSID, np.array([0, -1, 2, 3]), 4), r"token ids must be in \[0, 2\*\*32\)"),
        (lambda: block_keys(NSID, np.array([0, 2**32, 2, 3]), 4), r"token ids must be in \[0, 2\*\*32\)"),
        (lambda: block_keys(NSID, np.zeros((2, 4), dtype=np.int64), 4), r"one-dimensional, got shape \(2, 4\)"),
        (lambda: block_keys(NSID, np.zeros(8, dtype=np.float32), 4), r"must be integers, got dtype float32"),
        (lambda: block_keys(NSID, TOKENS, 0), r"block_tokens must be a positive int, got 0"),
        (lambda: block_keys(NSID, TOKENS, -4), r"block_tokens must be a positive int, got -4"),
        (lambda: block_keys(NSID, TOKENS, True), r"block_tokens must be a positive int, got True"),
        (lambda: block_keys(NSID, TOKENS, 4, extra_keys=[b""]), r"extra_keys has 1 entries but .* make 2 full blocks"),
        (lambda: block_keys(NSID, TOKENS, 4, extra_keys=[b""] * 3), r"extra_keys has 3 entries but .* 2 full blocks"),
        (lambda: block_keys(NamespaceId(b"x" * 15), TOKENS, 4), r"namespace_id must be 16 bytes"),
        (lambda: block_keys(NamespaceId(b"x" * 17), TOKENS, 4), r"namespace_id must be 16 bytes"),
        (lambda: block_keys(NSID, TOKENS, 4, parent=BlockKey(b"p" * 8)), r"parent must be 16 bytes"),
        (lambda: key_from_engine_hash(NamespaceId(b"x" * 15), b"h"), r"namespace_id must be 16 bytes"),
        (lambda: key_from_engine_hash(NSID, b""), r"engine_hash must be non-empty bytes"),
        (lambda: encode_extra_keys([True]), r"bool is not an extra key type"),
        (lambda: encode_extra_keys([2**63]), r"does not fit in 64 bits"),
        (lambda: encode_extra_keys([1.5]), r"must be str, int or bytes"),
    ],
    ids=[
        "negative-token",
        "token-2**32",
        "float-token",
        "negative-token-array",
        "token-2**32-array",
        "2d-array",
        "float-array",
        "block-tokens-0",
        "block-tokens-negative",
        "block-tokens-bool",
        "too-few-extra-keys",
        "too-many-extra-keys",
        "short-namespace-id",
        "long-namespace-id",
        "short-parent",
        "engine-short-namespace-id",
        "empty-engine-hash",
        "bool-extra-key",
        "huge-int-extra-key",
        "float-extra-key",
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(call: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        call()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_namespace(model_id=""), r"model_id must be a non-empty str"),
        (lambda: make_namespace(tp_rank=1, tp_size=1), r"tp_rank must be in \[0, tp_size=1\), got 1"),
        (lambda: make_namespace(tp_rank=-1), r"tp_rank must be in \[0, tp_size=1\), got -1"),
        (lambda: make_namespace(tp_size=0), r"tp_size must be a positive int, got 0"),
        (lambda: make_namespace(block_tokens=0), r"block_tokens must be a positive int, got 0"),
        (lambda: make_namespace(dtype="bfloat16x"), r"dtype must be a DType"),
        (lambda: make_namespace(layout=(2, 4, 16)), r"layout must be a KVLayout"),
        (lambda: make_namespace(tenant_salt=None), r"tenant_salt must be a str"),
        (lambda: KVLayout(0, 4, 16), r"KVLayout.num_layers must be a positive int, got 0"),
        (lambda: KVLayout(2, 0, 16), r"KVLayout.num_kv_heads must be a positive int, got 0"),
        (lambda: KVLayout(2, 4, -16), r"KVLayout.head_size must be a positive int, got -16"),
        (lambda: KVLayout(2, 4, 16, "separate"), r"KVLayout.packing must be a KVPacking"),
    ],
    ids=[
        "empty-model-id",
        "tp-rank-equals-size",
        "negative-tp-rank",
        "tp-size-0",
        "block-tokens-0",
        "dtype-str",
        "layout-tuple",
        "salt-none",
        "num-layers-0",
        "num-kv-heads-0",
        "negative-head-size",
        "packing-str",
    ],
)
def test_bad_namespaces_are_refused_with_a_message_naming_the_field(make: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        make()


# -- canonical encoding and block geometry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "namespace",
    [
        make_namespace(),
        make_namespace(tp_rank=3, tp_size=8, tenant_salt="tenant-é", model_revision=""),
        make_namespace(model_id="模型/7b", dtype=DType.FLOAT8_E4M3, layout=KVLayout(1, 1, 576, KVPacking.LATENT)),
        make_namespace(dtype=DType.FLOAT32, layout=KVLayout(32, 8, 128, KVPacking.INTERLEAVED), block_tokens=16),
    ],
    ids=["base", "tp-and-salt", "unicode-latent", "interleaved"],
)
def test_from_canonical_bytes_round_trips(namespace: Namespace) -> None:
    encoded = namespace.canonical_bytes()
    assert encoded == reference_canonical_bytes(namespace)
    decoded = Namespace.from_canonical_bytes(encoded)
    assert decoded == namespace
    assert decoded.namespace_id == namespace.namespace_id


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex(CANONICAL_HEX) + b"\x00", r"trailing bytes"),
        (bytes.fromhex(CANONICAL_HEX)[:-5], r"malformed namespace encoding"),
        (b"\x02" + bytes.fromhex(CANONICAL_HEX)[1:], r"encoding version 2 is not supported"),
        (b"", r"malformed namespace encoding"),
    ],
    ids=["trailing", "truncated", "version", "empty"],
)
def test_from_canonical_bytes_refuses_malformed_encodings(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Namespace.from_canonical_bytes(data)


@pytest.mark.parametrize(
    ("packing", "shape", "num_bytes"),
    [
        (KVPacking.SEPARATE, (2, 2, 4, 4, 16), 2 * 2 * 4 * 4 * 16 * 2),
        (KVPacking.INTERLEAVED, (2, 4, 4, 32), 2 * 4 * 4 * 32 * 2),
        (KVPacking.LATENT, (2, 4, 16), 2 * 4 * 16 * 2),
    ],
)
def test_block_shape_and_bytes_per_packing(packing: KVPacking, shape: tuple[int, ...], num_bytes: int) -> None:
    namespace = make_namespace(layout=KVLayout(2, 4, 16, packing))
    assert namespace.block_shape == shape
    assert namespace.layout.block_shape(4) == shape
    assert namespace.block_bytes == num_bytes


@pytest.mark.parametrize(("dtype", "itemsize"), [(DType.FLOAT32, 4), (DType.FLOAT8_E5M2, 1), (DType.INT8, 1)])
def test_block_bytes_scale_with_the_dtype(dtype: DType, itemsize: int) -> None:
    assert make_namespace(dtype=dtype).block_bytes == 2 * 2 * 4 * 4 * 16 * itemsize
