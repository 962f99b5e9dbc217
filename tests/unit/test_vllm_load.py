"""The load the vLLM connector reports (engine_adapters/vllm/load.py), worked out by hand from
requests with the fields of vLLM's `Request` that it reads, on a clock the test moves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine_adapters.vllm.load import IDLE_BUDGET_S, LoadTracker
from kvstore.types import EngineLoad


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def request(request_id: str, prompt: int, computed: int, generated: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=request_id, num_prompt_tokens=prompt, num_computed_tokens=computed, num_output_tokens=generated
    )


def test_prompts_not_computed_are_queued_and_computed_ones_decode() -> None:
    tracker = LoadTracker(tbt_slo_s=0.0, clock=Clock())
    load = tracker.step([request("waiting", 1000, 0), request("chunked", 800, 512), request("d", 300, 305, 6)])
    assert load == EngineLoad(queued_prefill_tokens=1000 + 288, running_decodes=1, decode_kv_tokens=305)
    assert load.decode_pause_budget_s == 0.0  # no SLO: the budget is unknown


def test_the_pause_budget_keeps_every_decoding_request_within_the_slo_over_its_tokens() -> None:
    clock = Clock()
    tracker = LoadTracker(tbt_slo_s=0.1, clock=clock)
    assert tracker.step([request("a", 100, 0)]).decode_pause_budget_s == IDLE_BUDGET_S  # nothing decodes
    tracker.step([request("a", 100, 100, 1)])  # a's first token, at 50.0
    clock.now += 0.02
    load = tracker.step([request("a", 100, 101, 2), request("b", 100, 100, 1)])  # b's first, at 50.02
    # a: 0.1 x 2 tokens - 0.02 s since its first - one 0.02 s step = 0.16; b: 0.1 - 0 - 0.02 = 0.08
    assert load.decode_pause_budget_s == pytest.approx(0.08)
    clock.now += 0.05  # a slow step: the average step is 0.02 + 0.2 x (0.05 - 0.02) = 0.026 s
    load = tracker.step([request("a", 100, 102, 3)])  # b finished
    assert load.decode_pause_budget_s == pytest.approx(0.3 - 0.07 - 0.026)
    clock.now += 1.0
    assert tracker.step([request("a", 100, 103, 4)]).decode_pause_budget_s == 0.0  # a is past its SLO: no pause


def test_a_preempted_request_queues_again_and_restarts_its_clock() -> None:
    clock = Clock()
    tracker = LoadTracker(tbt_slo_s=0.1, clock=clock)
    tracker.step([request("a", 100, 100, 1)])
    clock.now += 10.0
    assert tracker.step([request("a", 100, 0, 1)]) == EngineLoad(100, 0, 0, IDLE_BUDGET_S)  # recomputed in full
    # decoding again: its first token counts from now, and no step interval is known yet
    assert tracker.step([request("a", 100, 100, 1)]).decode_pause_budget_s == pytest.approx(0.1)


def test_between_steps_the_load_follows_the_requests_and_counts_no_step() -> None:
    clock = Clock()
    tracker = LoadTracker(tbt_slo_s=0.1, clock=clock)
    tracker.step([request("a", 100, 100, 1), request("b", 50, 50, 1)])
    clock.now += 0.02
    tracker.step([request("a", 100, 101, 2), request("b", 50, 51, 2)])  # one 0.02 s step
    clock.now += 5.0  # b finishes 5 s later, after its last step
    assert tracker.load([request("a", 100, 101, 2)]) == EngineLoad(0, 1, 101, 0.0)  # a is 4.8 s past its SLO
    assert tracker.load([]) == EngineLoad(decode_pause_budget_s=IDLE_BUDGET_S)
    # the 5 s without a step did not enter the step time: the next step's interval is 0.02 s again
    clock.now += 0.02
    load = tracker.step([request("c", 10, 10, 1)])
    assert load.decode_pause_budget_s == pytest.approx(0.1 - 0.02)
