"""The shared index against a model of what a node holds: a reader's answer is the node's
answer or None ("ask the node"), never a wrong one, also while the writer rewrites buckets."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidArgumentError
from kvstore.shared_index import (
    IndexReader,
    IndexWriter,
    buckets_for,
    namespace_tag,
    native_probe,
    segment_bytes,
    supported,
)
from kvstore.tiers.dram import native_copy_blocks
from kvstore.types import BlockKey, LookupResult, NamespaceId, TierKind

pytestmark = pytest.mark.skipif(not supported(), reason="the shared index is published on x86-64 only")

NAMESPACES = (NamespaceId(b"A" * 16), NamespaceId(b"B" * 16))
PROBES = [
    pytest.param(False, id="numpy"),
    pytest.param(True, id="compiled", marks=pytest.mark.skipif(native_probe is None, reason="not compiled here")),
]


def _key(i: int) -> BlockKey:
    # Every key homes in bucket i % 4 of a 4-bucket index: overflow comes quickly.
    return BlockKey((i % 4).to_bytes(8, "little") + i.to_bytes(8, "little"))


@pytest.fixture(params=PROBES)
def native(request):
    return request.param


@pytest.fixture
def index(request, native):
    name = f"kvstore-test-{os.getpid()}-{request.node.name[:40]}.index"
    writer = IndexWriter(name, getattr(request, "param", 4))
    reader = IndexReader(name, native=native)
    assert reader.native is native
    yield writer, reader
    reader.close()
    writer.close()


def _expected(held: dict[BlockKey, tuple[NamespaceId, TierKind]], namespace: NamespaceId, chain) -> LookupResult:
    tiers = []
    for key in chain:
        entry = held.get(key)
        if entry is None or entry[0] != namespace:
            break
        tiers.append(entry[1])
    return LookupResult(len(tiers), tuple(tiers))


operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 39), st.sampled_from(NAMESPACES), st.sampled_from(list(TierKind))),
    max_size=60,
)


@pytest.mark.parametrize("native", PROBES)
@settings(max_examples=60, deadline=None)
@given(operations=operations, chains=st.lists(st.lists(st.integers(0, 39), max_size=12), min_size=1, max_size=8))
def test_an_answer_is_the_nodes_answer_or_none(native, operations, chains):
    name = f"kvstore-test-{os.getpid()}-model.index"
    writer, reader = IndexWriter(name, 4), None
    try:
        reader = IndexReader(name, native=native)
        held: dict[BlockKey, tuple[NamespaceId, TierKind]] = {}
        for insert, i, owner, tier in operations:
            key = _key(i)
            if insert and (key not in held or held[key][0] == owner):
                writer.upsert(key, namespace_tag(owner), tier, 7)
                held[key] = (owner, tier)
            elif not insert:
                writer.remove(key)
                held.pop(key, None)
            for chain in chains:
                keys = [_key(i) for i in chain]
                for namespace in NAMESPACES:
                    answer = reader.lookup(namespace, keys)
                    if answer is not None:
                        assert answer == _expected(held, namespace, keys)
    finally:
        if reader is not None:
            reader.close()
        writer.close()


@pytest.mark.parametrize("index", [1024], indirect=True)
def test_a_roomy_index_answers_hits_and_misses_itself(index):
    writer, reader = index
    keys = [BlockKey(os.urandom(16)) for _ in range(40)]
    for key in keys[:30]:
        writer.upsert(key, namespace_tag(NAMESPACES[0]), TierKind.DRAM, 1)
    writer.upsert(keys[5], namespace_tag(NAMESPACES[0]), TierKind.NVME, 0xFFFFFFFF)
    expected_tiers = (TierKind.DRAM,) * 5 + (TierKind.NVME,) + (TierKind.DRAM,) * 24
    assert reader.lookup(NAMESPACES[0], keys) == LookupResult(30, expected_tiers)
    assert reader.lookup(NAMESPACES[1], keys) == LookupResult(0, ())  # another namespace: a miss
    writer.remove(keys[10])
    assert reader.lookup(NAMESPACES[0], keys) == LookupResult(10, expected_tiers[:10])
    assert reader.lookup(NAMESPACES[0], []) == LookupResult(0, ())


def test_a_full_neighbourhood_makes_the_index_incomplete_and_readers_ask(index):
    writer, reader = index  # 4 buckets of 4 entries: 16 keys at most
    keys = [_key(i) for i in range(20)]
    for key in keys:
        writer.upsert(key, namespace_tag(NAMESPACES[0]), TierKind.DRAM, 1)
    assert not writer.complete and len(writer) == 16
    assert reader.lookup(NAMESPACES[0], keys[:3]) is None


def test_bad_keys_get_the_nodes_error(index):
    _, reader = index
    with pytest.raises(InvalidArgumentError, match="16 bytes"):
        reader.lookup(NAMESPACES[0], [b"short"])


def test_readers_map_the_index_read_only(index):
    _, reader = index
    with pytest.raises(ValueError, match="read-only"):
        reader._words[0, 0] = 1  # the mapping itself is what is tested


def test_a_segment_that_is_not_an_index_is_refused(tmp_path):
    name = f"kvstore-test-{os.getpid()}-garbage.index"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as file:
        file.write(b"x" * segment_bytes(4))
    try:
        with pytest.raises(ValueError, match="not a version 1 kvstore index"):
            IndexReader(name)
    finally:
        os.unlink(path)


def test_bucket_counts_keep_the_index_half_empty():
    assert buckets_for(1) == 1
    assert buckets_for(1000) == 512  # 2048 entries for 1000 keys
    assert buckets_for(1025) == 1024


def _read_while_churning(
    name: str, native: bool, stable: list[bytes], churned: list[bytes], never: list[bytes], out
) -> None:
    reader = IndexReader(name, native=native)
    wrong = answered = 0
    chain = [BlockKey(key) for key in stable + never]
    for _ in range(3000):
        for keys, expect in ((chain, len(stable)), ([BlockKey(k) for k in churned + never], None)):
            answer = reader.lookup(NAMESPACES[0], keys)
            if answer is None:
                continue
            answered += 1
            limit = len(churned) if expect is None else expect
            if (expect is not None and answer.num_hits != expect) or answer.num_hits > limit:
                wrong += 1
    reader.close()
    out.put((wrong, answered))


def test_no_wrong_answer_while_the_writer_rewrites_buckets(native):
    name = f"kvstore-test-{os.getpid()}-churn.index"
    writer = IndexWriter(name, 64)
    rng = np.random.default_rng(0)
    stable = [bytes(rng.bytes(16)) for _ in range(20)]
    churned = [bytes(rng.bytes(16)) for _ in range(20)]
    never = [bytes(rng.bytes(16)) for _ in range(4)]
    tag = namespace_tag(NAMESPACES[0])
    for key in stable:
        writer.upsert(BlockKey(key), tag, TierKind.DRAM, 1)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    reader = context.Process(target=_read_while_churning, args=(name, native, stable, churned, never, out))
    reader.start()
    try:
        while reader.is_alive():
            for key in churned:
                writer.upsert(BlockKey(key), tag, TierKind.NVME, 0xFFFFFFFF)
                writer.upsert(BlockKey(key), tag, TierKind.DRAM, 3)
            for key in churned:
                writer.remove(BlockKey(key))
            reader.join(0)
        wrong, answered = out.get(timeout=60)
    finally:
        reader.join(10)
        writer.close()
    assert answered > 0
    assert wrong == 0


@pytest.mark.skipif(native_copy_blocks is None, reason="not compiled here")
def test_the_compiled_copy_copies_each_block_and_checks_everything_first():
    assert native_copy_blocks is not None
    source = np.arange(1 << 16, dtype=np.uint8)
    dests = [np.zeros(4096, np.uint8) for _ in range(3)]
    native_copy_blocks(source, np.array([0, 8192, 4096], np.int64), 4096, dests)
    for dest, start in zip(dests, (0, 8192, 4096), strict=True):
        np.testing.assert_array_equal(dest, source[start : start + 4096])
    untouched = [np.full(4096, 7, np.uint8), np.full(4096, 7, np.uint8)]
    for offsets, size, match in [
        ([0, -1], 4096, "block 1 at offset -1"),
        ([0, (1 << 16) - 10], 4096, "does not lie in the source"),
        ([0, 0], 4000, "destination 0 has 4096 bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            native_copy_blocks(source, np.array(offsets, np.int64), size, untouched)
        assert all((dest == 7).all() for dest in untouched)  # nothing copied before every check passed
    read_only = np.zeros(4096, np.uint8)
    read_only.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        native_copy_blocks(source, np.array([0], np.int64), 4096, [read_only])
