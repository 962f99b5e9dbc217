"""Cache policies: which blocks stay in which tier. Decisions only; see `base.EvictionPolicy`.

`prefix-lrfu` is the store's default: it keeps far more of what is reused than `leaf-first-lru`
(the previous default) when a tier is small, at a little more cost per access (docs/policy.md).
`lfu`, `s3-fifo` and `arc` are the baselines the policy benchmark (tools/bench/policy.py)
compares them with. Any of them is selected by `store.eviction_policy`."""

from collections.abc import Callable

from kvstore.errors import ConfigError
from kvstore.policy.arc import ARC
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lfu import LeafFirstLFU
from kvstore.policy.lru import LeafFirstLRU
from kvstore.policy.prefix_lrfu import PrefixLRFU
from kvstore.policy.s3fifo import S3FIFO

__all__ = ["ARC", "S3FIFO", "EvictionPolicy", "LeafFirstLFU", "LeafFirstLRU", "PrefixLRFU", "make_policy"]

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    policy.name: policy for policy in (PrefixLRFU, LeafFirstLRU, LeafFirstLFU, S3FIFO, ARC)
}


def make_policy(name: str) -> EvictionPolicy:
    """A new policy object of the kind registered under `name` (`store.eviction_policy`)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None
