"""The shared index: which blocks a node holds, published in shared memory for same-host engines.

Why: a Lookup is a question engines ask before every request, and answering it through the
node costs a round trip between processes (two wake-ups, Python on both sides). On a busy host
that round trip waits for the node's turn on a CPU: with 16 engines on 2 cores the p99 of a
socket Lookup was 5.5 ms. Here an engine answers its own Lookups from a read-only mapping of
this index, in its own process (~25 numpy calls: 50-75 us of CPU here), and asks the node only
when the index cannot say. Reads use it too: `locate` and `unchanged` let a client copy blocks
out of DRAM without a lease (see Client.get_into).

Layout (little-endian; one POSIX shared-memory segment, mode 0600, named after the node's DRAM
segment with ".index" appended, mapped read-only by readers):

    header   64 B    magic "KVIX", version, bucket count (a power of two), header sequence,
                     complete flag
    buckets  128 B each, 4 entries per bucket:
             seq u32           even when stable, odd while the node rewrites the bucket
             tiers u8[4]       the entry's fastest tier (TierKind value), 255 = empty entry
             overflow u8       1: a key whose home is this bucket lives in a later one
             (7 bytes of padding)
             (32 bytes reserved)
             key i64[4][2]     the block key's two 8-byte words, the second XORed with the
                               namespace tag (the namespace id's first 8 bytes): one
                               comparison matches key and namespace
             dram u32[4]       the block's DRAM slot in 4 KiB units (NO_SLOT when none),
                               for reads that take no lease

A key's home bucket is its first 8 bytes modulo the bucket count (keys are xxh3 outputs, so
uniform). The node, the only writer, puts a key in the first bucket from its home on that has
a free entry, within MAX_DISPLACEMENT buckets, and flags the buckets it passed; past that the
index is marked incomplete (header) and a reader can no longer trust a miss.

Reading is a seqlock per bucket: read the bucket's seq, the bucket, the seq again; equal and
even means the bucket was not being rewritten in between. On x86-64 (total store order, which
numpy's loads and stores obey in program order) that is sound; elsewhere no index is published
and engines ask the node. A reader returns None, meaning "ask the node", whenever it cannot be
sure: a bucket rewritten while read, a miss whose home bucket overflowed, an incomplete index,
a header changed under it. It never answers a hit that was not one.

Owner: the node creates the writer and unlinks the segment on close; the writer is called under
the tier manager's lock (as its residency listener). Readers only read: any thread may use one.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kvstore.config import ALIGNMENT_BYTES
from kvstore.table import NO_NAMESPACE, BlockTable, check_keys
from kvstore.tiers.dram import SharedSegment
from kvstore.types import KEY_BYTES, BlockKey, LookupResult, Namespace, NamespaceId, TierKind, tier_kinds

NativeProbe = Callable[[bytes, int, object, object], "tuple[int, bytes, bytes, bytes, bytes] | None"]
native_probe: NativeProbe | None
try:  # the compiled probe (kvstore/_index_probe.c; its block copy is the DRAM tier's), when the build had a C compiler
    from kvstore._index_probe import probe as native_probe
except ImportError:  # where nothing was compiled: numpy does the same
    native_probe = None

log = logging.getLogger(__name__)

MAGIC = b"KVIX"
VERSION = 1
ENTRIES_PER_BUCKET = 4
MAX_DISPLACEMENT = 8  # buckets a key may live past its home before the index gives up on it
EMPTY = 255
NO_SLOT = 0xFFFFFFFF

HEADER_DTYPE = np.dtype(
    [("magic", "S4"), ("version", "<u4"), ("num_buckets", "<u8"), ("seq", "<u8"), ("complete", "u1"), ("pad", "u1", 39)]
)
BUCKET_DTYPE = np.dtype(
    [
        ("seq", "<u4"),  # word 0, low half
        ("tiers", "u1", ENTRIES_PER_BUCKET),  # word 0, high half
        ("overflow", "u1"),  # word 1
        ("pad", "u1", 7),
        ("reserved", "<i8", ENTRIES_PER_BUCKET),  # words 2-5
        ("key", "<i8", (ENTRIES_PER_BUCKET, 2)),  # words 6-13 (signed: compared as int64)
        ("dram", "<u4", ENTRIES_PER_BUCKET),  # words 14-15
    ]
)
assert HEADER_DTYPE.itemsize == 64 and BUCKET_DTYPE.itemsize == 128
assert (
    HEADER_DTYPE.fields is not None and HEADER_DTYPE.fields["seq"][1] == 16 and HEADER_DTYPE.fields["complete"][1] == 24
)


def supported() -> bool:
    """Whether readers may trust the seqlock here (x86-64's total store order)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def buckets_for(num_blocks: int) -> int:
    """A bucket count (a power of two) that keeps `num_blocks` entries at most half full."""
    wanted = max(1, -(-2 * num_blocks // ENTRIES_PER_BUCKET))
    return 1 << (wanted - 1).bit_length()


def segment_bytes(num_buckets: int) -> int:
    return HEADER_DTYPE.itemsize + num_buckets * BUCKET_DTYPE.itemsize


def namespace_tag(namespace_id: NamespaceId) -> int:
    """What an entry stores of its namespace: the id's first 8 bytes (ids are xxh3-128 digests)."""
    return int.from_bytes(namespace_id[:8], "little", signed=True)


class IndexWriter:
    """The node's side: creates the segment and keeps it equal to the store's residency."""

    def __init__(self, name: str, num_buckets: int) -> None:
        if num_buckets < 1 or num_buckets & (num_buckets - 1):
            raise ValueError(f"the bucket count must be a power of two, got {num_buckets}")
        self.name = name
        self.num_buckets = num_buckets
        self._segment = SharedSegment.create(name, segment_bytes(num_buckets))
        memory = self._segment.array
        self._header = memory[: HEADER_DTYPE.itemsize].view(HEADER_DTYPE)
        self._buckets = memory[HEADER_DTYPE.itemsize :].view(BUCKET_DTYPE)
        self._seq = self._buckets["seq"]
        self._overflow = self._buckets["overflow"]
        self._tiers = self._buckets["tiers"]
        self._keys = self._buckets["key"]
        self._dram = self._buckets["dram"]
        self._tiers[:] = EMPTY
        self._where: dict[BlockKey, tuple[int, int]] = {}  # key -> (bucket, entry)
        header = self._header[0]
        header["magic"], header["version"], header["num_buckets"] = MAGIC, VERSION, num_buckets
        self._header["complete"] = 1

    @property
    def complete(self) -> bool:
        return bool(self._header["complete"][0])

    def __len__(self) -> int:
        return len(self._where)

    def upsert(self, key: BlockKey, tag: int, tier: TierKind, dram_units: int) -> None:
        """Record that `key` (of the namespace with tag `tag`) is held, fastest in `tier`."""
        place = self._where.get(key)
        if place is None:
            place = self._free_entry(key)
            if place is None:
                return  # marked incomplete: a miss on this key is no longer trusted
            self._where[key] = place
        bucket, entry = place
        self._seq[bucket] += 1  # odd: readers of this bucket retry or ask the node
        word0 = int.from_bytes(key[:8], "little", signed=True)
        self._keys[bucket, entry] = (word0, int.from_bytes(key[8:], "little", signed=True) ^ tag)
        self._dram[bucket, entry] = dram_units
        self._tiers[bucket, entry] = tier
        self._seq[bucket] += 1

    def remove(self, key: BlockKey) -> None:
        place = self._where.pop(key, None)
        if place is None:
            return
        bucket, entry = place
        self._seq[bucket] += 1
        self._tiers[bucket, entry] = EMPTY
        self._dram[bucket, entry] = NO_SLOT
        self._seq[bucket] += 1

    def close(self) -> None:
        """Mark the index incomplete (readers that still map it ask the node), unmap, unlink."""
        if len(self._header):
            self._header["complete"] = 0
            self._header["seq"] += 2
            self._header = self._header[:0]
        self._segment.close()

    def _free_entry(self, key: BlockKey) -> tuple[int, int] | None:
        home = int.from_bytes(key[:8], "little", signed=True) & (self.num_buckets - 1)
        for step in range(MAX_DISPLACEMENT):
            bucket = (home + step) & (self.num_buckets - 1)
            entries = self._tiers[bucket].tolist()  # a few entries: faster than numpy's search
            if EMPTY in entries:
                for passed in range(step):  # readers missing in these must look further: ask the node
                    self._overflow[(home + passed) & (self.num_buckets - 1)] = 1
                return bucket, entries.index(EMPTY)
        if self.complete:
            log.warning(
                "the shared index is full around a bucket; lookups that miss there go to the node",
                extra={"index": self.name, "entries": len(self._where), "buckets": self.num_buckets},
            )
            self._header["complete"] = 0
        return None


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Blocks to copy straight from the node's DRAM segment, and how to check them afterwards."""

    count: int
    ends_at_miss: bool  # the run covers every key, or stops at one the node does not hold
    buckets: npt.NDArray[np.int64]  # each block's home bucket
    seqs: npt.NDArray[np.uint32]  # the buckets' sequence numbers when the plan was made
    offsets: npt.NDArray[np.int64]  # each block's slot, in bytes from the segment's start


@dataclass(frozen=True, slots=True)
class _Probe:
    run: int  # leading keys found, in this namespace
    found: npt.NDArray[np.bool_]  # (keys, 4): which entry of each home bucket is the key
    words: npt.NDArray[np.int64]  # (keys, 16): the home buckets, as read
    homes: npt.NDArray[np.int64]  # the home buckets' numbers
    seqs: npt.NDArray[np.uint32]  # their sequence numbers, stable and even while read


class IndexReader:
    """An engine's side: a read-only mapping of a node's index."""

    def __init__(self, name: str, *, native: bool = True) -> None:
        """Map the index `name`; `native`: probe with the compiled probe when it was built
        (else, or with False, with numpy: the same answers, ~10x slower)."""
        self._segment = SharedSegment.attach(name, writable=False)
        memory = self._segment.array
        try:
            if memory.size < HEADER_DTYPE.itemsize:
                raise ValueError(f"shared index {name} is {memory.size} bytes: too short for its header")
            header = memory[: HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[0]
            num_buckets = int(header["num_buckets"])
            if bytes(header["magic"]) != MAGIC or int(header["version"]) != VERSION:
                raise ValueError(f"shared index {name} is not a version {VERSION} kvstore index")
            if memory.size != segment_bytes(num_buckets) or num_buckets & (num_buckets - 1):
                raise ValueError(f"shared index {name} is {memory.size} bytes, which {num_buckets} buckets do not fill")
        except BaseException:
            self._segment.close()
            raise
        self.name = name
        # Plain integer views, not the structured dtype: field access on a structured array
        # costs microseconds a call, and a Lookup is a few dozen such calls.
        self._header = memory[: HEADER_DTYPE.itemsize].view("<u8")
        self._words = memory[HEADER_DTYPE.itemsize :].view("<i8").reshape(num_buckets, 16)
        self._seqs = self._words.view("<u4")[:, 0]
        self._mask = np.int64(num_buckets - 1)
        self.native = native and native_probe is not None

    def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult | None:
        """The longest leading run of `keys` stored in the namespace and each one's fastest
        tier, as the node would answer; None when the index cannot be sure (ask the node).
        Keys are checked as the node checks them only when they do not add up to 16 bytes each
        (any 16-byte buffers are read as keys here)."""
        if not keys:
            return LookupResult(0, ())
        if self.native:
            answer = self._native(namespace_id, keys)
            return None if answer is None else LookupResult(answer[0], tier_kinds(answer[1]))
        probe = self._probe(namespace_id, keys)
        if probe is None:
            return None
        run, found = probe.run, probe.found
        tiers = probe.words[:, :1].view(np.uint8)[:, 4:8]
        return LookupResult(run, tier_kinds(tiers[:run][found[:run]].tobytes()))

    def locate(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> ReadPlan | None:
        """Where the leading run of `keys` held in DRAM lies in the node's segment, for a read
        that takes no lease: copy, then keep only the blocks `unchanged` still vouches for.
        None when the index cannot say (ask the node)."""
        if not keys:
            return None
        if self.native:
            answer = self._native(namespace_id, keys)
            if answer is None:
                return None
            run, _, home_bytes, seq_bytes, dram_bytes = answer
            homes = np.frombuffer(home_bytes, dtype=np.int64)
            seqs = np.frombuffer(seq_bytes, dtype=np.uint32)
            drams = np.frombuffer(dram_bytes, dtype=np.uint32)
        else:
            probe = self._probe(namespace_id, keys)
            if probe is None:
                return None
            run, homes, seqs = probe.run, probe.homes[: probe.run], probe.seqs[: probe.run]
            drams = probe.words[:, 14:16].view("<u4")[:run][probe.found[:run]]
        ends_at_miss = True
        if run and drams.max() == NO_SLOT:
            run = int((drams == NO_SLOT).argmax())  # the run ends at the first block not in DRAM
            drams, ends_at_miss = drams[:run], False
        return ReadPlan(run, ends_at_miss, homes[:run], seqs[:run], drams.astype(np.int64) * ALIGNMENT_BYTES)

    def unchanged(self, plan: ReadPlan) -> int:
        """How many leading blocks of `plan` are still what they were when it was made: their
        buckets were not rewritten since, so their slots were not freed, let alone reused (the
        node rewrites a bucket before it frees a slot; x86 orders these loads after the copy's)."""
        same = self._seqs[plan.buckets] == plan.seqs
        return plan.count if same.all() else int(same.argmin())

    def _native(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey]
    ) -> tuple[int, bytes, bytes, bytes, bytes] | None:
        """The compiled probe's answer (run, tiers, home buckets, sequence numbers, DRAM slots)."""
        try:
            packed = b"".join(keys)
        except TypeError:
            packed = b""
        if len(packed) != KEY_BYTES * len(keys):
            check_keys(keys)  # raises the node's error
            return None
        assert native_probe is not None
        answer: tuple[int, bytes, bytes, bytes, bytes] | None = native_probe(
            packed, namespace_tag(namespace_id), self._words, self._header
        )
        return answer

    def _probe(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> _Probe | None:
        """The leading run of hits, which entry of each home bucket matched, the home buckets'
        words, their numbers and their (stable, even) sequence numbers; None when unsure."""
        count = len(keys)
        try:
            packed = b"".join(keys)
        except TypeError:
            packed = b""
        if len(packed) != KEY_BYTES * count:
            check_keys(keys)  # raises the node's error
            return None
        wanted = np.frombuffer(packed, dtype="<i8").reshape(count, 2)
        header = self._header
        before = int(header[_HEADER_SEQ_WORD])
        homes = wanted[:, 0] & self._mask  # int64 = intp: indexes without a conversion
        seq_before = self._seqs[homes]  # (not `take`: that copies a strided array whole first)
        words = self._words.take(homes, axis=0)  # (count, 16): each key's home bucket
        seq_after = self._seqs[homes]
        if before & 1 or int(header[_HEADER_SEQ_WORD]) != before or not int(header[_HEADER_COMPLETE_WORD]) & 0xFF:
            return None
        if ((seq_before ^ seq_after) | (seq_before & 1)).any():
            return None  # a bucket was rewritten while read (rare): the node knows
        # Entries hold (key word 0, key word 1 ^ namespace tag): one comparison of all 4 entries'
        # 8 words; an entry is this block of this namespace when both of its words match.
        probe = wanted.take(_FOUR_ENTRIES, axis=1)
        probe[:, 1::2] ^= np.int64(namespace_tag(namespace_id))
        found = (words[:, 6:14] == probe).view(np.uint16) == _BOTH_TRUE
        found &= words[:, :1].view(np.uint8)[:, 4:8] != EMPTY
        hit = found.view(np.uint32)[:, 0] != 0  # any of the 4 entries
        run = count if hit.all() else int(hit.argmin())
        if run < count and words[run, 1] & 0xFF:
            return None  # a miss whose home bucket overflowed: it may live in a later one
        return _Probe(run, found, words, homes, seq_after)

    def close(self) -> None:
        self._segment.close()


_BOTH_TRUE = np.uint16(0x0101)  # two adjacent True bytes, read as one uint16
_FOUR_ENTRIES = np.array([0, 1] * ENTRIES_PER_BUCKET)
_HEADER_SEQ_WORD = 2  # byte 16 of the header: see HEADER_DTYPE
_HEADER_COMPLETE_WORD = 3  # byte 24


class IndexListener:
    """The tier manager's residency listener that keeps an IndexWriter equal to the table."""

    def __init__(self, writer: IndexWriter, table: BlockTable, namespaces: list[Namespace]) -> None:
        self._writer = writer
        self._table = table
        self._namespaces = namespaces  # shared with the manager, which appends to it
        self._tags: list[int] = []

    def residency_changed(
        self, rows: Sequence[int], namespaces: Sequence[int], before: Sequence[int], after: Sequence[int]
    ) -> None:
        keys, writer, tags = self._table.keys, self._writer, self._tags
        slots = self._table.slot
        for row, namespace, was, now in zip(rows, namespaces, before, after, strict=True):
            if was == now or namespace == NO_NAMESPACE:
                continue
            key = keys[row]
            assert key is not None  # only rows of stored blocks change residency
            if not now:
                writer.remove(key)
                continue
            while len(tags) <= namespace:
                tags.append(namespace_tag(self._namespaces[len(tags)].namespace_id))
            fastest = _TIERS[(now & -now).bit_length() - 1]
            # Called before a dropped copy's slot is cleared: only a copy `now` keeps counts.
            dram = int(slots[row, TierKind.DRAM]) if now & _DRAM_BIT else NO_SLOT
            writer.upsert(key, tags[namespace], fastest, dram)


_TIERS = tuple(TierKind)
_DRAM_BIT = 1 << TierKind.DRAM
