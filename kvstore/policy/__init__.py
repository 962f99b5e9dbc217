"""Cache policies: which blocks stay in which tier. Decisions only; see `base.EvictionPolicy`."""

from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LeafFirstLRU

__all__ = ["EvictionPolicy", "LeafFirstLRU", "make_policy"]

POLICIES = {LeafFirstLRU.name: LeafFirstLRU}


def make_policy(name: str) -> EvictionPolicy:
    """The policy registered under `name` (config's `policy`)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
