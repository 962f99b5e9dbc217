"""The Mooncake Store reference of the node benchmark: `mooncake-transfer-engine-non-cuda` in
its own venv (.bench-venvs/mooncake, created on first use), a master and metadata server on
127.0.0.1, and two worker processes (tools/bench/mooncake_worker.py) that time their own puts
and cross-process gets over TCP and report medians as JSON. Used by tools/bench/node_refs.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from tools.bench.refs_common import (
    BATCH_BLOCKS,
    LOOPBACK,
    REPO,
    STOP_SECONDS,
    WAIT_SECONDS,
    Log,
    UnavailableError,
    free_port,
    log_stderr,
    log_tail,
    stop_process,
    wait_for_port,
)

MOONCAKE_VENV = REPO / ".bench-venvs" / "mooncake"  # must be git-ignored
# Pinned, so that reference figures from different days compare; numpy is the worker's only other need.
MOONCAKE_PACKAGES = ("mooncake-transfer-engine-non-cuda==0.3.13.post1", "numpy")
MOONCAKE_WORKER = Path(__file__).with_name("mooncake_worker.py")


# -- Mooncake Store -------------------------------------------------------------------------------

MOONCAKE_OPERATIONS = ("put", "get, other process", "put, other process", "get, same process")
"""What the worker reports: the writer process (which holds the segment) puts fresh keys and gets
its own objects; the reader process (no segment) gets the writer's objects and puts to its segment."""


@dataclass(frozen=True, slots=True)
class MooncakeResult:
    """Per operation and block size, the median batch's time and GB/s; or why there are none."""

    unavailable: str = ""  # empty when the figures are there
    api: str = ""  # which Mooncake calls were timed
    median_ns: dict[str, dict[int, float]] = field(default_factory=dict)
    samples_ns: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)

    def gbps(self, operation: str, block_bytes: int) -> float:
        return BATCH_BLOCKS * block_bytes / self.median_ns[operation][block_bytes]


def mooncake_python(log: Log) -> Path:
    """The Mooncake venv's Python: the venv is created and the pinned wheel installed when missing.
    The wheel's libraries need libibverbs.so.1 even for TCP; on Debian it comes with apt-get."""
    python = MOONCAKE_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {MOONCAKE_VENV.relative_to(REPO)} for Mooncake (a separate venv; takes a minute or two)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(MOONCAKE_VENV)], check=True)
        log(f"pip install {' '.join(MOONCAKE_PACKAGES)}")
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *MOONCAKE_PACKAGES]
        if subprocess.run(pip, stdout=sys.stderr, check=False).returncode != 0:
            shutil.rmtree(MOONCAKE_VENV, ignore_errors=True)  # a half-made venv would be taken as ready
            raise UnavailableError(f"could not install {' '.join(MOONCAKE_PACKAGES)} from PyPI (see pip's output)")
    check = [str(python), "-c", "import mooncake.store"]
    found = subprocess.run(check, capture_output=True, text=True, check=False)
    if found.returncode != 0 and "libibverbs.so.1" in found.stderr and shutil.which("apt-get") and os.geteuid() == 0:
        log("Mooncake needs libibverbs.so.1: apt-get install -y libibverbs1")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "libibverbs1"], stdout=sys.stderr, env=env, check=False)
        found = subprocess.run(check, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        error = found.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise UnavailableError(f"{python} cannot import mooncake.store: {error[0]}")
    return python


class _Worker:
    """A mooncake_worker.py process; its stdout's JSON lines are read by a thread, so that waiting
    for one can time out instead of hanging the benchmark on a stuck worker."""

    def __init__(self, python: Path, arguments: list[str], log_path: Path) -> None:
        self.role, self.log_path = arguments[0], log_path
        with log_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [str(python), str(MOONCAKE_WORKER), *arguments],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, event: str, log: Log) -> dict[str, Any]:
        """The worker's `event` message; progress messages go to `log` meanwhile."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT_SECONDS * 5)
            except queue.Empty:
                raise UnavailableError(f"the Mooncake {self.role} sent nothing for {WAIT_SECONDS * 5:g} s") from None
            if line is None:
                status = self.process.wait()
                raise UnavailableError(f"the Mooncake {self.role} exited ({status}): {log_tail(self.log_path)}")
            try:
                message: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing on stdout
            if message.get("event") == "error":
                raise UnavailableError(f"{message['message']} ({log_tail(self.log_path)})")
            if message.get("event") == "progress":
                log(f"mooncake {message['message']}")
            elif message.get("event") == event:
                return message

    def stop(self) -> None:
        """Close its stdin (the writer's cue to unmount and exit), then wait, or kill."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(STOP_SECONDS * 3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def mooncake_master(python: Path, workdir: Path) -> Iterator[tuple[str, str]]:
    """`mooncake_master` with its embedded HTTP metadata server, on free loopback ports, and
    traffic on loopback only. The RPC and metrics servers bind 127.0.0.1; the metadata server (in
    0.3.13, whatever its host flag says) and the clients' transfer engines bind every address, on
    ports of their choosing. Yields the master's address and the metadata URL; stopped on exit."""
    binary = python.parent / "mooncake_master"
    if not binary.exists():
        raise UnavailableError(f"the Mooncake wheel installed no {binary}")
    rpc_port, metadata_port, metrics_port = free_port(), free_port(), free_port()
    flags = {
        "rpc_address": LOOPBACK,
        "rpc_port": rpc_port,
        "enable_http_metadata_server": "true",
        "http_metadata_server_host": LOOPBACK,
        "http_metadata_server_port": metadata_port,
        "metrics_host": LOOPBACK,
        "metrics_port": metrics_port,
        "enable_metric_reporting": "false",
    }
    log_path = workdir / "mooncake_master.log"
    with log_path.open("wb") as output:
        command = [str(binary), *(f"--{name}={value}" for name, value in flags.items())]
        master = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(rpc_port, master, "mooncake_master", log_path)
        wait_for_port(metadata_port, master, "mooncake_master's metadata server", log_path)
        yield f"{LOOPBACK}:{rpc_port}", f"http://{LOOPBACK}:{metadata_port}/metadata"
    finally:
        stop_process(master)


def measure_mooncake(block_sizes: Sequence[int], calls: Sequence[int], log: Log = log_stderr) -> MooncakeResult:
    """Mooncake Store's batch put and get of each block size, `calls` timed batches each (after one
    warm-up), cross-process over TCP; every process is stopped before this returns. Anything that
    keeps Mooncake from running here is returned as the `unavailable` reason, not raised."""
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-mooncake-"))
    failed = False
    try:
        python = mooncake_python(log)
        with mooncake_master(python, workdir) as (master, metadata), contextlib.ExitStack() as workers:
            arguments = ["--master", master, "--metadata", metadata]
            arguments += ["--sizes", ",".join(map(str, block_sizes)), "--calls", ",".join(map(str, calls))]
            writer = _Worker(python, ["writer", *arguments], workdir / "writer.log")
            workers.callback(writer.stop)
            ready = writer.wait_for("ready", log)
            crcs = ",".join(f"{size}:{crc}" for size, crc in ready["crcs"].items())
            reader = _Worker(python, ["reader", *arguments, "--expect-crc", crcs], workdir / "reader.log")
            workers.callback(reader.stop)
            result = reader.wait_for("result", log)
        samples = {
            operation: {int(size): ns for size, ns in by_size.items()}
            for message in (ready, result)
            for operation, by_size in message["timings"].items()
        }
        version = subprocess.run(
            [str(python), "-m", "pip", "show", MOONCAKE_PACKAGES[0].split("==")[0]],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        versions = [line.split(":", 1)[1].strip() for line in version.splitlines() if line.startswith("Version:")]
        return MooncakeResult(
            api=result["api"],
            median_ns={op: {size: statistics.median(ns) for size, ns in s.items()} for op, s in samples.items()},
            samples_ns=samples,
            context={
                "Mooncake": f"{MOONCAKE_PACKAGES[0].split('==')[0]} {versions[0] if versions else '?'} in "
                f"{MOONCAKE_VENV.relative_to(REPO)}, protocol tcp, master and metadata on {LOOPBACK}; "
                f"timed: {result['api']}"
            },
        )
    except UnavailableError as error:
        failed = True
        return MooncakeResult(unavailable=str(error))
    except (OSError, subprocess.SubprocessError, KeyError, ValueError) as error:
        failed = True
        return MooncakeResult(unavailable=f"{type(error).__name__}: {error}")
    finally:
        if failed:
            log(f"Mooncake logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
