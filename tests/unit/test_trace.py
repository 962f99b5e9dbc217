"""Reading and writing Mooncake-format traces (kvstore/trace.py)."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgumentError, TraceFormatError
from kvstore.trace import TraceRequest, iter_trace, load_trace, write_trace

GOOD = '{"timestamp": 0, "input_length": 1000, "output_length": 7, "hash_ids": [0, 1]}'


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_written_trace_reads_back_equal(tmp_path):
    requests = [TraceRequest(0, 1000, 7, (0, 1)), TraceRequest(5, 600, 0, ()), TraceRequest(5, 1500, 3, (0, 1, 2))]
    path = tmp_path / "out.jsonl"
    write_trace(path, requests)
    assert load_trace(path) == requests
    assert list(iter_trace(str(path))) == requests


def test_mooncake_fields_map_to_the_request(tmp_path):
    path = write_lines(
        tmp_path, '{"timestamp": 3000, "input_length": 13544, "output_length": 71, "hash_ids": [0, 219, 220]}'
    )
    assert load_trace(path) == [TraceRequest(3000, 13544, 71, (0, 219, 220))]


def test_blank_lines_and_extra_fields_are_tolerated(tmp_path):
    path = write_lines(
        tmp_path,
        "",
        GOOD,
        "   ",
        '{"timestamp": 9, "input_length": 5, "output_length": 1, "hash_ids": [0], "model": "x", "extra": [1]}',
        "",
    )
    assert load_trace(path) == [TraceRequest(0, 1000, 7, (0, 1)), TraceRequest(9, 5, 1, (0,))]


@pytest.mark.parametrize(
    ("bad_line", "complaint"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"input_length": 1, "output_length": 1, "hash_ids": []}', "missing field 'timestamp'"),
        ('{"timestamp": 1, "output_length": 1, "hash_ids": []}', "missing field 'input_length'"),
        ('{"timestamp": 1, "input_length": 1, "hash_ids": []}', "missing field 'output_length'"),
        ('{"timestamp": 1, "input_length": 1, "output_length": 1}', "missing field 'hash_ids'"),
        ('{"timestamp": "1", "input_length": 1, "output_length": 1, "hash_ids": []}', "'timestamp' must be an integer"),
        ('{"timestamp": 1.5, "input_length": 1, "output_length": 1, "hash_ids": []}', "'timestamp' must be an integer"),
        (
            '{"timestamp": 1, "input_length": true, "output_length": 1, "hash_ids": []}',
            "'input_length' must be an integer",
        ),
        (
            '{"timestamp": 1, "input_length": -4, "output_length": 1, "hash_ids": []}',
            "'input_length' must not be negative",
        ),
        (
            '{"timestamp": 1, "input_length": 1, "output_length": -1, "hash_ids": []}',
            "'output_length' must not be negative",
        ),
        ('{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": 3}', "'hash_ids' must be a list"),
        (
            '{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [0, "a"]}',
            "hash_ids[1] must be a non-negative",
        ),
        (
            '{"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [0, -2]}',
            "hash_ids[1] must be a non-negative",
        ),
    ],
)
def test_a_malformed_line_is_rejected_with_its_number(tmp_path, bad_line, complaint):
    path = write_lines(tmp_path, GOOD, "", bad_line, GOOD)
    with pytest.raises(TraceFormatError) as raised:
        load_trace(path)
    assert f"{path}:3: " in str(raised.value)
    assert complaint in str(raised.value)


def test_time_going_backwards_is_rejected(tmp_path):
    path = write_lines(
        tmp_path,
        '{"timestamp": 10, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 10, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
        '{"timestamp": 9, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
    )
    with pytest.raises(TraceFormatError, match=r":3: timestamp 9 ms goes back \(the line before had 10 ms\)"):
        load_trace(path)


def test_the_lazy_reader_yields_the_good_lines_before_a_bad_one(tmp_path):
    path = write_lines(tmp_path, GOOD, "oops")
    requests = iter_trace(path)
    assert next(requests) == TraceRequest(0, 1000, 7, (0, 1))
    with pytest.raises(TraceFormatError, match=":2: not JSON"):
        next(requests)


def test_a_trace_error_is_an_invalid_argument():
    assert issubclass(TraceFormatError, InvalidArgumentError)
    assert issubclass(TraceFormatError, ValueError)
