"""Cost models: the formulas, fitting a prefill profile, and unknown profiles."""

from __future__ import annotations

import math

import pytest

from conductor.costs import DEFAULT_COSTS, DecodeModel, Link, PrefillModel
from kvstore.errors import ConfigError


def test_prefill_counts_tokens_and_attention_pairs() -> None:
    model = PrefillModel(fixed_s=0.5, per_token_s=0.01, per_pair_s=0.001)
    assert model.seconds(0, 100) == 0.0
    # 10 new after 20 cached: 0.5 + 0.1 + 0.001 * (10 * 20 + 50)
    assert model.seconds(10, 20) == pytest.approx(0.5 + 0.1 + 0.25)


def test_fit_recovers_the_coefficients_of_exact_measurements() -> None:
    truth = PrefillModel(0.02, 1.4e-4, 2.6e-9)
    samples = [(n, c, truth.seconds(n, c)) for n in (256, 1024, 4096, 16384) for c in (0, 2048, 8192)]
    fitted = PrefillModel.fit(samples)
    for n, c, seconds in samples:
        assert fitted.seconds(n, c) == pytest.approx(seconds, rel=1e-6)


def test_fit_refuses_too_few_or_bad_measurements() -> None:
    with pytest.raises(ConfigError, match="at least 3"):
        PrefillModel.fit([(1, 0, 0.1), (2, 0, 0.2)])
    with pytest.raises(ConfigError, match="bad prefill measurement"):
        PrefillModel.fit([(1, 0, 0.1), (2, 0, 0.2), (3, 0, math.nan)])


def test_decode_fit_recovers_its_coefficients_and_refuses_bad_measurements() -> None:
    truth = DecodeModel(0.014, 1e-4, 3.4e-8)
    samples = [(b, b * k, truth.step_s(b, b * k)) for b in (1, 4, 16) for k in (512, 4096)]
    fitted = DecodeModel.fit(samples)
    for b, kv, seconds in samples:
        assert fitted.step_s(b, kv) == pytest.approx(seconds, rel=1e-6)
    with pytest.raises(ConfigError, match="fitting a decode model needs at least 3"):
        DecodeModel.fit(samples[:2])
    with pytest.raises(ConfigError, match=r"bad decode measurement \(sequences=0"):
        DecodeModel.fit([(0, 0, 0.1), *samples])


def test_decode_step_and_links() -> None:
    assert DecodeModel(0.01, 0.001, 1e-6).step_s(0, 0) == 0.0
    assert DecodeModel(0.01, 0.001, 1e-6).step_s(4, 1000) == pytest.approx(0.015)
    assert Link(1e9, 0.001).seconds(0) == 0.0
    assert Link(1e9, 0.001).seconds(10**9) == pytest.approx(1.001)
    assert Link(math.inf).seconds(10**12) == 0.0


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown cost profile 'h100'.*default"):
        DEFAULT_COSTS.profile("h100")
