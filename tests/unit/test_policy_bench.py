"""The policy benchmark's command line (tools/bench/policy.py) on a tiny trace file."""

from __future__ import annotations

import pytest

from kvstore.trace import TraceRequest, write_trace
from tools.bench.policy import DEFAULT_TRACE, REPO, main, split


def request(minute: float, *ids: int) -> TraceRequest:
    return TraceRequest(int(minute * 60_000), 512 * len(ids), 1, ids)


TRACE = [request(0, 0, 1), request(10, 0, 1, 2), request(31, 0, 1), request(40, 0, 3)]


def test_the_trace_splits_at_the_minute_into_parts_replayed_apart():
    whole, first, rest = split("t", TRACE, 30.0)
    assert whole.requests == TRACE
    assert first.requests == TRACE[:2]
    assert rest.requests == TRACE[2:]
    assert first.name == "t, first 30 min (tune)"
    assert rest.name == "t, last 10 min (judge)"


def test_a_trace_that_ends_before_the_minute_is_reported_whole_only():
    (whole,) = split("t", TRACE, 45.0)
    assert whole.requests == TRACE
    assert whole.name == "t, whole (40 min)"
    assert [part.name for part in split("t", TRACE, 0.0)] == ["t, whole (40 min)"]


def test_the_default_trace_is_the_shared_one_next_to_the_repository():
    assert DEFAULT_TRACE == REPO / "../shared/data/traces/conversation_trace.jsonl"


def test_a_run_prints_the_tables_and_writes_the_plot(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    write_trace(path, TRACE)
    plot = tmp_path / "plot.png"
    main(["--trace", str(path), "--capacities", "2,3", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "### trace, whole (40 min): 4 requests, 9 blocks" in out
    # capacity 2: LRU hits 0, 2 (block 2 finds no room: 0 and 1 are leased), 2, 1 = 5 of 9; so does Belady
    assert "| 2 | leaf-first-lru | 55.56 | 55.56 | 1.00 |" in out
    assert "| 2 | belady (offline optimum) | 55.56 | 55.56 | 1.00 | - |" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_traces_are_reported_each_in_its_parts(tmp_path, capsys):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    write_trace(first, TRACE)
    write_trace(second, TRACE[:2])
    argv = ["--capacities", "2", "--policies", "leaf-first-lru", "--plot", str(tmp_path / "p.png")]
    main(["--trace", str(first), "--trace", str(second), *argv])
    headings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("### ")]
    assert headings == [
        "### first, whole (40 min): 4 requests, 9 blocks",
        "### first, first 30 min (tune): 2 requests, 5 blocks",
        "### first, last 10 min (judge): 2 requests, 4 blocks",
        "### second, whole (10 min): 2 requests, 5 blocks",
    ]


def test_a_negative_split_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--split-minutes must be 0 or more, got -1"):
        main(["--trace", str(tmp_path / "x"), "--split-minutes", "-1"])


def test_a_malformed_trace_stops_with_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]}\nnope\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not JSON"):
        main(["--trace", str(path), "--capacities", "2", "--plot", str(tmp_path / "p.png")])


def test_bad_capacities_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--capacities"):
        main(["--trace", str(tmp_path / "x"), "--capacities", "ten"])


def test_unknown_policies_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"--policies must name store policies .*; unknown: \['mru'\]"):
        main(["--trace", str(tmp_path / "x"), "--policies", "leaf-first-lru,mru"])
