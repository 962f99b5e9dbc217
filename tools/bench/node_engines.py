"""The processes the node benchmark (tools/bench/node.py) drives: `kvstore serve` daemons, and
engine processes ("prefill" writers, "decode" readers, Lookup callers), each with its own
`Client`, that time their own calls and report the nanoseconds back over a pipe, so the pipe
is never billed to the node.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

if not __package__:  # run as a script (the documented way): make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.client import Client, Transport
from kvstore.types import BlockKey, DType, KVLayout, Namespace, NamespaceId
from tools.bench import harness, node_refs, refs_common
from tools.bench.refs_common import BATCH_BLOCKS, log_tail, split_blocks

SEED = 5
DRAM_POOL = "2 GiB"  # per daemon; the largest size holds a stored batch, a put batch and a fetched one
DRAM_SLAB = "16 MiB"
READY_SECONDS = 60.0  # for a daemon's ready line or an engine's answer to setup
CALL_SECONDS = 900.0  # for an engine to answer a timed command


def namespace_for(block_bytes: int) -> Namespace:
    """float16, 8 KV heads of 128, 16 tokens: 64 KiB per layer, so 1, 8, 32 or 128 layers."""
    per_layer = 2 * 16 * 8 * 128 * DType.FLOAT16.itemsize
    layers, rest = divmod(block_bytes, per_layer)
    if rest or not layers:
        raise ValueError(f"block size {block_bytes} is not a positive multiple of {per_layer}")
    namespace = Namespace("bench-node", DType.FLOAT16, KVLayout(layers, 8, 128), block_tokens=16)
    if namespace.block_bytes != block_bytes:
        raise AssertionError(f"namespace_for({block_bytes}) holds {namespace.block_bytes}-byte blocks")
    return namespace


LOOKUP_NAMESPACE = Namespace("bench-node-lookup", DType.FLOAT16, KVLayout(1, 1, 64), block_tokens=16)  # 4 KiB


def fresh_keys(rng: np.random.Generator, count: int) -> list[BlockKey]:
    raw = rng.bytes(16 * count)
    return [BlockKey(raw[i : i + 16]) for i in range(0, len(raw), 16)]


def typed(blocks: Sequence[npt.NDArray[np.uint8]], namespace: Namespace) -> list[npt.NDArray[np.float16]]:
    """As an engine hands them over: arrays of the namespace's dtype and block shape."""
    return [block.view(np.float16).reshape(namespace.block_shape) for block in blocks]


# -- daemons -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Daemon:
    name: str
    pid: int
    grpc_address: str
    data_address: str
    log_path: Path


def daemon_overrides(data_dir: Path, node_id: str) -> list[str]:
    settings: dict[str, object] = {
        "node.node_id": node_id,
        "node.data_dir": data_dir,
        "server.grpc_port": 0,
        "server.data_port": 0,
        "server.metrics_port": -1,
        "store.dram_capacity_bytes": DRAM_POOL,
        "store.dram_slab_bytes": DRAM_SLAB,
        "store.nvme_capacity_bytes": 0,
        "shutdown.drain_timeout_s": 5,
        "shutdown.flush_to_nvme": "false",
        "logging.format": "text",
        "logging.level": "warning",
    }
    return [f"{key}={value}" for key, value in settings.items()]


@contextlib.contextmanager
def node_daemon(name: str, workdir: Path) -> Iterator[Daemon]:
    """A `kvstore serve` process with its defaults but for the overrides above (KVSTORE_*
    variables of this environment are not passed on); stopped with SIGTERM on exit, killed if
    it does not stop, also on error."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KVSTORE_")}
    environment["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "kvstore.cli", "serve"]
    for item in daemon_overrides(workdir / name, f"bench-{name}"):
        command += ["--set", item]
    log_path = workdir / f"node-{name}.log"
    with log_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment
        )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], READY_SECONDS)
        line = process.stdout.readline() if readable else ""
        if not line:
            raise RuntimeError(f"node {name} did not print its ready line: {log_tail(log_path)}")
        ready = json.loads(line)
        yield Daemon(name, process.pid, ready["grpc"], ready["data"], log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


# -- engine processes ------------------------------------------------------------------------------


class _EngineState:
    """What an engine process holds: its Client, and preallocated, pre-faulted source and
    destination memory for the largest batch (none for a Lookup-only engine)."""

    def __init__(self, address: str, transport: Transport, max_block_bytes: int) -> None:
        self.client = Client(address, transport=transport, timeout_s=120.0)
        self.source = harness.aligned_bytes(max(BATCH_BLOCKS * max_block_bytes, mmap.PAGESIZE))
        self.source[:] = np.random.default_rng(SEED + os.getpid()).integers(0, 256, self.source.size, dtype=np.uint8)
        self.dest = harness.aligned_bytes(max(BATCH_BLOCKS * max_block_bytes, mmap.PAGESIZE))
        self.namespaces: dict[int, tuple[NamespaceId, Namespace]] = {}

    def namespace(self, block_bytes: int) -> tuple[NamespaceId, Namespace]:
        if block_bytes not in self.namespaces:
            namespace = namespace_for(block_bytes)
            self.namespaces[block_bytes] = (self.client.register_namespace(namespace), namespace)
        return self.namespaces[block_bytes]

    # Each command returns something picklable; the timed ones return each call's nanoseconds.

    def store_batch(self, block_bytes: int, keys: list[BlockKey]) -> int:
        """Put one batch (untimed) for another process to read; returns its CRC-32."""
        namespace_id, namespace = self.namespace(block_bytes)
        sources = split_blocks(self.source, block_bytes)
        result = self.client.put_blocks(namespace_id, keys, typed(sources, namespace))
        if result.num_written + result.num_present != BATCH_BLOCKS:
            raise RuntimeError(f"stored {result} of {BATCH_BLOCKS} blocks")
        return refs_common.batch_crc(sources)

    def time_puts(self, block_bytes: int, iterations: int, seed: int) -> list[int]:
        """`put_blocks` of fresh keys, each batch removed again outside the clock."""
        namespace_id, namespace = self.namespace(block_bytes)
        payloads = typed(split_blocks(self.source, block_bytes), namespace)
        batches = [fresh_keys(np.random.default_rng(seed + i), BATCH_BLOCKS) for i in range(iterations)]
        elapsed = []
        with harness.gc_paused():
            for keys in batches:
                start = time.perf_counter_ns()
                result = self.client.put_blocks(namespace_id, keys, payloads)
                elapsed.append(time.perf_counter_ns() - start)
                if result.num_written != BATCH_BLOCKS:
                    raise RuntimeError(f"put wrote {result.num_written} of {BATCH_BLOCKS} fresh blocks")
                removed = self.client.remove(namespace_id, keys)
                if removed.num_removed != BATCH_BLOCKS:
                    raise RuntimeError(f"removed {removed} of {BATCH_BLOCKS} blocks after a put")
        return elapsed

    def time_gets(self, block_bytes: int, keys: list[BlockKey], iterations: int, expect_crc: int | None) -> list[int]:
        """`get_into` preallocated destinations; with `expect_crc`, checked once first (untimed)."""
        namespace_id, namespace = self.namespace(block_bytes)
        dests = split_blocks(self.dest, block_bytes)
        typed_dests = typed(dests, namespace)
        if expect_crc is not None:
            self.dest[: BATCH_BLOCKS * block_bytes].fill(0)
            count = self.client.get_into(namespace_id, keys, typed_dests)
            if count != BATCH_BLOCKS or refs_common.batch_crc(dests) != expect_crc:
                raise RuntimeError("get_into delivered other bytes than the writer stored")
        elapsed = []
        with harness.gc_paused():
            for _ in range(iterations):
                start = time.perf_counter_ns()
                count = self.client.get_into(namespace_id, keys, typed_dests)
                elapsed.append(time.perf_counter_ns() - start)
                if count != BATCH_BLOCKS:
                    raise RuntimeError(f"get_into found {count} of {BATCH_BLOCKS} blocks")
        return elapsed

    def time_memcpy(self, block_bytes: int, iterations: int) -> list[int]:
        """`np.copyto` of each block, source to destination memory of this process."""
        trial = node_refs.memcpy_trial(split_blocks(self.source, block_bytes), split_blocks(self.dest, block_bytes))
        with harness.gc_paused():
            return harness.time_calls(trial, iterations)

    def time_lookups(self, keys: list[BlockKey], rpc: str, threads: int, start_at: float, seconds: float) -> list[int]:
        """`threads` callers of their own call `rpc` in a closed loop from `start_at`
        (time.monotonic, shared by every process) for `seconds`; returns the nanoseconds of
        every call that started in that window. "lookup": Client.lookup of `keys` (this
        process's Client, then new ones); "socket lookup": the same from new same-host Clients
        that ask the node instead of reading its shared index; "health": the standard grpc.health.v1 Check on a
        channel of its own, the least a unary call to the node costs."""
        calls: list[Callable[[], None]] = []
        closers: list[Callable[[], None]] = []
        namespace_id = LOOKUP_NAMESPACE.namespace_id
        for index in range(threads):
            if rpc == "lookup":
                client = self.client if index == 0 else Client(self.client.address, transport=Transport.TCP)
                if index:
                    closers.append(client.close)
                calls.append(functools.partial(_lookup_all, client, namespace_id, keys))
            elif rpc == "socket lookup":  # on the node's host, without its shared index
                client = Client(self.client.address, transport=Transport.SHARED_MEMORY, shared_index=False)
                closers.append(client.close)
                calls.append(functools.partial(_lookup_all, client, namespace_id, keys))
            else:
                channel = grpc.insecure_channel(self.client.address)
                closers.append(channel.close)
                stub = health_pb2_grpc.HealthStub(channel)
                calls.append(functools.partial(stub.Check, health_pb2.HealthCheckRequest(), timeout=60.0))
        results: list[list[int]] = [[] for _ in calls]
        errors: list[BaseException] = []

        def loop(call: Callable[[], None], elapsed: list[int]) -> None:
            try:
                for _ in range(10):  # warm the channel before the window
                    call()
                while time.monotonic() < start_at:
                    time.sleep(0.001)
                end_ns = int((start_at + seconds) * 1e9)
                while time.monotonic_ns() < end_ns:
                    start = time.perf_counter_ns()
                    call()
                    elapsed.append(time.perf_counter_ns() - start)
            except BaseException as error:
                errors.append(error)

        workers = [threading.Thread(target=loop, args=pair) for pair in zip(calls, results, strict=True)]
        try:
            with harness.gc_paused():
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
        finally:
            for close in closers:
                close()
        if errors:
            raise errors[0]
        return [ns for elapsed in results for ns in elapsed]

    def close(self) -> None:
        self.client.close()


def _lookup_all(client: Client, namespace_id: NamespaceId, keys: list[BlockKey]) -> None:
    result = client.lookup(namespace_id, keys)
    if result.num_hits != len(keys):
        raise RuntimeError(f"Lookup found {result.num_hits} of {len(keys)} keys")


def engine_main(connection: Connection, address: str, transport: str, max_block_bytes: int) -> None:
    """An engine process: answers ("ready", pid), then serves (command, arguments) messages with
    ("ok", result) or ("error", traceback) until ("stop", {}) or the pipe closes."""
    try:
        state = _EngineState(address, Transport(transport), max_block_bytes)
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    commands: dict[str, Callable[..., Any]] = {
        "store_batch": state.store_batch,
        "time_puts": state.time_puts,
        "time_gets": state.time_gets,
        "time_memcpy": state.time_memcpy,
        "time_lookups": state.time_lookups,
    }
    connection.send(("ready", os.getpid()))
    try:
        while True:
            try:
                command, arguments = connection.recv()
            except EOFError:
                return
            if command == "stop":
                return
            try:
                connection.send(("ok", commands[command](**arguments)))
            except Exception:
                connection.send(("error", traceback.format_exc()))
    finally:
        state.close()


class Engine:
    """An engine process driven through a pipe; started on construction, stopped on exit.

    with Engine("reader", daemon.grpc_address, Transport.SHARED_MEMORY, max_block_bytes) as engine:
        nanoseconds = engine.call("time_gets", block_bytes=..., keys=..., iterations=..., expect_crc=None)
    """

    def __init__(self, role: str, address: str, transport: Transport, max_block_bytes: int) -> None:
        self.role = role
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=engine_main, args=(child, address, transport.value, max_block_bytes), name=role, daemon=True
        )
        self._process.start()
        child.close()
        self.pid = 0

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self) -> None:
        self.pid = self._receive(READY_SECONDS * 2, expected="ready")

    def call(self, command: str, **arguments: Any) -> Any:
        self.send(command, **arguments)
        return self.result()

    def send(self, command: str, **arguments: Any) -> None:
        """Start `command`; `result()` waits for its answer."""
        self._pipe.send((command, arguments))

    def result(self) -> Any:
        return self._receive(CALL_SECONDS, expected="ok")

    def _receive(self, timeout_s: float, *, expected: str) -> Any:
        if not self._pipe.poll(timeout_s):
            raise RuntimeError(f"the {self.role} engine did not answer within {timeout_s:g} s")
        try:
            kind, payload = self._pipe.recv()
        except EOFError:
            raise RuntimeError(f"the {self.role} engine exited ({self._process.exitcode})") from None
        if kind != expected:
            raise RuntimeError(f"the {self.role} engine failed:\n{payload}")
        return payload

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._pipe.send(("stop", {}))
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._pipe.close()
