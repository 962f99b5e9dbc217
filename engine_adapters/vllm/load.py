"""The engine's load, which the connector reports to its node for the conductor (`ReportLoad`;
docs/conductor.md, Load).

vLLM does not hand a connector its queues, but the scheduler side holds every request it was
asked about (`get_num_new_matched_tokens`: each request the scheduler takes up from its waiting
queue) until it finishes, and sees every step (`build_connector_meta`). At each step, and
when a request finishes (no step may follow soon), `LoadTracker` works out from those requests:

- queued prefill tokens: prompt tokens not computed yet, over the requests taken up and not
  finished (a preempted request counts in full again). Requests still waiting behind the
  scheduler's budgets have not been shown to the connector and are not counted;
- running decodes and their KV: the requests whose prompt is computed, and their computed tokens;
- with `tbt_slo_s` set, the decode pause budget: the longest pause after which every decoding
  request still averages within the SLO over its tokens so far, one more step included. With
  n tokens generated, the first `first_s` ago, and a step of `step_s`, that is
  `slo * n - first_s - step_s`, the least over the requests (never below 0), the step the
  average interval between recent steps. With no request decoding the batch holds nothing
  back: IDLE_BUDGET_S. Without an SLO (0) the budget is 0, which the conductor reads as
  unknown: it places no prefill on this engine's batch.

`LoadReporter` sends the latest load from its own thread every `load_report_interval_s`, so a
slow or absent node never holds up the scheduler; failures are logged as the other node calls'.

Owner: the connector's scheduler side (vLLM's scheduler thread); the reporter's thread only
reads the latest load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from engine_adapters.vllm.node import NODE_ERRORS, NodeErrorLog
from kvstore.client import Client
from kvstore.types import EngineLoad

log = logging.getLogger(__name__)

IDLE_BUDGET_S = 60.0  # reported when no request decodes: a pause delays nobody's tokens
STEP_SMOOTHING = 0.2  # weight of the newest step interval in the moving average


class LoadTracker:
    def __init__(self, tbt_slo_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._tbt_slo_s = tbt_slo_s
        self._clock = clock
        self._first_token_s: dict[str, float] = {}  # decoding request -> when it was first seen decoding
        self._last_step_s: float | None = None
        self._step_s = 0.0  # moving average of the intervals between steps that had decodes

    def step(self, requests: Iterable[Any]) -> EngineLoad:
        """The load at a scheduler step, from the requests the connector holds (vLLM's
        `Request`s); the step's time goes into the average step."""
        now = self._clock()
        counts, decoding = self._scan(requests, now)
        if decoding and self._last_step_s is not None:
            interval = now - self._last_step_s
            self._step_s = interval if not self._step_s else self._step_s + STEP_SMOOTHING * (interval - self._step_s)
        self._last_step_s = now if decoding else None
        return EngineLoad(*counts, self._budget_s(now, decoding))

    def load(self, requests: Iterable[Any]) -> EngineLoad:
        """The load between steps (a request finished): the same figures, no step counted. With
        nothing left decoding the engine may idle, so the next step's interval is not timed."""
        now = self._clock()
        counts, decoding = self._scan(requests, now)
        if not decoding:
            self._last_step_s = None
        return EngineLoad(*counts, self._budget_s(now, decoding))

    def _scan(self, requests: Iterable[Any], now: float) -> tuple[tuple[int, int, int], list[tuple[int, float]]]:
        """(queued prefill tokens, decoding requests, their KV tokens), and for each decoding
        request (tokens generated, when its first was seen); finished and preempted requests
        drop out of the first-token times."""
        queued = decodes = kv_tokens = 0
        decoding: list[tuple[int, float]] = []
        first_token_s: dict[str, float] = {}
        for request in requests:
            computed, prompt = request.num_computed_tokens, request.num_prompt_tokens
            if computed < prompt:
                queued += prompt - computed
                continue
            decodes += 1
            kv_tokens += computed
            first = self._first_token_s.get(request.request_id, now)
            first_token_s[request.request_id] = first
            decoding.append((max(1, request.num_output_tokens), first))
        self._first_token_s = first_token_s
        return (queued, decodes, kv_tokens), decoding

    def _budget_s(self, now: float, decoding: list[tuple[int, float]]) -> float:
        slo = self._tbt_slo_s
        if not slo:
            return 0.0
        if not decoding:
            return IDLE_BUDGET_S
        budget = min(slo * generated - (now - first) - self._step_s for generated, first in decoding)
        return min(IDLE_BUDGET_S, max(0.0, budget))


class LoadReporter:
    """Sends the latest load to the node every `interval_s`, under `engine_id`, from its own thread."""

    def __init__(self, client: Client, engine_id: str, interval_s: float) -> None:
        self._client = client
        self._engine_id = engine_id
        self._interval_s = interval_s
        self._latest: EngineLoad | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._errors = NodeErrorLog(log, "a load report", "the conductor keeps its own account of this engine")
        self._thread = threading.Thread(target=self._run, name="kvstore-load-report", daemon=True)
        self._thread.start()

    @property
    def failures(self) -> int:
        return self._errors.count

    def update(self, load: EngineLoad) -> None:
        first = self._latest is None
        self._latest = load
        if first:
            self._wake.set()  # the node hears of the engine at once, then every interval

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self._client.timeout_s + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            load = self._latest
            if load is None or self._stop.is_set():
                continue
            try:
                self._client.report_load(self._engine_id, load)
            except NODE_ERRORS as error:
                self._errors.record(error)
