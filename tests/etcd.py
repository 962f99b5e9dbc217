"""A real etcd for tests: Debian's `etcd` binary on free loopback ports, its own data
directory, stopped at the end. Missing binary: the test fails saying how to install it
(CI installs it: .ci/run), never skips."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import etcd3gw
import pytest
import requests
from etcd3gw.client import Etcd3Client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdProcess:
    def __init__(self, data_dir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            pytest.fail("etcd is not installed: apt-get install etcd-server (`make test` does this)")
        self.client_port, peer_port = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        client_url, peer_url = f"http://{self.endpoint}", f"http://127.0.0.1:{peer_port}"
        self._log = (data_dir / "etcd.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--name=test-{self.client_port}",
                f"--data-dir={data_dir / 'data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=test-{self.client_port}={peer_url}",
                # It elects itself in ~0.1 s instead of ~1 s; its shortest lease becomes 1 s
                # (1.5 election timeouts), the membership's MIN_TTL_S, instead of 2 s.
                "--heartbeat-interval=10",
                "--election-timeout=100",
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

    def client(self) -> Etcd3Client:
        """A client of its own, to look at (or spoil) what a membership wrote."""
        return etcd3gw.client(host="127.0.0.1", port=self.client_port, timeout=5, api_path="/v3/")

    def pause(self) -> None:
        """Freeze it (SIGSTOP): it still accepts connections but answers nothing."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process.poll() is None:
            self.resume()  # a frozen process would not act on SIGTERM
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
