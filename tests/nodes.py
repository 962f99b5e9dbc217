"""Factories for node tests: configs, in-process node servers and real `kvstore serve` daemons.

Every node binds loopback on free ports, keeps its NVMe files under the test's tmp_path and
uses a small DRAM pool (64 KiB slabs hold the 8 KiB blocks of `factories.namespace`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvstore.node.config import NodeConfig, load_node_config
from kvstore.node.server import NodeServer

TOKEN = "test-token-0123456789abcdef"


def node_overrides(data_dir: Path, *, dram_kib: int = 512, nvme_kib: int = 2048, **extra: object) -> list[str]:
    settings: dict[str, object] = {
        "node.data_dir": data_dir,
        "server.grpc_port": 0,
        "server.data_port": 0,
        "server.metrics_port": 0,
        "store.dram_capacity_bytes": f"{dram_kib} KiB",
        "store.dram_slab_bytes": "64 KiB",
        "store.nvme_capacity_bytes": f"{nvme_kib} KiB" if nvme_kib else 0,
        "store.nvme_file_bytes": f"{nvme_kib} KiB" if nvme_kib else "64 KiB",
        "store.nvme_slab_bytes": "64 KiB",
        "store.high_watermark_fraction": 1.0,
        "store.low_watermark_fraction": 1.0,
        "shutdown.drain_timeout_s": 2,
        "logging.format": "text",
    }
    settings.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in settings.items()]


def node_config(data_dir: Path, *, token: str | None = None, **extra: object) -> NodeConfig:
    environ = {"KVSTORE_AUTH_TOKEN": token} if token else {}
    return load_node_config(None, environ=environ, overrides=node_overrides(data_dir, **extra))


@contextlib.contextmanager
def running_node(data_dir: Path, *, token: str | None = None, **extra: object) -> Iterator[NodeServer]:
    server = NodeServer(node_config(data_dir, token=token, **extra))
    server.start()
    try:
        yield server
    finally:
        server.shutdown()


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    grpc_address: str
    data_address: str
    metrics_port: int
    segment: str

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)


@contextlib.contextmanager
def daemon(data_dir: Path, *, token: str | None = None, **extra: object) -> Iterator[Daemon]:
    """A real `kvstore serve` process; yields once it printed its ready line."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment.pop("KVSTORE_AUTH_TOKEN", None)
    if token:
        environment["KVSTORE_AUTH_TOKEN"] = token
    command = [sys.executable, "-m", "kvstore.cli", "serve"]
    for item in node_overrides(data_dir, **extra):
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"kvstore serve exited before ready: {process.communicate(timeout=10)[1][-2000:]}")
        ready = json.loads(line)
        yield Daemon(process, ready["grpc"], ready["data"], ready["metrics_port"], ready["segment"])
    finally:
        if process.poll() is None:
            process.terminate()  # graceful: the daemon unlinks its shared memory
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False). For state a
    server thread changes just after replying, such as a data-plane lease released once the
    last byte is sent."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate for 127.0.0.1 and its key, made with the openssl command line."""
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
