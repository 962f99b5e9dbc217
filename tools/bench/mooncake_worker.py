"""One side of the Mooncake Store reference in tools/bench/node_refs.py, run with the Python of the
Mooncake virtual environment (Mooncake's wheel is not installed in the project's venv):

    .bench-venvs/mooncake/bin/python tools/bench/mooncake_worker.py {writer,reader} --master HOST:PORT
        --metadata URL --sizes BYTES,... --calls N,... [--segment-bytes N] [--expect-crc SIZE:CRC,...]

The writer mounts the global segment that holds every object (as a node holding its memory does),
times `batch_put_from` of fresh keys and `batch_get_into` of its own objects, stores one batch per
block size for the reader, reports, and stays up (its segment must outlive the reader's gets) until
its stdin closes. The reader mounts no segment, so its gets and puts all cross to the writer's
process over the TCP transport; it times `batch_get_into` of the writer's batch (checked once
against the writer's CRC-32) and `batch_put_from` of fresh keys.

It does the timed loop itself, because a round trip to the benchmark process per call would be
billed to Mooncake, and prints one JSON object per line on stdout: `{"event": "progress", ...}`,
then `{"event": "ready", ...}` (writer) or `{"event": "result", ...}` (reader), with every call's
nanoseconds per operation and block size; or `{"event": "error", "message": ...}`. Mooncake's own
log goes to stderr. Only the standard library, numpy and mooncake are imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

BATCH_BLOCKS = 32
LOCAL_BUFFER_BYTES = 16 << 20  # staging for the copying API; the zero-copy one transfers from registered memory
SEED = 7
ZERO_COPY_API = "batch_put_from / batch_get_into (zero-copy, registered buffers)"
COPY_API = "put_batch / get_batch (copying: bytes in, bytes out)"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def prefaulted(size_bytes: int) -> npt.NDArray[np.uint8]:
    """Page-aligned memory with every page faulted in: a first touch costs 2-3 us per 4 KiB here."""
    array = np.frombuffer(mmap.mmap(-1, size_bytes), dtype=np.uint8)
    array.fill(0)
    return array


class Client:
    """A `MooncakeDistributedStore` with registered source and destination buffers for the largest
    batch, and the batch operations of whichever API this Mooncake offers."""

    def __init__(self, args: argparse.Namespace, segment_bytes: int) -> None:
        from mooncake.store import MooncakeDistributedStore  # noqa: PLC0415 (only in the Mooncake venv)

        self.store = MooncakeDistributedStore()
        self.zero_copy = hasattr(self.store, "batch_put_from") and hasattr(self.store, "batch_get_into")
        batch_bytes = BATCH_BLOCKS * max(args.sizes)
        local_buffer = LOCAL_BUFFER_BYTES if self.zero_copy else batch_bytes
        code = self.store.setup(
            "127.0.0.1", args.metadata, segment_bytes, local_buffer, "tcp", "", args.master
        )  # local hostname, metadata server, global segment, local buffer, protocol, RDMA devices, master
        if code != 0:
            raise RuntimeError(f"MooncakeDistributedStore.setup returned {code}")
        self.source = prefaulted(batch_bytes)
        self.source[:] = np.random.default_rng(SEED).integers(0, 256, batch_bytes, dtype=np.uint8)
        self.dest = prefaulted(batch_bytes)
        if self.zero_copy:
            for buffer in (self.source, self.dest):
                code = self.store.register_buffer(buffer.ctypes.data, buffer.nbytes)
                if code != 0:
                    raise RuntimeError(f"register_buffer returned {code}")

    @property
    def api(self) -> str:
        return ZERO_COPY_API if self.zero_copy else COPY_API

    def put(self, keys: list[str], size: int) -> None:
        if self.zero_copy:
            pointers = [self.source.ctypes.data + i * size for i in range(len(keys))]
            codes = self.store.batch_put_from(keys, pointers, [size] * len(keys))
            if any(code != 0 for code in codes):
                raise RuntimeError(f"batch_put_from returned {sorted(set(codes))}")
        else:
            values = [self.source[i * size : (i + 1) * size].data for i in range(len(keys))]
            code = self.store.put_batch(keys, values)
            if code != 0:
                raise RuntimeError(f"put_batch returned {code}")

    def get(self, keys: list[str], size: int) -> None:
        if self.zero_copy:
            pointers = [self.dest.ctypes.data + i * size for i in range(len(keys))]
            sizes = self.store.batch_get_into(keys, pointers, [size] * len(keys))
            if any(got != size for got in sizes):
                raise RuntimeError(f"batch_get_into returned {sorted(set(sizes))} for blocks of {size} bytes")
        else:
            values = self.store.get_batch(keys)
            if any(len(value) != size for value in values):
                raise RuntimeError(f"get_batch returned {sorted({len(v) for v in values})} bytes, not {size}")
            for i, value in enumerate(values):
                self.dest[i * size : (i + 1) * size] = np.frombuffer(value, dtype=np.uint8)

    def remove(self, keys: list[str]) -> None:
        codes = self.store.batch_remove(keys, True)  # force: no lease to wait for
        if any(code != 0 for code in codes):
            raise RuntimeError(f"batch_remove returned {sorted(set(codes))}")

    def close(self) -> None:
        self.store.close()


def block_keys(prefix: str, size: int) -> list[str]:
    return [f"{prefix}-{size}-{i}" for i in range(BATCH_BLOCKS)]


def time_calls(calls: int, run: Callable[[int], None], after: Callable[[int], None] | None = None) -> list[int]:
    """Nanoseconds of `run(i)` for each call after one untimed warm-up call (i = -1); `after(i)` is
    not timed. The warm-up also faults in the segment pages the next calls reuse."""
    elapsed = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(-1, calls):
            start = time.perf_counter_ns()
            run(i)
            if i >= 0:
                elapsed.append(time.perf_counter_ns() - start)
            if after:
                after(i)
    finally:
        if enabled:
            gc.enable()
    return elapsed


def time_puts(client: Client, prefix: str, size: int, calls: int) -> list[int]:
    """Every put stores fresh keys (the store really allocates and writes); they are removed untimed."""

    def run(i: int) -> None:
        client.put(block_keys(f"{prefix}{i}", size), size)

    return time_calls(calls, run, lambda i: client.remove(block_keys(f"{prefix}{i}", size)))


def time_gets(client: Client, keys: list[str], size: int, calls: int) -> list[int]:
    def run(_: int) -> None:
        client.get(keys, size)

    return time_calls(calls, run)


def batch_crc(buffer: npt.NDArray[np.uint8], size: int) -> int:
    return zlib.crc32(buffer[: BATCH_BLOCKS * size].data)


def run_writer(args: argparse.Namespace) -> None:
    # Room for every stored batch plus two batches being put (the writer's and the reader's), with
    # a quarter to spare: the master starts evicting at 90 % full.
    stored = BATCH_BLOCKS * (sum(args.sizes) + 2 * max(args.sizes))
    client = Client(args, args.segment_bytes or stored * 5 // 4 + (64 << 20))
    timings: dict[str, dict[int, list[int]]] = {"put": {}, "get, same process": {}}
    crcs: dict[int, int] = {}
    for size, calls in zip(args.sizes, args.calls, strict=True):
        emit("progress", message=f"writer: put and local get, {size} B blocks")
        timings["put"][size] = time_puts(client, "put", size, calls)
        keys = block_keys("get", size)
        client.put(keys, size)
        client.dest[: BATCH_BLOCKS * size] = 0
        timings["get, same process"][size] = time_gets(client, keys, size, calls)
        crcs[size] = batch_crc(client.source, size)
        if batch_crc(client.dest, size) != crcs[size]:
            raise RuntimeError(f"a local get of {size} B blocks returned other bytes than were put")
    emit("ready", api=client.api, timings=timings, crcs=crcs)
    sys.stdin.read()  # until the benchmark is done with the reader
    client.close()


def run_reader(args: argparse.Namespace) -> None:
    client = Client(args, 0)  # no segment: every object lives in the writer's process
    timings: dict[str, dict[int, list[int]]] = {"get, other process": {}, "put, other process": {}}
    for size, calls in zip(args.sizes, args.calls, strict=True):
        emit("progress", message=f"reader: cross-process get and put, {size} B blocks")
        keys = block_keys("get", size)
        client.dest[: BATCH_BLOCKS * size] = 0
        client.get(keys, size)
        expected = args.expect_crc.get(size)
        if expected is not None and batch_crc(client.dest, size) != expected:
            raise RuntimeError(f"a cross-process get of {size} B blocks returned other bytes than the writer put")
        timings["get, other process"][size] = time_gets(client, keys, size, calls)
        timings["put, other process"][size] = time_puts(client, "reader-put", size, calls)
    emit("result", api=client.api, timings=timings)
    client.close()


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def crc_map(text: str) -> dict[int, int]:
    return {int(size): int(crc) for size, crc in (item.split(":") for item in text.split(",") if item)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time Mooncake Store batch put and get for tools/bench/node_refs.py")
    parser.add_argument("role", choices=("writer", "reader"))
    parser.add_argument("--master", required=True, help="the master's RPC address, HOST:PORT")
    parser.add_argument("--metadata", required=True, help="the metadata server, e.g. http://127.0.0.1:PORT/metadata")
    parser.add_argument("--sizes", type=int_list, required=True, help="block sizes in bytes, comma-separated")
    parser.add_argument("--calls", type=int_list, required=True, help="timed batches per block size, comma-separated")
    parser.add_argument("--segment-bytes", type=int, default=0, help="the writer's global segment (default: fits)")
    parser.add_argument("--expect-crc", type=crc_map, default={}, help="SIZE:CRC32 of the writer's batches")
    args = parser.parse_args(argv)
    if len(args.sizes) != len(args.calls):
        parser.error("--sizes and --calls need as many items each")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_writer(args) if args.role == "writer" else run_reader(args)
    except Exception as error:  # reported to the benchmark, which shows the reason
        emit("error", message=f"{args.role}: {type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
