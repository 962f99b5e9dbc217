"""`conductor simulate`: a run prints its table; bad input is named and exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conductor.simulate.main import main
from kvstore.trace import TraceRequest, write_trace


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    write_trace(path, [TraceRequest(i * 500, 1024, 4, (i % 2, 10 + i)) for i in range(20)])
    return path


def test_a_run_prints_one_row_per_policy_and_rate(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    code = main(
        [
            "--trace",
            str(trace),
            "--prefill",
            "2",
            "--decode",
            "1",
            "--policy",
            "kv-centric,random",
            "--rate-scale",
            "1,4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| kv-centric") or line.startswith("| random")
    ]
    assert len(rows) == 4
    summaries = json.loads(out.read_text())["summaries"]
    assert {(s["placement"], s["rate_scale"]) for s in summaries} == {
        ("kv-centric", 1.0),
        ("kv-centric", 4.0),
        ("random", 1.0),
        ("random", 4.0),
    }
    assert all(s["requests"] == 20 for s in summaries)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "best"], "unknown placement policies ['best']"),
        (["--rate-scale", "fast"], "--rate-scale must be numbers"),
        (["--rate-scale", "0"], "must be positive"),
        (["--prefill", "0"], "prefill_nodes must be at least 1"),
    ],
)
def test_bad_arguments_are_named(
    trace: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--trace", str(trace), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_malformed_trace_line_is_reported_with_its_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n\n{"timestamp": 1}\n')
    assert main(["--trace", str(path)]) == 2
    assert f"{path}:3: missing field 'input_length'" in capsys.readouterr().err
