"""The gRPC servicer: translates between protobuf and the `Node`'s domain calls, nothing more.

Every method runs inside `_call`, the one place where a `KVStoreError` becomes a status code
(`kvstore.status`) with the error's class name in the trailing metadata, and where each call's
latency is recorded. An error that is not a `KVStoreError` is a bug: it is logged with its
traceback and answered INTERNAL, and the node keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from kvstore import wire
from kvstore.errors import InvalidArgumentError, KVStoreError
from kvstore.node.engine_loads import total_of
from kvstore.node.node import Node
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.status import ERROR_METADATA_KEY, answer, code_of
from kvstore.types import BlockKey, unpack_keys

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 10000


class KVStoreService(pb_grpc.KVStoreServicer):
    def __init__(self, node: Node, *, max_keys_per_call: int) -> None:
        self._node = node
        self._max_keys = max_keys_per_call

    # -- the one error and metrics boundary ---------------------------------------------------

    def _call(self, method: str, context: grpc.ServicerContext, handler: Callable[[], Reply]) -> Reply:
        started = time.perf_counter()

        def done(code: grpc.StatusCode) -> None:
            self._node.metrics.call_done(method, code.name, time.perf_counter() - started)

        return answer(method, context, handler, done, "node")

    def _keys(self, packed: bytes) -> list[BlockKey]:
        return unpack_keys(packed, max_keys=self._max_keys)

    # -- identity -------------------------------------------------------------------------------

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        def handle() -> pb.InfoResponse:
            info = self._node.info()
            return pb.InfoResponse(
                node_id=info.node_id,
                host_id=info.host_id,
                version=info.version,
                data_address=info.data_address,
                local_address=info.local_address,
                index_segment_name=info.index_segment,
                segment_name=info.segment_name,
                segment_bytes=info.segment_bytes,
                namespaces=[
                    pb.NamespaceInfo(
                        namespace_id=namespace.namespace_id,
                        namespace=wire.namespace_to_proto(namespace),
                        block_bytes=namespace.block_bytes,
                    )
                    for namespace in info.namespaces
                ],
                draining=info.is_draining,
                uptime_s=info.uptime_s,
            )

        return self._call("Info", context, handle)

    def RegisterNamespace(
        self, request: pb.RegisterNamespaceRequest, context: grpc.ServicerContext
    ) -> pb.RegisterNamespaceResponse:
        def handle() -> pb.RegisterNamespaceResponse:
            if not request.HasField("namespace"):
                raise InvalidArgumentError("namespace is required")
            namespace = wire.namespace_from_proto(request.namespace)
            namespace_id = self._node.register_namespace(namespace)
            return pb.RegisterNamespaceResponse(namespace_id=namespace_id, block_bytes=namespace.block_bytes)

        return self._call("RegisterNamespace", context, handle)

    # -- index ----------------------------------------------------------------------------------

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        def handle() -> pb.LookupResponse:
            result = self._node.lookup(wire.namespace_id_from(request.namespace_id), self._keys(request.keys))
            return pb.LookupResponse(num_hits=result.num_hits, tiers=wire.tiers_to_proto(result.tiers))

        return self._call("Lookup", context, handle)

    # -- local path -------------------------------------------------------------------------------

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveResponse:
        def handle() -> pb.ReserveResponse:
            grant = self._node.reserve(
                wire.namespace_id_from(request.namespace_id),
                self._keys(request.keys),
                wire.parent_from(request.parent),
            )
            return pb.ReserveResponse(
                reservation_id=grant.grant_id,
                block_bytes=grant.block_bytes,
                indexes=grant.indexes,
                offsets=grant.offsets,
                segment_name=self._node.segment_name,
                expires_in_s=grant.expires_in_s,
                node_hashes=grant.node_hashes,
            )

        return self._call("Reserve", context, handle)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        def handle() -> pb.CommitResponse:
            self._node.commit(request.reservation_id, list(request.checksums) or None)
            return pb.CommitResponse()

        return self._call("Commit", context, handle)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        def handle() -> pb.AbortResponse:
            self._node.abort(request.reservation_id)
            return pb.AbortResponse()

        return self._call("Abort", context, handle)

    def Acquire(self, request: pb.AcquireRequest, context: grpc.ServicerContext) -> pb.AcquireResponse:
        def handle() -> pb.AcquireResponse:
            grant = self._node.acquire(
                wire.namespace_id_from(request.namespace_id), self._keys(request.keys), verify=request.verify
            )
            return pb.AcquireResponse(
                lease_id=grant.grant_id,
                block_bytes=grant.block_bytes,
                offsets=grant.offsets,
                checksums=grant.checksums,
                segment_name=self._node.segment_name,
                expires_in_s=grant.expires_in_s,
            )

        return self._call("Acquire", context, handle)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        def handle() -> pb.ReleaseResponse:
            self._node.release(request.lease_id)
            return pb.ReleaseResponse()

        return self._call("Release", context, handle)

    def ReportLookups(
        self, request: pb.ReportLookupsRequest, context: grpc.ServicerContext
    ) -> pb.ReportLookupsResponse:
        def handle() -> pb.ReportLookupsResponse:
            self._node.count_lookups(request.lookups, request.hit_blocks, request.miss_blocks)
            return pb.ReportLookupsResponse()

        return self._call("ReportLookups", context, handle)

    def ReportReads(self, request: pb.ReportReadsRequest, context: grpc.ServicerContext) -> pb.ReportReadsResponse:
        def handle() -> pb.ReportReadsResponse:
            self._node.touch(wire.namespace_id_from(request.namespace_id), self._keys(request.keys))
            return pb.ReportReadsResponse()

        return self._call("ReportReads", context, handle)

    def ReportLoad(self, request: pb.ReportLoadRequest, context: grpc.ServicerContext) -> pb.ReportLoadResponse:
        def handle() -> pb.ReportLoadResponse:
            self._node.report_load(request.engine_id, wire.load_from_proto(request.load))
            return pb.ReportLoadResponse()

        return self._call("ReportLoad", context, handle)

    # -- between nodes ----------------------------------------------------------------------------

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> pb.FetchResponse:
        def handle() -> pb.FetchResponse:
            result = self._node.fetch(
                wire.namespace_id_from(request.namespace_id),
                self._keys(request.keys),
                wire.parent_from(request.parent),
                request.peer,
            )
            return pb.FetchResponse(
                num_fetched=result.num_fetched, num_present=result.num_present, bytes_moved=result.bytes_moved
            )

        return self._call("Fetch", context, handle)

    # -- administration ---------------------------------------------------------------------------

    def Remove(self, request: pb.RemoveRequest, context: grpc.ServicerContext) -> pb.RemoveResponse:
        def handle() -> pb.RemoveResponse:
            result = self._node.remove(wire.namespace_id_from(request.namespace_id), self._keys(request.keys))
            return pb.RemoveResponse(num_removed=result.num_removed, num_busy=result.num_busy)

        return self._call("Remove", context, handle)

    def Pin(self, request: pb.PinRequest, context: grpc.ServicerContext) -> pb.PinResponse:
        return self._call("Pin", context, lambda: self._pin(request, pinned=True))

    def Unpin(self, request: pb.PinRequest, context: grpc.ServicerContext) -> pb.PinResponse:
        return self._call("Unpin", context, lambda: self._pin(request, pinned=False))

    def _pin(self, request: pb.PinRequest, *, pinned: bool) -> pb.PinResponse:
        count = self._node.pin(wire.namespace_id_from(request.namespace_id), self._keys(request.keys), pinned)
        return pb.PinResponse(num_changed=count)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        def handle() -> pb.StatsResponse:
            stats = self._node.stats()
            lookups = self._node.lookup_counts()
            engines = self._node.engine_loads.engines()
            load = total_of(engines.values())  # as the next heartbeat will carry it
            return pb.StatsResponse(
                tiers=wire.stats_to_proto(stats),
                num_blocks=stats.num_blocks,
                num_reservations=stats.num_reservations,
                num_leases=stats.num_leases,
                num_unhashed=stats.num_unhashed,
                lookups=lookups.lookups,
                lookup_hit_blocks=lookups.hit_blocks,
                lookup_miss_blocks=lookups.miss_blocks,
                draining=self._node.is_draining,
                reporting_engines=len(engines),
                load=wire.load_to_proto(load) if load is not None else None,
            )

        return self._call("Stats", context, handle)

    def ListBlocks(self, request: pb.ListBlocksRequest, context: grpc.ServicerContext) -> pb.ListBlocksResponse:
        def handle() -> pb.ListBlocksResponse:
            if request.keys:
                infos = self._node.inspect(self._keys(request.keys))
                return pb.ListBlocksResponse(blocks=[wire.block_info_to_proto(i) for i in infos if i is not None])
            namespace_id = wire.namespace_id_from(request.namespace_id) if request.namespace_id else None
            page_size = request.page_size or DEFAULT_PAGE_SIZE
            if page_size > MAX_PAGE_SIZE:
                raise InvalidArgumentError(f"page_size {page_size} exceeds {MAX_PAGE_SIZE}")
            start = _page_start(request.page_token)
            infos_page, following = self._node.list_blocks(namespace_id, start_row=start, limit=page_size)
            return pb.ListBlocksResponse(
                blocks=[wire.block_info_to_proto(info) for info in infos_page],
                next_page_token=b"" if following is None else following.to_bytes(8, "little"),
            )

        return self._call("ListBlocks", context, handle)

    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        try:
            for event in self._node.watch(context.is_active):
                yield wire.event_to_proto(event)
        except KVStoreError as error:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, type(error).__name__),))
            context.abort(code_of(error), str(error))

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainResponse:
        return self._call("Drain", context, lambda: pb.DrainResponse(num_flushed=self._node.drain(flush=request.flush)))


def generic_handler(service: object, service_name: str = "KVStore") -> grpc.GenericRpcHandler:
    """The handlers of `service_name` (a service of kvstore.proto) calling the methods of the
    same names on `service`, decoding requests themselves: grpc answers a request its
    deserializer cannot parse with INTERNAL, but a malformed message is the caller's fault
    (INVALID_ARGUMENT), and nothing is changed by it."""
    descriptor = pb.DESCRIPTOR.services_by_name[service_name]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in descriptor.methods:
        request_class = getattr(pb, method.input_type.name)
        behaviour = getattr(service, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _decoding_stream(request_class, behaviour), response_serializer=_serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _decoding(request_class, behaviour), response_serializer=_serialize
            )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _decode(request_class: type[Message], raw: bytes, context: grpc.ServicerContext) -> Message:
    try:
        return request_class.FromString(raw)
    except DecodeError as error:
        context.set_trailing_metadata(((ERROR_METADATA_KEY, InvalidArgumentError.__name__),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_class.__name__}: {error}")


def _decoding(request_class: type[Message], behaviour: Callable[..., Any]) -> Callable[[bytes, Any], Any]:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        return behaviour(_decode(request_class, raw, context), context)

    return handle


def _decoding_stream(request_class: type[Message], behaviour: Callable[..., Any]) -> Callable[[bytes, Any], Any]:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from behaviour(_decode(request_class, raw, context), context)

    return handle


def _page_start(token: bytes) -> int:
    if not token:
        return 0
    if len(token) != 8:
        raise InvalidArgumentError("page_token is not one this node issued")
    return int.from_bytes(token, "little")
