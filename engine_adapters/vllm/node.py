"""The connector's link to its kvstore node: connecting (a node that cannot be reached at
start is a configuration error), and what counts as the node failing at request time (a miss:
vLLM computes the tokens itself), logged without flooding the engine's log.
"""

from __future__ import annotations

import logging
import time

import grpc

from engine_adapters.vllm.config import ConnectorConfig
from kvstore.client import Client
from kvstore.errors import ConfigError, KVStoreError

# A node that is gone, slow, draining or refusing; OSError covers its sockets and shared memory.
NODE_ERRORS: tuple[type[BaseException], ...] = (KVStoreError, OSError, grpc.RpcError)

WARN_EVERY_S = 60.0


def connect(config: ConnectorConfig) -> Client:
    try:
        return Client(
            config.node,
            token=config.token,
            tls_root_certificates=config.tls_root_certificates,
            timeout_s=config.timeout_s,
            max_attempts=1,
        )
    except NODE_ERRORS as error:
        raise ConfigError(f"kvstore connector: cannot reach the kvstore node at {config.node}: {error}") from None


class NodeErrorLog:
    """Counts failures of one kind of call and logs the first, then one a minute."""

    def __init__(self, logger: logging.Logger, what: str, consequence: str = "vLLM computes the tokens itself") -> None:
        self._logger = logger
        self._what = what
        self._consequence = consequence
        self.count = 0
        self._last = -WARN_EVERY_S

    def record(self, error: BaseException) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= WARN_EVERY_S:
            self._last = now
            self._logger.warning(
                "kvstore connector: %s failed (%d so far), %s: %s",
                self._what,
                self.count,
                self._consequence,
                error,
            )
