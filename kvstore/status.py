"""The one table between the store's errors and gRPC status codes (DESIGN.md 4).

The servicer turns a raised `KVStoreError` into a status code plus the error's class name in
the trailing metadata (`kvstore-error`); the client turns that back into the same class, so a
caller catches `StoreFullError` whether the store runs in its process or on another host. The
data plane carries the same codes in its ERROR frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from kvstore import errors
from kvstore.events import WatchLagError

ERROR_METADATA_KEY = "kvstore-error"
log = logging.getLogger(__name__)

_CODES: dict[type[errors.KVStoreError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.LayoutMismatchError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownNamespaceError: grpc.StatusCode.NOT_FOUND,
    errors.UnknownReservationError: grpc.StatusCode.NOT_FOUND,
    errors.UnknownLeaseError: grpc.StatusCode.NOT_FOUND,
    errors.NamespaceMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DuplicateCommitError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StoreFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ChecksumError: grpc.StatusCode.DATA_LOSS,
    errors.StorageFormatError: grpc.StatusCode.DATA_LOSS,
    errors.StoreClosedError: grpc.StatusCode.UNAVAILABLE,
    errors.NodeDrainingError: grpc.StatusCode.UNAVAILABLE,
    errors.PeerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    WatchLagError: grpc.StatusCode.ABORTED,
}

_BY_NAME: dict[str, type[errors.KVStoreError]] = {cls.__name__: cls for cls in [*_CODES, errors.KVStoreError]}
_BY_NAME.update({cls.__name__: cls for cls in (errors.ConfigError, errors.PayloadSizeError, errors.ProtocolError)})

# A status that carries no kvstore error name (an interceptor's, or grpc's own) maps by code.
_BY_CODE: dict[grpc.StatusCode, type[errors.KVStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.StoreFullError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.NamespaceMismatchError,
    grpc.StatusCode.DATA_LOSS: errors.ChecksumError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.UNAVAILABLE: errors.PeerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.PeerUnavailableError,
    grpc.StatusCode.ABORTED: WatchLagError,
}


def code_of(error: errors.KVStoreError) -> grpc.StatusCode:
    """The status code of an error: its own class's, or its nearest ancestor's."""
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, details: str, error_name: str | None) -> errors.KVStoreError:
    """The exception a client raises for a failed call."""
    cls = _BY_NAME.get(error_name or "") or _BY_CODE.get(code) or errors.KVStoreError
    return cls(details or code.name)


def error_from_code_number(number: int, message: str, error_name: str) -> errors.KVStoreError:
    """The exception for a data-plane ERROR frame, which carries the numeric status code."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return error_from_status(code, message, error_name)
    return errors.KVStoreError(message)


def code_number(error: errors.KVStoreError) -> int:
    """`code_of` as the number a data-plane ERROR frame carries."""
    value: int = code_of(error).value[0]
    return value


Reply = TypeVar("Reply")


def answer(
    method: str,
    context: grpc.ServicerContext,
    handler: Callable[[], Reply],
    done: Callable[[grpc.StatusCode], None],
    server: str,
) -> Reply:
    """Run one gRPC call's `handler`: a `KVStoreError` aborts the call with its code (and its
    class name in the trailing metadata, for the client), anything else is an INTERNAL error
    logged here; `done` gets the final code. `server` names whose log to read."""
    code = grpc.StatusCode.OK
    try:
        return handler()
    except errors.KVStoreError as error:
        code = code_of(error)
        context.set_trailing_metadata(((ERROR_METADATA_KEY, type(error).__name__),))
        context.abort(code, str(error))
    except Exception:
        code = grpc.StatusCode.INTERNAL
        log.exception("internal error in %s", method)
        context.abort(code, f"internal error in {method}; see the {server}'s log")
    finally:
        done(code)
