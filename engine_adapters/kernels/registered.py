"""The host memory this process has registered with CUDA (host.HostRegistration), as address
ranges: the kernels check that every payload given to them by address lies, whole, inside
one, before they launch (cuda.gather_to / scatter_from). CUDA itself answers only whether an
address is registered, not how far its registration reaches.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_ranges: dict[int, int] = {}  # start address -> bytes, one per live registration


def add(address: int, nbytes: int) -> None:
    with _lock:
        _ranges[address] = nbytes


def remove(address: int) -> None:
    with _lock:
        _ranges.pop(address, None)


def containing(address: int) -> tuple[int, int] | None:
    """(start, bytes) of the live registration that holds `address`, if one does."""
    with _lock:
        for start, nbytes in _ranges.items():
            if start <= address < start + nbytes:
                return start, nbytes
    return None


def span_problem(address: int, nbytes: int) -> str | None:
    """Why `nbytes` at `address` is not inside one live registration (None when it is)."""
    found = containing(address)
    if found is None:
        return f"address {address:#x} is not in host memory registered by this process"
    start, size = found
    if address + nbytes > start + size:
        return (
            f"{nbytes} bytes at {address:#x} run {address + nbytes - start - size} bytes past the end of "
            f"the registered range {start:#x}+{size}"
        )
    return None
