"""The synthetic trace generator (tools/traces/generate.py): deterministic, and shaped as promised."""

from __future__ import annotations

from collections import Counter

import pytest

from kvstore.errors import InvalidArgumentError
from kvstore.trace import TRACE_BLOCK_TOKENS, load_trace
from tools.traces.generate import TraceParams, generate_trace, generate_turns, main

SMALL = TraceParams(seed=7, duration_minutes=5.0, session_rate_per_s=2.0, mean_think_s=20.0, num_prefixes=20)


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    assert generate_trace(SMALL) == generate_trace(SMALL)
    other = TraceParams(**{**{f: getattr(SMALL, f) for f in SMALL.__slots__}, "seed": 8})
    assert generate_trace(other) != generate_trace(SMALL)


def test_timestamps_never_go_back_and_stay_within_the_duration():
    times = [request.timestamp_ms for request in generate_trace(SMALL)]
    assert len(times) > 100
    assert times == sorted(times)
    assert times[-1] < SMALL.duration_minutes * 60_000


def test_a_later_turn_extends_its_own_sessions_history():
    last = {}
    num_followups = 0
    for turn in generate_turns(SMALL):
        if turn.session in last:
            earlier = last[turn.session]
            assert turn.request.hash_ids[: len(earlier.hash_ids)] == earlier.hash_ids
            assert turn.request.input_length > earlier.input_length + earlier.output_length
            num_followups += 1
        else:
            assert turn.turn == 0
        last[turn.session] = turn.request
    assert num_followups > 50


def test_block_counts_match_input_lengths():
    for request in generate_trace(SMALL):
        assert len(request.hash_ids) == -(-request.input_length // TRACE_BLOCK_TOKENS)
        assert request.hash_ids[0] == 0


def test_popular_prefixes_are_shared_by_many_sessions_and_ranked_by_zipf():
    first_turns = [turn for turn in generate_turns(SMALL) if turn.turn == 0]
    by_prefix = Counter(turn.prefix for turn in first_turns)
    assert by_prefix[0] > by_prefix[5] > 0  # rank 1 has weight 1, rank 6 about 1/7
    sessions_on_top = [turn.request.hash_ids for turn in first_turns if turn.prefix == 0]
    # they share the prefix's blocks, then each has its own tail
    shared = sessions_on_top[0][: min(map(len, sessions_on_top))]
    common = 0
    while common < len(shared) and all(ids[common] == shared[common] for ids in sessions_on_top):
        common += 1
    assert SMALL.min_prefix_blocks <= common <= SMALL.max_prefix_blocks
    tails = [ids[common:] for ids in sessions_on_top]
    assert len({tail[0] for tail in tails if tail}) == sum(1 for tail in tails if tail)


def test_one_turn_sessions_only_when_mean_turns_is_one():
    params = TraceParams(seed=1, duration_minutes=2.0, mean_turns=1.0)
    assert {turn.turn for turn in generate_turns(params)} == {0}


@pytest.mark.parametrize(
    "bad",
    [
        {"duration_minutes": 0.0},
        {"mean_turns": 0.5},
        {"num_prefixes": 0},
        {"min_prefix_blocks": 4, "max_prefix_blocks": 3},
        {"zipf_exponent": -1.0},
        {"mean_output_tokens": 0},
    ],
)
def test_bad_parameters_are_refused(bad):
    with pytest.raises(InvalidArgumentError):
        generate_trace(TraceParams(**bad))


def test_the_command_line_writes_a_trace_the_loader_reads(tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    main(["--out", str(out), "--seed", "3", "--minutes", "1", "--num-prefixes", "5"])
    params = TraceParams(seed=3, duration_minutes=1.0, num_prefixes=5)
    assert load_trace(out) == generate_trace(params)
    assert f"to {out}" in capsys.readouterr().out
