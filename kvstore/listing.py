"""What an operator and a watcher see of the block table: stored blocks as `BlockInfo`s, and
residency changes as block events. Read-only views over the table, for the tier manager to
call under its lock (`list_blocks`, `inspect`, `watch_snapshot`, the table's listener).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from kvstore.events import EventKind, EventLog, tiers_of_mask
from kvstore.table import NO_NAMESPACE, NO_TIER, BlockTable
from kvstore.types import BlockInfo, Namespace


def resident_rows(table: BlockTable, namespace: int | None) -> npt.NDArray[np.intp]:
    """Rows of readable blocks, of one namespace index or all, in row order."""
    mask = table.namespace != NO_NAMESPACE if namespace is None else table.namespace == namespace
    mask &= table.fastest != NO_TIER
    return np.flatnonzero(mask)


def block_infos(table: BlockTable, namespaces: list[Namespace], rows: npt.NDArray[np.intp]) -> list[BlockInfo]:
    """`rows` (readable blocks) as BlockInfos."""
    infos = []
    for row in rows.tolist():
        key = table.keys[row]
        assert key is not None  # resident rows have keys
        namespace = namespaces[int(table.namespace[row])]
        infos.append(
            BlockInfo(
                key,
                namespace.namespace_id,
                table.parents[row],
                tiers_of_mask(table.tier_mask(row)),
                namespace.block_bytes,
                int(table.checksum[row]),
                int(table.leases[row]),
                bool(table.pinned[row]),
            )
        )
    return infos


class BlockEvents:
    """The table's listener: each change in a block's set of tiers becomes one block event."""

    def __init__(self, table: BlockTable, namespaces: list[Namespace], events: EventLog) -> None:
        self._table = table
        self._namespaces = namespaces  # shared with the manager, which appends to it
        self._events = events

    def residency_changed(
        self, rows: Sequence[int], namespaces: Sequence[int], before: Sequence[int], after: Sequence[int]
    ) -> None:
        keys, parents = self._table.keys, self._table.parents
        changes = []
        for row, namespace, was, now in zip(rows, namespaces, before, after, strict=True):
            if was == now or namespace == NO_NAMESPACE:
                continue
            key = keys[row]
            assert key is not None  # only rows of stored blocks change residency
            kind = EventKind.STORED if not was else EventKind.REMOVED if not now else EventKind.TIER_CHANGED
            changes.append((kind, self._namespaces[namespace].namespace_id, key, parents[row], tiers_of_mask(now)))
        if changes:
            self._events.record_many(changes)
