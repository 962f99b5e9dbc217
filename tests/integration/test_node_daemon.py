"""Real `kvstore serve` processes: a second process reads what a first wrote, a client killed
with SIGKILL leaks nothing, SIGTERM flushes and a restarted node serves its NVMe blocks, and
the token guards both planes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.client import Client, Transport
from kvstore.dataplane.client import DataPlaneConnection
from kvstore.errors import AuthenticationError
from kvstore.types import TierKind
from tests import factories
from tests.nodes import TOKEN, daemon

_CLIENT_PRELUDE = """
import sys, numpy as np
from kvstore.client import Client
from tests import factories
client = Client(sys.argv[1])
namespace = factories.namespace()
namespace_id = client.register_namespace(namespace)
keys = factories.chain(namespace_id, 4)
"""


def _run_client(script: str, address: str, *, wait: bool = True) -> subprocess.Popen[str]:
    code = textwrap.dedent(_CLIENT_PRELUDE) + textwrap.dedent(script)
    process = subprocess.Popen(
        [sys.executable, "-c", code, address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if wait:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    return process


def test_a_second_process_reads_what_a_first_wrote(tmp_path):
    with daemon(tmp_path) as node:
        _run_client(
            """
            assert client.uses_shared_memory
            client.put_blocks(namespace_id, keys, factories.payloads(namespace, 4))
            """,
            node.grpc_address,
        )
        reader = _run_client(
            """
            got = client.get_blocks(namespace_id, keys)
            ok = all(np.array_equal(g, p) for g, p in zip(got, factories.payloads(namespace, 4)))
            print(len(got), ok, client.uses_shared_memory)
            """,
            node.grpc_address,
            wait=False,
        )
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert out.split() == ["4", "True", "True"]


def test_a_client_killed_holding_a_lease_and_a_reservation_leaks_nothing(tmp_path):
    with daemon(tmp_path, store__lease_ttl_s=1, store__reservation_ttl_s=1) as node:
        holder = _run_client(
            """
            from kvstore.proto import kvstore_pb2 as pb
            client.put_blocks(namespace_id, keys[:2], factories.payloads(namespace, 2))
            lease = client._stub.Acquire(pb.AcquireRequest(namespace_id=namespace_id, keys=b"".join(keys)))
            slots = client._stub.Reserve(pb.ReserveRequest(namespace_id=namespace_id, keys=b"".join(keys[2:])))
            print(len(lease.offsets), len(slots.offsets), flush=True)
            import time
            time.sleep(600)
            """,
            node.grpc_address,
            wait=False,
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["2", "2"]
        with Client(node.grpc_address) as client:
            held = client.status()
            assert (held.num_leases, held.num_reservations) == (1, 1)
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status = client.status()
                if (status.num_leases, status.num_reservations) == (0, 0):
                    break
                time.sleep(0.2)
            assert (status.num_leases, status.num_reservations) == (0, 0)
            dram = next(tier for tier in status.tiers if tier.kind is TierKind.DRAM)
            assert dram.used_bytes == 2 * factories.namespace().block_bytes  # the reserved slots are free again
            namespace_id = client.register_namespace(factories.namespace())
            keys = factories.chain(namespace_id, 4)
            assert client.remove(namespace_id, keys[:2]).num_removed == 2  # no lease pins them any more
        for stream in (holder.stdout, holder.stderr):
            stream.close()


def test_sigterm_flushes_to_nvme_and_a_restarted_node_serves_it(tmp_path):
    namespace = factories.namespace()
    payloads = factories.payloads(namespace, 5)
    with daemon(tmp_path, logging__format="json") as node:
        with Client(node.grpc_address) as client:
            namespace_id = client.register_namespace(namespace)
            keys = factories.chain(namespace_id, 5)
            client.put_blocks(namespace_id, keys, payloads)
        assert node.stop(signal.SIGTERM) == 0
        _, err = node.process.communicate(timeout=10)
        assert '"flushed_to_nvme": 5' in err
    with daemon(tmp_path) as node, Client(node.grpc_address, transport=Transport.TCP) as client:
        result = client.lookup(namespace_id, keys)
        assert result.num_hits == 5
        assert set(result.tiers) == {TierKind.NVME}
        got = client.get_blocks(namespace_id, keys)
        for block, payload in zip(got, payloads, strict=True):
            np.testing.assert_array_equal(block, payload)


def test_the_token_guards_both_planes(tmp_path):
    with daemon(tmp_path, token=TOKEN) as node:
        with pytest.raises(AuthenticationError, match="token"):
            Client(node.grpc_address)
        with pytest.raises(AuthenticationError, match="token"):
            Client(node.grpc_address, token="wrong-token-wrong-token")
        with pytest.raises(AuthenticationError, match="token"):
            DataPlaneConnection(node.data_address, token=None, timeout_s=5)
        with pytest.raises(AuthenticationError, match="token"):
            DataPlaneConnection(node.data_address, token="wrong-token-wrong-token", timeout_s=5)
        with Client(node.grpc_address, token=TOKEN, transport=Transport.TCP) as client:
            namespace = factories.namespace()
            namespace_id = client.register_namespace(namespace)
            keys = factories.chain(namespace_id, 2)
            assert client.put_blocks(namespace_id, keys, factories.payloads(namespace, 2)).num_written == 2
            assert len(client.get_blocks(namespace_id, keys)) == 2


def test_health_answers_without_the_token_and_reflection_does_not(tmp_path):
    # A Kubernetes `grpc` readiness probe cannot present a token (deploy/kubernetes).
    with daemon(tmp_path, token=TOKEN, nvme_kib=0) as node, grpc.insecure_channel(node.grpc_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvstore.v1.KVStore"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asked, timeout=5))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
