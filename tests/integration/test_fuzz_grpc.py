"""Fuzzing the gRPC plane of a real node: requests with random fields (keys of any length,
counts above `max_keys_per_call`, namespace ids of any length, ids never issued, broken
namespaces, page tokens) and raw bytes that may not even parse. tests/fuzzing.py says what
every case checks."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from hypothesis import event, given
from hypothesis import strategies as st

from kvstore import wire
from kvstore.proto import kvstore_pb2 as pb
from kvstore.types import KEY_BYTES, DType, KVPacking
from tests.fuzzing import (
    CALL_TIMEOUT_S,
    CHAIN_BLOCKS,
    FETCH_REJECTIONS,
    FUZZ,
    GRPC,
    GRPC_METHODS,
    MAX_KEYS,
    RANDOM_KEY,
    RAW_METHODS,
    REJECTIONS,
    TEXT,
    UINT32,
    UINT64,
    Target,
    assert_serves_everyone,
    call,
    fingerprint,
    numbered_keys,
    servicer_failures,
)
from tests.nodes import TOKEN

# -- strategies: gRPC fields -----------------------------------------------------------------


def packed_keys(target: Target, *, destructive: bool) -> st.SearchStrategy[bytes]:
    """`keys` fields: any byte length, random keys, counts above the limit, and the known chain
    with junk appended or repeated past the limit. With `destructive` (Remove, Pin), never a
    well-formed run of stored keys, so an accepted call cannot touch the known chain."""
    known = b"".join(target.chain)
    malformed = [
        st.binary(max_size=100),
        st.lists(RANDOM_KEY, max_size=8).map(b"".join),
        st.integers(MAX_KEYS + 1, 20 * MAX_KEYS).map(numbered_keys),
        st.tuples(RANDOM_KEY, st.integers(MAX_KEYS + 1, 10 * MAX_KEYS)).map(lambda pair: pair[0] * pair[1]),
        st.binary(min_size=1, max_size=KEY_BYTES - 1).map(lambda junk: known + junk),
        st.integers(MAX_KEYS // CHAIN_BLOCKS + 1, 40).map(lambda times: known * times),
    ]
    if destructive:
        return st.one_of(malformed)
    known_runs = [
        st.integers(1, CHAIN_BLOCKS).map(lambda count: b"".join(target.chain[:count])),
        st.integers(2, MAX_KEYS // CHAIN_BLOCKS).map(lambda times: known * times),  # repeats, within the limit
        st.lists(RANDOM_KEY, min_size=1, max_size=4).map(lambda keys: known + b"".join(keys)),
    ]
    return st.one_of(*malformed, *known_runs)


def namespace_ids(target: Target) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(target.namespace_id), st.just(target.other_namespace_id), st.binary(max_size=40), RANDOM_KEY
    )


def parents(target: Target) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(b""), st.binary(max_size=24), st.sampled_from(target.chain))


@st.composite
def namespace_messages(draw: st.DrawFn) -> pb.RegisterNamespaceRequest:
    """A valid namespace with up to four fields broken: bad dtypes, zero or huge sizes, packing
    garbage, ranks out of range, no layout; or no namespace at all."""
    if not draw(st.integers(0, 9)):
        return pb.RegisterNamespaceRequest()
    namespace = pb.Namespace(
        model_id="tiny", dtype="float16", layout=pb.KVLayout(num_layers=2, num_kv_heads=4, head_size=64), block_tokens=4
    )
    fields = {
        "model_id": st.one_of(st.just(""), TEXT),
        "model_revision": TEXT,
        "dtype": st.one_of(st.sampled_from([d.value for d in DType] + ["", "fp16", "float16 "]), TEXT),
        "layout.num_layers": UINT32,
        "layout.num_kv_heads": UINT32,
        "layout.head_size": UINT32,
        "layout.packing": st.one_of(st.sampled_from([p.value for p in KVPacking] + ["SEPARATE"]), TEXT),
        "block_tokens": UINT32,
        "tp_rank": UINT32,
        "tp_size": UINT32,
        "tenant_salt": TEXT,
        "layout": st.none(),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        value = draw(fields[name])
        if name == "layout":
            namespace.ClearField("layout")
        elif name.startswith("layout."):
            setattr(namespace.layout, name.removeprefix("layout."), value)
        else:
            setattr(namespace, name, value)
    return pb.RegisterNamespaceRequest(namespace=namespace)


def peers(target: Target) -> st.SearchStrategy[str]:
    fixed = ["", ":", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:1", "127.0.0.1:99999", "[::1]:x", "localhost:-1"]
    return st.one_of(st.sampled_from(fixed), TEXT, st.just(target.server.data_address))


# Strategies are built once per target: hypothesis validates a new strategy object on its
# first draw, which costs more than the call it generates.
@functools.cache
def grpc_requests(target: Target, methods: tuple[str, ...]) -> st.SearchStrategy[tuple[str, Message]]:
    """(method, request) pairs for `methods`, with random and malformed fields."""
    ns, ids = namespace_ids(target), UINT64
    keys, safe_keys = packed_keys(target, destructive=False), packed_keys(target, destructive=True)
    page_tokens = st.one_of(st.just(b""), st.binary(max_size=12), UINT64.map(lambda row: row.to_bytes(8, "little")))
    requests: dict[str, st.SearchStrategy[Message]] = {
        "Lookup": st.builds(pb.LookupRequest, namespace_id=ns, keys=keys),
        "Reserve": st.builds(pb.ReserveRequest, namespace_id=ns, keys=keys, parent=parents(target)),
        "Commit": st.builds(pb.CommitRequest, reservation_id=ids, checksums=st.lists(UINT64, max_size=4)),
        "Abort": st.builds(pb.AbortRequest, reservation_id=ids),
        "Acquire": st.builds(pb.AcquireRequest, namespace_id=ns, keys=keys, verify=st.booleans()),
        "Release": st.builds(pb.ReleaseRequest, lease_id=ids),
        "Remove": st.builds(pb.RemoveRequest, namespace_id=ns, keys=safe_keys),
        "Pin": st.builds(pb.PinRequest, namespace_id=ns, keys=safe_keys),
        "Unpin": st.builds(pb.PinRequest, namespace_id=ns, keys=safe_keys),
        "ListBlocks": st.builds(
            pb.ListBlocksRequest,
            namespace_id=st.one_of(st.just(b""), ns),
            keys=st.one_of(st.just(b""), keys),
            page_size=st.one_of(st.just(0), st.integers(1, 12000), UINT32),
            page_token=page_tokens,
        ),
        "RegisterNamespace": namespace_messages(),
        "Fetch": st.builds(pb.FetchRequest, namespace_id=ns, keys=keys, parent=parents(target), peer=peers(target)),
        "ReportLookups": st.builds(pb.ReportLookupsRequest, lookups=UINT64, hit_blocks=UINT64, miss_blocks=UINT64),
        "ReportReads": st.builds(pb.ReportReadsRequest, namespace_id=ns, keys=keys),
        "ReportLoad": st.builds(
            pb.ReportLoadRequest,
            engine_id=st.text(max_size=140),
            load=st.builds(
                pb.NodeLoad,
                queued_prefill_tokens=UINT64,
                running_decodes=UINT32,
                decode_kv_tokens=UINT64,
                decode_pause_budget_s=st.floats(),
            ),
        ),
    }
    return st.one_of([requests[name].map(functools.partial(named, name)) for name in methods])


def named(method: str, request: Message) -> tuple[str, Message]:
    return method, request


def check_accepted(target: Target, method: str, request: Message, reply: Any) -> None:
    """An accepted call's reply is consistent, and what it opened is closed again."""
    count = len(getattr(request, "keys", b"")) // KEY_BYTES
    if method == "Lookup":
        assert len(reply.tiers) == reply.num_hits <= count
    elif method == "Reserve":
        assert list(reply.indexes) == sorted(set(reply.indexes)) and all(i < count for i in reply.indexes)
        assert len(reply.offsets) == len(reply.indexes)
        assert call(target, "Abort", pb.AbortRequest(reservation_id=reply.reservation_id))[0] is GRPC.OK
    elif method == "Acquire":
        assert len(reply.offsets) == len(reply.checksums) <= count
        assert call(target, "Release", pb.ReleaseRequest(lease_id=reply.lease_id))[0] is GRPC.OK
    elif method == "Remove":
        assert (reply.num_removed, reply.num_busy) == (0, 0)  # only keys never stored get this far
    elif method in ("Pin", "Unpin"):
        assert reply.num_changed == 0
    elif method == "Fetch":
        assert reply.num_fetched == 0  # the only reachable peer is the node itself
    elif method == "ListBlocks":
        stored, _ = target.server.store.manager.list_blocks(None, start_row=0, limit=10**6)
        assert {block.key for block in reply.blocks} <= {info.key for info in stored}
    elif method == "RegisterNamespace":
        assert len(reply.namespace_id) == KEY_BYTES and reply.block_bytes > 0
    elif method == "ReportLoad":
        assert target.server.node.engine_loads.engines()[request.engine_id] == wire.load_from_proto(request.load)


# -- gRPC plane ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_grpc_requests_with_random_fields_are_rejected_cleanly(target: Target, data: st.DataObject) -> None:
    method, request = data.draw(grpc_requests(target, GRPC_METHODS), label="request")
    before, failures = fingerprint(target), servicer_failures(target.server)

    code, reply = call(target, method, request)

    event(f"{method}: {code.name}")
    assert code in (FETCH_REJECTIONS if method == "Fetch" else REJECTIONS) | {GRPC.OK}, (code, reply)
    if code is GRPC.OK:
        check_accepted(target, method, request, reply)
    else:
        assert fingerprint(target) == before
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert target.client.lookup(target.namespace_id, target.chain).num_hits == CHAIN_BLOCKS


RESPONSES: dict[str, type[Message]] = {"Reserve": pb.ReserveResponse, "Acquire": pb.AcquireResponse}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` truncated, with a byte flipped, with junk inserted, or replaced by junk."""
    position = draw(st.integers(0, len(valid)))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "garbage"]))
    if how == "truncate":
        return valid[:position]
    if how == "flip" and position < len(valid):
        return valid[:position] + bytes([valid[position] ^ draw(st.integers(1, 255))]) + valid[position + 1 :]
    if how == "insert":
        return valid[:position] + draw(st.binary(min_size=1, max_size=20)) + valid[position:]
    return draw(st.binary(max_size=200))


def parses(request_class: type[Message], raw: bytes) -> bool:
    try:
        request_class.FromString(raw)
    except DecodeError:
        return False
    return True


@FUZZ
@given(data=st.data())
def test_grpc_raw_bytes_are_rejected_cleanly(target: Target, data: st.DataObject) -> None:
    valid_method, valid = data.draw(grpc_requests(target, tuple(RAW_METHODS)), label="request")
    method = data.draw(st.sampled_from([valid_method, *RAW_METHODS]), label="method")
    raw = data.draw(mutated(valid.SerializeToString()), label="raw")
    send: grpc.UnaryUnaryMultiCallable[bytes, bytes] = target.channel.unary_unary(f"/kvstore.v1.KVStore/{method}")
    before, failures = fingerprint(target), servicer_failures(target.server)

    code, reply, details = GRPC.OK, b"", None
    try:
        reply = send(raw, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()

    event(f"{method}: {code.name}")
    assert code in REJECTIONS | {GRPC.OK}, (code, details)
    if not parses(RAW_METHODS[method], raw):
        assert code is GRPC.INVALID_ARGUMENT, (code, details)
    if code is GRPC.OK and method in RESPONSES:
        check_accepted(target, method, RAW_METHODS[method].FromString(raw), RESPONSES[method].FromString(reply))
    if code is not GRPC.OK:
        assert fingerprint(target) == before
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert target.client.lookup(target.namespace_id, target.chain).num_hits == CHAIN_BLOCKS


def test_grpc_fuzzing_left_the_node_serving(target: Target) -> None:
    assert_serves_everyone(target)
    assert servicer_failures(target.server) == 0
