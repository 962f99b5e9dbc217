"""The registry of host memory registered with CUDA (engine_adapters/kernels/registered.py),
which the kernels consult before copying to or from a payload given by address. Plain
address arithmetic: it runs without CUDA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine_adapters.kernels import registered

START, SIZE = 0x10000, 4096


@pytest.fixture(autouse=True)
def one_range() -> Iterator[None]:
    registered.add(START, SIZE)
    yield
    registered.remove(START)


def test_a_span_inside_a_registration_is_accepted() -> None:
    assert registered.containing(START + 100) == (START, SIZE)
    assert registered.span_problem(START, SIZE) is None
    assert registered.span_problem(START + SIZE - 16, 16) is None


def test_a_span_past_the_end_is_refused_with_how_far() -> None:
    problem = registered.span_problem(START + SIZE - 16, 17)
    assert problem is not None and "1 bytes past the end" in problem


@pytest.mark.parametrize("address", [START - 1, START + SIZE, 0])
def test_an_address_outside_every_registration_is_refused(address: int) -> None:
    assert registered.containing(address) is None
    problem = registered.span_problem(address, 1)
    assert problem is not None and "not in host memory registered" in problem


def test_a_removed_registration_no_longer_counts() -> None:
    registered.add(0x90000, 64)
    registered.remove(0x90000)
    assert registered.containing(0x90000) is None
    registered.remove(0x90000)  # removing twice is harmless
