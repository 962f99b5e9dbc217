"""Reference measurements for the node benchmark: what moving the same batches costs without kvstore.

    .venv/bin/python tools/bench/node_refs.py [--quick] [--repeats N] [--sizes BYTES,...] [--no-redis]
        [--no-mooncake]

tools/bench/node.py divides kvstore's figures by these, measured in the same run. The workload is
the node's: batches of 32 blocks of 64 KiB, 512 KiB, 2 MiB or 8 MiB, preallocated and pre-faulted
(a fresh page costs 2-3 us per 4 KiB here, which would swamp the transfers being timed).

1. memcpy: `np.copyto` of the 32 blocks between preallocated buffers in this process; the ceiling.
2. Raw socket: a request/response on loopback TCP, as a remote get is. This process sends an
   8-byte request; a sender process (multiprocessing, spawn) answers with the 32 blocks, one
   `sendall` each from its preallocated buffer; this process `recv_into`s preallocated blocks,
   READ_BYTES at a time with MSG_WAITALL: the fastest way to receive that we found here (one
   `recv_into` per 2 MiB block ran at 0.65-0.75x of it). The least any get over a socket costs
   in Python, framing and lookup aside.
3. Redis: a `redis-server` of our own on a free loopback port, no persistence
   (`--save '' --appendonly no`), stopped at the end, also on error; installed with apt-get when
   missing. The client is redis-py (hiredis when installed; neither is a project dependency).
   SET is one MSET of the 32 blocks (memoryviews, not copied into bytes first); GET is one MGET
   of 32 blocks that another process wrote with MSET. MGET returns new bytes objects, as redis-py
   does; nothing is copied into the destinations.
4. Mooncake Store (`mooncake-transfer-engine-non-cuda`), protocol "tcp", master and its embedded
   HTTP metadata server on loopback. Its wheel lives in its own venv (.bench-venvs/mooncake,
   created here when missing), so tools/bench/mooncake_worker.py runs the timed loops in that
   venv's Python and reports JSON: a writer process mounts the segment, puts and gets in its own
   process; a reader process without a segment gets the writer's objects and puts to its segment
   over TCP. These are medians of the worker's own timing, not harness Trials: they cannot be
   interleaved with the figures they calibrate, so they are measured next to them instead.

References 1-3 are `Trial`s (see harness.py) that the node benchmark times alongside its own;
2 and 3 come from context managers that own their processes. Nothing here imports kvstore: the
references do not depend on the code they judge. Standalone, this prints one markdown table of
every reference in GB/s per block size (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

if not __package__:  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench import harness
from tools.bench.harness import Comparison, Trial, Unit
from tools.bench.mooncake_ref import measure_mooncake
from tools.bench.refs_common import (
    BATCH_BLOCKS,
    BLOCK_SIZES,
    LOOPBACK,
    SEED,
    STOP_SECONDS,
    WAIT_SECONDS,
    KiB,
    Log,
    MiB,
    UnavailableError,
    batch_crc,
    format_size,
    free_port,
    log_stderr,
    split_blocks,
    stop_process,
    wait_for_port,
)

# -- 1. memcpy ---------------------------------------------------------------------------------------


def memcpy_trial(sources: Sequence[npt.NDArray[np.uint8]], dests: Sequence[npt.NDArray[np.uint8]]) -> Trial:
    """`np.copyto` of each block: one process, no system call, no framing; the ceiling."""
    pairs = list(zip(sources, dests, strict=True))

    def run(_: int) -> None:
        for source, dest in pairs:
            np.copyto(dest, source)

    return Trial(run)


# -- 2. raw socket stream ----------------------------------------------------------------------------

_REQUEST = struct.Struct("<q")  # > 0: send a batch of blocks of this size; < 0: its CRC-32; 0: stop
READ_BYTES = 32 * KiB  # per recv_into of the raw socket reference


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ConnectionError("the peer closed the connection mid-message")
        received += count


def recv_in_reads(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` READ_BYTES at a time: small reads keep the receiver draining the socket."""
    for start in range(0, len(view), READ_BYTES):
        chunk = view[start : start + READ_BYTES]
        if sock.recv_into(chunk, len(chunk), socket.MSG_WAITALL) != len(chunk):
            raise ConnectionError("the peer closed the connection mid-message")


def _stream_sender(port: int, max_block_bytes: int) -> None:
    """The sender process: answers each request with 32 blocks, one `sendall` each from a
    preallocated, pre-faulted buffer (module level, so that a spawned process can find it)."""
    source = harness.aligned_bytes(BATCH_BLOCKS * max_block_bytes)
    source[:] = np.random.default_rng(SEED).integers(0, 256, source.size, dtype=np.uint8)
    request = bytearray(_REQUEST.size)
    batches: dict[int, list[memoryview]] = {}
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            recv_exact(sock, memoryview(request))
            (size,) = _REQUEST.unpack(request)
            if size == 0:
                return
            if size < 0:
                sock.sendall(struct.pack("<I", batch_crc(split_blocks(source, -size))))
                continue
            if size not in batches:
                batches[size] = [block.data for block in split_blocks(source, size)]
            for block in batches[size]:
                sock.sendall(block)


class SocketStream:
    """A sender process connected to this one over loopback TCP, for `trial`s of remote-style gets.

    with SocketStream(max(BLOCK_SIZES)) as stream:
        trial = stream.trial(dests)
    """

    def __init__(self, max_block_bytes: int) -> None:
        self.max_block_bytes = max_block_bytes
        self.sock: socket.socket | None = None
        self.process: Any = None  # multiprocessing's SpawnProcess

    def __enter__(self) -> SocketStream:
        try:
            with socket.create_server((LOOPBACK, 0)) as listener:
                listener.settimeout(WAIT_SECONDS)
                context = get_context("spawn")
                port = listener.getsockname()[1]
                self.process = context.Process(target=_stream_sender, args=(port, self.max_block_bytes), daemon=True)
                self.process.start()
                self.sock, _ = listener.accept()
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(_REQUEST.pack(0))
            self.sock.close()
            self.sock = None
        if self.process is not None:
            self.process.join(STOP_SECONDS)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.process = None

    def trial(self, dests: Sequence[npt.NDArray[np.uint8]]) -> Trial:
        """Request a batch of `dests`' block size and receive it into `dests`; checked once here
        against the sender's CRC-32, so a figure never comes from a broken stream."""
        sock = self.sock
        if sock is None:
            raise RuntimeError("SocketStream.trial outside its `with` block")
        size = dests[0].nbytes
        if size > self.max_block_bytes or any(dest.nbytes != size for dest in dests):
            raise ValueError(f"blocks must all have one size, at most {self.max_block_bytes} bytes")
        request, views = _REQUEST.pack(size), [dest.data for dest in dests]

        def run(_: int) -> None:
            sock.sendall(request)
            for view in views:
                recv_in_reads(sock, view)

        for dest in dests:
            dest.fill(0)
        run(0)
        sock.sendall(_REQUEST.pack(-size))
        crc = bytearray(4)
        recv_exact(sock, memoryview(crc))
        if batch_crc(dests) != struct.unpack("<I", crc)[0]:
            raise RuntimeError("the socket stream delivered other bytes than were sent")
        return Trial(run)


# -- 3. Redis ----------------------------------------------------------------------------------------


def redis_server_binary(log: Log) -> str:
    """`redis-server` from PATH, installed with apt-get (Debian's package) when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise UnavailableError("redis-server is not on PATH, and apt-get cannot run here as root to install it")
    log("redis-server is missing: apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "redis-server"]
    if subprocess.run(install, stdout=sys.stderr, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=sys.stderr, env=env, check=False)
        subprocess.run(install, stdout=sys.stderr, env=env, check=False)
    found = shutil.which("redis-server")
    if not found:
        raise UnavailableError("apt-get install -y redis-server did not put redis-server on PATH")
    return found


def _redis_write_batch(port: int, keys: list[str], block_bytes: int, seed: int) -> int:
    """The writer process: MSET one batch of random blocks; returns their CRC-32 for the reader."""
    import redis  # noqa: PLC0415 (not a project dependency)

    data = np.random.default_rng(seed).integers(0, 256, BATCH_BLOCKS * block_bytes, dtype=np.uint8)
    blocks = split_blocks(data, block_bytes)
    client = redis.Redis(host=LOOPBACK, port=port)
    client.mset({key: block.data for key, block in zip(keys, blocks, strict=True)})
    client.close()
    return batch_crc(blocks)


class RedisReference:
    """A private `redis-server` (loopback, free port, no persistence), a redis-py client, and a
    writer process for the gets; all stopped on exit, also on error.

    with RedisReference() as redis_ref:
        set_trial, get_trial = redis_ref.set_trial(sources), redis_ref.get_trial(block_bytes)
    """

    def __init__(self, log: Log = log_stderr) -> None:
        self.log = log
        self.port = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.client: Any = None  # redis.Redis
        self.writer: ProcessPoolExecutor | None = None
        self.workdir: Path | None = None
        self.context: dict[str, str] = {}

    def __enter__(self) -> RedisReference:
        try:
            import redis  # noqa: PLC0415 (not a project dependency)
            import redis.utils  # noqa: PLC0415
        except ImportError as error:
            raise UnavailableError(
                f"redis-py is not installed ({error}): .venv/bin/pip install redis hiredis"
            ) from error
        binary = redis_server_binary(self.log)
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-redis-"))
            self.port = free_port()
            log_path = self.workdir / "redis.log"
            command = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
            command += ["--dir", str(self.workdir), "--logfile", str(log_path), "--daemonize", "no"]
            self.server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            wait_for_port(self.port, self.server, "redis-server", log_path)
            self.client = redis.Redis(host=LOOPBACK, port=self.port)
            self.writer = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
            version = self.client.info("server")["redis_version"]
            hiredis = "hiredis " + getattr(sys.modules.get("hiredis"), "__version__", "?")
            parser = hiredis if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser (hiredis not installed)"
            self.context = {"Redis": f"redis-server {version} ({binary}), redis-py {redis.__version__}, {parser}"}
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.writer is not None:
            self.writer.shutdown(cancel_futures=True)
            self.writer = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.shutdown(nosave=True)  # the reply never comes: the server has gone
            self.client.close()
            self.client = None
        if self.server is not None:
            stop_process(self.server)
            self.server = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def set_trial(self, sources: Sequence[npt.NDArray[np.uint8]]) -> Trial:
        """One MSET of the 32 blocks; the same keys each call, so Redis replaces the values."""
        size = sources[0].nbytes
        mapping = {f"set-{size}-{i}": source.data for i, source in enumerate(sources)}
        client = self.client

        def run(_: int) -> None:
            client.mset(mapping)

        return Trial(run)

    def get_trial(self, block_bytes: int) -> Trial:
        """One MGET of 32 blocks another process wrote (written and checked here, untimed)."""
        if self.writer is None:
            raise RuntimeError("RedisReference.get_trial outside its `with` block")
        keys = [f"get-{block_bytes}-{i}" for i in range(BATCH_BLOCKS)]
        crc = self.writer.submit(_redis_write_batch, self.port, keys, block_bytes, SEED + block_bytes).result()
        client = self.client
        values = client.mget(keys)
        if None in values or batch_crc(values) != crc:
            raise RuntimeError("MGET returned other bytes than the writer process stored")

        def run(_: int) -> None:
            if None in client.mget(keys):
                raise RuntimeError("MGET missed a block: the figure would be wrong")

        return Trial(run)

    def clear(self) -> None:
        """Drop every key, so the server holds one block size's batches at a time."""
        self.client.flushall()


# -- standalone: every reference in one table ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    repeats: int  # every trial figure is the median of this many repeats
    block_sizes: tuple[int, ...]
    volume_bytes: int  # bytes each trial moves per repeat (whole batches, at least one)

    def iterations(self, block_bytes: int) -> int:
        return max(1, self.volume_bytes // (BATCH_BLOCKS * block_bytes))


def measure_trials(trials: dict[str, Trial], block_bytes: int, settings: Settings) -> dict[str, float]:
    """Median GB/s of each trial, measured by `harness.measure` (back to back, order rotated), with
    the first trial as the comparison's subject and the others as its references."""
    (subject_name, subject), *others = trials.items()
    comparison = Comparison(
        group="references",
        name=format_size(block_bytes),
        unit=Unit.GBPS,
        subject=subject,
        references=dict(others),
        iterations=settings.iterations(block_bytes),
        bytes_per_call=BATCH_BLOCKS * block_bytes,
    )
    figures = harness.measure(comparison, settings.repeats)
    values = {subject_name: figures[0].value} if figures else {}
    return values | {figure.reference: figure.reference_value for figure in figures}


def run_references(
    settings: Settings, *, redis_on: bool, mooncake_on: bool, progress: tqdm
) -> tuple[dict[str, dict[int, float]], dict[str, str], dict[str, str]]:
    """GB/s per reference and block size, the unavailable references' reasons, and the context."""
    log: Log = lambda message: progress.write(message, file=sys.stderr)  # noqa: E731
    rows: dict[str, dict[int, float]] = {}
    missing: dict[str, str] = {}
    context: dict[str, str] = {}
    max_size = max(settings.block_sizes)
    progress.set_description("preparing buffers")
    source = harness.aligned_bytes(BATCH_BLOCKS * max_size)
    source[:] = np.random.default_rng(SEED).integers(0, 256, source.size, dtype=np.uint8)
    dest = harness.aligned_bytes(BATCH_BLOCKS * max_size)
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(SocketStream(max_size))
        redis_ref: RedisReference | None = None
        if redis_on:
            try:
                redis_ref = stack.enter_context(RedisReference(log))
                context |= redis_ref.context
            except UnavailableError as error:
                missing["Redis"] = str(error)
        for size in settings.block_sizes:
            progress.set_description(f"memcpy, socket, Redis: {format_size(size)}")
            log(f"memcpy, raw socket{', Redis' if redis_ref else ''}: {format_size(size)} blocks")
            sources, dests = split_blocks(source, size), split_blocks(dest, size)
            trials = {"memcpy (np.copyto)": memcpy_trial(sources, dests)}
            trials["raw socket, loopback (request, recv_into 32 KiB at a time)"] = stream.trial(dests)
            if redis_ref is not None:
                redis_ref.clear()
                trials["Redis SET (MSET)"] = redis_ref.set_trial(sources)
                trials["Redis GET (MGET, written by another process)"] = redis_ref.get_trial(size)
            for name, value in measure_trials(trials, size, settings).items():
                rows.setdefault(name, {})[size] = value
            progress.update(1)
    if mooncake_on:
        progress.set_description("Mooncake Store")
        log("Mooncake Store: master, writer and reader processes")
        calls = [settings.iterations(size) * settings.repeats for size in settings.block_sizes]
        mooncake = measure_mooncake(settings.block_sizes, calls, log)
        if mooncake.unavailable:
            missing["Mooncake Store"] = mooncake.unavailable
        else:
            context |= mooncake.context
            labels = {
                "put": "Mooncake put (segment-owner process)",
                "get, other process": "Mooncake get, cross-process over TCP",
                "put, other process": "Mooncake put, cross-process over TCP",
                "get, same process": "Mooncake get (segment-owner process)",
            }
            for operation, label in labels.items():
                rows[label] = {size: mooncake.gbps(operation, size) for size in settings.block_sizes}
        progress.update(1)
    return rows, missing, context


def render_markdown(
    rows: dict[str, dict[int, float]], missing: dict[str, str], context: dict[str, str], settings: Settings
) -> str:
    sizes = settings.block_sizes
    lines = [
        f"## Node references: GB/s, batches of {BATCH_BLOCKS} blocks",
        "",
        *(f"- {name}: {value}" for name, value in context.items()),
        "",
        f"memcpy, socket and Redis: median of {settings.repeats} repeats (harness.measure, order rotated). "
        "Mooncake: median batch of the worker's own timed loop. Higher is better.",
        "",
        "| Reference | " + " | ".join(format_size(size) for size in sizes) + " |",
        "|---|" + "--:|" * len(sizes),
    ]
    lines += [f"| {name} | " + " | ".join(f"{row[size]:.2f}" for size in sizes) + " |" for name, row in rows.items()]
    lines += [f"| {name} | " + " | ".join("unavailable" for _ in sizes) + " |" for name in missing]
    if missing:
        lines += ["", *(f"- {name} unavailable: {reason}" for name, reason in missing.items())]
    return "\n".join(lines)


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(int(item) for item in text.split(",") if item)
    if not sizes or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError("block sizes must be positive byte counts")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure the node benchmark's references on their own.")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and less data per repeat")
    parser.add_argument("--repeats", type=int, help="repeats per figure (default 5, 3 with --quick)")
    parser.add_argument("--sizes", type=parse_sizes, default=BLOCK_SIZES, help="block sizes in bytes, comma-separated")
    parser.add_argument("--no-redis", action="store_true", help="leave Redis out")
    parser.add_argument("--no-mooncake", action="store_true", help="leave Mooncake Store out")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    settings = Settings(
        repeats=args.repeats or (3 if args.quick else 5),
        block_sizes=args.sizes,
        volume_bytes=(64 if args.quick else 256) * MiB,
    )
    steps = len(settings.block_sizes) + (0 if args.no_mooncake else 1)
    with tqdm(total=steps, file=sys.stderr, unit="step", dynamic_ncols=True, disable=None) as progress:
        rows, missing, context = run_references(
            settings, redis_on=not args.no_redis, mooncake_on=not args.no_mooncake, progress=progress
        )
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *arguments])
    context = {"command": f"`{command}`", **harness.machine_info(), **context}
    print(render_markdown(rows, missing, context, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
