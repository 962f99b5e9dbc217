"""Placement policies behind one interface (`base.PlacementPolicy`); `make_placement` builds
one by the name the config and the simulator use."""

from collections.abc import Callable

from conductor.placement.base import PlacementPolicy
from conductor.placement.baselines import LeastLoaded, LocalCacheAware, RandomPlacement, RoundRobin
from conductor.placement.flow import PrefixFlow
from conductor.placement.kv_centric import KVCentric
from kvstore.errors import ConfigError

__all__ = ["PLACEMENTS", "PlacementPolicy", "make_placement"]

PLACEMENTS: dict[str, Callable[[int], PlacementPolicy]] = {
    RandomPlacement.name: RandomPlacement,
    RoundRobin.name: lambda seed: RoundRobin(),
    LeastLoaded.name: lambda seed: LeastLoaded(),
    LocalCacheAware.name: lambda seed: LocalCacheAware(),
    KVCentric.name: lambda seed: KVCentric(),
    PrefixFlow.name: lambda seed: PrefixFlow(),
}


def make_placement(name: str, seed: int = 0) -> PlacementPolicy:
    """A new placement policy of the kind registered under `name`; `seed` drives any randomness."""
    try:
        return PLACEMENTS[name](seed)
    except KeyError:
        raise ConfigError(f"unknown placement policy {name!r}; known: {sorted(PLACEMENTS)}") from None
