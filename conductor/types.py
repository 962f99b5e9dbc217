"""The conductor's vocabulary: nodes, their load, a request to place, and a placement decision.

Everything here is plain data. Membership (conductor/membership.py) produces `NodeInfo`,
nodes and the conductor's own bookkeeping produce `NodeLoad`, the placement policies
(conductor/placement/) turn a `RouteRequest` into a `Decision`, and the gRPC service and the
simulator carry these objects unchanged, so a decision made in a simulation is the decision the
service would make.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kvstore.types import BlockKey, NamespaceId, TierKind


class Role(StrEnum):
    """What a node's engine does. Storage nodes hold KV but run no engine."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"
    STORAGE = "storage"

    @property
    def prefills(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)

    @property
    def decodes(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A member of the cluster, as it registered."""

    node_id: str
    role: Role
    grpc_address: str = ""  # the node daemon's control plane (empty in a simulation)
    data_address: str = ""  # its TCP data plane, which peers `Fetch` from
    profile: str = "default"  # the cost profile of its engine (model and GPU), see costs.py
    kv_capacity_tokens: int = 0  # KV its decode engine can hold (0: not a decode node)


@dataclass(slots=True)
class NodeLoad:
    """How busy a node is. Nodes report it; the conductor adds its own placements in between
    (optimistically), so two requests routed in the same millisecond do not both see an idle
    node."""

    prefill_busy_until_s: float = 0.0  # when its queued prefill work is predicted to end (conductor clock)
    queued_prefill_tokens: int = 0  # tokens it still has to compute, queued and running
    running_decodes: int = 0  # sequences in its decode batch
    decode_kv_tokens: int = 0  # KV tokens those sequences hold, plus reservations for placed ones
    # How long its decode engine could pause its batch to compute a prefill without any running
    # sequence's time per token passing the TBT SLO. Only an engine that knows its batch can
    # say; 0 (unknown) means no prefill is placed on a decode-only node (see placement/flow.py).
    decode_pause_budget_s: float = 0.0

    def queue_s(self, now_s: float) -> float:
        """Predicted wait before a newly queued prefill starts."""
        return max(0.0, self.prefill_busy_until_s - now_s)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request to place: its prompt's block keys (chained, root first, in `namespace_id`),
    the prompt's length in tokens and how many tokens it may generate."""

    request_id: str
    namespace_id: NamespaceId
    keys: tuple[BlockKey, ...]
    prompt_tokens: int
    max_output_tokens: int
    block_tokens: int


@dataclass(frozen=True, slots=True)
class PrefixHolding:
    """How much of a request's prefix one node holds: its leading run of blocks, by tier."""

    node_id: str
    blocks: int
    by_tier: tuple[int, int, int] = (0, 0, 0)  # blocks of the run whose fastest copy is HBM, DRAM, NVMe

    def count(self, tier: TierKind) -> int:
        return self.by_tier[tier]


@dataclass(frozen=True, slots=True)
class PrefillScore:
    """One prefill candidate's predicted TTFT and what it is made of (seconds, tokens)."""

    node_id: str
    ttft_s: float
    queue_s: float
    prefill_s: float  # computing the tokens it does not reuse
    load_s: float  # bringing its own cached prefix from DRAM or NVMe into the engine
    fetch_s: float  # pulling the part of the prefix another node holds (0 when not fetching)
    reused_tokens: int  # prompt tokens it does not compute (own cache plus fetched)
    local_tokens: int  # of those, held by the candidate itself
    fetch_tokens: int = 0
    fetch_from: str = ""  # node the missing prefix comes from ("" when none)


@dataclass(frozen=True, slots=True)
class DecodeScore:
    """The decode candidate chosen: its predicted time between tokens and the KV it has left."""

    node_id: str
    tbt_s: float
    transfer_s: float  # moving the prompt's KV from the prefill node
    free_kv_tokens: int  # after this request's reservation


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request runs and why, or why it does not run (`rejected` names the reason)."""

    request_id: str
    policy: str
    prefill: PrefillScore | None
    decode: DecodeScore | None
    rejected: str = ""
    candidates: tuple[PrefillScore, ...] = field(default=())  # the best few, best first (the breakdown)
    # When the prefill node should start it among the requests placed on it: lower first, on the
    # conductor's clock; None leaves arrival order. Engines take it as a request priority.
    priority_s: float | None = None

    @property
    def accepted(self) -> bool:
        return not self.rejected
