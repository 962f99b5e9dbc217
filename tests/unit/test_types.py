"""Conversions on the wire path: packed keys to keys, raw tier values to tiers."""

from __future__ import annotations

import os

import pytest

from kvstore.errors import InvalidArgumentError, ProtocolError
from kvstore.types import TierKind, tier_kinds, unpack_keys


def test_packed_keys_come_back_as_the_same_bytes_in_order():
    keys = [os.urandom(16) for _ in range(5)] + [bytes(16), b"\0" * 15 + b"\1"]  # trailing NULs kept
    unpacked = unpack_keys(b"".join(keys), max_keys=10)
    assert unpacked == keys
    assert all(type(key) is bytes for key in unpacked)
    assert unpack_keys(b"", max_keys=10) == []


def test_packed_keys_that_are_not_whole_or_too_many_are_refused():
    with pytest.raises(InvalidArgumentError, match="not a multiple of 16"):
        unpack_keys(b"x" * 17, max_keys=10)
    with pytest.raises(ProtocolError, match="at most 2 per call"):
        unpack_keys(b"x" * 48, max_keys=2, error=ProtocolError)


def test_tier_values_become_tiers():
    assert tier_kinds(b"") == ()
    assert tier_kinds(b"\1\1\1") == (TierKind.DRAM,) * 3
    assert tier_kinds([0, 1, 2, 1]) == (TierKind.HBM, TierKind.DRAM, TierKind.NVME, TierKind.DRAM)


@pytest.mark.parametrize("values", [b"\3", b"\1\1\7", [1, -1], [-1, -1]])
def test_unknown_tier_values_are_refused_by_name(values):
    with pytest.raises(ValueError, match="unknown tier value"):
        tier_kinds(values)
