"""The policy's reference points (tools/bench/policy_bounds.py) on traces small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.policy import LeafFirstLRU
from kvstore.trace import TraceRequest, write_trace
from tools.bench.policy_bounds import (
    NEVER,
    AgeClassDensity,
    FrozenMostUsed,
    ReuseProfile,
    WhetherOracleLRU,
    hazard_table,
    hit_density,
    main,
    references,
    replay_ideal,
    reuse_profile,
    turn_gaps,
)
from tools.bench.policy_sim import belady, replay
from tools.traces.generate import TraceParams, generate_trace


def trace(*chains: tuple[int, ...]) -> list[TraceRequest]:
    return [TraceRequest(index * 1000, 512 * len(ids), 1, ids) for index, ids in enumerate(chains)]


def test_the_profile_gives_each_access_its_uses_its_place_and_the_age_of_the_next_use():
    profile = reuse_profile(trace((0, 1), (0, 2), (0, 1)))  # ticks 0..5: 0 1 | 0 2 | 0 1
    assert profile.uses.tolist() == [1, 1, 2, 1, 3, 2]
    assert profile.ends_request.tolist() == [False, True, False, True, False, True]
    assert profile.age.tolist() == [2, 4, 2, NEVER, NEVER, NEVER]


def test_the_hazard_counts_reuses_per_age_among_the_blocks_still_waiting():
    profile = reuse_profile(trace((0, 1), (0, 2), (0, 1)))
    first_uses = hazard_table(profile, edges=(0, 2, 4))[0]  # ticks 0, 1, 3: next uses 2 and 4 later, and never
    assert (first_uses.uses, first_uses.accesses) == (1, 3)
    assert first_uses.reused == pytest.approx(2 / 3)
    # [0, 2): none of 3; [2, 4): 1 of 3 over 2 accesses; [4, ...): 1 of the 2 left, in a bucket 1 wide
    assert first_uses.per_1k == pytest.approx([0.0, 1000 / 3 / 2, 1000 / 2])
    assert first_uses.ever == pytest.approx([2 / 3, 2 / 3, 1 / 2])


def test_hit_density_rises_towards_the_age_of_reuse_and_falls_after_it():
    # ten blocks of one class: five used again exactly 2 accesses later, five never
    ages = np.array([2] * 5 + [NEVER] * 5, dtype=np.int64)
    profile = ReuseProfile(np.ones(10, dtype=np.int8), np.zeros(10, dtype=np.bool_), ages)
    density = hit_density(profile, width=1, buckets=4)[0]
    # at age 0 the best horizon holds 10 + 10 + 10 block-accesses for 5 hits; at 2 only 10
    assert density.tolist() == pytest.approx([5 / 30, 5 / 20, 5 / 10, 0.0])


def test_a_follow_up_turn_is_timed_from_the_turn_it_continues_to_its_own_next():
    # starts at accesses 0, 3, 7, 9; request 2 shares only the root, so it continues nothing
    gaps = turn_gaps(trace((0, 1, 2), (0, 1, 2, 3), (0, 5), (0, 1, 2, 3, 4)))
    assert gaps.previous.tolist() == [3, 6]  # 1 continues 0; 3 continues 1 (its deepest shared block)
    assert gaps.following.tolist() == [6, NEVER]  # 3 reuses block 2 of request 1; nothing reuses block 3 of 3


def test_the_whether_oracle_does_not_store_a_block_never_used_again():
    requests = trace((1,), (2,), (1,))
    profile = reuse_profile(requests)
    assert replay(requests, LeafFirstLRU(), 1).hit_blocks == 0  # 2 pushed 1 out
    assert replay_ideal(requests, WhetherOracleLRU(1, profile)) == 1


def test_the_frozen_set_keeps_the_most_used_blocks_from_their_first_use():
    requests = trace((1,), (2,), (1,), (1,))
    assert replay_ideal(requests, FrozenMostUsed(1, requests)) == 2


def test_no_reference_beats_the_offline_optimum_on_a_generated_trace():
    requests = generate_trace(TraceParams(seed=3, duration_minutes=4.0, num_prefixes=30))
    profile = reuse_profile(requests)
    for capacity in (50, 400):
        found = references(requests, capacity, profile)
        optimum = belady(requests, capacity).hit_blocks
        assert found[0].hit_blocks == optimum
        assert all(0 <= ref.hit_blocks <= optimum for ref in found)
        density = replay_ideal(requests, AgeClassDensity(capacity, profile, width=64, buckets=64))
        assert density <= optimum


def test_a_run_prints_the_hazard_and_the_references(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace((0, 1), (0, 2), (0, 1), (0, 3)))
    main(["--trace", str(path), "--capacities", "2"])
    out = capsys.readouterr().out
    assert "| uses so far | accesses | used again |" in out
    # capacity 2: the optimum keeps 0 and 1 (bypassing 2) and hits 0, 1, 2 and 1 of the 8 blocks
    assert "| 2 | belady (offline optimum) | every block's next use | 50.00 | 1.00 |" in out


def test_bad_capacities_are_refused_by_name(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace((0, 1)))
    with pytest.raises(SystemExit, match="--capacities must be positive"):
        main(["--trace", str(path), "--capacities", "0"])
    with pytest.raises(SystemExit, match="no trace at"):
        main(["--trace", str(tmp_path / "missing.jsonl")])
