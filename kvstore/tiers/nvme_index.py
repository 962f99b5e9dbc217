"""The NVMe tier's persistent index: which slots of the slab files hold committed blocks.

Step of the data path: the last step of an NVMe write and the first step of a restart. The NVMe
tier (`kvstore.tiers.nvme`) calls `commit` only after a block's payload is durable in the slab
files, and `remove` before the block's slot is freed, so a record never points at bytes that are
torn or reused. On restart the tier rebuilds its allocator from `records()`.

Mechanism only: it stores what it is given and checks nothing but the encoding. One LMDB
environment at `<directory>/index.lmdb` (a directory holding `data.mdb` and `lock.mdb`), opened
with sync on, so a returned `commit` has reached the disk. Named databases:

    blocks      BlockKey -> NvmeRecord (struct-encoded, `RECORD_FORMAT` below)
    namespaces  NamespaceId -> the namespace's canonical encoding (opaque here)
    meta        "geometry.<field>" -> uint64: the slab geometry the files were created with

Owner: one NvmeTier. Thread-safe: LMDB serialises write transactions and readers never block.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from kvstore.errors import InvalidArgumentError, StorageFormatError, StoreClosedError, StoreFullError
from kvstore.types import KEY_BYTES, BlockKey, NamespaceId, Slot

INDEX_NAME = "index.lmdb"
RECORD_VERSION = 1
RECORD_FORMAT = struct.Struct("<B16s16sB16sQQQ")
"""version, key, namespace_id, has_parent, parent (zeros when none), slot, size_bytes, checksum.

Never reorder: add fields at the end and bump RECORD_VERSION.
"""
_U64 = struct.Struct("<Q")
_NO_PARENT = bytes(KEY_BYTES)


@dataclass(frozen=True, slots=True)
class NvmeRecord:
    """A block committed to NVMe: where its payload lives and the checksum it was written with."""

    key: BlockKey
    namespace_id: NamespaceId
    parent: BlockKey | None
    slot: Slot
    size_bytes: int
    checksum: int

    def encode(self) -> bytes:
        for name, value in (("key", self.key), ("namespace_id", self.namespace_id), ("parent", self.parent)):
            if value is not None and len(value) != KEY_BYTES:
                raise InvalidArgumentError(f"NvmeRecord.{name} must be {KEY_BYTES} bytes, got {value!r}")
        has_parent = self.parent is not None
        try:
            return RECORD_FORMAT.pack(
                RECORD_VERSION,
                self.key,
                self.namespace_id,
                has_parent,
                self.parent if self.parent is not None else _NO_PARENT,
                self.slot,
                self.size_bytes,
                self.checksum,
            )
        except struct.error as error:
            raise InvalidArgumentError(f"NvmeRecord for key {self.key.hex()} does not encode: {error}") from error

    @classmethod
    def decode(cls, stored_key: bytes, raw: bytes) -> NvmeRecord:
        """Parse a stored record; StorageFormatError (naming the key) if it is not one."""
        if len(raw) != RECORD_FORMAT.size or raw[0] != RECORD_VERSION:
            raise StorageFormatError(
                f"NVMe index record for key {stored_key.hex()} is unreadable: {len(raw)} bytes, "
                f"version {raw[0] if raw else None} (expected {RECORD_FORMAT.size} bytes, version {RECORD_VERSION})"
            )
        _, key, namespace_id, has_parent, parent, slot, size_bytes, checksum = RECORD_FORMAT.unpack(raw)
        if key != stored_key or has_parent not in (0, 1) or size_bytes == 0:
            raise StorageFormatError(f"NVMe index record for key {stored_key.hex()} is corrupt")
        return cls(
            key=BlockKey(key),
            namespace_id=NamespaceId(namespace_id),
            parent=BlockKey(parent) if has_parent else None,
            slot=Slot(slot),
            size_bytes=size_bytes,
            checksum=checksum,
        )


class NvmeIndex:
    def __init__(self, directory: Path, map_size_bytes: int) -> None:
        self.path = directory / INDEX_NAME
        # py-lmdb would create the directory with the files' mode (0600), which only root can enter.
        self.path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size_bytes,
            subdir=True,
            max_dbs=3,
            sync=True,
            metasync=True,
            readahead=False,  # lookups are random; readahead only evicts the page cache
            mode=0o600,
        )
        self._blocks = self._env.open_db(b"blocks")
        self._namespaces = self._env.open_db(b"namespaces")
        self._meta = self._env.open_db(b"meta")
        self._closed = False

    def commit(self, records: Sequence[NvmeRecord]) -> None:
        """Make the records durable in one transaction (all or none); a key already present is replaced."""
        encoded = [(record.key, record.encode()) for record in records]
        env = self._environment()
        try:
            with env.begin(write=True) as txn:
                for key, raw in encoded:
                    txn.put(key, raw, db=self._blocks)
        except lmdb.MapFullError as error:
            raise StoreFullError(f"the NVMe index at {self.path} is full; raise nvme.index_map_bytes") from error

    def remove(self, keys: Sequence[BlockKey]) -> None:
        """Delete the keys' records in one transaction; unknown keys are ignored."""
        with self._environment().begin(write=True) as txn:
            for key in keys:
                txn.delete(key, db=self._blocks)

    def records(self) -> list[NvmeRecord]:
        with self._environment().begin() as txn:
            return [NvmeRecord.decode(bytes(key), bytes(raw)) for key, raw in txn.cursor(db=self._blocks)]

    def put_namespace(self, namespace_id: NamespaceId, encoded: bytes) -> None:
        if len(namespace_id) != KEY_BYTES:
            raise InvalidArgumentError(f"a namespace id is {KEY_BYTES} bytes, got {namespace_id!r}")
        with self._environment().begin(write=True) as txn:
            txn.put(namespace_id, encoded, db=self._namespaces)

    def namespaces(self) -> dict[NamespaceId, bytes]:
        with self._environment().begin() as txn:
            return {NamespaceId(bytes(key)): bytes(raw) for key, raw in txn.cursor(db=self._namespaces)}

    def check_geometry(self, geometry: dict[str, int]) -> None:
        """Record the geometry on first use; on later opens refuse one that differs, naming the fields."""
        mismatches: list[str] = []
        with self._environment().begin(write=True) as txn:
            for name, value in sorted(geometry.items()):
                meta_key = f"geometry.{name}".encode()
                stored = txn.get(meta_key, db=self._meta)
                if stored is None:
                    txn.put(meta_key, _U64.pack(value), db=self._meta)
                elif _U64.unpack(stored)[0] != value:
                    mismatches.append(f"{name} (stored {_U64.unpack(stored)[0]}, configured {value})")
            if mismatches:  # raised inside the transaction, so it aborts and stores nothing
                raise StorageFormatError(
                    f"the NVMe files at {self.path.parent} have another geometry: {', '.join(mismatches)}"
                )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    def _environment(self) -> lmdb.Environment:
        if self._closed:
            raise StoreClosedError(f"the NVMe index at {self.path} is closed")
        return self._env
