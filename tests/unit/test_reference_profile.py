"""The reference engine's profiler: it measures the tiny model, and what it writes is a profile
the conductor reads; bad settings are refused before anything is measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.config import load_profiles
from engine_adapters.reference.config import read_config
from engine_adapters.reference.profile import Settings, main, profile_model
from engine_adapters.reference.tiny import make_tiny_model
from kvstore.errors import ConfigError, InvalidArgumentError

QUICK = Settings(max_tokens=64, repeats=1, kv_capacity_tokens=4096)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_the_profile_of_the_tiny_model(folder: Path) -> None:
    profile = profile_model(folder, "tiny", QUICK)
    config = read_config(folder)
    assert profile.kv_bytes_per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert profile.kv_capacity_tokens == 4096
    # more tokens cost more, a bigger batch too (the fit's coefficients are clipped at zero)
    assert profile.prefill.seconds(64) > profile.prefill.seconds(16) > 0
    assert profile.decode.step_s(4, 4 * 64) > profile.decode.step_s(1, 64) > 0
    hbm, dram, nvme = profile.tier_loads
    assert hbm.bytes_per_s == float("inf") and 0 < dram.bytes_per_s < float("inf")
    assert (nvme.bytes_per_s, nvme.latency_s) == (QUICK.nvme_load_bytes_per_s, QUICK.nvme_load_latency_s)


def test_the_table_it_writes_is_read_by_the_conductor(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "conductor.toml"
    out.write_text('[placement]\npolicy = "prefix-flow"\n')
    argv = ["--model", str(folder), "--name", "tiny-cpu", "--max-tokens", "64", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "appended [profiles.tiny-cpu]" in capsys.readouterr().out
    (profile,) = load_profiles(out)
    assert profile.name == "tiny-cpu" and profile.kv_capacity_tokens == Settings().kv_capacity_tokens
    assert main(argv) == 0  # printed instead
    assert "[profiles.tiny-cpu]\nkv_bytes_per_token = " in capsys.readouterr().out


def test_bad_settings_are_refused_before_measuring(folder: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="a profile name is letters"):
        profile_model(folder, "two words", QUICK)
    with pytest.raises(InvalidArgumentError, match="need max_tokens >= 64"):
        profile_model(folder, "tiny", Settings(max_tokens=32))
    with pytest.raises(InvalidArgumentError, match="needs 4096 positions; the model has 2048"):
        profile_model(folder, "tiny", Settings(max_tokens=2048))
    assert main(["--model", str(tmp_path / "nowhere"), "--name", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
