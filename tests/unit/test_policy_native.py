"""prefix-lrfu's compiled access and eviction (kvstore/_lrfu.c) against its Python loops: the
same numbers bit for bit over whole replays, and bad input refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.policy import PrefixLRFU, prefix_lrfu
from kvstore.policy.simulated import SimulatedTier
from tools.traces.generate import TraceParams, generate_trace

native_access = prefix_lrfu.native_access
native_evict = prefix_lrfu.native_evict
native_adopt = prefix_lrfu.native_adopt
pytestmark = pytest.mark.skipif(native_access is None, reason="kvstore/_lrfu.c was not compiled here")

TRACE = generate_trace(TraceParams(seed=7, duration_minutes=6.0, num_prefixes=40))


def replay(capacity: int, scale_factor: float) -> tuple[list[int], PrefixLRFU]:
    policy = PrefixLRFU(scale_factor=scale_factor)
    tier = SimulatedTier(policy, capacity)
    return [tier.serve(request.hash_ids) for request in TRACE], policy


@pytest.mark.parametrize("capacity", [150, 2000])
@pytest.mark.parametrize("scale_factor", [4.0, 0.02])  # 0.02: a short time scale, so weights are rebased often
def test_a_replay_is_the_same_compiled_or_not(monkeypatch, capacity, scale_factor):
    compiled_hits, compiled = replay(capacity, scale_factor)
    monkeypatch.setattr(prefix_lrfu, "native_access", None)
    monkeypatch.setattr(prefix_lrfu, "native_evict", None)
    monkeypatch.setattr(prefix_lrfu, "native_adopt", None)
    python_hits, python = replay(capacity, scale_factor)

    assert sum(python_hits) > 0  # blocks were reused, evicted and came back: every path ran
    assert compiled_hits == python_hits
    for name in ("_weight", "_last", "_incarnation", "_intervals", "_history_tag", "_history_weight", "_history_last"):
        assert np.array_equal(getattr(compiled, name), getattr(python, name)), name
    assert (compiled._clock, compiled._origin, compiled._samples) == (python._clock, python._origin, python._samples)
    assert compiled.time_scale == python.time_scale


def state(rows: int = 8) -> list[np.ndarray]:
    return [
        np.zeros(rows, dtype=np.uint32),  # mine
        np.zeros(rows, dtype=np.uint32),  # current
        np.zeros(rows, dtype=np.float32),  # weight
        np.zeros(rows, dtype=np.float32),  # last
        np.zeros(64, dtype=np.float64),  # histogram
    ]


def test_a_row_out_of_range_is_refused_before_anything_is_written():
    assert native_access is not None
    arrays = state()
    with pytest.raises(IndexError, match="row 8 is outside the policy's 8 rows"):
        native_access(np.array([1, 8], dtype=np.int64), *arrays, 10.0, 1.0, 1.5)
    assert not any(array.any() for array in arrays)


def test_buffers_of_the_wrong_type_are_refused():
    assert native_access is not None
    mine, current, weight, last, histogram = state()
    with pytest.raises(ValueError, match="histogram 64 float64 buckets"):
        native_access(np.array([1], dtype=np.int64), mine, current, weight, last, histogram[:10], 10.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="must cover the same rows"):  # float64 weights
        native_access(
            np.array([1], dtype=np.int64), mine, current, weight.astype(np.float64), last, histogram, 1.0, 1.0, 1.5
        )
    assert not last.any() and not histogram.any()
    with pytest.raises(TypeError):  # read-only weights
        weight.flags.writeable = False
        native_access(np.array([1], dtype=np.int64), mine, current, weight, last, histogram, 10.0, 1.0, 1.5)


def test_a_row_that_holds_another_block_asks_for_adoption_and_changes_nothing():
    assert native_access is not None
    mine, current, weight, last, histogram = state()
    current[3] = 1
    assert native_access(np.array([2, 3], dtype=np.int64), mine, current, weight, last, histogram, 10.0, 1.0, 1.5) == -1
    assert not weight.any() and not last.any()
    mine[3] = 1
    last[2] = 4.0  # accessed before: one reuse interval, 11 - 4 = 7, in bucket 2
    assert native_access(np.array([2, 3], dtype=np.int64), mine, current, weight, last, histogram, 10.0, 1.0, 1.5) == 1
    assert weight[2] == 1.5 and weight[3] == 2.25 and last[2] == 11.0 and last[3] == 12.0
    assert histogram[2] == 1.0 and histogram.sum() == 1.0


def history(size: int = 16) -> list[np.ndarray]:
    return [np.zeros(size, dtype=np.uint32), np.zeros(size, dtype=np.float32), np.zeros(size, dtype=np.float32)]


def test_evict_keeps_only_last_copies_of_known_rows_in_the_history():
    assert native_evict is not None
    mine, current, weight, last, _ = state(4)
    mine[:] = current[:] = 1
    current[2] = 2  # row 2 holds another block now: not the policy's to remember
    weight[:] = [1.0, 2.0, 3.0, 4.0]
    last[:] = [5.0, 6.0, 7.0, 8.0]
    slot = np.full((4, 3), 0xFFFFFFFF, dtype=np.uint32)
    slot[:, 1] = 0  # every row in tier 1 ...
    slot[1, 2] = 0  # ... row 1 also in tier 2: leaving tier 1 is not leaving
    keys = [np.random.default_rng(row).bytes(16) for row in range(4)]  # hash-like, as block keys are
    tags, kept_weight, kept_last = history(1 << 16)

    left = native_evict(
        np.array([0, 1, 2, 3], dtype=np.int64),
        1,
        3,
        mine,
        current,
        slot,
        keys,
        weight,
        last,
        tags,
        kept_weight,
        kept_last,
    )

    assert left == 2 and list(mine) == [0, 1, 1, 0]
    assert sorted(kept_weight[tags != 0]) == [1.0, 4.0] and sorted(kept_last[tags != 0]) == [5.0, 8.0]


def test_evict_refuses_a_row_out_of_range_or_a_bad_key_before_writing():
    assert native_evict is not None
    mine, current, weight, last, _ = state(4)
    slot = np.full((4, 3), 0xFFFFFFFF, dtype=np.uint32)
    arrays = history()
    with pytest.raises(IndexError, match="row 4 is outside"):
        native_evict(
            np.array([0, 4], dtype=np.int64), 1, 3, mine, current, slot, [b"k" * 16] * 4, weight, last, *arrays
        )
    with pytest.raises(ValueError, match="the key of row 1 is not 16 bytes"):
        native_evict(
            np.array([0, 1], dtype=np.int64),
            1,
            3,
            mine,
            current,
            slot,
            [b"k" * 16, b"short", None, None],
            weight,
            last,
            *arrays,
        )
    with pytest.raises(ValueError, match="the tier one of the slot table's tiers"):
        native_evict(np.array([0], dtype=np.int64), 3, 3, mine, current, slot, [None] * 4, weight, last, *arrays)
    assert not any(array.any() for array in arrays)


def test_adopt_resumes_an_evicted_block_from_the_history_and_starts_a_new_one_from_nothing():
    assert native_adopt is not None and native_evict is not None
    mine, current, weight, last, _ = state(4)
    mine[:] = current[:] = 1
    weight[:] = [1.0, 2.0, 3.0, 4.0]
    last[:] = [5.0, 6.0, 7.0, 8.0]
    slot = np.full((4, 1), 0xFFFFFFFF, dtype=np.uint32)
    keys = [np.random.default_rng(row).bytes(16) for row in range(4)]
    arrays = history(1 << 16)
    native_evict(np.array([1, 2], dtype=np.int64), 0, 1, mine, current, slot, keys, weight, last, *arrays)
    current[1:3] = 2  # rows 1 and 2 hold blocks again: row 1 its old one, row 2 a block never seen
    keys[2] = np.random.default_rng(99).bytes(16)

    adopted = native_adopt(np.array([0, 1, 2], dtype=np.int64), mine, current, keys, weight, last, *arrays)

    assert adopted == 2 and list(mine) == [1, 2, 2, 1]
    assert list(weight) == [1.0, 2.0, 0.0, 4.0] and list(last) == [5.0, 6.0, 0.0, 8.0]
    tags = arrays[0]
    assert np.count_nonzero(tags) == 1  # row 1's entry was taken; row 2's old block's stays


def test_adopt_refuses_a_row_out_of_range_or_a_bad_key_before_writing():
    assert native_adopt is not None
    mine, current, weight, last, _ = state(4)
    current[:] = 1
    arrays = history()
    with pytest.raises(IndexError, match="adopt: row 4 is outside"):
        native_adopt(np.array([0, 4], dtype=np.int64), mine, current, [None] * 4, weight, last, *arrays)
    with pytest.raises(ValueError, match="adopt: the key of row 1 is not 16 bytes"):
        native_adopt(
            np.array([0, 1], dtype=np.int64), mine, current, [None, b"short", None, None], weight, last, *arrays
        )
    with pytest.raises(ValueError, match="a power of two"):
        native_adopt(np.array([0], dtype=np.int64), mine, current, [None] * 4, weight, last, *history(12))
    assert not mine.any() and not weight.any() and not any(array.any() for array in arrays)
