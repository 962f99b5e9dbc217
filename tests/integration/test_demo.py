"""`kvstore demo` (what `make run` runs), end to end: separate processes for the conductor,
two node daemons and two engine workers; every output equal to the colocated run."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_runs_a_disaggregated_workload_and_checks_every_output() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "demo", "--requests", "5", "--sessions", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("req ")]
    assert len(lines) == 5
    assert all(line.endswith("same as colocated") for line in lines)
    assert any(" reused    0 tok" not in line for line in lines[1:])  # later turns reuse earlier blocks
    assert "5 requests:" in result.stdout and "0 outputs differing" in result.stdout


def test_the_demo_serves_and_reports_requests_after_the_prefill_node_is_gone() -> None:
    command = [sys.executable, "-m", "kvstore.cli", "demo", "--requests", "4", "--sessions", "2"]
    command += ["--stop-prefill-node-after", "2"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("req ")]
    assert len(lines) == 4
    assert all(line.endswith("same as colocated") or "rejected" in line for line in lines)
    after = result.stdout.split("killed the prefill node's daemon")[1]
    assert "the prefill engine's node failed: " in after
    assert "moving the KV to the decode node failed" in after
    assert "0 outputs differing" in result.stdout


def test_bad_demo_settings_are_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "demo", "--requests", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "must be positive" in result.stderr
    command = [sys.executable, "-m", "kvstore.cli", "demo", "--requests", "4", "--stop-prefill-node-after", "4"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--stop-prefill-node-after must be in 1..3" in result.stderr
    command = [sys.executable, "-m", "kvstore.cli", "demo", "--profile-tokens", "8"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--profile-tokens must be at least 64" in result.stderr
