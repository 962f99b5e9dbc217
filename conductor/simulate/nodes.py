"""Simulated instances: a prefill engine with its node's cache tier, a decode engine with
continuous batching, and the network interface between nodes.

Time is the simulator's clock (seconds since the trace began). Durations come from the same
cost models the conductor predicts with (conductor/costs.py): the simulator is exact about
its model, so a policy wins by deciding better, not by predicting a different world. What the
policies do not see is the future: later arrivals, evictions, and which fetches will contend.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from conductor.costs import Link, Profile
from conductor.index import GlobalIndex
from conductor.types import Decision, NodeLoad, RouteRequest
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.simulated import TIER, SimulatedTier
from kvstore.table import BlockTable
from kvstore.types import TierKind

KNOWN_OUTPUT = "known-output"  # the engine knows each sequence's output length (the trace's)
TOKENS_SO_FAR = "tokens-so-far"  # it knows only what each has generated (the vLLM connector)
PAUSE_BUDGETS = (KNOWN_OUTPUT, TOKENS_SO_FAR)


class Nic:
    """A node's network interface: one transfer at a time each way, in the order asked."""

    def __init__(self) -> None:
        self.tx_free_s = 0.0
        self.rx_free_s = 0.0


def transfer(link: Link, source: Nic, target: Nic, num_bytes: int, now_s: float) -> float:
    """Move `num_bytes` from `source` to `target` once both are free; returns when it ends."""
    if num_bytes <= 0:
        return now_s
    start = max(now_s, source.tx_free_s, target.rx_free_s)
    end = start + link.seconds(num_bytes)
    source.tx_free_s = target.rx_free_s = end
    return end


class _IndexFeed:
    """The table's residency listener: keeps the node's part of the global index current, as a
    node's `WatchEvents` keep the conductor's (conductor/watch.py)."""

    def __init__(self, node_id: str, table: BlockTable, index: GlobalIndex) -> None:
        self._node_id = node_id
        self._table = table
        self._index = index

    def residency_changed(self, rows, namespaces, before, after) -> None:  # type: ignore[no-untyped-def]
        keys = self._table.keys
        for row, mask in zip(rows, after, strict=True):
            key = keys[row]
            if key is not None:
                self._index.set_tiers(self._node_id, key, (TierKind.DRAM,) if mask >> TIER & 1 else ())


@dataclass(slots=True)
class PrefillJob:
    request: RouteRequest
    decision: Decision
    arrival_s: float
    ready_s: float  # when a fetched prefix has arrived (arrival when none)
    fetched_blocks: int  # blocks of the prefix that came from another node
    planned_s: float  # the predicted time still to compute (for the load the node reports)
    reused_tokens: int = 0  # set when it first starts: not computed (own cache and fetched prefix)
    done_tokens: int = 0  # computed before it was preempted, beyond the reused ones
    started: bool = False  # has looked up and stored its blocks (at its first start)
    run: int = 0  # bumped at each start and preemption: a completion scheduled for another run is void

    @property
    def order_s(self) -> float:
        """Serve order, lower first: the decision's priority, else the arrival."""
        return self.arrival_s if self.decision.priority_s is None else self.decision.priority_s

    @property
    def preemptible(self) -> bool:
        """Placed with a priority: an engine with priority scheduling may set it aside between
        two chunks for a request it ranks higher, and takes a request that ranks higher from
        the queue. Served in arrival order (no priority), nothing is ever preempted."""
        return self.decision.priority_s is not None


class SimPrefill:
    """A prefill engine serving its queue one request at a time, lowest serve order first
    (arrival order unless the placement gave priorities; an engine with priority scheduling),
    with its node's cache tier of `capacity_blocks` run by `policy`."""

    def __init__(
        self, node_id: str, profile: Profile, policy: EvictionPolicy, capacity_blocks: int, index: GlobalIndex
    ) -> None:
        self.node_id = node_id
        self.profile = profile
        self.cache = SimulatedTier(policy, capacity_blocks)
        self.cache.table.listener = _IndexFeed(node_id, self.cache.table, index)
        self.queue: list[PrefillJob] = []
        self.running: PrefillJob | None = None
        self.running_since_s = 0.0  # when the running job's current run began computing
        self.busy_until_s = 0.0
        self.nic = Nic()

    def next_job(self, now_s: float) -> PrefillJob | float | None:
        """The queued job to run now (the lowest serve order among those whose prefix has
        arrived, the first queued on a tie: a job still waiting for its fetch does not hold up
        the queue), else when the first one will be ready, else None."""
        ready = [job for job in self.queue if job.ready_s <= now_s]
        if ready:
            return min(ready, key=lambda job: job.order_s)  # min keeps the first of equals
        return min((job.ready_s for job in self.queue), default=None)

    def preemption_s(self, now_s: float, chunk_tokens: int) -> tuple[float, int] | None:
        """When the running job could next be set aside for a queued job that ranks higher and
        is ready, and the tokens it will have computed in its current run by then: the end of
        the chunk being computed at `now_s` (a prefill is computed in chunks of `chunk_tokens`,
        and an engine changes requests only between chunks). None when no ready job outranks
        it, either is served without priority, or the running job finishes first."""
        job = self.running
        if job is None or chunk_tokens <= 0 or not job.preemptible:
            return None
        if not any(
            queued.preemptible and queued.ready_s <= now_s and queued.order_s < job.order_s for queued in self.queue
        ):
            return None
        left = job.request.prompt_tokens - job.reused_tokens - job.done_tokens
        cached = job.reused_tokens + job.done_tokens
        elapsed = now_s - self.running_since_s
        model = self.profile.prefill
        chunk = chunk_tokens
        while chunk < left:
            ends_s = model.seconds(chunk, cached)
            if ends_s >= elapsed:
                return self.running_since_s + ends_s, chunk
            chunk += chunk_tokens
        return None

    def load(self, now_s: float) -> NodeLoad:
        """What the node reports: when its queue will have drained, and the tokens left."""
        until = max(now_s, self.busy_until_s) if self.running is not None else now_s
        tokens = 0
        for job in self.queue:
            until = max(until, job.ready_s) + job.planned_s
            reused = (
                job.reused_tokens
                if job.started
                else (job.decision.prefill.reused_tokens if job.decision.prefill else 0)
            )
            tokens += job.request.prompt_tokens - reused - job.done_tokens
        return NodeLoad(prefill_busy_until_s=until, queued_prefill_tokens=tokens)


@dataclass(order=True, slots=True)
class _Sequence:
    done_at_steps: float  # the batch's step count at which it has generated all its tokens
    request_id: str = field(compare=False)
    joined_s: float = field(compare=False)
    output_tokens: int = field(compare=False)
    kv_tokens: int = field(compare=False)


class SimDecode:
    """A decode engine with continuous batching: every step makes one token for each sequence
    in the batch, and a step takes `profile.decode.step_s(batch, kv tokens)`. Between changes of
    the batch the step time is constant, so the simulator jumps from change to change."""

    def __init__(self, node_id: str, profile: Profile, pause_budget: str = KNOWN_OUTPUT) -> None:
        self.node_id = node_id
        self.profile = profile
        self.pause_budget = pause_budget
        self.nic = Nic()
        self.reserved_tokens = 0  # placed, not yet joined
        self.version = 0  # bumps whenever the next finish time changes (older events are stale)
        self._steps = 0.0  # steps made since the start (fractional between events)
        self._at_s = 0.0
        self._batch: list[_Sequence] = []
        self._kv_tokens = 0
        self._paused = False

    def pause(self, now_s: float) -> None:
        """The engine computes a prefill: the batch makes no steps until `resume`."""
        self._advance(now_s)
        self._paused = True
        self.version += 1

    def resume(self, now_s: float) -> None:
        """The prefill ended or was set aside: the batch steps again from `now_s`."""
        self._advance(now_s)
        self._paused = False
        self.version += 1

    def _advance(self, now_s: float) -> None:
        if self._batch and not self._paused:
            self._steps += (now_s - self._at_s) / self._step_s()
        self._at_s = now_s

    def _step_s(self) -> float:
        return self.profile.decode.step_s(len(self._batch), self._kv_tokens)

    def reserve(self, request: RouteRequest) -> None:
        """`request` was placed here: its KV is reserved until it joins the batch."""
        self.reserved_tokens += request.prompt_tokens + request.max_output_tokens

    def join(self, request: RouteRequest, output_tokens: int, now_s: float) -> None:
        self._advance(now_s)
        need = request.prompt_tokens + request.max_output_tokens
        self.reserved_tokens -= need
        kv = request.prompt_tokens + output_tokens
        heapq.heappush(
            self._batch, _Sequence(self._steps + output_tokens, request.request_id, now_s, output_tokens, kv)
        )
        self._kv_tokens += kv
        self.version += 1

    def next_finish_s(self) -> float | None:
        if not self._batch or self._paused:
            return None
        return self._at_s + max(0.0, self._batch[0].done_at_steps - self._steps) * self._step_s()

    def finish_due(self, now_s: float) -> list[tuple[str, float, int]]:
        """Sequences done by `now_s`: (request id, joined at, output tokens)."""
        self._advance(now_s)
        done = []
        while self._batch and self._batch[0].done_at_steps <= self._steps + 1e-9:
            sequence = heapq.heappop(self._batch)
            self._kv_tokens -= sequence.kv_tokens
            done.append((sequence.request_id, sequence.joined_s, sequence.output_tokens))
        self.version += 1
        return done

    def pause_budget_s(self, now_s: float, tbt_slo_s: float) -> float:
        """How long the batch could pause from `now_s` with every sequence in it still within
        `tbt_slo_s` per token at the current step time (0 when one already cannot), by the
        engine's rule (`pause_budget`):

        - KNOWN_OUTPUT: each sequence's mean over its whole output, whose length the engine
          knows (the trace's);
        - TOKENS_SO_FAR: what an engine that does not know it can promise, as the vLLM connector
          reports it (engine_adapters/vllm/load.py): each sequence's mean over its tokens so far,
          one more step included.

        Sequences placed here that have not joined are not the engine's to count: the
        conductor, which sent them, does (`ClusterState.incoming_pause_s`)."""
        self._advance(now_s)
        step_s = self._step_s() if self._batch else self.profile.decode.step_s(1, 0)
        budget = math.inf
        for sequence in self._batch:
            if self.pause_budget == TOKENS_SO_FAR:
                generated = self._steps - (sequence.done_at_steps - sequence.output_tokens)
                budget = min(budget, tbt_slo_s * (generated + 1) - (now_s - sequence.joined_s) - step_s)
            else:
                finish_s = now_s + max(0.0, sequence.done_at_steps - self._steps) * step_s
                budget = min(budget, tbt_slo_s * sequence.output_tokens - (finish_s - sequence.joined_s))
        return max(0.0, budget)

    def load(self, now_s: float, tbt_slo_s: float) -> NodeLoad:
        return NodeLoad(
            running_decodes=len(self._batch),
            decode_kv_tokens=self._kv_tokens + self.reserved_tokens,
            decode_pause_budget_s=self.pause_budget_s(now_s, tbt_slo_s),
        )
