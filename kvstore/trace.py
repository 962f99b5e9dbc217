"""Request traces in Mooncake's format: one JSON object per line, read and written.

A line is `{"timestamp": 3000, "input_length": 13544, "output_length": 71, "hash_ids": [0, 219]}`:
milliseconds since the trace started, prompt and output lengths in tokens, and one id per
512-token block of the prompt. Ids are chained, as block keys are: an equal run of leading ids
means an equal run of leading tokens. The policy benchmark (tools/bench/policy.py) and the trace
generator (tools/traces/generate.py) use this module; the store itself does not.

Reading is strict where a mistake would silently change a result (a wrong type, a negative
length, time going backwards) and lenient where the format grows: blank lines are skipped and
unknown fields ignored. Every error names the file and the 1-based line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from kvstore.errors import TraceFormatError

TRACE_BLOCK_TOKENS = 512
"""Tokens per hash id in Mooncake's traces."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. `hash_ids` are the prompt's blocks, root first."""

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        """The request as one line of the trace format (no newline)."""
        return json.dumps(
            {
                "timestamp": self.timestamp_ms,
                "input_length": self.input_length,
                "output_length": self.output_length,
                "hash_ids": list(self.hash_ids),
            }
        )


def iter_trace(path: Path | str) -> Iterator[TraceRequest]:
    """The requests of a trace file in order, read lazily; TraceFormatError on a bad line."""
    path = Path(path)
    previous_ms = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            request = _parse_line(line, path, number)
            if request.timestamp_ms < previous_ms:
                raise TraceFormatError(
                    f"{path}:{number}: timestamp {request.timestamp_ms} ms goes back "
                    f"(the line before had {previous_ms} ms)"
                )
            previous_ms = request.timestamp_ms
            yield request


def load_trace(path: Path | str) -> list[TraceRequest]:
    """Every request of a trace file; TraceFormatError on a bad line (nothing is returned)."""
    return list(iter_trace(path))


def write_trace(path: Path | str, requests: Iterable[TraceRequest]) -> None:
    """Write `requests` as a trace file that `load_trace` reads back equal."""
    with Path(path).open("w", encoding="utf-8") as out:
        for request in requests:
            out.write(request.to_json())
            out.write("\n")


def _parse_line(line: str, path: Path, number: int) -> TraceRequest:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TraceFormatError(f"{where}: not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    timestamp = _count(record, "timestamp", where)
    input_length = _count(record, "input_length", where)
    output_length = _count(record, "output_length", where)
    if "hash_ids" not in record:
        raise TraceFormatError(f"{where}: missing field 'hash_ids'")
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list):
        raise TraceFormatError(f"{where}: 'hash_ids' must be a list of integers, got {type(hash_ids).__name__}")
    for position, value in enumerate(hash_ids):
        if not _is_int(value) or value < 0:
            raise TraceFormatError(f"{where}: hash_ids[{position}] must be a non-negative integer, got {value!r}")
    return TraceRequest(timestamp, input_length, output_length, tuple(hash_ids))


def _count(record: dict[str, object], field: str, where: str) -> int:
    """A required non-negative integer field."""
    if field not in record:
        raise TraceFormatError(f"{where}: missing field {field!r}")
    value = record[field]
    if not _is_int(value):
        raise TraceFormatError(f"{where}: {field!r} must be an integer, got {value!r}")
    if value < 0:
        raise TraceFormatError(f"{where}: {field!r} must not be negative, got {value}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    """An integer that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
