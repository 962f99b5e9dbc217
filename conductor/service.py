"""The conductor's gRPC servicer: proto messages in, domain calls, proto messages out. Errors
map to status codes through the one table (kvstore/status.py), as the node's do."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from conductor.conductor import Conductor
from conductor.metrics import ConductorMetrics
from conductor.types import Decision, DecodeScore, NodeInfo, PrefillScore, Role, RouteRequest
from kvstore.errors import InvalidArgumentError
from kvstore.proto import kvstore_pb2 as pb
from kvstore.status import answer
from kvstore.types import TierKind, unpack_keys
from kvstore.wire import load_from_proto, namespace_id_from

Reply = TypeVar("Reply")

_ROLES = {
    pb.NODE_ROLE_PREFILL: Role.PREFILL,
    pb.NODE_ROLE_DECODE: Role.DECODE,
    pb.NODE_ROLE_BOTH: Role.BOTH,
    pb.NODE_ROLE_STORAGE: Role.STORAGE,
}
_ROLE_NUMBERS = {role: number for number, role in _ROLES.items()}
MAX_ROUTE_KEYS = 1 << 16


class ConductorService:
    def __init__(self, conductor: Conductor, metrics: ConductorMetrics) -> None:
        self._conductor = conductor
        self._metrics = metrics

    def _call(self, method: str, context: grpc.ServicerContext, handler: Callable[[], Reply]) -> Reply:
        def done(code: grpc.StatusCode) -> None:
            self._metrics.calls.labels(method, code.name).inc()

        return answer(method, context, handler, done, "conductor")

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        def handle() -> pb.RegisterResponse:
            self._conductor.register(node_info(request.node), request.ttl_s)
            return pb.RegisterResponse()

        return self._call("Register", context, handle)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        def handle() -> pb.HeartbeatResponse:
            load = load_from_proto(request.load) if request.HasField("load") else None
            alive = self._conductor.heartbeat(request.node_id, load)
            return pb.HeartbeatResponse(register_again=not alive)

        return self._call("Heartbeat", context, handle)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        return self._call("Leave", context, lambda: pb.LeaveResponse(was_member=self._conductor.leave(request.node_id)))

    def Locate(self, request: pb.LocateRequest, context: grpc.ServicerContext) -> pb.LocateResponse:
        def handle() -> pb.LocateResponse:
            keys = unpack_keys(request.keys, max_keys=MAX_ROUTE_KEYS, what="Locate: keys")
            return pb.LocateResponse(
                holders=[
                    pb.PrefixHolder(
                        node_id=held.node_id,
                        blocks=held.blocks,
                        hbm_blocks=held.by_tier[TierKind.HBM],
                        dram_blocks=held.by_tier[TierKind.DRAM],
                        nvme_blocks=held.by_tier[TierKind.NVME],
                    )
                    for held in self._conductor.locate(keys)
                ]
            )

        return self._call("Locate", context, handle)

    def Route(self, request: pb.RouteRequest, context: grpc.ServicerContext) -> pb.RouteResponse:
        def handle() -> pb.RouteResponse:
            started = time.perf_counter()
            decision = self._conductor.route(route_request(request))
            self._metrics.decided(decision, time.perf_counter() - started)
            return self._decision_message(decision)

        return self._call("Route", context, handle)

    def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.ServicerContext
    ) -> pb.ClusterStatusResponse:
        def handle() -> pb.ClusterStatusResponse:
            snapshot = self._conductor.status()
            reply = pb.ClusterStatusResponse(
                policy=snapshot.policy,
                indexed_blocks=snapshot.indexed_blocks,
                routed=snapshot.routed,
                rejected=snapshot.rejected,
            )
            for member in snapshot.members:
                load = member.load
                reply.nodes.add(
                    node=node_message(member.info),
                    load=pb.NodeLoad(
                        queued_prefill_tokens=load.queued_prefill_tokens,
                        running_decodes=load.running_decodes,
                        decode_kv_tokens=load.decode_kv_tokens,
                        decode_pause_budget_s=load.decode_pause_budget_s,
                    ),
                    prefill_queue_s=member.prefill_queue_s,
                    indexed_blocks=member.indexed_blocks,
                    resyncs=member.resyncs,
                    load_reported=member.load_reported,
                )
            return reply

        return self._call("ClusterStatus", context, handle)

    def WatchDecisions(
        self, request: pb.WatchDecisionsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RouteResponse]:
        for decision in self._conductor.decisions(context.is_active):
            yield self._decision_message(decision)

    def _decision_message(self, decision: Decision) -> pb.RouteResponse:
        nodes = self._conductor.cluster.nodes
        reply = pb.RouteResponse(request_id=decision.request_id, policy=decision.policy, rejected=decision.rejected)
        if decision.prefill is not None:
            reply.prefill.CopyFrom(prefill_message(decision.prefill, nodes))
        if decision.decode is not None:
            reply.decode.CopyFrom(decode_message(decision.decode))
        reply.candidates.extend(prefill_message(score, nodes) for score in decision.candidates)
        if decision.priority_s is not None:
            reply.priority = round(decision.priority_s * 1000)
        return reply


def node_info(message: pb.NodeDescription) -> NodeInfo:
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidArgumentError(
            f"node {message.node_id!r}: role {message.role} is not one of prefill, decode, both, storage"
        )
    return NodeInfo(
        node_id=message.node_id,
        role=role,
        grpc_address=message.grpc_address,
        data_address=message.data_address,
        profile=message.profile or "default",
        kv_capacity_tokens=message.kv_capacity_tokens,
    )


def node_message(info: NodeInfo) -> pb.NodeDescription:
    return pb.NodeDescription(
        node_id=info.node_id,
        role=_ROLE_NUMBERS[info.role],
        grpc_address=info.grpc_address,
        data_address=info.data_address,
        profile=info.profile,
        kv_capacity_tokens=info.kv_capacity_tokens,
    )


def route_request(message: pb.RouteRequest) -> RouteRequest:
    where = f"request {message.request_id!r}"
    keys = unpack_keys(message.keys, max_keys=MAX_ROUTE_KEYS, what=f"{where}: keys")
    namespace_id = namespace_id_from(message.namespace_id, field=f"{where}: namespace_id")
    return RouteRequest(
        message.request_id,
        namespace_id,
        tuple(keys),
        message.prompt_tokens,
        message.max_output_tokens,
        message.block_tokens,
    )


def prefill_message(score: PrefillScore, nodes: dict[str, NodeInfo]) -> pb.PrefillScore:
    holder = nodes.get(score.fetch_from) if score.fetch_from else None
    return pb.PrefillScore(
        node_id=score.node_id,
        ttft_s=score.ttft_s,
        queue_s=score.queue_s,
        prefill_s=score.prefill_s,
        load_s=score.load_s,
        fetch_s=score.fetch_s,
        reused_tokens=score.reused_tokens,
        local_tokens=score.local_tokens,
        fetch_tokens=score.fetch_tokens,
        fetch_from=score.fetch_from,
        fetch_from_address=holder.data_address if holder is not None else "",
    )


def decode_message(score: DecodeScore) -> pb.DecodeScore:
    return pb.DecodeScore(
        node_id=score.node_id, tbt_s=score.tbt_s, transfer_s=score.transfer_s, free_kv_tokens=score.free_kv_tokens
    )
