"""The README's examples run as written (the store's with its NVMe directory moved to a
temporary one; the client's against a real daemon on a free port)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.nodes import daemon

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    return blocks


def test_the_client_example_runs_against_a_daemon(tmp_path):
    code = _examples()[1]
    assert '"127.0.0.1:50051"' in code
    with daemon(tmp_path, dram_kib=16 * 1024, nvme_kib=0, store__dram_slab_bytes="2 MiB") as node:  # 2 MiB blocks
        code = code.replace('"127.0.0.1:50051"', repr(node.grpc_address))
        command = [sys.executable, "-c", code]
        runs = [subprocess.run(command, capture_output=True, text=True, timeout=120, check=False) for _ in "ab"]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stdout.split() == ["4", "4", "4"]
    assert runs[1].stdout.split() == ["0", "4", "4"]


def test_the_readme_example_runs(tmp_path):
    code = _examples()[0].replace('Path("/var/lib/kvstore")', f"Path({str(tmp_path)!r})")
    assert str(tmp_path) in code  # the example still names the directory this test replaces
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4"]
