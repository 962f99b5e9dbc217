"""Cache policies: which blocks stay in which tier. Decisions only; see `base.EvictionPolicy`."""

from collections.abc import Callable

from kvstore.errors import ConfigError
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LeafFirstLRU
from kvstore.policy.prefix_lrfu import PrefixLRFU

__all__ = ["EvictionPolicy", "LeafFirstLRU", "PrefixLRFU", "make_policy"]

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {LeafFirstLRU.name: LeafFirstLRU, PrefixLRFU.name: PrefixLRFU}


def make_policy(name: str) -> EvictionPolicy:
    """The policy registered under `name` (config's `policy`)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None
