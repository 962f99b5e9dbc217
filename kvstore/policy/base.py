"""The policy interface: decisions about which blocks stay, never I/O.

The tier manager (mechanism) owns the table, the tiers and the locking; a policy only ranks
and admits. Every method is called by the manager under its lock, in this order of a block's
life:

    attach(table)              once, first: the table whose rows every other call names
    resize(num_rows)           the block table grew; per-row state must cover `num_rows`
    on_access(rows)            a chain of blocks (root first) was written or read
    on_insert(rows, tier)      blocks gained a copy in `tier` (commit, demotion, promotion)
    admit(rows, tier)          should each block get a copy in `tier` (demotion, promotion)? Asked
                               only when `tier` lacks free room for them: the copy would evict
    victims(tier, table)       blocks to take out of `tier`, best victim first
    on_evict(rows, tier)       blocks lost their copy in `tier`

`victims` is a lazy iterator: the manager takes as many as it needs. It yields only blocks
that are resident in `tier`, hold no lease, are not pinned and have no resident child in
`tier` (children go before their ancestors: a child without its parent is unreachable). Each
yielded block is assumed gone for the rest of the iteration, so its parent may follow.
Nothing here may fail on valid rows; a policy raises only on programming errors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kvstore.table import BlockTable
from kvstore.types import TierKind


class EvictionPolicy(Protocol):
    name: str

    def attach(self, table: BlockTable) -> None: ...

    def resize(self, num_rows: int) -> None: ...

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None: ...

    def on_insert(self, rows: Sequence[int], tier: TierKind) -> None: ...

    def admit(self, rows: Sequence[int], tier: TierKind) -> list[bool]: ...

    def victims(self, tier: TierKind, table: BlockTable) -> Iterator[int]: ...

    def on_evict(self, rows: Sequence[int], tier: TierKind) -> None: ...
