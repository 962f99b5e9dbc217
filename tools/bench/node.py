"""The node benchmark (issue 3): real `kvstore serve` daemons, driven by engine processes.

    .venv/bin/python tools/bench/node.py [--quick] [--runs N] [--repeats N] [--sizes 64KiB,2MiB,...]
        [--no-redis] [--no-mooncake] [--lookup-clients N] [--lookup-threads] [--out-json PATH] [--no-doc]

--quick (64 KiB and 2 MiB, 3 repeats, 1 run, ~1.5 minutes here) is for development and writes no
doc; the full default (4 sizes, 5 repeats, 3 runs) takes ~10 minutes on this 2-core VM.

Every daemon is a subprocess (`python -m kvstore.cli serve`, loopback, free ports, a 2 GiB DRAM
pool of 16 MiB slabs, NVMe off), and every engine is a separate Python process (multiprocessing,
spawn) with its own `kvstore.client.Client`. What is measured, in batches of 32 blocks of 64 KiB,
512 KiB, 2 MiB and 8 MiB (namespaces of float16, 8 KV heads of 128, 16 tokens, 1-128 layers, whose
`block_bytes` equal the size exactly):

1. Local, cross-process, through node A's shared-memory segment. A writer process ("prefill
   engine") times `put_blocks` of fresh keys (Reserve -> copy and hash -> Commit), removing
   them again after each batch, outside the clock, so slots are reused. A reader process
   ("decode engine") times `get_into` (Acquire -> copy -> Release) of a batch the writer stored,
   into preallocated destinations (checked once against the writer's CRC-32). Reference: memcpy
   (`np.copyto`) of the same bytes in the same process, between its own preallocated buffers.
2. Remote, over TCP: node B `Fetch`es the batch from node A's data plane (a call to B by a
   Client in this process, on B's host, so over B's Unix socket as an engine beside B would ask;
   timed from this process; the blocks are removed from B after each call, untimed, so every
   call moves the bytes), and a `Transport.TCP` Client in this process does `get_into` from A
   into preallocated buffers. Reference: node_refs' raw loopback socket stream (request, then
   `recv_into` preallocated blocks, 32 KiB per read, from a sender process).
3. `Lookup` of a stored 128-key chain by 16 concurrent clients: 16 processes (or, with
   `--lookup-threads`, 16 threads of one process), each with its own Client, in a closed loop
   over a common time window; p50 and p99 of every call in the window, against one client alone
   and against the same clients calling the standard grpc.health.v1 Check on the same daemon
   (the least any unary gRPC call to the node costs), rotated.
4. More references (node_refs): Redis MSET/MGET (a private redis-server) and Mooncake Store's
   batch put/get over TCP between processes (its own venv and timing loop).

Timing: the engines time their own calls (a pipe round trip per call would be billed to the
node) and send back each call's nanoseconds; this process times its own. A figure and the
references it is divided by run back to back, the order rotated every repeat (as
harness.measure); each figure is the median over the repeats and its ratio the median of the
per-repeat ratios. Mooncake cannot be interleaved (its worker runs its own timed loop), so it
is measured in the same run, just before the daemons start, and its ratio divides medians.
Sources and destinations are preallocated, page-aligned and pre-faulted (a fresh page costs
2-3 us per 4 KiB here). A repeat moves 128 MiB per trial locally and 1 GiB remotely: one call
of 32 x 2 MiB over loopback takes 12-25 ms, with no pattern, so a remote repeat of two calls
was mostly noise. With `--runs N` (default 3) the whole benchmark runs N times and each
row reports the run with the median ratio, noting the range. Results go to a JSON file, a plot
and a section of docs/benchmarks.md between `<!-- bench:node:begin -->` and
`<!-- bench:node:end -->`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

if not __package__:  # run as a script (the documented way): make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.client import Client, Transport
from kvstore.errors import ConfigError
from kvstore.layered_config import parse_size_bytes
from kvstore.node.config import StoreSection
from tools.bench import harness, mooncake_ref, node_refs, refs_common
from tools.bench.harness import Figure, Target, Trial, Unit, median_figures
from tools.bench.node_engines import (
    DRAM_POOL,
    DRAM_SLAB,
    LOOKUP_NAMESPACE,
    SEED,
    Daemon,
    Engine,
    fresh_keys,
    namespace_for,
    node_daemon,
    typed,
)
from tools.bench.refs_common import BATCH_BLOCKS, KiB, MiB, format_size, log_tail, split_blocks

REPO = Path(__file__).resolve().parents[2]
DOC_PATH = REPO / "docs" / "benchmarks.md"
JSON_PATH = REPO / "docs" / "bench-node.json"
PLOT_PATH = REPO / "docs" / "bench-node.png"
BEGIN_MARKER, END_MARKER = "<!-- bench:node:begin -->", "<!-- bench:node:end -->"
DOC_HEADER = "# Benchmarks\n\nEach section is written by the tool it names; rerun the tool to refresh it.\n"

BLOCK_SIZES = refs_common.BLOCK_SIZES  # 64 KiB, 512 KiB, 2 MiB, 8 MiB
QUICK_BLOCK_SIZES = (64 * KiB, 2 * MiB)
LOOKUP_CHAIN = 128
LOOKUP_CLIENTS = 16

LOCAL_GROUP = "Local, cross-process: engine processes through node A's shared memory"
REMOTE_GROUP = "Remote get over TCP: between two daemons, and a TCP client"
LOOKUP_GROUP = "Lookup latency: 128-key chain, concurrent clients"
PLOT_GROUP = "plot"

MEMCPY = "memcpy (np.copyto) in the same process"
SOCKET = "raw socket, loopback (request, recv_into 32 KiB at a time)"
REDIS_SET = "Redis SET (MSET)"
REDIS_GET = "Redis GET (MGET, written by another process)"
MOONCAKE_PUT = "Mooncake put, cross-process over TCP"
MOONCAKE_GET = "Mooncake get, cross-process over TCP"
MOONCAKE_OPERATION = {MOONCAKE_PUT: "put, other process", MOONCAKE_GET: "get, other process"}
SHORT_NAMES = {MEMCPY: "memcpy", SOCKET: "raw socket", MOONCAKE_GET: "Mooncake tcp", MOONCAKE_PUT: "Mooncake tcp"}

# The goals, per (figure kind, block size): {reference: target}.
TARGETS: dict[tuple[str, int], dict[str, Target]] = {
    ("put", 2 * MiB): {MEMCPY: Target.ratio_at_least(0.7)},
    ("get", 2 * MiB): {MEMCPY: Target.ratio_at_least(0.8)},
    ("get", 64 * KiB): {MEMCPY: Target.ratio_at_least(0.5)},
    ("fetch", 2 * MiB): {SOCKET: Target.ratio_at_least(0.8), MOONCAKE_GET: Target.ratio_at_least(2.0)},
    ("tcp get", 2 * MiB): {SOCKET: Target.ratio_at_least(0.8), MOONCAKE_GET: Target.ratio_at_least(2.0)},
}
LOOKUP_P99_TARGET = Target.value_at_most(2.0)  # ms

Log = Callable[[str], None]


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """How much work each figure does; `--quick` shrinks it for development."""

    repeats: int  # every figure is the median of this many repeats
    runs: int  # ... in the median one of this many whole runs
    block_sizes: tuple[int, ...]
    volume_bytes: int  # bytes each data-path trial moves per repeat (whole batches, at least one)
    remote_volume_bytes: int  # ... of the remote figures: a loopback transfer varies 1.5x call to call
    lookup_clients: int
    lookup_threads: bool  # the clients are threads of one process, not processes
    lookup_seconds: float  # the window each Lookup repeat measures
    redis: bool
    mooncake: bool

    def iterations(self, block_bytes: int, *, remote: bool = False) -> int:
        volume = self.remote_volume_bytes if remote else self.volume_bytes
        return max(1, volume // (BATCH_BLOCKS * block_bytes))


# -- timing: trials timed here or in an engine, rotated like harness.measure -----------------------


@dataclass(frozen=True, slots=True)
class Timed:
    """A trial timed wherever it runs: `run(n)` makes n calls and returns each one's nanoseconds."""

    run: Callable[[int], list[int]]

    @classmethod
    def here(cls, trial: Trial) -> Timed:
        return cls(lambda calls: harness.time_calls(trial, calls))


@dataclass(frozen=True, slots=True)
class Measurement:
    """A figure, the references it is divided by (each a table row), and where it has targets."""

    group: str
    name: str
    subject: Timed
    references: dict[str, Timed]  # interleaved with the subject, order rotated
    iterations: int  # calls of each trial per repeat
    bytes_per_call: int
    beside: dict[str, float] = field(default_factory=dict)  # GB/s of references measured beside, not interleaved
    targets: dict[str, Target] = field(default_factory=dict)  # per reference
    notes: dict[str, str] = field(default_factory=dict)  # per reference


def measure(measurement: Measurement, repeats: int) -> list[Figure]:
    """One warm-up call of each trial, then `repeats` rounds of every trial back to back, the
    order rotated each round; one figure per reference (interleaved ones first)."""
    trials = {"": measurement.subject, **measurement.references}
    names = list(trials)
    values: dict[str, list[float]] = {name: [] for name in names}
    with harness.gc_paused():
        for trial in trials.values():
            trial.run(1)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = trials[name].run(measurement.iterations)
                values[name].append(harness.summarize(elapsed, Unit.GBPS, measurement.bytes_per_call))
    subject = values[""]
    baselines = {name: values[name] for name in measurement.references}
    baselines |= {name: [value] * len(subject) for name, value in measurement.beside.items()}
    return [
        make_figure(
            measurement.group,
            measurement.name,
            Unit.GBPS,
            subject,
            reference,
            baseline,
            measurement.targets.get(reference),
            measurement.notes.get(reference, ""),
        )
        for reference, baseline in baselines.items()
    ]


def make_figure(
    group: str,
    name: str,
    unit: Unit,
    subject: list[float],
    reference: str,
    baseline: list[float],
    target: Target | None,
    note: str,
) -> Figure:
    """As harness.make_figure, for any reference row (a figure here may have two targets)."""
    value, reference_value = statistics.median(subject), statistics.median(baseline)
    ratio = statistics.median(s / b for s, b in zip(subject, baseline, strict=True))
    return Figure(
        group=group,
        name=name,
        unit=unit,
        value=value,
        reference=reference,
        reference_value=reference_value,
        ratio=ratio,
        target=target.describe(unit) if target else "",
        status=target.status(value, ratio) if target else "",
        note=note,
        samples=subject,
    )


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    figures: list[Figure]
    context: dict[str, str]
    missing: dict[str, str]  # reference -> why it could not run
    extra: dict[str, Any]  # raw numbers for the JSON file


@dataclass
class Rig:
    """Everything a run measures with: daemons, engines, references, this process's buffers."""

    settings: Settings
    node_a: Daemon
    node_b: Daemon
    writer: Engine
    reader: Engine
    client_a: Client  # TCP transport: registration, the TCP get
    client_b: Client  # on B's host (shared memory): Fetch and Remove on node B
    stream: node_refs.SocketStream
    redis: node_refs.RedisReference | None
    mooncake: mooncake_ref.MooncakeResult | None
    source: npt.NDArray[np.uint8]  # the largest batch, random bytes (Redis SET)
    dest: npt.NDArray[np.uint8]  # the largest batch (raw socket, TCP get)
    rng: np.random.Generator


def engine_trial(engine: Engine, command: str, **arguments: Any) -> Timed:
    """A trial an engine times: `command` with `iterations` set to the number of calls."""
    return Timed(lambda calls: list(engine.call(command, iterations=calls, **arguments)))


def beside_references(rig: Rig, labels: Sequence[str], block_bytes: int) -> dict[str, float]:
    mooncake = rig.mooncake
    if mooncake is None or mooncake.unavailable:
        return {}
    return {label: mooncake.gbps(MOONCAKE_OPERATION[label], block_bytes) for label in labels}


def measurement(
    rig: Rig,
    group: str,
    kind: str,
    name: str,
    block_bytes: int,
    subject: Timed,
    references: dict[str, Timed],
    beside: Sequence[str],
    notes: dict[str, str] | None = None,
) -> Measurement:
    notes = dict(notes or {})
    for label in beside:
        notes.setdefault(label, "")
        notes[label] = "; ".join(n for n in (notes[label], "measured beside (own timed loop), not interleaved") if n)
    return Measurement(
        group=group,
        name=name,
        subject=subject,
        references=references,
        iterations=rig.settings.iterations(block_bytes, remote=group == REMOTE_GROUP),
        bytes_per_call=BATCH_BLOCKS * block_bytes,
        beside=beside_references(rig, beside, block_bytes),
        targets=TARGETS.get((kind, block_bytes), {}),
        notes=notes,
    )


def size_measurements(rig: Rig, block_bytes: int) -> Iterator[Measurement]:
    """Local put and get, remote Fetch and TCP get, of one block size."""
    size = format_size(block_bytes)
    namespace = namespace_for(block_bytes)
    namespace_a = rig.client_a.register_namespace(namespace)
    namespace_b = rig.client_b.register_namespace(namespace)
    keys = fresh_keys(rig.rng, BATCH_BLOCKS)
    crc = rig.writer.call("store_batch", block_bytes=block_bytes, keys=keys)
    sources = split_blocks(rig.source, block_bytes)
    dests = split_blocks(rig.dest, block_bytes)
    redis_set: dict[str, Timed] = {}
    redis_get: dict[str, Timed] = {}
    if rig.redis is not None:
        rig.redis.clear()
        redis_set = {REDIS_SET: Timed.here(rig.redis.set_trial(sources))}
        redis_get = {REDIS_GET: Timed.here(rig.redis.get_trial(block_bytes))}

    puts = engine_trial(rig.writer, "time_puts", block_bytes=block_bytes, seed=int(rig.rng.integers(1 << 62)))
    yield measurement(
        rig,
        LOCAL_GROUP,
        "put",
        f"local put {size}",
        block_bytes,
        puts,
        {MEMCPY: engine_trial(rig.writer, "time_memcpy", block_bytes=block_bytes), **redis_set},
        [MOONCAKE_PUT],
        {
            MEMCPY: "writer process: Reserve, copy per block (hashed while copying below 128 KiB, "
            "by the node in the background above), Commit; fresh keys"
        },
    )
    rig.reader.call("time_gets", block_bytes=block_bytes, keys=keys, iterations=0, expect_crc=crc)
    gets = engine_trial(rig.reader, "time_gets", block_bytes=block_bytes, keys=keys, expect_crc=None)
    yield measurement(
        rig,
        LOCAL_GROUP,
        "get",
        f"local get {size}, other process",
        block_bytes,
        gets,
        {MEMCPY: engine_trial(rig.reader, "time_memcpy", block_bytes=block_bytes), **redis_get},
        [MOONCAKE_GET],
        {
            MEMCPY: "reader process: located in the node's shared index, copied per block without a "
            "lease, checked after; written by the writer process"
        },
    )

    # Remote: node B pulls the writer's batch from node A; removed from B after each call, untimed.
    def fetch(_: int) -> None:
        result = rig.client_b.fetch(namespace_b, keys, rig.node_a.data_address)
        if result.num_fetched != BATCH_BLOCKS:
            raise RuntimeError(f"Fetch copied {result} of {BATCH_BLOCKS} blocks")

    def unfetch(_: int) -> None:
        removed = rig.client_b.remove(namespace_b, keys)
        if removed.num_removed != BATCH_BLOCKS:
            raise RuntimeError(f"removed {removed} of {BATCH_BLOCKS} fetched blocks from node B")

    socket_trial = {SOCKET: Timed.here(rig.stream.trial(dests))}
    yield measurement(
        rig,
        REMOTE_GROUP,
        "fetch",
        f"remote Fetch {size}: B pulls from A",
        block_bytes,
        Timed.here(Trial(fetch, after=unfetch)),
        {**socket_trial, **redis_get},
        [MOONCAKE_GET],
        {
            SOCKET: "a call to B from a Client on its host (over B's Unix socket); B pulls over A's data "
            "plane into its slots and verifies xxh3"
        },
    )

    typed_dests = typed(dests, namespace)
    rig.dest[: BATCH_BLOCKS * block_bytes].fill(0)
    if rig.client_a.get_into(namespace_a, keys, typed_dests) != BATCH_BLOCKS or refs_common.batch_crc(dests) != crc:
        raise RuntimeError("the TCP get delivered other bytes than the writer stored")

    def tcp_get(_: int) -> None:
        count = rig.client_a.get_into(namespace_a, keys, typed_dests)
        if count != BATCH_BLOCKS:
            raise RuntimeError(f"TCP get_into found {count} of {BATCH_BLOCKS} blocks")

    yield measurement(
        rig,
        REMOTE_GROUP,
        "tcp get",
        f"remote TCP get {size}: client from A",
        block_bytes,
        Timed.here(Trial(tcp_get)),
        {**socket_trial, **redis_get},
        [MOONCAKE_GET],
        {SOCKET: "Transport.TCP Client in this process: receive into the destinations, verify xxh3"},
    )


def measure_lookup(rig: Rig, log: Log) -> tuple[list[Figure], dict[str, Any]]:
    """p50 and p99 of Lookup with `lookup_clients` clients at once (processes, or threads of one
    process), against one client alone and against the same clients calling the standard
    health Check (the floor of a unary gRPC call to the node), rotated like `measure`."""
    settings = rig.settings
    clients = settings.lookup_clients
    namespace_id = rig.client_a.register_namespace(LOOKUP_NAMESPACE)
    keys = fresh_keys(rig.rng, LOOKUP_CHAIN)
    payloads = [np.zeros(LOOKUP_NAMESPACE.block_bytes, dtype=np.uint8)] * LOOKUP_CHAIN
    rig.client_a.put_blocks(namespace_id, keys, payloads)
    kind = "threads of one process" if settings.lookup_threads else "processes"
    log(f"Lookup: {clients} clients as {kind}")
    with contextlib.ExitStack() as stack:
        count = 1 if settings.lookup_threads else clients
        address = rig.node_a.grpc_address
        remote = [stack.enter_context(Engine(f"lookup-{i}", address, Transport.TCP, 0)) for i in range(count)]
        local = [
            stack.enter_context(Engine(f"local-lookup-{i}", address, Transport.SHARED_MEMORY, 0)) for i in range(count)
        ]
        for engine in remote + local:
            engine.wait_ready()

        def load(rpc: str, callers: int, engines: list[Engine]) -> list[int]:
            start_at = time.monotonic() + 0.3 + 0.03 * callers  # every caller warmed and waiting
            arguments = {"keys": keys, "rpc": rpc, "start_at": start_at, "seconds": settings.lookup_seconds}
            if settings.lookup_threads:
                return list(engines[0].call("time_lookups", threads=callers, **arguments))
            for engine in engines[:callers]:  # every engine at once: send all, then collect
                engine.send("time_lookups", threads=1, **arguments)
            return [ns for engine in engines[:callers] for ns in engine.result()]

        trials: dict[str, Callable[[], list[int]]] = {
            "local": lambda: load("lookup", clients, local),
            "socket": lambda: load("socket lookup", clients, local),
            "lookup": lambda: load("lookup", clients, remote),
            "alone": lambda: load("lookup", 1, remote),
            "health": lambda: load("health", clients, remote),
            "health alone": lambda: load("health", 1, remote),
        }
        stats: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": [], "rate": []} for name in trials}
        names = list(trials)
        for repeat in range(settings.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = np.asarray(trials[name](), dtype=np.float64) / 1e6
                p50, p99 = np.percentile(elapsed, [50, 99])
                stats[name]["p50"].append(float(p50))
                stats[name]["p99"].append(float(p99))
                stats[name]["rate"].append(elapsed.size / settings.lookup_seconds)
    rate = {name: statistics.median(values["rate"]) for name, values in stats.items()}
    many = f"{clients} {kind}, one Client each, closed loop, {settings.lookup_seconds:g} s per repeat"
    figures = []
    for quantile in ("p50", "p99"):
        target = LOOKUP_P99_TARGET if quantile == "p99" else None
        local_note = (
            f"{many}, on the node's host: the engines' path (the node's shared index, no call): "
            f"{rate['local']:,.0f} Lookups/s in all"
        )
        socket_note = f"the same clients asking the node over its Unix socket: {rate['socket']:,.0f} Lookups/s in all"
        figures.append(
            make_figure(
                LOOKUP_GROUP,
                f"Lookup {quantile}, {clients} same-host clients",
                Unit.MS,
                stats["local"][quantile],
                f"gRPC Lookup {quantile}, {clients} clients",
                stats["lookup"][quantile],
                target,
                local_note if quantile == "p50" else "",
            )
        )
        figures.append(
            make_figure(
                LOOKUP_GROUP,
                f"socket Lookup {quantile}, {clients} same-host clients",
                Unit.MS,
                stats["socket"][quantile],
                f"gRPC Lookup {quantile}, {clients} clients",
                stats["lookup"][quantile],
                None,
                socket_note if quantile == "p50" else "",
            )
        )
        name = f"gRPC Lookup {quantile}, {clients} clients"
        alone_note = f"{many}: {rate['lookup']:,.0f} Lookups/s in all; alone: {rate['alone']:,.0f}/s"
        health_note = f"health Check: {rate['health']:,.0f} calls/s in all"
        references = {  # reference label: (its trial, target, note)
            f"Lookup {quantile}, 1 client alone": ("alone", None, alone_note if quantile == "p50" else ""),
            f"gRPC health Check {quantile}, {clients} clients (the floor of a unary call)": (
                "health",
                None,
                health_note if quantile == "p50" else "",
            ),
        }
        for reference, (base, goal, note) in references.items():
            subject, baseline = stats["lookup"][quantile], stats[base][quantile]
            figures.append(make_figure(LOOKUP_GROUP, name, Unit.MS, subject, reference, baseline, goal, note))
    figures.append(
        make_figure(
            LOOKUP_GROUP,
            "Lookup p50, 1 client alone",
            Unit.MS,
            stats["alone"]["p50"],
            "gRPC health Check p50, 1 client alone",
            stats["health alone"]["p50"],
            None,
            f"one Lookup of {LOOKUP_CHAIN} keys against the cheapest unary call to the same node",
        )
    )
    return figures, {"lookup": stats}


def run_once(settings: Settings, progress: tqdm, log: Log) -> RunResult:
    missing: dict[str, str] = {}
    context: dict[str, str] = {}
    extra: dict[str, Any] = {}
    max_size = max(settings.block_sizes)
    mooncake = None
    if settings.mooncake:  # first, alone: its worker times its own loop, and needs the memory
        progress.set_description("Mooncake Store")
        calls = [settings.iterations(size) * settings.repeats for size in settings.block_sizes]
        mooncake = mooncake_ref.measure_mooncake(settings.block_sizes, calls, log)
        if mooncake.unavailable:
            missing["Mooncake Store"] = mooncake.unavailable
        else:
            context |= mooncake.context
            extra["mooncake_median_ns"] = mooncake.median_ns
        progress.update(1)
    figures: list[Figure] = []
    with contextlib.ExitStack() as stack:
        progress.set_description("starting daemons and engines")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvstore-bench-node-")))
        node_a = stack.enter_context(node_daemon("a", workdir))
        node_b = stack.enter_context(node_daemon("b", workdir))
        writer = stack.enter_context(Engine("writer", node_a.grpc_address, Transport.SHARED_MEMORY, max_size))
        reader = stack.enter_context(Engine("reader", node_a.grpc_address, Transport.SHARED_MEMORY, max_size))
        rng = np.random.default_rng(SEED)
        source = harness.aligned_bytes(BATCH_BLOCKS * max_size)
        source[:] = rng.integers(0, 256, source.size, dtype=np.uint8)
        dest = harness.aligned_bytes(BATCH_BLOCKS * max_size)
        stream = stack.enter_context(node_refs.SocketStream(max_size))
        redis_ref = None
        if settings.redis:
            try:
                redis_ref = stack.enter_context(node_refs.RedisReference(log))
                context |= redis_ref.context
            except refs_common.UnavailableError as error:
                missing["Redis"] = str(error)
        client_a = stack.enter_context(Client(node_a.grpc_address, transport=Transport.TCP, timeout_s=120.0))
        client_b = stack.enter_context(Client(node_b.grpc_address, transport=Transport.SHARED_MEMORY, timeout_s=120.0))
        writer.wait_ready()
        reader.wait_ready()
        rig = Rig(
            settings, node_a, node_b, writer, reader, client_a, client_b, stream, redis_ref, mooncake, source, dest, rng
        )
        try:
            for block_bytes in settings.block_sizes:
                for item in size_measurements(rig, block_bytes):
                    progress.set_description(item.name)
                    measured = measure(item, settings.repeats)
                    harness.report(measured, progress)
                    figures += measured
            progress.set_description("Lookup")
            lookup, extra_lookup = measure_lookup(rig, log)
            harness.report(lookup, progress)
            figures += lookup
            extra |= extra_lookup
        except BaseException:
            for daemon in (node_a, node_b):
                log(f"node {daemon.name}: {log_tail(daemon.log_path)}")
            raise
    context |= {
        "daemons": f"2 x `kvstore serve` (python -m kvstore.cli serve), loopback, DRAM pool {DRAM_POOL} in "
        f"{DRAM_SLAB} slabs, NVMe off, eviction policy {StoreSection().eviction_policy} (the default), "
        "logging at warning",
        "engines": "separate processes (multiprocessing spawn), one Client each: writer and reader through "
        "shared memory (Transport.SHARED_MEMORY); Fetch, TCP get and Redis from this process",
        "grpcio": grpc.__version__,
    }
    return RunResult(figures, context, missing, extra)


# -- report ----------------------------------------------------------------------------------------


def median_run(runs: list[RunResult]) -> RunResult:
    """`harness.median_figures` of the runs, with the last run's context."""
    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    merged = median_figures([run.figures for run in runs])
    return RunResult(merged, last.context, last.missing, {"runs": [run.extra for run in runs]})


def render_markdown(result: RunResult, context: dict[str, str], settings: Settings, command: str) -> str:
    lines = [
        "## Node (issue 3)",
        "",
        f"Written by `{command}` on {context['date']}.",
        "",
        *(f"- {name}: {value}" for name, value in context.items() if name != "date"),
        "",
        f"Every figure is the median of {settings.repeats} repeats in the median one of {settings.runs} runs "
        "(the note gives the runs' range), in batches of 32 blocks. Ratio = figure / reference: the median over "
        "the repeats of the two measured back to back, the order rotated (higher is better for GB/s, lower for "
        "ms). Rows marked 'measured beside' divide by a median measured in the same run but not interleaved. "
        "Engines time their own calls; sources and destinations are preallocated, page-aligned and "
        "pre-faulted; every put writes fresh keys.",
        "",
        harness.target_summary(result.figures),
        "",
        f"![Node ratios]({PLOT_PATH.name})",
        *harness.markdown_tables(result.figures),
    ]
    if result.missing:
        lines += ["", *(f"- {name} unavailable: {reason}" for name, reason in result.missing.items())]
    return "\n".join(lines)


def plot_figures(figures: list[Figure]) -> list[Figure]:
    """The data-path rows worth a bar: each measurement's first row and every row with a target,
    named by figure and reference."""
    rows: list[Figure] = []
    seen: set[str] = set()
    for figure in figures:
        first = figure.name not in seen
        seen.add(figure.name)
        if figure.unit is Unit.GBPS and (first or figure.target):
            label = f"{figure.name} / {SHORT_NAMES.get(figure.reference, figure.reference)}"
            rows.append(replace(figure, group=PLOT_GROUP, name=label))
    return rows


def write_plot(figures: list[Figure], path: Path) -> None:
    from tools.bench.plot import plot_ratios  # noqa: PLC0415 (matplotlib: not in the engine processes)

    plot_ratios(plot_figures(figures), PLOT_GROUP, "kvstore node (real daemons), batches of 32 blocks", path)


# -- entry point -----------------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(parse_size_bytes(item.strip(), "--sizes") for item in text.split(",") if item.strip())
        for size in sizes:
            namespace_for(size)
    except (ConfigError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no block sizes given")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark kvstore node daemons: local, remote and Lookup.")
    parser.add_argument("--quick", action="store_true", help="fewer sizes, repeats and bytes; implies --no-doc")
    parser.add_argument(
        "--runs", type=int, default=3, help="whole runs; each row reports the median run (default 3, 1 with --quick)"
    )
    parser.add_argument("--repeats", type=int, help="repeats per figure (default 5, 3 with --quick)")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        help="block sizes, comma-separated, e.g. 64KiB,2MiB or bytes (default 64KiB,512KiB,2MiB,8MiB; "
        "64KiB,2MiB with --quick)",
    )
    parser.add_argument("--no-redis", action="store_true", help="leave the Redis references out")
    parser.add_argument("--no-mooncake", action="store_true", help="leave the Mooncake Store references out")
    parser.add_argument(
        "--lookup-clients",
        type=int,
        default=LOOKUP_CLIENTS,
        help=f"concurrent Lookup clients (default {LOOKUP_CLIENTS})",
    )
    parser.add_argument(
        "--lookup-threads", action="store_true", help="Lookup clients as threads of one process, not processes"
    )
    parser.add_argument(
        "--out-json", type=Path, default=JSON_PATH, help=f"results file (default {JSON_PATH.relative_to(REPO)})"
    )
    parser.add_argument(
        "--no-doc", action="store_true", help=f"do not rewrite the section in {DOC_PATH.relative_to(REPO)} or the plot"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.lookup_clients < 1:
        parser.error("--lookup-clients must be at least 1")
    if args.quick:
        args.runs = 1
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        repeats=args.repeats or (3 if args.quick else 5),
        runs=args.runs,
        block_sizes=args.sizes or (QUICK_BLOCK_SIZES if args.quick else BLOCK_SIZES),
        volume_bytes=(64 if args.quick else 128) * MiB,
        remote_volume_bytes=(256 if args.quick else 1024) * MiB,
        lookup_clients=args.lookup_clients,
        lookup_threads=args.lookup_threads,
        lookup_seconds=1.0 if args.quick else 1.5,
        redis=not args.no_redis,
        mooncake=not args.no_mooncake,
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    settings = settings_from(args)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *arguments])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    steps = settings.runs * (4 * len(settings.block_sizes) + 1 + settings.mooncake)
    runs = []
    with tqdm(total=steps, file=sys.stderr, unit="figure", dynamic_ncols=True, disable=None) as progress:
        log: Log = lambda message: progress.write(message, file=sys.stderr)  # noqa: E731
        for run in range(settings.runs):
            log(f"run {run + 1} of {settings.runs}")
            runs.append(run_once(settings, progress, log))
    result = median_run(runs)
    context = {"date": date, **harness.machine_info(), **result.context}
    section = render_markdown(result, context, settings, command)
    print(section)
    payload = {"command": command, "settings": asdict(settings), "context": context, "missing": result.missing}
    figures = [asdict(figure) for figure in result.figures]
    harness.write_json(args.out_json, {**payload, "figures": figures, "raw": result.extra})
    if not (args.no_doc or args.quick):
        harness.write_doc_section(DOC_PATH, section, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        write_plot(result.figures, PLOT_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
