"""Payload checks at the store's edge: a block's bytes must match its namespace's layout.

A typed array (numpy or a CPU torch tensor) must have the namespace's dtype and block shape;
raw bytes (bytes, bytearray, memoryview, a 1-D uint8 array) must have its byte length. What
passes is returned as a flat uint8 view, so nothing downstream reinterprets anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kvstore.errors import InvalidArgumentError, LayoutMismatchError
from kvstore.tiers.base import as_bytes_array
from kvstore.types import Namespace


def payload_bytes(
    payload: Any,
    namespace: Namespace,
    what: str,
    index: int | None = None,
    *,
    writable: bool = False,
    num_blocks: int | None = None,
) -> npt.NDArray[np.uint8]:
    """A flat uint8 view of `payload` (a writable one, for a destination), or
    LayoutMismatchError / PayloadSizeError / InvalidArgumentError naming `what` and `index`.
    With `num_blocks`, `payload` holds that many blocks back to back (typed: shape
    `(num_blocks, *block_shape)`)."""
    shape = namespace.block_shape if num_blocks is None else (num_blocks, *namespace.block_shape)
    if isinstance(payload, np.ndarray):
        dtype = payload.dtype
        # numpy's builtin dtypes are singletons, so `is` is the fast test; `.name` (~3 us) is
        # read only for the others (ml_dtypes' bfloat16 and float8 types) and on a mismatch.
        if (dtype is not _UINT8 or payload.ndim != 1) and (
            dtype is not namespace.numpy_dtype or payload.shape != shape
        ):
            _check_typed(dtype.name, payload.shape, namespace, _name(what, index), shape)
    elif _is_torch_tensor(payload):
        payload = _tensor_bytes(payload, namespace, _name(what, index), shape)
    size = namespace.block_bytes * (1 if num_blocks is None else num_blocks)
    return as_bytes_array(payload, size, what, index, writable=writable)


def payloads_bytes(
    payloads: Sequence[Any], namespace: Namespace, what: str, *, writable: bool = False
) -> list[npt.NDArray[np.uint8]]:
    """`payload_bytes` over a batch. Arrays of exactly the namespace's dtype and block shape
    (what engines hand over) take a short path: half the cost, at 32 blocks a batch."""
    dtype, shape = namespace.numpy_dtype, namespace.block_shape
    flats = []
    for index, payload in enumerate(payloads):
        if (
            type(payload) is np.ndarray
            and payload.dtype is dtype
            and payload.shape == shape
            and payload.flags.c_contiguous
            and (payload.flags.writeable or not writable)
        ):
            flats.append(np.frombuffer(payload, dtype=np.uint8))  # writable when the array is
        else:
            flats.append(payload_bytes(payload, namespace, what, index, writable=writable))
    return flats


_UINT8 = np.dtype(np.uint8)


def _name(what: str, index: int | None) -> str:
    return what if index is None else f"{what} {index}"


def _check_typed(
    dtype: str, shape: tuple[int, ...], namespace: Namespace, what: str, expected_shape: tuple[int, ...]
) -> None:
    if dtype != namespace.dtype:  # a StrEnum: compares as its value
        raise LayoutMismatchError(
            f"{what} has dtype {dtype}; namespace {namespace.model_id!r} stores {namespace.dtype}"
        )
    if shape != expected_shape:
        raise LayoutMismatchError(f"{what} has shape {shape}; namespace {namespace.model_id!r} needs {expected_shape}")


def _is_torch_tensor(payload: Any) -> bool:
    return type(payload).__module__.startswith("torch") and hasattr(payload, "untyped_storage")


def _tensor_bytes(
    tensor: Any, namespace: Namespace, what: str, expected_shape: tuple[int, ...]
) -> npt.NDArray[np.uint8]:
    import torch  # noqa: PLC0415 - only when a tensor is passed

    dtype = str(tensor.dtype).removeprefix("torch.")
    dtype = {"float8_e4m3fn": "float8_e4m3", "float8_e5m2": "float8_e5m2"}.get(dtype, dtype)
    _check_typed(dtype, tuple(tensor.shape), namespace, what, expected_shape)
    if tensor.device.type != "cpu":
        raise InvalidArgumentError(f"{what} is on {tensor.device}; host payloads only (device copies use the kernels)")
    if not tensor.is_contiguous():
        raise InvalidArgumentError(f"{what} must be contiguous")
    flat: npt.NDArray[np.uint8] = tensor.reshape(-1).view(torch.uint8).numpy()
    return flat
