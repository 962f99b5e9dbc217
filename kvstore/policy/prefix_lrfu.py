"""Prefix LRFU: recency and frequency in one number, kept across evictions, on a time scale
learned from the workload; leaf-first. The store's default (`store.eviction_policy`). The
per-row work of an access, of taking on a row's new block and of an eviction is compiled where
the build had a C compiler (kvstore/_lrfu.c).

Why. On request traces most blocks are used once, and a block that comes back usually comes
back after a long while (on Mooncake's conversation trace the median reuse is ~450 requests
later, ~10k blocks of traffic). LRU keeps every block for the same short time and so keeps
almost nothing long enough; a block that has been used several times is the one worth keeping.
How many times, and how recently, is the question this policy answers with one number.

The weight (LRFU, Lee et al., IEEE ToC 2001). A block accessed at times t1..tn is worth
sum(2 ** (ti / H)): each access counts 1 when it happens and halves every H block accesses of
the store. The decay is common to all blocks, so the weights are stored undecayed (relative to
an origin that moves forward now and then, before they overflow) and never change between
accesses: an access adds its term. Small H is LRU, large H is LFU. The lowest weight goes first.

What makes it prefix-aware:
- a chain is accessed root first and stamped so that each ancestor gets a later time than its
  descendants (a read of a prefix is a read of all its ancestors), so an ancestor never weighs
  less than its descendants and leaf-first eviction costs nothing;
- victims are leaves only (the tier manager's contract): a block whose children are resident
  waits until they have gone;
- history outlives the copy: when a block leaves its last tier, its weight is kept in a
  direct-mapped history by key, and a block that comes back resumes it. Without this every
  block re-enters as new and the frequency half of LRFU never builds up (on the conversation
  trace at 1k blocks the hit ratio falls from 8.1% to 5%).

The time scale H is not a constant: it is four times the median interval between a block's
accesses seen so far (in block accesses, from a decaying log2 histogram), so it follows the
workload rather than one trace; the factor was tuned on the first half of Mooncake's trace
(docs/policy.md). Until enough reuses were seen, H is the table's size.

Admission (`admit`, asked when a demotion to NVMe or the promotion of an NVMe hit to DRAM would
evict): a block is admitted when it weighs at least as much as the tier's lightest possible
victim, so a copy that would be the first to go is not made. New writes are always admitted.
That lightest weight takes a pass over the table, so it is kept and worked out again only after
1/64 of the rows' worth of accesses (at least 1024), or when the weights were rescaled.

Cost: an access is a short loop over its rows and touches no queue. Nothing is kept per copy:
`victims` ranks the tier's candidates by weight when asked, in the scan leaf-first LRU uses
(ranked.py), so a block's state is its row's 12 bytes and a share of the history (docs/policy.md,
Memory). A weight only changes when its block is accessed, and the scan reads the current ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from kvstore.policy import ranked
from kvstore.table import ABSENT, BlockTable
from kvstore.types import BlockKey, TierKind

NativeAccess = Callable[[object, object, object, object, object, object, float, float, float], int]
NativeKeyed = Callable[..., int]  # adopt and evict: they take the table's list of keys too
native_access: NativeAccess | None
native_adopt: NativeKeyed | None
native_evict: NativeKeyed | None
try:  # the per-row work of an access, an adoption and an eviction, compiled (kvstore/_lrfu.c), when the build
    # had a C compiler
    from kvstore._lrfu import access as native_access
    from kvstore._lrfu import adopt as native_adopt
    from kvstore._lrfu import evict as native_evict
except ImportError:  # where nothing was compiled: the Python loops do the same
    native_access = native_adopt = native_evict = None

_TIERS = tuple(TierKind)
# The history remembers departed blocks: one slot per this many table rows, and at least
# _MIN_HISTORY slots (768 KiB). On the conversation trace and both generated ones, hits at 1k and
# 10k blocks are the same with 2 ** 16 slots as with 2 ** 20 (docs/policy.md, Memory).
_ROWS_PER_HISTORY_SLOT = 16
_MIN_HISTORY = 1 << 16
_BUCKETS = 64  # log2 histogram of reuse intervals
_HISTOGRAM_HALVING = 1 << 16  # samples after which the histogram is halved (it follows drift)
_MIN_SAMPLES = 256  # reuses seen before the learned time scale replaces the default
_MAX_ESTIMATE_EVERY = 1 << 16  # reuses between two estimates of the time scale, at most
_SCALE_FACTOR = 4.0  # H = this x the median reuse interval (tuned on the first half of a trace: docs/policy.md)
_LOWEST_REFRESH = 1 / 64  # admission's lowest weight is worked out again after this many accesses per row
_MAX_EXPONENT = 100.0  # weights are rebased before an access weighs 2 ** this (float32 history: 2 ** 127)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: spreads keys over the history
_TAG_MULTIPLIER = np.uint64(0xC2B2AE3D27D4EB4F)  # another odd constant: tags independent of positions
_NO_KEY = bytes(16)  # a tombstone's key (None): looked up, never found
_ABSENT = int(ABSENT)


class PrefixLRFU:
    name = "prefix-lrfu"

    def __init__(self, scale_factor: float = _SCALE_FACTOR) -> None:
        """`scale_factor`: H as a multiple of the median reuse interval (tools/bench/policy.py
        tunes it on the first half of a trace; docs/policy.md)."""
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        self._scale_factor = scale_factor
        self._table: BlockTable | None = None
        self._weight = np.zeros(0, dtype=np.float32)  # float32: 2 ** _MAX_EXPONENT times a count fits
        self._last = np.zeros(0, dtype=np.float32)  # time of the last access; 0 = never (coarse: it
        # only feeds a log2 histogram)
        self._incarnation = np.zeros(0, dtype=np.uint32)  # the table's, when the state was set
        self._clock = 1.0
        self._origin = 0.0  # weights are 2 ** ((t - origin) / H)
        self._lowest_seen: dict[TierKind, tuple[float, float | None]] = {}  # tier -> (clock, lowest)
        self._history_tag = np.zeros(0, dtype=np.uint32)  # hints only: a rare false match is harmless
        self._history_weight = np.zeros(0, dtype=np.float32)
        self._history_last = np.zeros(0, dtype=np.float32)
        self._intervals = np.zeros(_BUCKETS, dtype=np.float64)
        self._samples = 0
        self._next_estimate = _MIN_SAMPLES
        self._scale = 1024.0

    @property
    def time_scale(self) -> float:
        """H: the number of block accesses over which an access's weight halves."""
        return self._scale

    def attach(self, table: BlockTable) -> None:
        self._table = table

    def resize(self, num_rows: int) -> None:
        if num_rows <= len(self._weight):
            return
        grown = num_rows - len(self._weight)
        self._weight = np.concatenate([self._weight, np.zeros(grown, dtype=np.float32)])
        self._last = np.concatenate([self._last, np.zeros(grown, dtype=np.float32)])
        self._incarnation = np.concatenate([self._incarnation, np.zeros(grown, dtype=np.uint32)])
        size = max(_MIN_HISTORY, 1 << max(0, num_rows // _ROWS_PER_HISTORY_SLOT - 1).bit_length())
        if size > len(self._history_tag):  # a fresh, larger history: old hints are only hints
            self._history_tag = np.zeros(size, dtype=np.uint32)
            self._history_weight = np.zeros(size, dtype=np.float32)
            self._history_last = np.zeros(size, dtype=np.float32)
        if self._samples < _MIN_SAMPLES:
            self._set_scale(float(max(1024, num_rows)))

    # -- accesses ------------------------------------------------------------------------------

    def on_access(self, rows: Sequence[int] | npt.NDArray[np.intp]) -> None:
        count = len(rows)
        if not count:
            return
        table = self._require_table()
        if native_access is not None:
            self._access_natively(rows, table)
            return
        row_list: list[int] = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
        mine, current = self._incarnation, table.incarnation
        if any(mine.item(row) != current.item(row) for row in row_list):
            self._adopt(np.asarray(row_list, dtype=np.int64), table)
        if (self._clock + count - self._origin) / self._scale > _MAX_EXPONENT:
            self._rebase()
        weight, last = self._weight, self._last
        # leaf first, each row a tick later: the root gets the latest time and the largest term
        time = self._clock
        term = 2.0 ** ((time - self._origin) / self._scale)
        step = 2.0 ** (1.0 / self._scale)
        intervals = []
        for row in reversed(row_list):
            time += 1.0
            term *= step
            weight[row] = weight.item(row) + term
            if seen := last.item(row):
                intervals.append(time - seen)
            last[row] = time
        self._clock = time + 1.0
        if intervals:
            self._learn(intervals)

    def _access_natively(self, rows: Sequence[int] | npt.NDArray[np.intp], table: BlockTable) -> None:
        """`on_access` with its per-row loop compiled: the same steps in the same order, and the
        same numbers bit for bit (tests/unit/test_policy_native.py replays traces both ways)."""
        assert native_access is not None
        count = len(rows)
        leaf_first = np.array(rows[::-1], dtype=np.int64)
        if (self._clock + count - self._origin) / self._scale > _MAX_EXPONENT:
            self._adopt(leaf_first, table)
            self._rebase()
        term = 2.0 ** ((self._clock - self._origin) / self._scale)
        step = 2.0 ** (1.0 / self._scale)
        state = (self._incarnation, table.incarnation, self._weight, self._last, self._intervals)
        counted = native_access(leaf_first, *state, self._clock, term, step)
        if counted < 0:  # rows that hold other blocks now: adopted first, as on_access does
            self._adopt(leaf_first, table)
            counted = native_access(leaf_first, *state, self._clock, term, step)
        self._clock += count + 1.0
        if counted:
            self._note_samples(counted)

    def on_insert(self, rows: Sequence[int], tier: TierKind) -> None:
        """A copy in a new tier: nothing is queued (`victims` ranks the tier's rows when asked);
        a row that holds a new block takes on that block's history here."""
        if rows:
            self._adopt(np.asarray(rows, dtype=np.int64), self._require_table())

    def on_evict(self, rows: Sequence[int], tier: TierKind) -> None:
        """A block losing its last copy leaves its weight in the history."""
        if not rows:
            return
        table = self._require_table()
        if native_evict is not None:
            history = (self._history_tag, self._history_weight, self._history_last)
            state = (self._incarnation, table.incarnation, table.slot, table.keys, self._weight, self._last)
            native_evict(np.array(rows, dtype=np.int64), int(tier), table.slot.shape[1], *state, *history)
            return
        slot, mine, current = table.slot, self._incarnation, table.incarnation
        others = [kind for kind in _TIERS if kind != tier]
        leaving = [
            row
            for row in rows
            if mine.item(row) == current.item(row) and all(slot.item(row, kind) == _ABSENT for kind in others)
        ]
        if not leaving:
            return
        positions, tags = self._history_positions(table.keys, leaving)
        self._history_tag[positions] = tags
        self._history_weight[positions] = self._weight[leaving]
        self._history_last[positions] = self._last[leaving]
        self._incarnation[leaving] = 0  # no block's: the next one to hold the row is adopted

    def admit(self, rows: Sequence[int], tier: TierKind) -> list[bool]:
        lowest = self._lowest(tier)
        if lowest is None:
            return [True] * len(rows)
        return [self._weight.item(row) >= lowest for row in rows]

    # -- victims -------------------------------------------------------------------------------

    def victims(self, tier: TierKind, table: BlockTable) -> Iterator[int]:
        # Every copy was adopted when it was inserted (on_insert), so each resident row's weight
        # is its own block's.
        return ranked.by_rank(table, tier, ranked.evictable(table, tier), self._weight)

    # -- internals -----------------------------------------------------------------------------

    def _require_table(self) -> BlockTable:
        if self._table is None:
            raise RuntimeError("PrefixLRFU used before attach(table)")
        return self._table

    def _adopt(self, index: npt.NDArray[np.int64], table: BlockTable) -> None:
        """Rows of `index` that hold another block than when last seen start from that block's
        history, if it has one, else from nothing."""
        if native_adopt is not None:
            state = (self._incarnation, table.incarnation, table.keys, self._weight, self._last)
            native_adopt(index, *state, self._history_tag, self._history_weight, self._history_last)
            return
        current = table.incarnation[index]
        changed = self._incarnation[index] != current
        if not changed.any():
            return
        rows = index[changed]
        self._incarnation[rows] = current[changed]
        self._weight[rows] = 0.0
        self._last[rows] = 0.0
        positions, tags = self._history_positions(table.keys, rows.tolist())
        found = self._history_tag[positions] == tags
        if found.any():
            rows, positions = rows[found], positions[found]
            self._weight[rows] = self._history_weight[positions]
            self._last[rows] = self._history_last[positions]
            self._history_tag[positions] = 0

    def _history_positions(
        self, keys: Sequence[BlockKey | None], rows: list[int]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint32]]:
        """Where the history of each row's key lives, and the tag that tells it is that key's.
        Keys are hashes, but not every caller's are uniform in every byte, so both halves are
        mixed (Fibonacci hashing; numpy arrays wrap on overflow)."""
        halves = np.frombuffer(b"".join([keys[row] or _NO_KEY for row in rows]), dtype="<u8")
        folded = halves[0::2] ^ halves[1::2]
        bits = len(self._history_tag).bit_length() - 1
        positions = ((folded * _GOLDEN) >> np.uint64(64 - bits)).astype(np.intp)
        tags = ((folded * _TAG_MULTIPLIER) >> np.uint64(32)).astype(np.uint32) | np.uint32(1)  # tag 0 = empty
        return positions, tags

    def _learn(self, intervals: list[float]) -> None:
        """Add reuse intervals to the histogram; every so often H is set from its median."""
        for interval in intervals:
            self._intervals[min(_BUCKETS - 1, max(0, int(interval).bit_length() - 1))] += 1.0
        self._note_samples(len(intervals))

    def _note_samples(self, count: int) -> None:
        """`count` reuse intervals were added to the histogram; every so often H is set from its median."""
        self._samples += count
        if self._samples < self._next_estimate:
            return
        # A new scale converts every weight and the whole history, O(rows): estimates come at
        # doubling sample counts, then every _MAX_ESTIMATE_EVERY, so that cost stays amortised
        # even when the median wavers across a bucket's edge.
        self._next_estimate = self._samples + min(self._samples, _MAX_ESTIMATE_EVERY)
        cumulative = np.cumsum(self._intervals)
        if cumulative[-1] > _HISTOGRAM_HALVING:
            self._intervals *= 0.5
        median = int(np.searchsorted(cumulative, cumulative[-1] / 2))
        self._set_scale(self._scale_factor * float(2.0 ** (median + 0.5)))

    def _set_scale(self, scale: float) -> None:
        """Change H. A weight w (relative to the origin) read at the old scale is the time
        log2(w) * H_old of one equivalent access; it becomes that access's term at the new one."""
        if scale == self._scale:
            return
        self._rebase()  # every access term is then <= 1
        ratio = self._scale / scale
        with np.errstate(divide="ignore"):  # log2(0) = -inf -> 2 ** -inf = 0: never accessed stays 0
            for weights in (self._weight, self._history_weight):
                exponents = np.log2(weights) * ratio
                np.exp2(np.minimum(exponents, _MAX_EXPONENT, out=exponents), out=weights)  # a sum of terms may exceed 1
        self._scale = scale
        self._lowest_seen.clear()

    def _rebase(self) -> None:
        """Move the origin to now, scaling every weight down by the same factor, before new
        terms overflow a float. Old weights may underflow to 0: they were negligible."""
        factor = 2.0 ** (-(self._clock - self._origin) / self._scale)
        self._weight *= factor
        self._history_weight *= factor
        self._origin = self._clock
        self._lowest_seen.clear()

    def _lowest(self, tier: TierKind) -> float | None:
        """The lowest weight among the tier's possible victims, or None when it has none. A full
        pass over the table: it is kept, and worked out again only after `_LOWEST_REFRESH` of the
        rows have been accessed, or when the weights were rescaled."""
        kept = self._lowest_seen.get(tier)
        if kept is not None and self._clock - kept[0] < max(1024.0, _LOWEST_REFRESH * len(self._weight)):
            return kept[1]
        table = self._require_table()
        candidates = ranked.leaves(table, tier, ranked.evictable(table, tier))
        lowest = float(self._weight[candidates].min()) if len(candidates) else None
        self._lowest_seen[tier] = (self._clock, lowest)
        return lowest
