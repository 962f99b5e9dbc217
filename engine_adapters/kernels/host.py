"""Host memory registered with CUDA (`cudaHostRegister`), so that the block-copy kernels and
the GPU's copy engines read and write it directly, without a staging copy: a client maps its
node's shared-memory pool and registers it once (DESIGN.md 6).

A registration lasts until `close()` (or the end of a `with` block); the memory must outlive
it. Registering where torch has no CUDA raises KernelUnavailableError.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch

from engine_adapters.kernels import registered
from engine_adapters.kernels.cuda import KernelUnavailableError, available
from kvstore.errors import InvalidArgumentError

# cudaHostRegister flags (cuda_runtime_api.h)
PORTABLE = 0x01  # every CUDA context sees it as pinned
MAPPED = 0x02  # the GPU may address it


class HostRegistration:
    def __init__(self, address: int, nbytes: int) -> None:
        if not available():
            raise KernelUnavailableError("registering host memory needs a CUDA build of torch and a GPU")
        if address <= 0 or nbytes <= 0:
            raise InvalidArgumentError(f"cannot register {nbytes} bytes at address {address}")
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        error = cudart.cudaHostRegister(address, nbytes, PORTABLE | MAPPED)
        if int(error) != 0:
            raise InvalidArgumentError(f"cudaHostRegister of {nbytes} bytes at {address:#x} failed: {error}")
        self.address = address
        self.nbytes = nbytes
        self._registered = True
        registered.add(address, nbytes)

    @classmethod
    def of(cls, buffer: Any) -> HostRegistration:
        """Register the memory of a numpy array, a writable buffer or a CPU tensor."""
        if isinstance(buffer, torch.Tensor):
            if buffer.device.type != "cpu" or not buffer.is_contiguous():
                raise InvalidArgumentError(f"only a contiguous CPU tensor can be registered, got {buffer.device}")
            return cls(buffer.data_ptr(), buffer.numel() * buffer.element_size())
        array = np.asarray(buffer) if not isinstance(buffer, np.ndarray) else buffer
        if not array.flags.c_contiguous:
            raise InvalidArgumentError("only contiguous memory can be registered")
        return cls(array.ctypes.data_as(ctypes.c_void_p).value or 0, array.nbytes)

    def close(self) -> None:
        if self._registered:
            self._registered = False
            registered.remove(self.address)
            torch.cuda.cudart().cudaHostUnregister(self.address)  # type: ignore[no-untyped-call]

    def __enter__(self) -> HostRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
