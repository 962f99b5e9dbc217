"""Fixtures of the integration tests: the node under fuzz (tests/integration/test_fuzz_*.py),
one per module; the capture of exceptions that escape any thread; a real etcd
(tests/etcd.py); a conductor with three nodes (tests/conductors.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from kvstore.client import Client, Transport
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from tests import factories
from tests.conductors import cluster  # noqa: F401 - a fixture, for the conductor's tests
from tests.etcd import etcd  # noqa: F401 - a fixture, for the conductor's tests
from tests.fuzzing import (
    CHAIN_BLOCKS,
    MAX_KEYS,
    Target,
    ThreadErrors,
)
from tests.nodes import TOKEN, running_node


@pytest.fixture(scope="module")
def thread_errors() -> Iterator[ThreadErrors]:
    captured = ThreadErrors()
    previous, threading.excepthook = threading.excepthook, captured.hook
    try:
        yield captured
    finally:
        threading.excepthook = previous
    assert captured.take() == []


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, thread_errors: ThreadErrors) -> Iterator[Target]:
    with running_node(tmp_path_factory.mktemp("fuzz"), token=TOKEN, server__max_keys_per_call=MAX_KEYS) as server:
        channel = grpc.insecure_channel(server.grpc_address)
        client = Client(server.grpc_address, transport=Transport.TCP, token=TOKEN)
        try:
            namespace = factories.namespace()
            namespace_id = client.register_namespace(namespace)
            other_namespace_id = client.register_namespace(factories.namespace("other"))
            chain = factories.chain(namespace_id, CHAIN_BLOCKS)
            payloads = factories.payloads(namespace, CHAIN_BLOCKS)
            assert client.put_blocks(namespace_id, chain, payloads).num_written == CHAIN_BLOCKS
            yield Target(
                server,
                channel,
                pb_grpc.KVStoreStub(channel),
                client,
                namespace,
                namespace_id,
                other_namespace_id,
                chain,
                payloads,
                thread_errors,
            )
        finally:
            client.close()
            channel.close()
