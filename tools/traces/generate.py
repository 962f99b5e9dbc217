"""A synthetic request trace generator, so cache policies are judged on more than one trace.

The model, every part of it seeded from one numpy Generator (same parameters, same trace):

- Sessions start as a Poisson process (`session_rate_per_s`).
- Each session opens with one of `num_prefixes` shared prefixes (a system prompt, a tool
  manifest, a document), picked with Zipf popularity (rank k has weight 1 / k**`zipf_exponent`).
  Prefix depths vary uniformly between `min_prefix_blocks` and `max_prefix_blocks`; all share
  block 0, as Mooncake's traces do.
- The first turn adds a one-off tail of the user's own blocks after the prefix.
- A session has a geometric number of turns (mean `mean_turns`; one-turn sessions are the
  one-off requests). Turn k+1 comes an exponential think time after turn k and extends the
  history: its prompt is turn k's prompt + turn k's output + a new user message, so its hash ids
  start with turn k's.
- Token counts (tails, messages, outputs) are lognormal around their means. A prompt's blocks
  are ceil(input_length / 512); the partial last block keeps its id when the next turn fills it,
  a simplification (a real block key changes when its tokens do).

Requests past `duration_minutes` are dropped, so the trace ends with sessions mid-way, as a cut
from a live service would. Run it as `python -m tools.traces.generate --out FILE --seed N`.
"""

from __future__ import annotations

import argparse
import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kvstore.errors import InvalidArgumentError
from kvstore.trace import TRACE_BLOCK_TOKENS, TraceRequest, write_trace


@dataclass(frozen=True, slots=True)
class TraceParams:
    """What the generated workload looks like. The defaults give about the request rate of
    Mooncake's conversation trace (3-4 per second) but far more reuse: it is not fitted to it."""

    seed: int = 0
    duration_minutes: float = 30.0  # length of the trace
    session_rate_per_s: float = 1.5  # Poisson rate of new sessions
    mean_turns: float = 2.5  # geometric turns per session (>= 1); 1.0 makes every request one-off
    mean_think_s: float = 60.0  # exponential gap between a turn's arrival and the next turn's
    num_prefixes: int = 200  # distinct shared prefixes
    zipf_exponent: float = 1.1  # popularity skew of the prefixes (0 = uniform)
    min_prefix_blocks: int = 1  # shallowest shared prefix, in 512-token blocks (block 0 included)
    max_prefix_blocks: int = 16  # deepest shared prefix
    mean_tail_tokens: int = 2000  # the first turn's one-off tail after the prefix
    mean_message_tokens: int = 300  # each later turn's new user message
    mean_output_tokens: int = 400  # each turn's output, which the next turn's prompt includes
    spread: float = 0.8  # sigma of the lognormal token counts

    def validate(self) -> None:
        """InvalidArgumentError naming the first field out of range."""
        positive = ("duration_minutes", "session_rate_per_s", "mean_think_s", "spread")
        for name in positive:
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mean_turns < 1:
            raise InvalidArgumentError(f"mean_turns must be at least 1, got {self.mean_turns}")
        if self.num_prefixes < 1 or self.min_prefix_blocks < 1:
            raise InvalidArgumentError("num_prefixes and min_prefix_blocks must be at least 1")
        if self.max_prefix_blocks < self.min_prefix_blocks:
            raise InvalidArgumentError(
                f"max_prefix_blocks ({self.max_prefix_blocks}) < min_prefix_blocks ({self.min_prefix_blocks})"
            )
        if self.zipf_exponent < 0:
            raise InvalidArgumentError(f"zipf_exponent must not be negative, got {self.zipf_exponent}")
        for name in ("mean_tail_tokens", "mean_message_tokens", "mean_output_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Turn:
    """A generated request and where it came from (for tests and analysis; the trace file
    keeps only the request)."""

    session: int
    turn: int
    prefix: int  # index of the shared prefix, 0 = most popular
    request: TraceRequest


class _Ids:
    """Fresh block ids; 0 is the root every prompt starts with."""

    def __init__(self) -> None:
        self._next = 1

    def take(self, count: int) -> tuple[int, ...]:
        first = self._next
        self._next += count
        return tuple(range(first, first + count))


def generate_turns(params: TraceParams) -> list[Turn]:
    """The whole trace, in arrival order (ties in session order)."""
    params.validate()
    rng = np.random.default_rng(params.seed)
    ids = _Ids()
    prefixes = _make_prefixes(params, rng, ids)
    ranks = np.arange(1, params.num_prefixes + 1, dtype=np.float64)
    weights = (ranks**-params.zipf_exponent).astype(np.float64)
    weights /= weights.sum()
    end_ms = params.duration_minutes * 60_000
    sessions = _session_starts(params, rng, end_ms)
    # Sessions are generated one after another (so each draws its numbers in a fixed order) and
    # their turns merged by time; a heap keeps the merge O(n log sessions).
    per_session = [
        list(_session(params, rng, ids, session, start_ms, prefixes, weights, end_ms))
        for session, start_ms in enumerate(sessions)
    ]
    return list(heapq.merge(*per_session, key=lambda turn: (turn.request.timestamp_ms, turn.session)))


def generate_trace(params: TraceParams) -> list[TraceRequest]:
    """The requests of `generate_turns`, ready for `write_trace`."""
    return [turn.request for turn in generate_turns(params)]


def _make_prefixes(params: TraceParams, rng: np.random.Generator, ids: _Ids) -> list[tuple[int, ...]]:
    depths = rng.integers(params.min_prefix_blocks, params.max_prefix_blocks + 1, size=params.num_prefixes)
    return [(0, *ids.take(int(depth) - 1)) for depth in depths]


def _session_starts(params: TraceParams, rng: np.random.Generator, end_ms: float) -> list[float]:
    mean_gap_ms = 1000.0 / params.session_rate_per_s
    expected = int(end_ms / mean_gap_ms * 1.2) + 16
    starts = np.cumsum(rng.exponential(mean_gap_ms, size=expected))
    while starts[-1] < end_ms:  # rare: the draw ran short of the duration
        more = starts[-1] + np.cumsum(rng.exponential(mean_gap_ms, size=expected))
        starts = np.concatenate([starts, more])
    return [float(value) for value in starts[starts < end_ms]]


def _session(
    params: TraceParams,
    rng: np.random.Generator,
    ids: _Ids,
    session: int,
    start_ms: float,
    prefixes: list[tuple[int, ...]],
    weights: npt.NDArray[np.float64],
    end_ms: float,
) -> Iterator[Turn]:
    prefix = int(rng.choice(len(prefixes), p=weights))
    num_turns = int(rng.geometric(1.0 / params.mean_turns))
    history = prefixes[prefix]
    input_length = len(history) * TRACE_BLOCK_TOKENS + _tokens(rng, params.mean_tail_tokens, params.spread)
    output_length = 0
    at_ms = start_ms
    for turn in range(num_turns):
        if at_ms >= end_ms:
            return
        if turn:
            input_length += output_length + _tokens(rng, params.mean_message_tokens, params.spread)
            at_ms += rng.exponential(params.mean_think_s * 1000.0)
            if at_ms >= end_ms:
                return
        blocks = math.ceil(input_length / TRACE_BLOCK_TOKENS)
        history = history + ids.take(blocks - len(history))
        output_length = _tokens(rng, params.mean_output_tokens, params.spread)
        yield Turn(session, turn, prefix, TraceRequest(int(at_ms), input_length, output_length, history))


def _tokens(rng: np.random.Generator, mean: int, spread: float) -> int:
    """A lognormal count with the given mean, at least 1."""
    mu = math.log(mean) - spread**2 / 2
    return max(1, int(rng.lognormal(mu, spread)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="trace file to write (JSON lines)")
    defaults = TraceParams()
    for field in fields(TraceParams):
        name = "--minutes" if field.name == "duration_minutes" else "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        parser.add_argument(name, dest=field.name, type=type(default), default=default, help=f"default {default}")
    args = parser.parse_args(argv)
    params = TraceParams(**{field.name: getattr(args, field.name) for field in fields(TraceParams)})
    try:
        requests = generate_trace(params)
    except InvalidArgumentError as error:
        parser.error(str(error))
    write_trace(args.out, requests)
    blocks = sum(len(request.hash_ids) for request in requests)
    print(f"wrote {len(requests)} requests ({blocks} blocks) to {args.out}")


if __name__ == "__main__":
    main()
