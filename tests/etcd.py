"""A real etcd for tests: Debian's `etcd` binary on free loopback ports, its own data
directory, stopped at the end. Missing binary: the test fails saying how to install it
(CI installs it: .ci/run), never skips."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdProcess:
    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: apt-get install etcd-server (CI does this in .ci/run)")
        self.client_port, peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        client_url, peer_url = f"http://{self.endpoint}", f"http://127.0.0.1:{peer_port}"
        self._log = (data_dir / "etcd.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                "--name=test",
                f"--data-dir={data_dir / 'data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test={peer_url}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{client_url}/health", timeout=0.5).ok:
                    return
            except requests.RequestException:
                pass
            if self._process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"etcd did not start; its log: {(data_dir / 'etcd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    process = EtcdProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()
