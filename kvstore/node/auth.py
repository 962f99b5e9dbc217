"""Who may talk to a node: the shared token on every gRPC call (DESIGN.md 4).

When a token is configured, a call must carry `authorization: Bearer <token>` metadata, or it
is answered UNAUTHENTICATED before any handler runs (reflection included). The standard health
service alone answers without it: orchestrators' probes (Kubernetes' `grpc` probe, load
balancers) cannot present a token, and it tells only SERVING or NOT_SERVING. The comparison
takes constant time. The data plane checks the same token in its HELLO frame.

Both ends of every gRPC link (clients and nodes, nodes and the conductor) use the two helpers
here: `Access` (the token a caller presents and the TLS roots it trusts) opens channels, and
`bind` opens a server's port, over TLS when it has a certificate.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvstore.errors import AuthenticationError
from kvstore.status import ERROR_METADATA_KEY

AUTHORIZATION_KEY = "authorization"
OPEN_PREFIX = "/grpc.health.v1.Health/"  # methods that answer without the token


def bearer(token: str) -> str:
    return f"Bearer {token}"


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a gRPC call presents: the token, when there is one."""
    return ((AUTHORIZATION_KEY, bearer(token)),) if token else ()


@dataclass(frozen=True, slots=True)
class Access:
    """What a caller presents to a node's or the conductor's gRPC: the shared token, and the
    PEM root certificates it trusts when the server speaks TLS (plaintext without them)."""

    token: str | None = None
    tls_root_certificates: bytes | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token)

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        if self.tls_root_certificates is None:
            return grpc.insecure_channel(address, options=list(options))
        credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_root_certificates)
        return grpc.secure_channel(address, credentials, options=list(options))


PLAINTEXT = Access()  # no token, no TLS


def bind(server: grpc.Server, address: str, cert_file: Path | None, key_file: Path | None) -> int:
    """Listen on `address`, over TLS when a certificate and its key are given; the port bound
    (0 when binding failed)."""
    if cert_file is not None and key_file is not None:
        credentials = grpc.ssl_server_credentials([(key_file.read_bytes(), cert_file.read_bytes())])
        return int(server.add_secure_port(address, credentials))
    return int(server.add_insecure_port(address))


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION_KEY:
                presented = value if isinstance(value, str) else value.decode("latin-1")
        handler = continuation(handler_call_details)
        if handler is None or hmac.compare_digest(presented.encode(), self._expected):
            return handler
        if handler_call_details.method.startswith(OPEN_PREFIX):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    shape = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[shape]
    return make(
        _deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _deny(request: object, context: grpc.ServicerContext) -> None:
    context.set_trailing_metadata(((ERROR_METADATA_KEY, AuthenticationError.__name__),))
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (metadata 'authorization: Bearer <token>')")
