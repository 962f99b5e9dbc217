"""`kvctl lookup --cluster HOST:PORT`: where in the cluster a prompt's prefix is cached, from the
conductor's global index (its `Locate` call; read only).

The conductor's token comes from `CONDUCTOR_AUTH_TOKEN`; its certificate is checked against
the same `--tls-ca` roots as the node's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kvstore.kvctl.errors import KvctlError
from kvstore.node.auth import Access
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, TierKind

TOKEN_ENV = "CONDUCTOR_AUTH_TOKEN"


@dataclass(frozen=True, slots=True)
class Holder:
    """One node's leading run of the prompt's blocks, by the tier of each block's fastest copy."""

    node_id: str
    blocks: int
    by_tier: dict[TierKind, int]


@dataclass(frozen=True, slots=True)
class Conductor:
    address: str
    access: Access
    timeout_s: float

    def locate(self, keys: Sequence[BlockKey]) -> list[Holder]:
        """The nodes holding the prefix, the most first; KvctlError (exit 1) when the conductor
        cannot be asked."""
        try:
            with self.access.channel(self.address) as channel:
                reply = pb_grpc.ConductorStub(channel).Locate(
                    pb.LocateRequest(keys=b"".join(keys)), timeout=self.timeout_s, metadata=self.access.metadata
                )
        except grpc.RpcError as error:
            hint = (
                f"; set {TOKEN_ENV}"
                if error.code() is grpc.StatusCode.UNAUTHENTICATED and not self.access.token
                else ""
            )
            raise KvctlError(f"conductor {self.address}: {error.code().name}: {error.details()}{hint}") from None
        return [
            Holder(
                holder.node_id,
                holder.blocks,
                {TierKind.HBM: holder.hbm_blocks, TierKind.DRAM: holder.dram_blocks, TierKind.NVME: holder.nvme_blocks},
            )
            for holder in reply.holders
        ]
