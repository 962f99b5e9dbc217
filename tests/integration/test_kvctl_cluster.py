"""`kvctl lookup --cluster`: where a prompt's prefix is cached across the cluster, from a real
conductor's global index (its `Locate` call), beside the node's own answer."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvstore.client import Client
from kvstore.hashing import block_keys
from kvstore.kvctl.main import main as kvctl
from kvstore.proto import kvstore_pb2 as pb
from tests import factories
from tests.conductors import CONDUCTOR_TOKEN, conductor_server, node, status, stub
from tests.nodes import eventually

TOKENS = np.arange(6 * factories.BLOCK_TOKENS, dtype=np.uint32)


def test_lookup_names_every_node_holding_the_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conductor = conductor_server(token=CONDUCTOR_TOKEN)
    try:
        with (
            node(tmp_path, "a", conductor, "prefill", token=CONDUCTOR_TOKEN) as a,
            node(tmp_path, "b", conductor, "decode", token=CONDUCTOR_TOKEN) as b,
        ):
            namespace = factories.namespace()
            for server, count in ((a, 6), (b, 2)):
                with Client(server.grpc_address) as client:
                    namespace_id = client.register_namespace(namespace)
                    keys = block_keys(namespace_id, TOKENS, factories.BLOCK_TOKENS)
                    client.put_blocks(namespace_id, keys[:count], factories.payloads(namespace, count))
            authorized = (("authorization", f"Bearer {CONDUCTOR_TOKEN}"),)

            def indexed() -> dict[str, int]:
                reply = stub(conductor).ClusterStatus(pb.ClusterStatusRequest(), metadata=authorized)
                return {member.node.node_id: member.indexed_blocks for member in reply.nodes}

            assert eventually(lambda: indexed() == {"a": 6, "b": 2}, 10)
            tokens = ",".join(map(str, [*TOKENS.tolist(), 1, 2, 3, 4]))  # a seventh block nobody holds
            argv = ["--node", b.grpc_address, "lookup", "--tokens", tokens, "--cluster", conductor.grpc_address]
            environ = {"CONDUCTOR_AUTH_TOKEN": CONDUCTOR_TOKEN}
            assert kvctl(argv, environ) == 0
            lines = capsys.readouterr().out.splitlines()
            assert lines[0] == "2 of 7 blocks cached (8 of 28 tokens): 2 DRAM; first miss at block 2"
            assert lines[2] == f"cluster (conductor {conductor.grpc_address}): 2 nodes holding its leading blocks"
            assert [line.split() for line in lines[3:]] == [
                ["NODE", "BLOCKS", "TOKENS", "HBM", "DRAM", "NVME"],
                ["a", "6", "of", "7", "24", "0", "6", "0"],
                ["b", "2", "of", "7", "8", "0", "2", "0"],
            ]
            assert kvctl(["--json", *argv], environ) == 0
            document = json.loads(capsys.readouterr().out)
            assert document["cluster"] == [
                {"node_id": "a", "blocks": 6, "cached_tokens": 24, "tiers": {"dram": 6}},
                {"node_id": "b", "blocks": 2, "cached_tokens": 8, "tiers": {"dram": 2}},
            ]
            # the conductor's token is its own: without it, the refusal says where to give it
            assert kvctl(argv, {}) == 1
            refused = capsys.readouterr().err
            assert "UNAUTHENTICATED" in refused and "set CONDUCTOR_AUTH_TOKEN" in refused
            # a prompt nobody holds
            assert kvctl([*argv[:3], "--tokens", "9,9,9,9", *argv[5:]], environ) == 0
            assert "no node holds its first block" in capsys.readouterr().out
    finally:
        conductor.shutdown()


def test_locate_refuses_malformed_keys(tmp_path: Path) -> None:
    conductor = conductor_server()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub(conductor).Locate(pb.LocateRequest(keys=b"x" * 17))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "Locate: keys" in (caught.value.details() or "")
        assert stub(conductor).Locate(pb.LocateRequest()).holders == []
        assert status(conductor) == {}
    finally:
        conductor.shutdown()
