"""The discrete-event replay: a trace's requests arrive, the real router places them (the
placement policy under test, `conductor.router.Router`), and simulated nodes run them.

Per request:

1. arrival: `Router.route` on the cluster state the simulated nodes keep current (their
   loads after every change; their cache tiers' contents through the global index). A
   rejected request is counted and goes no further. A decision that fetches a prefix starts
   the transfer from the holder now, over both nodes' network interfaces.
2. prefill, in its node's serve order (the decision's priority, else arrival), once any
   fetched prefix has arrived (with `prefill_chunk_tokens`, a prefill with a priority is set
   aside at the end of a chunk when a ready request outranks it, and resumes later from the
   tokens it computed, paying the model's fixed cost once more): the node's own
   tier is looked up (the store's policy sees the access), the request's blocks are stored
   there, and the prefill takes the cost model's time for the tokens not reused. The prompt's
   KV streams to the decode node from the start of the prefill. A placement may put the
   prefill on the decode node itself (a decode server has the same GPUs, and a DRAM tier like
   the prefill servers'): nothing is sent, and the node's decode batch makes no steps while
   the prefill runs.
3. first token at the end of the prefill (TTFT); the sequence joins its decode node's batch
   when its KV has arrived, and generates its output (TBT = its time in the batch per token).

Deterministic: a seed drives every random choice, and ties between simultaneous events go by
the order they were scheduled.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial

from conductor.cluster import ClusterState, Slo
from conductor.costs import DEFAULT_COSTS, CostModel
from conductor.placement import make_placement
from conductor.placement.scoring import reusable_tokens
from conductor.router import Router
from conductor.simulate.nodes import KNOWN_OUTPUT, PAUSE_BUDGETS, PrefillJob, SimDecode, SimPrefill, transfer
from conductor.types import NodeInfo, Role, RouteRequest
from kvstore.errors import InvalidArgumentError
from kvstore.policy import make_policy
from kvstore.policy.simulated import block_key
from kvstore.trace import TRACE_BLOCK_TOKENS, TraceRequest
from kvstore.types import NamespaceId

SIM_NAMESPACE = NamespaceId(b"\x00" * 16)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated cluster and how hard the trace drives it."""

    prefill_nodes: int = 8
    decode_nodes: int = 8
    placement: str = "kv-centric"
    cache_blocks: int = 6000  # each node's DRAM tier, in blocks of the trace's size
    cache_policy: str = "leaf-first-lru"
    rate_scale: float = 1.0  # arrivals this many times as fast as the trace's
    # 0: a prefill runs to its end once started (vLLM's scheduler serves running requests
    # first). Else the engine computes prefills in chunks of this many tokens and, between two,
    # may set a request placed with a priority aside for a waiting one it ranks higher.
    prefill_chunk_tokens: int = 0
    profile: str = "default"
    slo: Slo = field(default_factory=Slo)
    seed: int = 0
    # How a decode engine works out how long its batch could pause for a prefill (SimDecode):
    # knowing each sequence's output length, or, as the vLLM connector, only its tokens so far.
    pause_budget: str = KNOWN_OUTPUT

    def check(self) -> None:
        for name in ("prefill_nodes", "decode_nodes", "cache_blocks"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"simulation {name} must be at least 1, got {getattr(self, name)}")
        if self.prefill_chunk_tokens < 0:
            raise InvalidArgumentError(
                f"simulation prefill_chunk_tokens must be >= 0 (0: never split), got {self.prefill_chunk_tokens}"
            )
        if not self.rate_scale > 0:
            raise InvalidArgumentError(f"simulation rate_scale must be positive, got {self.rate_scale}")
        if self.pause_budget not in PAUSE_BUDGETS:
            raise InvalidArgumentError(
                f"simulation pause_budget must be one of {list(PAUSE_BUDGETS)}, got {self.pause_budget!r}"
            )

    @property
    def label(self) -> str:
        """The placement, and the engine's preemption when it has one: how reports name a run."""
        label = self.placement
        if self.prefill_chunk_tokens:
            label += f", preemptive {self.prefill_chunk_tokens}"
        if self.pause_budget != KNOWN_OUTPUT:
            label += f", budget {self.pause_budget}"
        return label


@dataclass(slots=True)
class RequestOutcome:
    """What happened to one request (times in seconds)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    rejected: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    reused_tokens: int = 0  # not computed: the node's own cache plus a fetched prefix
    fetched_tokens: int = 0
    ttft_s: float = float("nan")
    tbt_s: float = float("nan")  # mean time per output token in the decode batch
    decision_us: float = 0.0

    def meets(self, slo: Slo) -> bool:
        if self.rejected or self.ttft_s != self.ttft_s:
            return False
        return self.ttft_s <= slo.ttft_s and (self.output_tokens == 0 or self.tbt_s <= slo.tbt_s)


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    outcomes: list[RequestOutcome]
    fetched_bytes: int = 0
    handoff_bytes: int = 0  # prefill to decode
    wall_s: float = 0.0


class _Event(IntEnum):  # simultaneous events run in this order, then in scheduling order
    DECODE_FINISH = 0
    DECODE_JOIN = 1
    PREFILL_DONE = 2
    PREFILL_PREEMPT = 3
    PREFILL_START = 4
    ARRIVAL = 5


ProgressFn = Callable[[int, int], None]


class Simulation:
    def __init__(self, config: SimConfig, trace: Sequence[TraceRequest], costs: CostModel = DEFAULT_COSTS) -> None:
        config.check()
        self.config = config
        self.trace = trace
        self.costs = costs
        self.profile = costs.profile(config.profile)
        self.cluster = ClusterState(costs, config.slo)
        self.cluster.namespaces.add(SIM_NAMESPACE)
        self.router = Router(self.cluster, make_placement(config.placement, config.seed))
        self.prefill: dict[str, SimPrefill] = {}
        self.decode: dict[str, SimDecode] = {}
        index = self.cluster.index
        for i in range(config.prefill_nodes):
            node_id = f"prefill-{i}"
            self.cluster.join(NodeInfo(node_id, Role.PREFILL, profile=config.profile))
            policy = make_policy(config.cache_policy)
            self.prefill[node_id] = SimPrefill(node_id, self.profile, policy, config.cache_blocks, index)
        for i in range(config.decode_nodes):
            node_id = f"decode-{i}"
            self.cluster.join(NodeInfo(node_id, Role.DECODE, profile=config.profile))
            decode = self.decode[node_id] = SimDecode(node_id, self.profile, config.pause_budget)
            # The same GPUs can compute a prefill placed there (the placement's choice; a
            # decode node then pauses its batch), and the server has a DRAM tier like the
            # prefill servers'; it stays empty unless prefills run there.
            local = SimPrefill(node_id, self.profile, make_policy(config.cache_policy), config.cache_blocks, index)
            local.nic = decode.nic
            self.prefill[node_id] = local
        self._events: list[tuple[float, int, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self._outcomes: dict[str, RequestOutcome] = {}
        self._kv_ready_s: dict[str, float] = {}
        self._fetched_bytes = 0
        self._handoff_bytes = 0

    def _at(self, when_s: float, kind: _Event, action: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (when_s, kind, next(self._order), action))

    def run(self, progress: ProgressFn | None = None) -> SimResult:
        started = time.perf_counter()
        scale = self.config.rate_scale
        total = len(self.trace)
        arrived = 0

        def arrive(number: int, request: TraceRequest) -> Callable[[float], None]:
            def action(now_s: float) -> None:
                nonlocal arrived
                self._arrive(number, request, now_s)
                arrived += 1
                if progress is not None and (arrived % 500 == 0 or arrived == total):
                    progress(arrived, total)

            return action

        for number, request in enumerate(self.trace):
            self._at(request.timestamp_ms / 1000 / scale, _Event.ARRIVAL, arrive(number, request))
        while self._events:
            now_s, _, _, action = heapq.heappop(self._events)
            action(now_s)
        outcomes = [self._outcomes[str(number)] for number in range(total)]
        return SimResult(self.config, outcomes, self._fetched_bytes, self._handoff_bytes, time.perf_counter() - started)

    # -- arrival and placement -----------------------------------------------------------------

    def _arrive(self, number: int, trace_request: TraceRequest, now_s: float) -> None:
        request = RouteRequest(
            str(number),
            SIM_NAMESPACE,
            tuple(block_key(hash_id) for hash_id in trace_request.hash_ids),
            trace_request.input_length,
            trace_request.output_length,
            TRACE_BLOCK_TOKENS,
        )
        outcome = RequestOutcome(request.request_id, now_s, request.prompt_tokens, request.max_output_tokens)
        self._outcomes[request.request_id] = outcome
        started = time.perf_counter_ns()
        decision = self.router.route(request, now_s)
        outcome.decision_us = (time.perf_counter_ns() - started) / 1e3
        if not decision.accepted or decision.prefill is None or decision.decode is None:
            outcome.rejected = decision.rejected or "no placement"
            return
        outcome.prefill_node, outcome.decode_node = decision.prefill.node_id, decision.decode.node_id
        node = self.prefill[decision.prefill.node_id]
        ready_s, fetched_blocks = now_s, 0
        if decision.prefill.fetch_from:
            holder = self.prefill[decision.prefill.fetch_from]
            wanted = -(-(decision.prefill.local_tokens + decision.prefill.fetch_tokens) // request.block_tokens)
            fetched_blocks = holder.cache.touch(request.keys[:wanted])  # what it still holds is sent
            own = node.cache.leading_run(request.keys)
            sent_tokens = max(0, fetched_blocks - own) * request.block_tokens
            if sent_tokens:
                num_bytes = sent_tokens * self.profile.kv_bytes_per_token
                ready_s = transfer(self.costs.network, holder.nic, node.nic, num_bytes, now_s)
                self._fetched_bytes += num_bytes
        self.decode[decision.decode.node_id].reserve(request)
        planned_s = decision.prefill.load_s + decision.prefill.prefill_s
        node.queue.append(PrefillJob(request, decision, now_s, ready_s, fetched_blocks, planned_s))
        self._report_decode(decision.decode.node_id, now_s)
        if node.running is None:
            self._at(max(now_s, ready_s), _Event.PREFILL_START, partial(self._start_prefill, node))
        else:  # it may outrank the running prefill once its prefix is here
            self._at(max(now_s, ready_s), _Event.PREFILL_PREEMPT, partial(self._plan_preemption, node))
        self._report_prefill(node, now_s)

    # -- prefill -------------------------------------------------------------------------------

    def _start_prefill(self, node: SimPrefill, now_s: float) -> None:
        if node.running is not None:
            return
        job = node.next_job(now_s)
        if job is None:
            return
        if not isinstance(job, PrefillJob):  # every queued prefix is still on its way
            self._at(job, _Event.PREFILL_START, partial(self._start_prefill, node))
            return
        node.queue.remove(job)
        request = job.request
        load_s = 0.0  # a preempted prefill resumes from the KV it computed, still in its engine
        if not job.started:
            job.started = True
            own = node.cache.leading_run(request.keys)
            node.cache.serve_keys(request.keys)  # the access, then the request's blocks are stored
            job.reused_tokens = reusable_tokens(request, max(own, job.fetched_blocks))
            outcome = self._outcomes[request.request_id]
            outcome.reused_tokens = job.reused_tokens
            outcome.fetched_tokens = max(0, job.reused_tokens - reusable_tokens(request, own))
            load_s = self.profile.load_s((0, own, 0), request.block_tokens)
            assert job.decision.decode is not None
            decode = self.decode[job.decision.decode.node_id]
            num_bytes = request.prompt_tokens * self.profile.kv_bytes_per_token
            if decode.node_id == node.node_id:  # computed where it decodes: nothing to send
                self._kv_ready_s[request.request_id] = now_s
            else:
                self._kv_ready_s[request.request_id] = transfer(
                    self.costs.network, node.nic, decode.nic, num_bytes, now_s
                )
                self._handoff_bytes += num_bytes
        cached = job.reused_tokens + job.done_tokens
        compute_s = self.profile.prefill.seconds(request.prompt_tokens - cached, cached)
        job.run += 1
        node.running = job
        if node.node_id in self.decode:  # a prefill on a decode node: its batch waits
            self.decode[node.node_id].pause(now_s)
        node.running_since_s = now_s + load_s
        node.busy_until_s = node.running_since_s + compute_s
        self._at(node.busy_until_s, _Event.PREFILL_DONE, partial(self._prefill_done, job, job.run))
        self._plan_preemption(node, now_s)
        self._report_prefill(node, now_s)

    def _plan_preemption(self, node: SimPrefill, now_s: float) -> None:
        """If a ready queued request outranks the running prefill, set that one aside at the end
        of its current chunk."""
        job = node.running
        if job is None:
            return
        planned = node.preemption_s(max(now_s, node.running_since_s), self.config.prefill_chunk_tokens)
        if planned is not None:
            when_s, tokens = planned
            self._at(when_s, _Event.PREFILL_PREEMPT, partial(self._preempt, node, job, job.run, tokens))

    def _preempt(self, node: SimPrefill, job: PrefillJob, run: int, tokens: int, now_s: float) -> None:
        if node.running is not job or job.run != run:
            return  # already set aside, or finished
        job.done_tokens += tokens
        cached = job.reused_tokens + job.done_tokens
        job.planned_s = self.profile.prefill.seconds(job.request.prompt_tokens - cached, cached)
        job.ready_s = now_s
        job.run += 1  # its completion, scheduled for the run just ended, is void
        node.running = None
        self._resume(node, now_s)
        node.queue.append(job)
        self._start_prefill(node, now_s)

    def _prefill_done(self, job: PrefillJob, run: int, now_s: float) -> None:
        if job.run != run:
            return  # that run was preempted
        assert job.decision.prefill is not None
        node = self.prefill[job.decision.prefill.node_id]
        node.running = None
        self._resume(node, now_s)
        outcome = self._outcomes[job.request.request_id]
        outcome.ttft_s = now_s - job.arrival_s
        ready_s = max(now_s, self._kv_ready_s.pop(job.request.request_id))
        self._at(ready_s, _Event.DECODE_JOIN, partial(self._join_decode, job))
        self._report_prefill(node, now_s)
        if node.queue:
            self._at(now_s, _Event.PREFILL_START, partial(self._start_prefill, node))

    def _report_prefill(self, node: SimPrefill, now_s: float) -> None:
        if node.node_id in self.decode:
            self._report_decode(node.node_id, now_s)
        else:
            self.cluster.report_load(node.node_id, node.load(now_s))

    def _resume(self, node: SimPrefill, now_s: float) -> None:
        """A prefill on a decode node ended or was set aside: its batch steps again."""
        decode = self.decode.get(node.node_id)
        if decode is not None:
            decode.resume(now_s)
            self._schedule_finish(decode)
            self._report_decode(decode.node_id, now_s)

    # -- decode --------------------------------------------------------------------------------

    def _join_decode(self, job: PrefillJob, now_s: float) -> None:
        assert job.decision.decode is not None
        decode = self.decode[job.decision.decode.node_id]
        decode.join(job.request, job.request.max_output_tokens, now_s)
        self._schedule_finish(decode)
        self._report_decode(decode.node_id, now_s)

    def _finish_decodes(self, decode: SimDecode, version: int, now_s: float) -> None:
        if version != decode.version:
            return  # the batch changed since this was scheduled
        for request_id, joined_s, tokens in decode.finish_due(now_s):
            if tokens:
                self._outcomes[request_id].tbt_s = (now_s - joined_s) / tokens
        self._schedule_finish(decode)
        self._report_decode(decode.node_id, now_s)

    def _schedule_finish(self, decode: SimDecode) -> None:
        when = decode.next_finish_s()
        if when is not None:
            self._at(when, _Event.DECODE_FINISH, partial(self._finish_decodes, decode, decode.version))

    def _report_decode(self, node_id: str, now_s: float) -> None:
        """The decode node's load: its batch's, and the prefills placed on it."""
        load = self.decode[node_id].load(now_s, self.config.slo.tbt_s)
        prefill = self.prefill[node_id].load(now_s)
        load.prefill_busy_until_s = prefill.prefill_busy_until_s
        load.queued_prefill_tokens = prefill.queued_prefill_tokens
        self.cluster.report_load(node_id, load)


def simulate(
    config: SimConfig,
    trace: Sequence[TraceRequest],
    costs: CostModel = DEFAULT_COSTS,
    progress: ProgressFn | None = None,
) -> SimResult:
    return Simulation(config, trace, costs).run(progress)


def print_progress(label: str) -> ProgressFn:
    """A one-line progress counter on stderr."""

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} requests", end=end, file=sys.stderr, flush=True)

    return show
