"""What the node benchmark's references share: sizes, loopback ports, child processes and their
logs (tools/bench/node_refs.py, tools/bench/mooncake_ref.py, tools/bench/node_engines.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

KiB, MiB = 1 << 10, 1 << 20
BATCH_BLOCKS = 32
BLOCK_SIZES = (64 * KiB, 512 * KiB, 2 * MiB, 8 * MiB)
LOOPBACK = "127.0.0.1"
SEED = 3
REPO = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 60.0  # for a server to listen, or a worker to set up and answer
STOP_SECONDS = 10.0  # for a process to exit before it is killed

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class UnavailableError(RuntimeError):
    """A reference that cannot run on this machine; the message says exactly why."""


def format_size(size_bytes: int) -> str:
    return f"{size_bytes // MiB} MiB" if size_bytes >= MiB else f"{size_bytes // KiB} KiB"


def split_blocks(pool: npt.NDArray[np.uint8], block_bytes: int) -> list[npt.NDArray[np.uint8]]:
    """The first 32 blocks of `pool`, as views."""
    return [pool[i * block_bytes : (i + 1) * block_bytes] for i in range(BATCH_BLOCKS)]


def batch_crc(blocks: Sequence[npt.NDArray[np.uint8] | bytes]) -> int:
    crc = 0
    for block in blocks:
        crc = zlib.crc32(block.data if isinstance(block, np.ndarray) else block, crc)
    return crc


def free_port() -> int:
    """A loopback port nobody listens on now (another process may take it before we do: unlikely)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[Any], what: str, log_path: Path) -> None:
    """Until `port` accepts connections; a process that exits first is an error, with its log."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UnavailableError(f"{what} exited with status {process.returncode}: {log_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.05)
    raise UnavailableError(f"{what} did not listen on {LOOPBACK}:{port} within {WAIT_SECONDS:g} s")


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it is still there after STOP_SECONDS."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"last lines of {path}: " + " | ".join(tail) if tail else f"(empty log at {path})"
