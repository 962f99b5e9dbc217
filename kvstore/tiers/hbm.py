"""HBM tier: a torch device slab carved into slots, behind the same interface as DRAM.

On a GPU node the slab is a `uint8` tensor on `cuda:N`; elsewhere (and in tests) it is on the
CPU, so the same code runs everywhere. Host payloads are copied in with one `copy_` per block
(checksummed on the host side first); reads copy out to host buffers. Engines reach HBM blocks
through the node like any other (a local read copies them to host memory first): handing
same-GPU engines the slab itself through CUDA IPC, so that their kernels copy device to
device, is not built yet.

Owner: the store. Threads may copy into or out of slots they hold a reservation or lease for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from kvstore.config import ALIGNMENT_BYTES, HbmConfig
from kvstore.errors import ConfigError, StoreClosedError
from kvstore.hashing import checksum
from kvstore.slab import SlabAllocator
from kvstore.tiers.base import Buffer, SlabTier, as_bytes_arrays, check_batch, zero_and_verify
from kvstore.types import Slot, TierKind


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"hbm.device {name!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"hbm.device {name!r} asks for CUDA, which is not available here")
    return device


class HbmTier(SlabTier):
    kind = TierKind.HBM

    def __init__(self, config: HbmConfig) -> None:
        allocator = SlabAllocator(config.capacity_bytes, config.slab_bytes, ALIGNMENT_BYTES)
        super().__init__(allocator)
        self.device = resolve_device(config.device)
        self.host_addressable = self.device.type == "cpu"
        self._slab: torch.Tensor | None = torch.zeros(allocator.capacity_bytes, dtype=torch.uint8, device=self.device)

    def write(
        self, slots: Sequence[Slot], size_bytes: int, payloads: Sequence[Buffer], *, with_checksums: bool = True
    ) -> list[int]:
        check_batch(slots, payloads, size_bytes, "payloads")
        sources = as_bytes_arrays(payloads, size_bytes, "payload")
        slab = self._memory()
        sums = []
        for slot, source in zip(slots, sources, strict=True):
            if with_checksums:
                sums.append(checksum(source))
            slab[slot : slot + size_bytes].copy_(_as_tensor(source))
        return sums

    def read_flat(
        self,
        slots: Sequence[Slot],
        size_bytes: int,
        targets: Sequence[npt.NDArray[np.uint8]],
        checksums: Sequence[int] | None = None,
    ) -> list[bool]:
        slab = self._memory()
        for slot, target in zip(slots, targets, strict=True):
            torch.from_numpy(target).copy_(slab[slot : slot + size_bytes])
        return zero_and_verify(targets, checksums)

    def host_view(self, slot: Slot, size_bytes: int) -> memoryview | None:
        slab = self._memory()
        if slab.device.type != "cpu":
            return None
        view: memoryview = slab[slot : slot + size_bytes].numpy().data
        return view

    def tensor(self, slot: Slot, size_bytes: int) -> torch.Tensor:
        """The slot as a device tensor, for kernels that read or write it in place."""
        return self._memory()[slot : slot + size_bytes]

    def close(self) -> None:
        self._closed = True
        self._slab = None

    def _memory(self) -> torch.Tensor:
        if self._slab is None:
            raise StoreClosedError("the HBM tier is closed")
        return self._slab


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # torch cannot wrap read-only memory (bytes payloads); those take one extra copy.
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
