"""Value types shared by every layer: namespaces, block keys, ids and tier names.

Ids are `NewType`s over bytes or ints and are built only where bytes come in from the hash
function or the wire (`kvstore.hashing`, later the gRPC servicer). Value objects are frozen,
slotted dataclasses; enums that cross the wire or config are `StrEnum`s.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, NewType

import numpy as np
import xxhash

from kvstore.errors import InvalidArgumentError

BlockKey = NewType("BlockKey", bytes)
"""16 bytes: xxh3_128 of the parent key, the block's tokens and its extra keys (DESIGN.md 2)."""

NamespaceId = NewType("NamespaceId", bytes)
"""16 bytes: xxh3_128 of a namespace's canonical encoding."""

LeaseId = NewType("LeaseId", int)
ReservationId = NewType("ReservationId", int)
Slot = NewType("Slot", int)
"""Byte offset of a block's slot inside one tier's address space."""

KEY_BYTES = 16
_KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")
_NAMESPACE_ENCODING_VERSION = 1


def unpack_keys(
    packed: bytes, *, max_keys: int, what: str = "keys", error: type[InvalidArgumentError] = InvalidArgumentError
) -> list[BlockKey]:
    """Keys sent back to back (gRPC's `keys` fields, data-plane frames) as a list; `error`
    (naming `what`) when the bytes are not whole keys or more than `max_keys` of them."""
    if len(packed) % KEY_BYTES:
        raise error(f"{what} is {len(packed)} bytes, not a multiple of {KEY_BYTES} (whole keys)")
    count = len(packed) // KEY_BYTES
    if count > max_keys:
        raise error(f"{what} holds {count} keys; at most {max_keys} per call")
    # One C loop: a 16-byte void element's `tolist` is its bytes (4x faster than slicing).
    return np.frombuffer(packed, dtype=_KEY_DTYPE).tolist()  # type: ignore[no-any-return]


class TierKind(IntEnum):
    """The tiers, fastest first. The value orders them and indexes per-tier arrays."""

    HBM = 0
    DRAM = 1
    NVME = 2

    @property
    def label(self) -> str:
        return self.name.lower()


_TIER_KINDS = tuple(TierKind)


def tier_kinds(values: bytes | Sequence[int]) -> tuple[TierKind, ...]:
    """The TierKinds of raw tier values (a table lookup, not `TierKind(v)`: that costs ~1 us,
    which a 128-key Lookup reply would pay 128 times). ValueError names an unknown value."""
    if not values:
        return ()
    first = values[0]
    if values.count(first) == len(values) and 0 <= first < len(_TIER_KINDS):  # a run in one tier
        return (_TIER_KINDS[first],) * len(values)
    if not 0 <= min(values) <= max(values) < len(_TIER_KINDS):
        raise ValueError(f"unknown tier value in {sorted(set(values))}; known: 0..{len(_TIER_KINDS) - 1}")
    return tuple(map(_TIER_KINDS.__getitem__, values))


class DType(StrEnum):
    """Element types a KV cache is stored in; the value is the canonical name."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT8_E4M3 = "float8_e4m3"
    FLOAT8_E5M2 = "float8_e5m2"
    INT8 = "int8"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]


_ITEMSIZE = {
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.FLOAT8_E4M3: 1,
    DType.FLOAT8_E5M2: 1,
    DType.INT8: 1,
}


class KVPacking(StrEnum):
    """How one block's K and V are laid out in its payload.

    SEPARATE:     per layer, K then V: shape (layers, 2, block_tokens, kv_heads, head_size).
    INTERLEAVED:  per layer, K and V side by side on the last axis, as vLLM's CPU backend keeps
                  them: shape (layers, kv_heads, block_tokens, 2 * head_size).
    LATENT:       one latent vector per token (MLA): shape (layers, block_tokens, head_size).
    """

    SEPARATE = "separate"
    INTERLEAVED = "interleaved"
    LATENT = "latent"


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one block's KV payload; everything a reader needs to interpret its bytes."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    packing: KVPacking = KVPacking.SEPARATE

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.packing, KVPacking):
            raise InvalidArgumentError(f"KVLayout.packing must be a KVPacking, got {self.packing!r}")

    def block_shape(self, block_tokens: int) -> tuple[int, ...]:
        if self.packing is KVPacking.SEPARATE:
            return (self.num_layers, 2, block_tokens, self.num_kv_heads, self.head_size)
        if self.packing is KVPacking.INTERLEAVED:
            return (self.num_layers, self.num_kv_heads, block_tokens, 2 * self.head_size)
        return (self.num_layers, block_tokens, self.head_size)


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes KV blocks non-interchangeable (DESIGN.md 2).

    Two engines share blocks exactly when their namespaces are equal. `namespace_id` hashes the
    canonical encoding, which is stable across processes, machines and Python versions.
    """

    model_id: str
    dtype: DType
    layout: KVLayout
    block_tokens: int
    model_revision: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    tenant_salt: str = ""
    # Derived once (hot paths read them per block); not part of equality or the encoding.
    _block_shape: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _block_bytes: int = field(init=False, repr=False, compare=False)
    _numpy_dtype: np.dtype[Any] | None = field(init=False, repr=False, compare=False)
    _namespace_id: NamespaceId = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise InvalidArgumentError(f"Namespace.model_id must be a non-empty str, got {self.model_id!r}")
        if not isinstance(self.dtype, DType):
            raise InvalidArgumentError(f"Namespace.dtype must be a DType, got {self.dtype!r}")
        if not isinstance(self.layout, KVLayout):
            raise InvalidArgumentError(f"Namespace.layout must be a KVLayout, got {self.layout!r}")
        if not _is_positive_int(self.block_tokens):
            raise InvalidArgumentError(f"Namespace.block_tokens must be a positive int, got {self.block_tokens!r}")
        if not _is_positive_int(self.tp_size):
            raise InvalidArgumentError(f"Namespace.tp_size must be a positive int, got {self.tp_size!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(
                f"Namespace.tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank!r}"
            )
        for name in ("model_revision", "tenant_salt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgumentError(f"Namespace.{name} must be a str, got {getattr(self, name)!r}")
        shape = self.layout.block_shape(self.block_tokens)
        object.__setattr__(self, "_block_shape", shape)
        object.__setattr__(self, "_block_bytes", self.dtype.itemsize * math.prod(shape))
        object.__setattr__(self, "_numpy_dtype", _NUMPY_DTYPES.get(self.dtype))
        object.__setattr__(self, "_namespace_id", NamespaceId(xxhash.xxh3_128_digest(self.canonical_bytes())))

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self._block_shape

    @property
    def numpy_dtype(self) -> np.dtype[Any] | None:
        """The numpy dtype of this namespace's elements, where numpy has one (not bfloat16, fp8)."""
        return self._numpy_dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's payload in this namespace."""
        return self._block_bytes

    def canonical_bytes(self) -> bytes:
        """A byte encoding that is equal exactly when the namespaces are equal.

        Version byte, then each field in declaration order: strings as little-endian uint32
        length plus UTF-8, ints as little-endian uint32. Never reorder; add fields at the end
        and bump the version.
        """
        parts = [struct.pack("<B", _NAMESPACE_ENCODING_VERSION)]
        for text in (self.model_id, self.model_revision, self.dtype.value, self.layout.packing.value):
            raw = text.encode("utf-8")
            parts.append(struct.pack("<I", len(raw)) + raw)
        parts.append(
            struct.pack(
                "<IIIIII",
                self.layout.num_layers,
                self.layout.num_kv_heads,
                self.layout.head_size,
                self.block_tokens,
                self.tp_rank,
                self.tp_size,
            )
        )
        salt = self.tenant_salt.encode("utf-8")
        parts.append(struct.pack("<I", len(salt)) + salt)
        return b"".join(parts)

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> Namespace:
        """Inverse of `canonical_bytes` (for namespaces persisted by the NVMe tier)."""
        try:
            (version,) = struct.unpack_from("<B", data, 0)
            if version != _NAMESPACE_ENCODING_VERSION:
                raise InvalidArgumentError(f"namespace encoding version {version} is not supported")
            offset = 1
            texts = []
            for _ in range(4):
                (length,) = struct.unpack_from("<I", data, offset)
                texts.append(data[offset + 4 : offset + 4 + length].decode("utf-8"))
                offset += 4 + length
            layers, heads, head_size, block_tokens, tp_rank, tp_size = struct.unpack_from("<IIIIII", data, offset)
            offset += 24
            (length,) = struct.unpack_from("<I", data, offset)
            salt = data[offset + 4 : offset + 4 + length].decode("utf-8")
            if offset + 4 + length != len(data):
                raise InvalidArgumentError("trailing bytes after the namespace encoding")
            model_id, revision, dtype, packing = texts
            return cls(
                model_id=model_id,
                model_revision=revision,
                dtype=DType(dtype),
                layout=KVLayout(layers, heads, head_size, KVPacking(packing)),
                block_tokens=block_tokens,
                tp_rank=tp_rank,
                tp_size=tp_size,
                tenant_salt=salt,
            )
        except (struct.error, UnicodeDecodeError, ValueError) as error:
            raise InvalidArgumentError(f"malformed namespace encoding: {error}") from None

    @property
    def namespace_id(self) -> NamespaceId:
        """xxh3_128 of `canonical_bytes` (computed once: events name it per block)."""
        return self._namespace_id


_NUMPY_DTYPES = {
    DType.FLOAT32: np.dtype(np.float32),
    DType.FLOAT16: np.dtype(np.float16),
    DType.INT8: np.dtype(np.int8),
}


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where one READY block lives, as handed to a reader under a lease."""

    key: BlockKey
    tier: TierKind
    slot: Slot
    size_bytes: int
    checksum: int


@dataclass(frozen=True, slots=True)
class LookupResult:
    """`lookup(keys)`: how many leading keys are present, and the fastest tier of each."""

    num_hits: int
    tiers: tuple[TierKind, ...]


@dataclass(frozen=True, slots=True)
class PutResult:
    """`put_blocks`: how many blocks were written, and how many were already stored (or being
    stored by another writer) and so not written again."""

    num_written: int
    num_present: int


@dataclass(frozen=True, slots=True)
class RemoveResult:
    num_removed: int
    num_busy: int  # leased, so kept


@dataclass(frozen=True, slots=True)
class FetchResult:
    """`fetch`: blocks copied from the peer, blocks already here, and the bytes moved."""

    num_fetched: int
    num_present: int
    bytes_moved: int


_MAX_LOAD_COUNT = 1 << 48  # more tokens or sequences than any engine holds: a garbled report


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's load, or a node's (the sum of its engines'): what `ReportLoad` tells a node
    and a node's heartbeat tells the conductor (kvstore/node/engine_loads.py)."""

    queued_prefill_tokens: int = 0  # prompt tokens queued or running, not yet computed
    running_decodes: int = 0  # sequences in its decode batch
    decode_kv_tokens: int = 0  # KV those sequences hold
    decode_pause_budget_s: float = 0.0  # how long its batch could pause for a prefill; 0: unknown

    def check(self) -> None:
        """InvalidArgumentError naming the first field out of range."""
        for name in ("queued_prefill_tokens", "running_decodes", "decode_kv_tokens"):
            value = getattr(self, name)
            if not 0 <= value < _MAX_LOAD_COUNT:
                raise InvalidArgumentError(f"{name} must be in [0, 2**48), got {value}")
        if not 0.0 <= self.decode_pause_budget_s < math.inf:
            raise InvalidArgumentError(
                f"decode_pause_budget_s must be a finite number >= 0, got {self.decode_pause_budget_s}"
            )


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What an operator sees of one stored block (`kvctl ls` / `inspect`)."""

    key: BlockKey
    namespace_id: NamespaceId
    parent: BlockKey | None
    tiers: tuple[TierKind, ...]  # every tier holding a copy, fastest first
    size_bytes: int
    checksum: int  # 0 while the background hasher has not reached it
    num_leases: int
    is_pinned: bool
