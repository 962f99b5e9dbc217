"""Optional TLS on the gRPC plane: a client with the CA talks; a plaintext client cannot."""

from __future__ import annotations

import pytest

from kvstore.client import Client
from kvstore.errors import PeerUnavailableError
from tests import factories
from tests.nodes import running_node, self_signed_certificate


@pytest.fixture
def certificate(tmp_path):
    return self_signed_certificate(tmp_path)


def test_tls_node_serves_clients_that_trust_it(tmp_path, certificate):
    cert, key = certificate
    with running_node(tmp_path / "node", nvme_kib=0, auth__tls_cert_file=cert, auth__tls_key_file=key) as server:
        with Client(server.grpc_address, tls_root_certificates=cert.read_bytes()) as client:
            namespace_id = client.register_namespace(factories.namespace())
            assert client.lookup(namespace_id, factories.chain(namespace_id, 2)).num_hits == 0
        with pytest.raises(PeerUnavailableError):
            Client(server.grpc_address, timeout_s=2)  # plaintext against TLS: no handshake
